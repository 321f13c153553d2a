"""Merged sessions (runtime/merge.py): a range of segments run as one onnxruntime session gives the answers the
segments give one by one, for every exit, every tail and every prefix, at batch 1 and 7; without the onnx
package (or when a range cannot be merged) the runner chains the segments instead, with the same answers.

Bundles: ``tiny_bundle`` (the fixtures' residual CNN), the camera model's bundle (``artifacts/``, when built) and,
marked slow, the reference resnet-exits (``trained_resnet_pt2``) exported for real.
"""

from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from edgeexit.errors import BundleError, InvalidTensor
from edgeexit.runtime import merge
from edgeexit.runtime.runner import SegmentRunner

CAMERA = Path(__file__).resolve().parents[1] / "artifacts" / "camera_resnet.edgeexit"
# Merging lets onnxruntime fuse across the cuts, which may round differently: float32 noise, nothing more.
RTOL, ATOL = 1e-4, 1e-5


def _bundles() -> list:
    camera = pytest.param(CAMERA, marks=pytest.mark.skipif(not CAMERA.is_dir(),
                                                            reason="artifacts/camera_resnet.edgeexit not built"))
    return ["tiny", camera]


@pytest.fixture(params=_bundles(), ids=["tiny", "camera"])
def bundle(request, tiny_bundle) -> Path:
    return Path(tiny_bundle) if request.param == "tiny" else request.param


def _input(runner: SegmentRunner, batch: int, seed: int = 0) -> np.ndarray:
    shape = runner.manifest.input.shape[1:]
    return np.random.default_rng(seed).random((batch, *shape), dtype=np.float32)


def _chained(runner: SegmentRunner, x: np.ndarray, start: int, stop: int):
    """The segments' own sessions one by one: the reference."""
    exits: dict[int, np.ndarray] = {}
    for k in range(start, stop):
        out = runner.run_segment(k, x)
        exits.update(out.exits)
        x = out.boundary
    return x, exits


def _same(a, b) -> None:
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("batch", [1, 7])
def test_merged_equals_chained_for_every_exit(bundle: Path, batch: int) -> None:
    merged, plain = SegmentRunner(bundle), SegmentRunner(bundle, merge=False)
    x = merged.normalize(_input(merged, batch))
    got, want = merged.run_all(x), plain.run_all(x)
    assert len(got) == len(merged.manifest.exits) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.shape == (batch, w.shape[1])
        _same(g, w)
    assert merged._ranges[(0, merged.num_segments)] is not None, "run_all should have used a merged session"
    assert not plain._ranges, "merge=False must never build one"
    _, exits = _chained(merged, x, 0, merged.num_segments)
    for j, g in enumerate(got):
        _same(g, exits[j])


@pytest.mark.parametrize("batch", [1, 7])
def test_every_tail_and_prefix(bundle: Path, batch: int) -> None:
    runner = SegmentRunner(bundle)
    n = runner.num_segments
    x = runner.normalize(_input(runner, batch, seed=1))
    boundaries = [x]
    for k in range(n - 1):
        boundaries.append(runner.run_segment(k, boundaries[-1]).boundary)
    for start in range(n):  # the cloud's tails start..end (start 0: the whole model)
        out = runner.run(boundaries[start], start)
        _, want = _chained(runner, boundaries[start], start, n)
        assert out.boundary is None and sorted(out.exits) == sorted(want)
        for j in want:
            _same(out.exits[j], want[j])
    for stop in range(2, n):  # a device prefix 0..stop-1 hands on its boundary
        out = runner.run(x, 0, stop)
        cur, want = _chained(runner, x, 0, stop)
        _same(out.boundary, cur)
        assert sorted(out.exits) == sorted(want)
        for j in want:
            _same(out.exits[j], want[j])
    assert all(step is not None for step in runner._ranges.values())


def test_batched_equals_per_sample_through_merged(tiny_bundle) -> None:
    runner = SegmentRunner(tiny_bundle)
    x = runner.normalize(_input(runner, 7, seed=2))
    whole = runner.run_all(x)
    for i in range(7):
        for j, logits in enumerate(runner.run_all(x[i:i + 1])):
            _same(logits[0], whole[j][i])


