"""Bundle loading refuses anything partial, corrupted, foreign or inconsistent, with a message saying why."""

import json
import shutil
from pathlib import Path

import pytest

from edgeexit.bundle import (
    Bundle,
    ExitInfo,
    InputSpec,
    Manifest,
    Segment,
    SplitPoint,
    TensorSpec,
    file_entry,
    write_manifest,
)
from edgeexit.errors import BundleError


def _hand_made(root: Path) -> Path:
    """A structurally valid two-segment bundle whose segment files are placeholders (loading never runs them)."""
    (root / "segments").mkdir(parents=True)
    for k in range(2):
        (root / "segments" / f"seg{k}.onnx").write_bytes(f"segment {k}".encode())
    b0 = TensorSpec("boundary0", ["batch", 8, 14, 14])
    manifest = Manifest(
        name="toy",
        input=InputSpec("input", ["batch", 1, 28, 28]),
        segments=[
            Segment(0, {"onnx": file_entry(root, "segments/seg0.onnx")}, [TensorSpec("input", ["batch", 1, 28, 28])],
                    [b0, TensorSpec("exit0", ["batch", 10])], [0]),
            Segment(1, {"onnx": file_entry(root, "segments/seg1.onnx")}, [b0],
                    [TensorSpec("exit1", ["batch", 10])], [1]),
        ],
        split_points=[SplitPoint(0, b0, {"fp32": 8 * 14 * 14 * 4})],
        exits=[ExitInfo(0, 0, "exit0", 10), ExitInfo(1, 1, "exit1", 10)],
    )
    write_manifest(root, manifest)
    return root


@pytest.fixture
def toy(tmp_path):
    return _hand_made(tmp_path / "toy.edgeexit")


def test_loads_and_round_trips(toy):
    b = Bundle.load(toy)
    assert b.name == "toy" and b.formats == ["onnx"] and b.manifest.num_classes == 10
    assert b.manifest.split_points[0].tensor.sample_elements() == 8 * 14 * 14
    b.manifest.policy = {"kind": "confidence", "thresholds": [0.9]}
    b.save()
    assert Bundle.load(toy).manifest.policy == {"kind": "confidence", "thresholds": [0.9]}
    assert not (toy / "manifest.json.tmp").exists()


def test_missing_directory(tmp_path):
    with pytest.raises(BundleError, match="edgeexit export"):
        Bundle.load(tmp_path / "nope.edgeexit")


def test_foreign_directory(tmp_path):
    with pytest.raises(BundleError, match="no manifest.json"):
        Bundle.load(tmp_path)


def test_corrupted_segment_fails_checksum(toy):
    (toy / "segments" / "seg1.onnx").write_bytes(b"tampered")
    with pytest.raises(BundleError, match="sha256.*re-export"):
        Bundle.load(toy)
    Bundle.load(toy, verify=False)  # structure alone is still fine


def test_missing_segment_file(toy):
    (toy / "segments" / "seg0.onnx").unlink()
    with pytest.raises(BundleError, match="missing"):
        Bundle.load(toy)


def test_unknown_schema(toy):
    data = json.loads((toy / "manifest.json").read_text())
    data["schema"] = "edgeexit.bundle/99"
    (toy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="unknown bundle schema"):
        Bundle.load(toy)


def test_truncated_manifest(toy):
    text = (toy / "manifest.json").read_text()
    (toy / "manifest.json").write_text(text[: len(text) // 2])
    with pytest.raises(BundleError, match="not valid JSON"):
        Bundle.load(toy)


def test_manifest_missing_key(toy):
    data = json.loads((toy / "manifest.json").read_text())
    del data["segments"][0]["inputs"]
    (toy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="malformed"):
        Bundle.load(toy)


def test_inconsistent_chain(toy):
    data = json.loads((toy / "manifest.json").read_text())
    data["segments"][1]["inputs"][0]["name"] = "boundary7"
    (toy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="must read only 'boundary0'"):
        Bundle.load(toy)


def test_format_not_exported(toy):
    with pytest.raises(BundleError, match="--formats tflite"):
        Bundle.load(toy).segment_path(0, "tflite")


def test_copy_is_still_valid(toy, tmp_path):
    copy = shutil.copytree(toy, tmp_path / "copy.edgeexit")
    assert Bundle.load(copy).name == "toy"
