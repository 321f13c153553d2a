"""Hostile and broken bundles (issue 13, items 1-2): nothing is read from outside a bundle, every malformed
manifest or segment file is a one-line BundleError (the CLI exits 2, never starts serving), and the bundle
digest follows the model, not its calibration or profiles.

Each case is a copy of the real ``tiny_bundle`` with manifest.json edited (sha256 recomputed where the case
needs a matching hash)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edgeexit.bundle import Bundle, sha256_file
from edgeexit.cli import main
from edgeexit.errors import BundleError
from edgeexit.runtime.runner import SegmentRunner
from edgeexit.runtime.service import build_handlers

HOSTILE = "corrupt or hostile"


@pytest.fixture
def bundle(tiny_bundle, tmp_path) -> Path:
    """A private copy of the tiny bundle, inside ``tmp_path/in`` so ``tmp_path/out`` is outside it."""
    dst = tmp_path / "in" / "b.edgeexit"
    shutil.copytree(tiny_bundle, dst)
    (tmp_path / "out").mkdir()
    return dst


def edit(root: Path, change: Callable[[dict[str, Any]], Any]) -> Path:
    data = json.loads((root / "manifest.json").read_text())
    change(data)
    (root / "manifest.json").write_text(json.dumps(data))
    return root


def entry(data: dict[str, Any], k: int) -> dict[str, Any]:
    return data["segments"][k]["files"]["onnx"]


def point_at(root: Path, k: int, path: str, like: Path) -> None:
    """Segment k's onnx entry names ``path``, with the sha256 and size of ``like`` (so only the path is wrong)."""
    def change(d: dict[str, Any]) -> None:
        entry(d, k).update(path=path, sha256=sha256_file(like), bytes=like.stat().st_size)
    edit(root, change)


def refused(root: Path, *words: str) -> str:
    with pytest.raises(BundleError) as info:
        Bundle.load(root)
    msg = str(info.value)
    assert "\n" not in msg and len(msg) < 400, msg
    for w in words:
        assert w in msg, msg
    return msg


# --------------------------------------------------------------------------------------- item 1: outside files


def test_absolute_path_is_refused_even_with_a_matching_hash(bundle, tmp_path):
    outside = tmp_path / "out" / "seg0.onnx"
    shutil.copy(bundle / "segments" / "seg0.onnx", outside)
    point_at(bundle, 0, str(outside), outside)
    refused(bundle, "segments[0].files['onnx'].path", HOSTILE)


def test_dotdot_path_is_refused(bundle, tmp_path):
    outside = tmp_path / "out" / "seg0.onnx"
    shutil.copy(bundle / "segments" / "seg0.onnx", outside)
    point_at(bundle, 0, "segments/../../../out/seg0.onnx", outside)
    refused(bundle, "'..'", HOSTILE)


def test_symlinked_segment_file_is_refused(bundle, tmp_path):
    outside = tmp_path / "out" / "seg1.onnx"
    (bundle / "segments" / "seg1.onnx").rename(outside)
    (bundle / "segments" / "seg1.onnx").symlink_to(outside)  # same bytes: the hash alone would pass it
    refused(bundle, "segment 1", "resolves outside the bundle", HOSTILE)


def test_symlinked_segments_folder_is_refused(bundle, tmp_path):
    (bundle / "segments").rename(tmp_path / "out" / "segments")
    (bundle / "segments").symlink_to(tmp_path / "out" / "segments")
    refused(bundle, "resolves outside the bundle")
    # verify=False (tools that only read the manifest) still never hands out the outside path to open
    with pytest.raises(BundleError, match="resolves outside"):
        SegmentRunner(Bundle.load(bundle, verify=False)).session(0)


