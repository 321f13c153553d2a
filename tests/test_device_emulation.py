"""Device emulation: a CFS CPU quota per agent process (as root), its calibration, and the stretch fallback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgeexit.emulation import Emulation
from edgeexit.errors import ConfigError
from edgeexit.profiles import load_device_class
from edgeexit.runtime.device import DeviceOptions, DeviceRuntime
from edgeexit.runtime.runner import SegmentRunner
from edgeexit.testbed import cpu_quota
from edgeexit.testbed.cpu_quota import CpuCgroup, Quota
from edgeexit.testbed.device_emulation import AgentEmulation, CalibrationOptions, calibrate, resolve_emulation
from edgeexit.testbed.harness import AgentClient, launch_agent

needs_quota = pytest.mark.skipif(not cpu_quota.available(),
                                 reason=f"no CPU quota here: {cpu_quota.unavailable_reason()}")

# A CPU-bound loop much longer than a quota period, timed inside the child (start-up excluded).
LOOP = ("import time; t = time.perf_counter(); [sum(range(20000)) for _ in range(120)]; "
        "print((time.perf_counter() - t) * 1e3)")


@pytest.fixture
def class_4x(tmp_path) -> Path:
    path = tmp_path / "four-x.toml"
    path.write_text('name = "four-x"\nslowdown = 4.0\ndescription = "test class"\nsource = "a test"\n')
    return path


def _loop_ms(prefix: list[str]) -> float:
    done = subprocess.run([*prefix, sys.executable, "-c", LOOP], capture_output=True, text=True, check=True)
    return float(done.stdout)


def test_quota_periods_respect_the_kernel_floor():
    q = Quota.for_fraction(1 / 7)
    assert q.quota_us >= cpu_quota.MIN_QUOTA_US and abs(q.fraction - 1 / 7) < 0.01
    assert Quota.for_fraction(0.5) == Quota(cpu_quota.DEFAULT_PERIOD_US, cpu_quota.DEFAULT_PERIOD_US // 2)
    with pytest.raises(ConfigError, match="stretch"):
        Quota.for_fraction(0.001)  # would need a period far too long to look like a slow CPU


@needs_quota
def test_a_process_under_the_quota_runs_about_factor_times_slower():
    with CpuCgroup("test-slow", Quota.for_fraction(1 / 4)) as group:
        free, slow = [], []
        for _ in range(3):  # interleaved, so a busy neighbour slows both sides alike
            free.append(_loop_ms([]))
            slow.append(_loop_ms(group.command_prefix()))
        assert group.throttled_us() > 0
        path = group.path
    ratio = float(np.median(slow) / np.median(free))
    assert 2.0 <= ratio <= 8.0, (free, slow)
    assert not path.exists(), "the cgroup must be removed on exit"


@needs_quota
def test_removing_a_group_moves_a_live_process_out_first():
    group = CpuCgroup("test-live", Quota.for_fraction(0.5))
    child = subprocess.Popen([*group.command_prefix(), "sleep", "30"])
    try:
        deadline = time.monotonic() + 5
        while child.pid not in group.pids() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert child.pid in group.pids()
        group.remove()
        assert not group.path.exists() and child.poll() is None
        group.remove()  # idempotent
    finally:
        child.kill()
        child.wait()


def test_without_root_a_quota_is_refused_and_auto_falls_back_to_stretch(monkeypatch, class_4x):
    monkeypatch.setattr(cpu_quota.os, "geteuid", lambda: 1000)
    with pytest.raises(ConfigError, match="root"):
        CpuCgroup("never", Quota.for_fraction(0.25))
    with pytest.raises(ConfigError, match="root"):
        resolve_emulation(str(class_4x), "cgroup")
    auto = resolve_emulation(str(class_4x), "auto")
    assert auto.method == "stretch" and "root" in auto.info.note
    assert auto.describe() == "EMULATED four-x: compute stretch x4"
    assert auto.agent_args() == ["--emulate-device", str(class_4x), "--emulation", "stretch"]
    assert resolve_emulation(None).agent_args() == [] and resolve_emulation("host").method == "none"
    with pytest.raises(ConfigError, match="choose one of"):
        resolve_emulation(str(class_4x), "fast")


def test_without_the_cpu_controller_a_quota_is_refused(monkeypatch, class_4x):
    monkeypatch.setattr(cpu_quota, "cpu_controller_v1", lambda: None)
    assert not cpu_quota.available() and "cgroup v1 'cpu' controller" in cpu_quota.unavailable_reason()
    with pytest.raises(ConfigError, match="controller"):
        resolve_emulation(str(class_4x), "cgroup")
    assert resolve_emulation(str(class_4x)).method == "stretch"


@needs_quota
def test_calibration_reaches_the_factor_and_is_cached(class_4x, tmp_path):
    device = load_device_class(str(class_4x))
    options = CalibrationOptions(cache=tmp_path / "cache.json", rounds=12, iterations=2, tolerance=0.15)
    info = calibrate(device, options)
    assert info.method == "cgroup" and 0 < info.quota < 1
    assert device.slowdown / 2 <= info.measured <= device.slowdown * 2, info
    assert info.describe().startswith("EMULATED four-x: cgroup quota ")
    assert len(json.loads((tmp_path / "cache.json").read_text())) == 1
    t = time.monotonic()
    again = calibrate(device, options)
    assert time.monotonic() - t < 0.5 and "cached" in again.note
    assert (again.quota, again.measured) == (info.quota, info.measured)
    assert not list(cpu_quota.controller_root().glob(f"edgeexit-{os.getpid()}-*calibrate*"))


@needs_quota
@pytest.mark.slow
def test_the_harness_runs_an_agent_inside_its_quota(tiny_bundle, class_4x, tmp_path):
    emulation = AgentEmulation(str(class_4x), Emulation("four-x", 4.0, "cgroup", quota=0.25, measured=3.9))
    runner = SegmentRunner(tiny_bundle)
    x = np.random.default_rng(5).random((2, 1, 28, 28), dtype=np.float32)
    want = runner.run_all(runner.normalize(x))[-1].argmax(1)
    args = ["agent", str(tiny_bundle), "--split", "device", "--policy", "never", "--listen", "127.0.0.1:0"]
    with launch_agent("agent-quota", args, tmp_path, emulation) as agent:
        group = agent.cgroup
        assert agent.popen.pid in group.pids()
        with AgentClient(agent.target, runner.manifest.name) as app:
            ans = app.infer(x)
        np.testing.assert_array_equal(ans.labels, want)
        assert "EMULATED four-x: cgroup quota 25.0% of a core (factor 4, measured 3.90)" in agent.log()
    assert agent.popen.returncode == 0 and not group.path.exists()


def test_an_agent_told_cgroup_without_a_quota_refuses(tiny_bundle):
    done = subprocess.run([sys.executable, "-m", "edgeexit", "agent", str(tiny_bundle), "--emulate-device",
                           "raspberry-pi-4", "--emulation", "cgroup", "--listen", "127.0.0.1:0"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "no CPU quota below one core" in done.stderr


def test_under_cgroup_the_runtime_does_not_stretch(tiny_bundle):
    x = np.random.default_rng(0).random((1, 1, 28, 28), dtype=np.float32)

    def device_ms(emulation: str) -> float:
        rt = DeviceRuntime(tiny_bundle, DeviceOptions(split="device", policy="never", slowdown=200.0,
                                                      emulation=emulation))
        rt.infer(x)  # warm
        return min(rt.infer(x).latency.device_ms for _ in range(3))

    assert device_ms("cgroup") * 5 < device_ms("stretch")
    with pytest.raises(ConfigError, match="emulation"):
        DeviceOptions(emulation="quota")
