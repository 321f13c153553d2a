"""The LiteRT backend alone: it imports and runs with torch and TensorFlow absent, orders outputs like ONNX,
and turns bad files into BundleErrors. The model file is made once with litert-torch in this process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from edgeexit.errors import BundleError, ConfigError
from edgeexit.runtime.backends import open_session
from edgeexit.runtime.litert_backend import LiteRTSession, default_output_order

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_tflite(tmp_path_factory) -> tuple[Path, np.ndarray, list[np.ndarray]]:
    """A segment-shaped TFLite file (input -> boundary0, exit0) plus one input and torch's outputs for it."""
    torch = pytest.importorskip("torch")
    from edgeexit.exporters.tflite import SegmentNames, export_tflite_segment

    torch.manual_seed(0)

    class Seg(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 4, 3, stride=2, padding=1)
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x):
            b = torch.relu(self.conv(x))
            return b, self.fc(b.mean(dim=(2, 3)))

    seg = Seg().eval()
    out = tmp_path_factory.mktemp("litert")
    res = export_tflite_segment(seg, torch.zeros(2, 1, 8, 8), out, "tiny", ["tflite"],
                                names=SegmentNames("input", ("boundary0", "exit0")))
    x = np.random.default_rng(0).random((3, 1, 8, 8), dtype=np.float32)
    with torch.no_grad():
        ref = [t.numpy() for t in seg(torch.from_numpy(x))]
    return out / res["tflite"]["file"], x, ref


def test_runs_without_torch_or_tensorflow(tiny_tflite, tmp_path):
    path, x, ref = tiny_tflite
    np.save(tmp_path / "x.npy", x)
    script = textwrap.dedent(f"""
        import importlib.abc, json, sys
        import numpy as np

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in ("torch", "tensorflow"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        from edgeexit.runtime.backends import open_session
        sess = open_session({str(path)!r}, "litert", threads=1)
        outs = sess.run({{"input": np.load({str(tmp_path / "x.npy")!r})}})
        print(json.dumps({{"names": sess.output_names, "exit0": outs[1].tolist(),
                          "torch": "torch" in sys.modules, "tf": "tensorflow" in sys.modules}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["names"] == ["boundary0", "exit0"]
    assert not got["torch"] and not got["tf"]
    assert np.abs(np.asarray(got["exit0"], np.float32) - ref[1]).max() < 1e-5


def test_batch_changes_resize_and_match_torch(tiny_tflite):
    path, x, ref = tiny_tflite
    sess = open_session(path, "litert", threads=2)
    assert sess.dynamic_batch
    for n in (3, 1, 3):  # grow, shrink, grow again: every resize reallocates correctly
        b, e0 = sess.run({"input": x[:n]})
        assert b.shape == ref[0][:n].shape
        assert np.abs(e0 - ref[1][:n]).max() < 1e-5


def test_unknown_backend_is_a_config_error(tiny_tflite):
    with pytest.raises(ConfigError, match="litert"):
        open_session(tiny_tflite[0], "tensorrt")


def test_missing_or_corrupt_file_is_a_bundle_error(tmp_path):
    with pytest.raises(BundleError, match="missing"):
        LiteRTSession(tmp_path / "nope.tflite")
    (tmp_path / "junk.tflite").write_bytes(b"not a flatbuffer")
    with pytest.raises(BundleError, match="re-export"):
        LiteRTSession(tmp_path / "junk.tflite")


def test_manifest_output_list_must_match_the_file(tiny_tflite):
    with pytest.raises(BundleError, match="re-export"):
        LiteRTSession(tiny_tflite[0], extra={"outputs": ["boundary0", "exit7"]})


def test_default_output_order_is_numeric_boundary_first():
    assert default_output_order(["exit10", "exit2", "boundary3"]) == ["boundary3", "exit2", "exit10"]
    assert default_output_order(["output_10", "output_2"]) == ["output_2", "output_10"]
