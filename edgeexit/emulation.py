"""How an emulated device's speed was produced, described the same way in every output that shows a figure.

Two methods slow an agent down to a device class's factor (devices/classes/*.toml ``slowdown``):

- ``stretch``: the agent sleeps after each segment so that its compute takes factor x its CPU time. Only the
  segments are slowed; Python, gRPC, the codecs and numpy run at this host's speed.
- ``cgroup``: a launcher (the testbed, as root) runs the whole agent process under a CFS CPU quota of about
  1/factor of one core, so everything the process does is slowed, as on the real board. The agent then does
  not stretch. The quota is calibrated on a real workload, so the factor measured under it is reported too.

This module only reads and describes; creating cgroups belongs to ``edgeexit.testbed.cpu_quota``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

METHODS = ("stretch", "cgroup")


@dataclass(frozen=True)
class Emulation:
    """Which emulation ran, for headers, start lines and JSON results."""

    device_class: str
    factor: float  # the device class's slowdown
    method: str  # "stretch" | "cgroup" | "none" (this host's own speed)
    quota: float | None = None  # cgroup: the fraction of one core the process may use
    measured: float | None = None  # cgroup: the slowdown measured under that quota on the calibration workload
    note: str = ""  # why this method (e.g. why ``auto`` fell back to stretch)

    def describe(self) -> str:
        if self.method == "none":
            return "this host's speed (no emulation)"
        if self.method == "stretch":
            return f"EMULATED {self.device_class}: compute stretch x{self.factor:g}"
        measured = "not measured" if self.measured is None else f"measured {self.measured:.2f}"
        quota = "?" if self.quota is None else f"{self.quota * 100:.1f}"
        return f"EMULATED {self.device_class}: cgroup quota {quota}% of a core (factor {self.factor:g}, {measured})"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "description": self.describe()}


def cpu_controller_v1() -> Path | None:
    """Where the cgroup v1 ``cpu`` controller is mounted (e.g. /sys/fs/cgroup/cpu or .../cpu,cpuacct)."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    for line in mounts:
        fields = line.split()
        if len(fields) >= 4 and fields[2] == "cgroup" and "cpu" in fields[3].split(","):
            return Path(fields[1])
    return None


def own_cpu_quota() -> float | None:
    """The fraction of one core this process's cgroup v1 ``cpu`` quota allows, or None when unlimited/unknown."""
    root = cpu_controller_v1()
    if root is None:
        return None
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if "cpu" in controllers.split(","):
            folder = root / rel.lstrip("/")
            try:
                quota = int((folder / "cpu.cfs_quota_us").read_text())
                period = int((folder / "cpu.cfs_period_us").read_text())
            except (OSError, ValueError):
                return None
            return quota / period if quota > 0 and period > 0 else None
    return None
