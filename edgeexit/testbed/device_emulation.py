"""Choose, calibrate and apply the emulation of a device class for the agents the testbed starts.

:func:`resolve_emulation` turns ``(device class, "auto" | "cgroup" | "stretch")`` into an
:class:`AgentEmulation`: ``auto`` runs each agent under a CPU quota (``cpu_quota``) when this process is root and
the cgroup v1 ``cpu`` controller is there, else falls back to the agent's compute stretch (see
``edgeexit.emulation`` for what each slows down). The quota is calibrated (:func:`calibrate`): a probe process
times a workload (the bundle's segments, or a fixed numpy workload) in and out of the quota, interleaved, and
the quota is corrected by measured/target until the measured slowdown is within ``tolerance`` of the class's
factor. The result is cached per class, workload and machine, so later runs start at once.

For the demo and bench headers, and the JSON ``emulation`` field: ``AgentEmulation.describe()`` and
``AgentEmulation.to_dict()``; start agents with ``harness.launch_agent(name, args, log_dir, emulation)``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeexit.emulation import Emulation
from edgeexit.errors import ConfigError
from edgeexit.profiles import DeviceClass, load_device_class
from edgeexit.testbed import cpu_quota
from edgeexit.testbed.cpu_probe import NUMPY_ITERATIONS
from edgeexit.testbed.cpu_quota import CpuCgroup, Quota

CHOICES = ("auto", "cgroup", "stretch")
# ``auto`` keeps the quota only if the calibration got this close (ratio) to the class's factor: a workload of
# requests much shorter than the 1 ms minimum quota runs unthrottled, and then the stretch is the better model.
AUTO_MAX_ERROR = 1.5


def default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "edgeexit" / "cpu-quota.json"


@dataclass
class CalibrationOptions:
    workload: Path | None = None  # a bundle whose segments are timed; None = a fixed numpy workload
    cache: Path | None = None  # None = default_cache(); results are kept per class, workload and machine
    refresh: bool = False  # measure again even when cached
    rounds: int = 30  # requests per side (free, quota) per iteration
    iterations: int = 3  # at most this many quota corrections
    tolerance: float = 0.08  # stop when |measured / factor - 1| is within this


@dataclass(frozen=True)
class AgentEmulation:
    """How the testbed's agents emulate a device: the flags they get and, under cgroup, their quota."""

    device_arg: str | None  # what the agent gets as --emulate-device (a class name or TOML path)
    info: Emulation

    @property
    def method(self) -> str:
        return self.info.method

    def describe(self) -> str:
        return self.info.describe()

    def to_dict(self) -> dict[str, Any]:
        return self.info.to_dict()

    def agent_args(self) -> list[str]:
        if self.info.method == "none" or self.device_arg is None:
            return []
        args = ["--emulate-device", self.device_arg, "--emulation", self.info.method]
        if self.info.measured is not None:
            args += ["--emulation-measured", f"{self.info.measured:.3f}"]
        return args

    def cgroup(self, name: str) -> CpuCgroup | None:
        """A fresh quota group for one agent process (None unless the method is cgroup)."""
        if self.info.method != "cgroup" or self.info.quota is None:
            return None
        return CpuCgroup(name, Quota.for_fraction(self.info.quota))


def resolve_emulation(device_class: str | None, method: str = "auto",
                      calibration: CalibrationOptions | None = None) -> AgentEmulation:
    """How agents emulate ``device_class`` (None or a factor of 1 = this host's speed)."""
    if method not in CHOICES:
        raise ConfigError(f"emulation {method!r}: choose one of {', '.join(CHOICES)}")
    if device_class is None:
        return AgentEmulation(None, Emulation("host", 1.0, "none"))
    device = load_device_class(device_class)
    if not device.emulated:
        return AgentEmulation(None, Emulation(device.name, 1.0, "none"))
    if method == "stretch":
        return AgentEmulation(device_class, Emulation(device.name, device.slowdown, "stretch"))
    reason = cpu_quota.unavailable_reason()
    if reason is not None:
        if method == "cgroup":
            raise ConfigError(f"cannot emulate {device.name} with a CPU quota: {reason}")
        return AgentEmulation(device_class, Emulation(device.name, device.slowdown, "stretch",
                                                      note=f"auto: compute stretch, since {reason}"))
    info = calibrate(device, calibration or CalibrationOptions())
    off = max(info.measured / device.slowdown, device.slowdown / info.measured)  # type: ignore[operator]
    if method == "auto" and off > AUTO_MAX_ERROR:
        return AgentEmulation(device_class, Emulation(
            device.name, device.slowdown, "stretch",
            note=f"auto: compute stretch, since a CPU quota slowed this workload only x{info.measured:.2f} "
                 f"(target x{device.slowdown:g}): its requests are too short for a CFS quota"))
    return AgentEmulation(device_class, info)


