"""`edgeexit info BUNDLE [--json]`: what a bundle holds, checked against the bundle itself; a corrupt bundle is
one BundleError line and exit 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from edgeexit.bundle import Bundle
from edgeexit.bundle_info import INFO_SCHEMA
from edgeexit.cli import main

CAMERA = Path(__file__).resolve().parents[1] / "artifacts" / "camera_resnet.edgeexit"
TOP_KEYS = {"info_schema", "path", "name", "digest", "schema", "verified", "input", "formats", "segments",
            "split_points", "exits", "policy", "profiles", "export"}


def info_json(bundle: Path, capsys, *extra: str) -> dict:
    assert main(["info", str(bundle), "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_describes_the_tiny_bundle(tiny_bundle, capsys):
    info = info_json(tiny_bundle, capsys)
    b = Bundle.load(tiny_bundle)
    m = b.manifest
    assert set(info) == TOP_KEYS and info["info_schema"] == INFO_SCHEMA  # consumers rely on these keys
    assert info["name"] == m.name and info["digest"] == b.digest and info["verified"] is True
    assert info["input"]["shape"] == m.input.shape and info["formats"] == b.formats
    assert len(info["segments"]) == len(m.segments) == 3
    for seg, s in zip(info["segments"], m.segments, strict=True):
        assert seg["exits"] == s.exits and seg["flops"] == s.flops > 0
        for fmt, f in seg["files"].items():
            assert f["bytes"] == b.file_path(s.index, fmt).stat().st_size > 0
    assert [p["int8_calibrated"] for p in info["split_points"]] == [True, True]  # the fixture calibrates int8
    assert info["split_points"][0]["bytes_per_sample"]["int8"] * 4 == info["split_points"][0]["bytes_per_sample"][
        "fp32"]
    assert [e["num_classes"] for e in info["exits"]] == [10, 10, 10]
    assert info["profiles"] == {}


def test_text_is_aligned_and_names_what_matters(tiny_bundle, capsys):
    assert main(["info", str(tiny_bundle)]) == 0
    out = capsys.readouterr().out
    b = Bundle.load(tiny_bundle)
    assert out.splitlines()[0].startswith(b.name) and b.digest in out
    assert "calibrated (scale" in out and "none (measure with `edgeexit profile`)" in out
    rows = out.split("\nexits\n")[1].split("\n\n")[0].splitlines()
    col = rows[0].index("classes")
    assert len(rows) == 1 + 3 and all(r[col:col + 3] == "10 " for r in rows[1:])  # columns line up


@pytest.mark.skipif(not CAMERA.is_dir(), reason="artifacts/camera_resnet.edgeexit not built")
def test_calibrated_and_profiled_bundle_shows_policy_and_profiles(capsys):
    info = info_json(CAMERA, capsys)
    m = Bundle.load(CAMERA, verify=False).manifest
    assert info["policy"]["kind"] == m.policy["kind"]
    assert info["policy"]["thresholds"] == m.policy["thresholds"]
    assert [e["threshold"] for e in info["exits"][:-1]] == m.policy["thresholds"] and info["exits"][-1][
        "threshold"] is None
    assert sum(e["exit_rate"] for e in info["exits"]) == pytest.approx(1.0, abs=1e-3)
    assert set(info["profiles"]) == set(m.profiles) == {"device", "cloud"}
    assert info["profiles"]["device"]["backend"] == m.profiles["device"]["backend"]
    assert main(["info", str(CAMERA)]) == 0
    out = capsys.readouterr().out
    assert f"policy    {m.policy['kind']}" in out and "device: " in out and "cloud: " in out


def test_a_corrupt_bundle_is_one_line_and_exit_2(tiny_bundle, tmp_path, capsys):
    broken = tmp_path / "broken.edgeexit"
    shutil.copytree(tiny_bundle, broken)
    seg = Bundle.load(broken, verify=False).file_path(1, "onnx")
    seg.write_bytes(seg.read_bytes()[:-1] + b"\0")
    assert main(["info", str(broken)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("edgeexit info: error:") and "sha256" in err and "\n" not in err
    assert info_json(broken, capsys, "--no-verify")["verified"] is False  # the manifest alone still reads
    (broken / "manifest.json").write_text("{not json")
    assert main(["info", str(broken)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("edgeexit info: error:") and "\n" not in err