def test_outside_file_with_a_wrong_hash_is_never_opened(bundle, tmp_path):
    # A FIFO: opening it for reading blocks until a writer comes, so a loader that opens before checking
    # the path hangs here (the thread below then unblocks it and the test fails).
    fifo = tmp_path / "out" / "passwd"
    os.mkfifo(fifo)
    (bundle / "segments" / "seg2.onnx").unlink()
    (bundle / "segments" / "seg2.onnx").symlink_to(fifo)
    result: list[BaseException | None] = []

    def load() -> None:
        try:
            Bundle.load(bundle)
            result.append(None)
        except BaseException as e:  # noqa: BLE001  handed to the main thread
            result.append(e)

    t = threading.Thread(target=load, daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():
        with open(fifo, "wb"):  # let the stuck open() return, then fail
            pass
        t.join(5)
        pytest.fail("Bundle.load opened a file outside the bundle")
    assert isinstance(result[0], BundleError)
    assert "resolves outside" in str(result[0]) and "sha256" not in str(result[0])


def test_fifo_inside_the_bundle_is_not_read(bundle):
    (bundle / "segments" / "seg0.onnx").unlink()
    os.mkfifo(bundle / "segments" / "seg0.onnx")
    refused(bundle, "not a regular file")


def test_two_segments_naming_one_file_are_refused(bundle):
    seg0 = bundle / "segments" / "seg0.onnx"
    point_at(bundle, 1, "segments/seg0.onnx", seg0)
    refused(bundle, "two entries name one file", HOSTILE)


def test_two_names_linked_to_one_file_are_refused(bundle):
    seg0 = bundle / "segments" / "seg0.onnx"
    (bundle / "segments" / "alias.onnx").symlink_to("seg0.onnx")
    point_at(bundle, 1, "segments/alias.onnx", seg0)
    refused(bundle, "same file as segment 0")


def test_duplicate_keys_are_refused(bundle):
    text = (bundle / "manifest.json").read_text()
    (bundle / "manifest.json").write_text(text.replace('"onnx": {', '"onnx": {"path": "x"}, "onnx": {', 1))
    refused(bundle, "'onnx'", "appears twice")


# --------------------------------------------------------------------------------------- item 2: wrong shapes


def test_segment_file_that_is_not_onnx_but_matches_its_hash(bundle):
    bad = bundle / "segments" / "seg1.onnx"
    bad.write_bytes(b"#!/bin/sh\necho not a model\n")
    point_at(bundle, 1, "segments/seg1.onnx", bad)
    b = Bundle.load(bundle)  # the hash matches: only opening it tells
    with pytest.raises(BundleError, match="seg1.onnx is not a loadable ONNX model") as info:
        build_handlers(b)
    assert "\n" not in str(info.value) and "re-export" in str(info.value)


def test_segment_pointing_at_another_segments_graph(bundle):
    # A distinct copy of segment 0's file given as segment 1: it loads, but reads 'input', not 'boundary0'.
    copy = bundle / "segments" / "copy.onnx"
    shutil.copy(bundle / "segments" / "seg0.onnx", copy)
    point_at(bundle, 1, "segments/copy.onnx", copy)
    runner = SegmentRunner(Bundle.load(bundle))
    runner.session(0)
    with pytest.raises(BundleError, match=r"copy.onnx has inputs \['input'\] but the manifest says \['boundary0'\]"):
        runner.session(1)


def test_session_output_shape_must_match_the_manifest(bundle):
    edit(bundle, lambda d: d["segments"][1]["outputs"][0]["shape"].__setitem__(1, 17))
    edit(bundle, lambda d: d["segments"][2]["inputs"][0]["shape"].__setitem__(1, 17))
    edit(bundle, lambda d: d["split_points"][1]["tensor"]["shape"].__setitem__(1, 17))
    with pytest.raises(BundleError, match=r"output 'boundary1' is float32 \[None, 16, 14, 14\] but the manifest"):
        SegmentRunner(Bundle.load(bundle)).session(1)


Q = ("split_points", 0, "quantization")


@pytest.mark.parametrize(("where", "value", "words"), [
    (("segments", 2, "files"), lambda d: [entry(d, 2)], ["segments[2].files must be an object mapping format -> file"]),
    (("input", "shape", 2), "sixteen", ["input.shape[2] must be a positive integer", "'sixteen'"]),
    (("segments", 1, "outputs", 0, "shape", 3), "14", ["segments[1].outputs[0].shape[3]"]),
    (("segments", 0, "inputs", 0, "shape", 1), -1, ["must be a positive integer"]),
    (Q, "int8", ["split_points[0].quantization must be an object"]),
    ((*Q, "scale"), "0.01", ["quantization.scale must be a finite"]),
    ((*Q, "scale"), 0.0, ["quantization.scale", "> 0"]),
    ((*Q, "scale"), True, ["quantization.scale"]),
    ((*Q, "scale"), 1e400, ["quantization.scale"]),
    ((*Q, "zero_point"), 200, ["zero_point must be an integer in [-128, 127]"]),
    ((*Q, "zero_point"), 3.5, ["zero_point"]),
    (("name",), 7, ["name must be a non-empty string"]),
    (("exits", 0, "num_classes"), "10", ["exits[0].num_classes"]),
    (("exits", 0, "num_classes"), 11, ["exits[0].num_classes is 11"]),
    (("exits", 1, "segment"), 0, ["exits[1]"]),
    (("segments", 0, "exits"), ["0"], ["segments[0].exits[0]"]),
    (("segments", 0, "outputs", 0, "dtype"), "complex128", ["dtype must be one of"]),
    (("segments", 0, "files", "onnx", "sha256"), 12, ["sha256 must be 64 lowercase hex"]),
    (("policy",), "confidence", ["policy must be an object", "edgeexit calibrate"]),
    (("policy",), {"kind": "confidence", "thresholds": ["high"]}, ["policy.thresholds[0]"]),
    (("profiles",), {"device": {"backend": "onnxruntime", "threads": "1"}}, ["profiles['device'].threads",
                                                                             "edgeexit profile"]),
    (("split_points", 1, "tensor", "shape", 1), 15, ["split_points[1].tensor differs"]),
    (("input", "normalization"), {"mean": [0.5], "std": [0.0]}, ["normalization.std[0]"]),
])
def test_malformed_manifests_are_one_line_bundle_errors(bundle, where, value, words):
    def change(d: dict[str, Any]) -> None:
        node = d
        for key in where[:-1]:
            node = node[key]
        node[where[-1]] = value(d) if callable(value) else value

    edit(bundle, change)
    msg = refused(bundle, "manifest.json is malformed", *words)
    assert "re-" in msg  # says what to do


def test_deeply_nested_json_is_a_bundle_error(bundle):
    text = (bundle / "manifest.json").read_text()
    deep = "[" * 100_000 + "]" * 100_000  # RecursionError inside json
    (bundle / "manifest.json").write_text(text.rstrip()[:-1] + f', "deep": {deep}}}')
    refused(bundle, "nests deeper")
    (bundle / "manifest.json").write_text(text)
    edit(bundle, lambda d: d.__setitem__("export", json.loads("[" * 40 + "]" * 40)))  # json reads it; we don't
    refused(bundle, "nests deeper than 32")


def test_huge_numbers_and_garbage_are_bundle_errors(bundle):
    (bundle / "manifest.json").write_text('{"schema": "edgeexit.bundle/1", "name": ' + "9" * 5000 + "}")
    refused(bundle, "not valid JSON")
    (bundle / "manifest.json").write_bytes(b'{"name": "\xff"}')
    refused(bundle, "not UTF-8")


# --------------------------------------------------------------------------------------- CLI: exit 2, one line


def test_evaluate_on_a_malformed_bundle_exits_2(bundle, capsys):
    edit(bundle, lambda d: d["input"]["shape"].__setitem__(2, "sixteen"))
    assert main(["evaluate", str(bundle), "--data", "digits", "--limit", "8", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("edgeexit evaluate: error: manifest.json is malformed: input.shape[2]") and "\n" not in err


def test_cli_prints_any_edgeexit_error_on_one_bounded_line(monkeypatch, capsys):
    import edgeexit.cli.plan as plan

    def boom(args: Any) -> int:
        raise BundleError("first line\n  second line\n" + "x" * 5000)

    monkeypatch.setattr(plan, "run", boom)
    assert main(["plan", "some.edgeexit"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("edgeexit plan: error: first line / second line / xxx") and err.count("\n") == 1
    assert len(err) < 2100 and "Traceback" not in err


def _symlinked_file(b: Path) -> None:
    outside = b.parent.parent / "out" / "seg1.onnx"
    (b / "segments" / "seg1.onnx").rename(outside)
    (b / "segments" / "seg1.onnx").symlink_to(outside)


def _not_onnx(b: Path) -> None:
    bad = b / "segments" / "seg2.onnx"
    bad.write_bytes(b"PK\x03\x04 not a model")
    point_at(b, 2, "segments/seg2.onnx", bad)


def _string_quantization(b: Path) -> None:
    edit(b, lambda d: d["split_points"][0].__setitem__("quantization", "int8"))


@pytest.mark.slow
@pytest.mark.parametrize("command", [["serve", "--port", "0"], ["agent", "--listen", "127.0.0.1:0"]])
@pytest.mark.parametrize(("case", "words"), [(_symlinked_file, "resolves outside the bundle"),
                                             (_not_onnx, "is not a loadable ONNX model"),
                                             (_string_quantization, "quantization must be an object")])
def test_serve_and_agent_processes_refuse_hostile_bundles(bundle, command, case, words):
    case(bundle)
    done = subprocess.run([sys.executable, "-m", "edgeexit", command[0], str(bundle), *command[1:]],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    # stderr: the service's JSON log lines (e.g. the agent's "start" event), then the error, on one line
    plain = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("{")]
    assert len(plain) == 1 and plain[0].startswith(f"edgeexit {command[0]}: error:") and words in plain[0], plain
    assert "ready on" not in done.stdout and "Traceback" not in done.stderr


# --------------------------------------------------------------------------------------- the model digest


def test_digest_follows_the_model_not_its_calibration_or_profiles(bundle):
    b = Bundle.load(bundle)
    before = b.digest
    assert len(before) == 64 and before == b.manifest.model_digest()
    b.manifest.policy = {"kind": "confidence", "thresholds": [0.5, 0.7], "candidates": []}
    b.manifest.profiles["device"] = {"backend": "onnxruntime", "threads": 1, "segment_ms": {"1": [1.0, 2.0, 3.0]}}
    b.save()
    assert Bundle.load(bundle).digest == before  # re-calibrating / re-profiling keeps the identity

    b.manifest.split_points[0].quantization = {"scale": 0.5, "zero_point": 0}
    assert b.manifest.model_digest() != before  # the int8 wire parameters decide answers

    seg = bundle / "segments" / "seg2.onnx"
    seg.write_bytes(seg.read_bytes() + b"\0")  # a changed segment file (re-hashed, so it loads)
    point_at(bundle, 2, "segments/seg2.onnx", seg)
    assert Bundle.load(bundle).digest != before
