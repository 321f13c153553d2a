"""`edgeexit demo`: real serve + agent over an emulated link, every sample answered, clean stop."""

import re
import subprocess
import sys

import pytest


def test_demo_refuses_data_of_the_wrong_shape_before_starting_anything(tiny_bundle, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "edgeexit", "demo", str(tiny_bundle), "--data", "digits", "--limit", "10",
         "--work", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "takes [1, 28, 28]" in out.stderr and "Traceback" not in out.stderr
    assert not list(tmp_path.iterdir())  # no process was started


@pytest.mark.slow
def test_demo_answers_every_sample_and_stops_cleanly(tiny_bundle, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "edgeexit", "demo", str(tiny_bundle), "--data", "fashion-mnist", "--limit", "60",
         "--batch", "20", "--network", "wifi", "--emulate-device", "host", "--agent-split", "0",
         "--encoding", "fp16", "--work", str(tmp_path)],
        capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    counts = dict(re.findall(r"\| (device|cloud|device-fallback) \| (\d+) \|", out.stdout))
    assert sum(int(v) for v in counts.values()) == 60
    assert int(counts["cloud"]) > 0  # split 0 with an uncalibrated (never-exit) bundle: the cloud answers
    assert "agent exit 0, serve exit 0" in out.stdout
