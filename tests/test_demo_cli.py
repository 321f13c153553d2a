"""`edgeexit demo`: real serve + agents over an emulated link, every image answered, clean stop."""

import re
import shutil
import subprocess
import sys

import pytest


def test_demo_refuses_data_of_the_wrong_shape_before_starting_anything(tiny_bundle, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "edgeexit", "demo", str(tiny_bundle), "--data", "digits", "--samples", "10",
         "--work", str(tmp_path / "work")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "takes [1, 28, 28]" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "work").exists()  # no process was started


@pytest.mark.slow
def test_demo_compares_the_planner_with_device_and_cloud_only_and_stops_cleanly(tiny_bundle, tmp_path):
    bundle = tmp_path / "tiny.edgeexit"
    shutil.copytree(tiny_bundle, bundle)
    for role in ("device", "cloud"):  # the demo needs profiles, as `make demo` stores them
        done = subprocess.run([sys.executable, "-m", "edgeexit", "profile", str(bundle), "--role", role, "--store"],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    out = subprocess.run(
        [sys.executable, "-m", "edgeexit", "demo", str(bundle), "--samples", "6", "--warmup", "1",
         "--networks", "wifi,3g", "--emulate-device", "host", "--work", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("The planner chooses") == 2
    for strategy in ("device-only", "cloud-only", "edgeexit"):
        answered = re.findall(rf"\| {strategy} \|[^\n]*\| (\d+) / (\d+) / (\d+) \|", out.stdout)
        assert len(answered) == 2 and all(sum(map(int, a)) == 6 for a in answered)  # every image, per network
    cloud = re.findall(r"\| cloud-only \|[^\n]*\| (\d+) / (\d+) / (\d+) \|", out.stdout)
    assert all(int(c[1]) == 6 for c in cloud)  # cloud-only really went to the cloud
    assert "processes stopped, all cleanly" in out.stdout
