"""`edgeexit calibrate` and `edgeexit evaluate` end to end on a real exported bundle and real Fashion-MNIST."""

import json
import shutil
import subprocess
import sys

import pytest

from edgeexit.bundle import Bundle
from edgeexit.cli import main
from edgeexit.policies import policy_from_manifest


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    """calibrate writes the manifest: never touch the session-wide bundle other areas share."""
    return shutil.copytree(tiny_bundle, tmp_path / "tiny.edgeexit")


def _cli(*argv):
    return main([str(a) for a in argv])


@pytest.mark.parametrize("split", ["test", "train"])
def test_calibrate_refuses_test_and_train_splits(bundle_copy, split, capsys):
    before = (bundle_copy / "manifest.json").read_text()
    assert _cli("calibrate", bundle_copy, "--split", split, "--no-progress") == 2
    err = capsys.readouterr().err
    assert f"refusing to calibrate on the '{split}' split" in err and "--split val" in err
    assert "Traceback" not in err
    assert (bundle_copy / "manifest.json").read_text() == before  # nothing written


def test_calibrate_writes_policy_and_evaluate_runs_it(bundle_copy, tmp_path, capsys):
    rc = _cli("calibrate", bundle_copy, "--data", "fashion-mnist", "--split", "val", "--policy", "margin",
              "--epsilon", "0.6", "--delta", "0.1", "--limit", "400", "--no-progress")
    out = capsys.readouterr().out
    assert rc == 0 and "passes fixed-sequence testing" in out
    m = Bundle.load(bundle_copy).manifest
    p = m.policy
    assert p["kind"] == "margin" and p["epsilon"] == 0.6 and p["delta"] == 0.1 and p["mode"] == "consistency"
    assert p["calibration"] == {"split": "val", "n": 400, "dataset": "fashion-mnist"}
    assert len(p["exit_stats"]) == 3 and all("cumulative_flops" in s for s in p["exit_stats"])
    assert p["exit_stats"][2]["cumulative_flops"] == m.exits[2].cumulative_flops > 0
    assert any(c["valid"] for c in p["candidates"]) and len(p["thresholds"]) == 2
    assert policy_from_manifest(m).kind == "margin"

    out_dir = tmp_path / "eval"
    rc = _cli("evaluate", bundle_copy, "--split", "test", "--limit", "300", "--sweep", "--out", out_dir,
              "--no-progress")
    out = capsys.readouterr().out
    assert rc == 0
    assert "Policy margin" in out and "vs final exit alone" in out and "measured time relative" in out
    for name in ("sweep.png", "sweep.json", "sweep.md", "evaluate.json"):
        assert (out_dir / name).stat().st_size > 0
    assert (out_dir / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rep = json.loads((out_dir / "evaluate.json").read_text())
    pol = rep["policy"]
    assert rep["n"] == 300 and 0 < pol["relative_flops"] <= 1.0 and pol["relative_time"] > 0
    assert sum(r["exit_rate"] for r in pol["rows"]) == pytest.approx(1.0)
    sweeps = json.loads((out_dir / "sweep.json").read_text())["sweeps"]
    assert set(sweeps) == {"confidence", "entropy", "margin", "patience", "ensemble"}
    # the most aggressive confidence setting (tau = 0) exits everything at exit 0
    assert sweeps["confidence"][-1]["relative_flops"] == pytest.approx(rep["exits"][0]["relative_flops"])


def test_calibration_that_cannot_pass_falls_back_explicitly(bundle_copy, capsys):
    rc = _cli("calibrate", bundle_copy, "--split", "val", "--limit", "200", "--epsilon", "0.01", "--no-progress")
    cap = capsys.readouterr()
    assert rc == 0 and "falling back to NEVER exiting early" in cap.err
    m = Bundle.load(bundle_copy).manifest
    assert m.policy["kind"] == "never" and m.policy["requested_kind"] == "confidence"
    assert policy_from_manifest(m).kind == "never"


def test_evaluate_no_policy_and_user_errors(bundle_copy, capsys):
    assert _cli("evaluate", bundle_copy, "--no-policy", "--limit", "200", "--no-progress") == 0
    out = capsys.readouterr().out
    assert "Every exit on every sample" in out and "Policy" not in out
    assert out.count("%") >= 3  # one accuracy per exit
    assert _cli("evaluate", bundle_copy, "--sweep", "--limit", "50") == 2
    assert "--out" in capsys.readouterr().err
    assert _cli("evaluate", bundle_copy, "--policy", "entropy", "--limit", "50") == 2
    assert "edgeexit calibrate BUNDLE --policy entropy" in capsys.readouterr().err


def test_evaluate_uncalibrated_says_it_runs_to_the_final_exit(bundle_copy, capsys):
    assert _cli("evaluate", bundle_copy, "--limit", "100", "--no-progress") == 0
    out = capsys.readouterr().out
    assert "no calibrated policy" in out and "Policy never" in out
    assert "relative compute (FLOPs) 1.000" in out  # never exiting costs the full model


def test_cli_subprocess_exits_nonzero_without_traceback(bundle_copy):
    r = subprocess.run([sys.executable, "-m", "edgeexit", "calibrate", str(bundle_copy), "--split", "test"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "refusing" in r.stderr
