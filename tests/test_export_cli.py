"""`edgeexit export` as a user runs it: real subprocesses, exit codes, no tracebacks for user errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edgeexit.bundle import Bundle
from tests.fixtures_bundles import TinySequential, seeded

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgeexit", "export", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_help_lists_every_option():
    r = _cli("--help", timeout=60)
    assert r.returncode == 0
    for flag in ("--out", "--input-shape", "--split-points", "--opset", "--formats", "--quantize",
                 "--calibration-data", "--model", "--weights", "--trust-pickle", "--normalize", "--force"):
        assert flag in r.stdout


@pytest.mark.slow
def test_factory_weights_export(tmp_path):
    torch.save(seeded(TinySequential()).state_dict(), tmp_path / "sd.pt")
    out = tmp_path / "cli.edgeexit"
    r = _cli("--model", "tests.fixtures_bundles:TinySequential", "--weights", str(tmp_path / "sd.pt"),
             "--input-shape", "1,1,28,28", "--split-points", "exits", "--normalize", "0.3:0.35", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "segment 0/2" in r.stderr and "validating" in r.stderr  # progress goes to stderr
    # Only our own lines: torch's warnings and native converter output show with --verbose alone.
    assert all(line.startswith("[export ") for line in r.stderr.splitlines()), r.stderr
    assert "3 segments, 3 exits" in r.stdout
    m = Bundle.load(out).manifest
    assert m.export["source"] == "factory" and m.input.normalization == {"mean": [0.3], "std": [0.35]}
    assert m.name == "cli"
    r2 = _cli("--model", "tests.fixtures_bundles:TinySequential", "--weights", str(tmp_path / "sd.pt"),
              "--input-shape", "1,1,28,28", "--out", str(out))
    assert r2.returncode == 2 and "--force" in r2.stderr and "Traceback" not in r2.stderr


@pytest.mark.parametrize("case", ["missing", "pickle", "single", "shape"])
def test_user_errors_exit_nonzero_without_traceback(tmp_path, case):
    if case == "missing":
        args, expect = [str(tmp_path / "nope.pt2")], "does not exist"
    elif case == "pickle":
        torch.save(seeded(TinySequential()), tmp_path / "whole.pt")
        args, expect = [str(tmp_path / "whole.pt"), "--input-shape", "1,1,28,28"], "--trust-pickle"
    elif case == "single":
        torch.save(torch.nn.Conv2d(1, 2, 3), tmp_path / "conv.pt")
        args, expect = [str(tmp_path / "conv.pt"), "--trust-pickle", "--input-shape", "1,1,28,28"], "tuple or list"
    else:
        torch.save(seeded(TinySequential()), tmp_path / "whole.pt")
        args, expect = [str(tmp_path / "whole.pt"), "--trust-pickle", "--input-shape", "1,3,32,32"], "--input-shape"
    r = _cli(*args, "--out", str(tmp_path / "o.edgeexit"))
    assert r.returncode == 2, r.stderr
    assert expect in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o.edgeexit").exists()