def test_without_onnx_the_segments_are_chained(tiny_bundle, monkeypatch, caplog) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` raises ImportError, as on a LiteRT-only device
    want = SegmentRunner(tiny_bundle, merge=False)
    runner = SegmentRunner(tiny_bundle)
    x = runner.normalize(_input(runner, 7))
    with caplog.at_level(logging.INFO, logger="edgeexit.runtime.runner"):
        got = runner.run_all(x)
    assert runner.merge is False and runner._ranges == {(0, runner.num_segments): None}
    assert "merge_unavailable" in caplog.text
    for g, w in zip(got, want.run_all(x), strict=True):
        np.testing.assert_array_equal(g, w)  # the very same sessions' answers
    tail = runner.run(runner.run_segment(0, x).boundary, 1)
    assert tail.boundary is None and set(tail.exits) == {j for s in runner.manifest.segments[1:] for j in s.exits}


def test_a_range_that_cannot_merge_falls_back_with_a_warning(tiny_bundle, monkeypatch, caplog) -> None:
    def refuse(*_args, **_kw):
        raise BundleError("segments use different versions of opset 'ai.onnx' (17 and 18)")

    monkeypatch.setattr(merge, "merge_range", refuse)
    runner = SegmentRunner(tiny_bundle)
    x = runner.normalize(_input(runner, 3))
    with caplog.at_level(logging.WARNING, logger="edgeexit.runtime.runner"):
        got = runner.run_all(x)
        runner.run_all(x)
    assert caplog.text.count("cannot merge segments 0..2") == 1, caplog.text  # said once, then remembered
    assert runner.merge is True and runner._ranges[(0, 3)] is None
    for g, w in zip(got, SegmentRunner(tiny_bundle, merge=False).run_all(x), strict=True):
        np.testing.assert_array_equal(g, w)


def test_merged_model_keeps_the_bundle_names(tiny_bundle) -> None:
    import onnx

    from edgeexit.bundle import Bundle

    b = Bundle.load(tiny_bundle)
    n = len(b.manifest.segments)
    model = onnx.load_model_from_string(merge.merge_range(b, 1, n))
    assert [i.name for i in model.graph.input] == ["boundary0"]
    assert [o.name for o in model.graph.output] == [f"exit{j}" for s in b.manifest.segments[1:] for j in s.exits]
    prefix = onnx.load_model_from_string(merge.merge_range(b, 0, 2))
    assert [o.name for o in prefix.graph.output] == ["boundary1", "exit0", "exit1"]
    with pytest.raises(BundleError, match="outside"):
        merge.merge_range(b, 2, 2)


def test_the_input_is_still_checked_on_the_merged_path(tiny_bundle) -> None:
    runner = SegmentRunner(tiny_bundle)
    x = _input(runner, 2)
    with pytest.raises(InvalidTensor, match="dtype float64"):
        runner.run_all(x.astype(np.float64))
    with pytest.raises(InvalidTensor, match="shape"):
        runner.run(x[:, :, :14], 0, 3)
    with pytest.raises(InvalidTensor, match="shape"):
        runner.run(x, 1)  # the tail wants boundary0, not the input
    assert runner.run_all(runner.normalize(x))[0].shape == (2, 10)


def test_litert_runner_never_merges(tiny_bundle) -> None:
    assert SegmentRunner(tiny_bundle, backend="litert").merge is False


def test_prepare_then_concurrent_runs_share_one_merged_session(tiny_bundle, caplog) -> None:
    runner = SegmentRunner(tiny_bundle)
    with caplog.at_level(logging.INFO, logger="edgeexit.runtime.runner"):
        runner.prepare(1)
        x = runner.normalize(_input(runner, 5))
        boundary = runner.run_segment(0, x).boundary
        want = runner.run(boundary, 1).exits
        errors: list[BaseException] = []

        def work() -> None:
            try:
                for _ in range(20):
                    got = runner.run(boundary, 1).exits
                    for j in want:
                        np.testing.assert_array_equal(got[j], want[j])
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors[0]
    assert caplog.text.count("merged_session") == 1, caplog.text
    assert list(runner._ranges) == [(1, runner.num_segments)]


@pytest.mark.slow
def test_reference_resnet_exits_merged_equals_chained(trained_resnet_pt2, tmp_path) -> None:
    from tests.fixtures_bundles import make_bundle

    bundle = make_bundle(tmp_path, trained_resnet_pt2, name="resnet_exits")
    merged, plain = SegmentRunner(bundle), SegmentRunner(bundle, merge=False)
    for batch in (1, 7):
        x = merged.normalize(_input(merged, batch))
        for g, w in zip(merged.run_all(x), plain.run_all(x), strict=True):
            _same(g, w)
        n = merged.num_segments
        boundary = merged.run(x, 0, 1).boundary
        for start in range(1, n):
            got, want = merged.run(boundary, start).exits, plain.run(boundary, start).exits
            assert sorted(got) == sorted(want)
            for j in want:
                _same(got[j], want[j])
            boundary = merged.run_segment(start, boundary).boundary


def test_a_file_lying_about_an_inner_boundary_is_refused_on_the_merged_path(tiny_bundle, tmp_path) -> None:
    """The merged session's own check sees only the range's ends: each file is still checked against the
    manifest (here boundary1, inside the range 0..2, is 16 channels but the manifest says 17)."""
    import json
    import shutil

    from edgeexit.bundle import Bundle

    root = tmp_path / "lying.edgeexit"
    shutil.copytree(tiny_bundle, root)
    data = json.loads((root / "manifest.json").read_text())
    data["segments"][1]["outputs"][0]["shape"][1] = 17
    data["segments"][2]["inputs"][0]["shape"][1] = 17
    data["split_points"][1]["tensor"]["shape"][1] = 17
    (root / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match=r"output 'boundary1' is float32 \[None, 16, 14, 14\] but the manifest"):
        merge.merge_range(Bundle.load(root), 0, 3)
    runner = SegmentRunner(root)
    with pytest.raises(BundleError, match="boundary1"):
        runner.run_all(runner.normalize(_input(runner, 1)))