def calibrate(device: DeviceClass, options: CalibrationOptions) -> Emulation:
    """The CPU quota that slows ``options.workload`` by the class's factor, measured here (cached)."""
    if device.slowdown < 1.0:
        raise ConfigError(f"device class {device.name}: a CPU quota can only emulate a slower device (factor >= 1)")
    cache = options.cache or default_cache()
    key = f"{device.name}|{device.slowdown:g}|{_workload_key(options.workload)}|{_host()}"
    if not options.refresh and (hit := _read_cache(cache).get(key)):
        return Emulation(device.name, device.slowdown, "cgroup", hit["quota"], hit["measured"],
                         note=f"calibrated {hit['when']} (cached in {cache})")
    target = device.slowdown
    lo = cpu_quota.MIN_QUOTA_US / cpu_quota.MAX_PERIOD_US
    quota = Quota.for_fraction(min(1.0, max(lo, 1.0 / target)))
    tried: list[tuple[Quota, float]] = []
    with CpuCgroup(f"calibrate-{device.name}", quota) as group:
        for _ in range(max(1, options.iterations)):
            measured = _probe(group, options)
            tried.append((quota, measured))
            if abs(measured / target - 1) <= options.tolerance:
                break
            # Measured slower than the target: give more CPU (and the reverse), within the kernel's limits.
            nxt = Quota.for_fraction(min(1.0, max(lo, quota.fraction * measured / target)))
            if nxt == quota:
                break  # at a limit: no quota gets closer
            quota = nxt
            group.set_quota(quota)
    best, measured = min(tried, key=lambda t: abs(math.log(t[1] / target)))
    when = time.strftime("%Y-%m-%d %H:%M")
    _write_cache(cache, key, {"quota": best.fraction, "period_us": best.period_us, "quota_us": best.quota_us,
                              "measured": measured, "when": when})
    return Emulation(device.name, target, "cgroup", best.fraction, measured, note=f"calibrated {when}")


def _probe(group: CpuCgroup, options: CalibrationOptions) -> float:
    """Measured slowdown under the group's quota: ratio of median request times, quota vs free."""
    cmd = [sys.executable, "-m", "edgeexit.testbed.cpu_probe", "--group", str(group.procs_file),
           "--rounds", str(options.rounds)]
    if options.workload is not None:
        cmd += ["--bundle", str(options.workload)]
    # One thread everywhere: the agent runs its segments on one thread, and BLAS pools would blur the quota.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if done.returncode != 0:
        raise ConfigError(f"the CPU quota probe failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    times = json.loads(done.stdout.strip().splitlines()[-1])
    return float(np.median(times["quota_ms"]) / np.median(times["free_ms"]))


def _workload_key(workload: Path | None) -> str:
    if workload is None:
        return f"numpy-{NUMPY_ITERATIONS}"  # a cache entry of another probe length does not apply
    manifest = Path(workload) / "manifest.json"
    if not manifest.is_file():
        raise ConfigError(f"calibration workload {workload} is not a bundle (no manifest.json)")
    return "bundle:" + hashlib.sha256(manifest.read_bytes()).hexdigest()[:16]


def _host() -> str:
    """This machine as far as CPU speed goes: a quota calibrated elsewhere does not apply here."""
    model = ""
    try:
        model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                      if ln.startswith("model name")), "")
    except OSError:
        pass
    return f"{platform.node()}/{model}/{os.cpu_count()}"


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}  # no cache or a damaged one: calibrate again
    return data if isinstance(data, dict) else {}


def _write_cache(path: Path, key: str, entry: dict[str, Any]) -> None:
    data = _read_cache(path)
    data[key] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)  # atomic: concurrent testbeds never read half a file
