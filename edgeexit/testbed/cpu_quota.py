"""A CFS CPU quota per emulated process: one cgroup v1 ``cpu`` group, created, filled and removed.

Used by the testbed to run an agent as a slower device (see ``edgeexit.emulation``). The quota covers the
whole process: every thread (the inference thread, gRPC's pollers and workers, Python's own) shares one
budget of ``quota_us`` per ``period_us``, i.e. a fraction of ONE core. A real Raspberry Pi has four cores, so
background threads there have room this quota does not give them; the emulation errs on the slow side.

The period is short (a few ms) so that a request is slowed evenly instead of running at full speed and then
stalling for a long period. The kernel refuses a quota below 1 ms, so slower factors get longer periods; and it
notices an exhausted quota only at the next scheduler tick (4 ms at HZ=250), so a process overruns its quota
and a request shorter than a few periods starts with a whole quota in hand. The slowdown a quota gives thus
depends on the request's length, which is why ``device_emulation.calibrate`` measures it on the real workload.
Needs root and the cgroup v1 ``cpu`` controller; without them every entry point raises ConfigError.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from edgeexit.emulation import cpu_controller_v1
from edgeexit.errors import ConfigError

MIN_QUOTA_US = 1000  # the kernel's floor for cpu.cfs_quota_us
DEFAULT_PERIOD_US = 4000
MAX_PERIOD_US = 40000  # beyond this a request stalls for tens of ms at once: too bursty to pass for a slow CPU
_PREFIX = "edgeexit-"


@dataclass(frozen=True)
class Quota:
    period_us: int
    quota_us: int

    @property
    def fraction(self) -> float:
        """The share of one core the process may use."""
        return self.quota_us / self.period_us

    @classmethod
    def for_fraction(cls, fraction: float, period_us: int = DEFAULT_PERIOD_US) -> Quota:
        """The shortest period (at least ``period_us``) whose quota for ``fraction`` is >= the kernel's floor."""
        lo = MIN_QUOTA_US / MAX_PERIOD_US
        if not lo <= fraction <= 1.0:
            raise ConfigError(f"a CPU quota of {fraction:.4f} cores is outside [{lo:.3f}, 1]: emulate a factor "
                              f"between 1 and {1 / lo:g} with a quota, or use --emulation stretch")
        period = max(period_us, math.ceil(MIN_QUOTA_US / fraction))
        return cls(period, max(MIN_QUOTA_US, round(period * fraction)))


def unavailable_reason() -> str | None:
    """Why a CPU quota cannot be applied here (None when it can)."""
    if os.geteuid() != 0:
        return "creating a cgroup needs root (run as root, or use --emulation stretch)"
    root = cpu_controller_v1()
    if root is None or not (root / "cpu.cfs_quota_us").exists():
        return ("no cgroup v1 'cpu' controller with cpu.cfs_quota_us is mounted (see `mount | grep cgroup`); "
                "use --emulation stretch")
    if not os.access(root, os.W_OK):
        return f"the cgroup 'cpu' controller at {root} is read-only here; use --emulation stretch"
    return None


def available() -> bool:
    return unavailable_reason() is None


def controller_root() -> Path:
    """The cgroup v1 ``cpu`` mount, or ConfigError saying why a quota cannot be used."""
    reason = unavailable_reason()
    if reason is not None:
        raise ConfigError(f"cannot emulate a device with a CPU quota: {reason}")
    return cpu_controller_v1()  # type: ignore[return-value]  # not None: checked above


class CpuCgroup:
    """A cgroup holding one emulated process under a CPU quota. Removed by :meth:`remove` (or ``with``)."""

    _count = 0

    def __init__(self, name: str, quota: Quota):
        root = controller_root()
        _remove_stale(root)
        CpuCgroup._count += 1
        slug = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
        # Our pid in the name lets a later run remove the group if this process dies before removing it.
        self.root = root
        self.path = root / f"{_PREFIX}{os.getpid()}-{CpuCgroup._count}-{slug}"
        self.path.mkdir()
        self.quota = quota
        self.set_quota(quota)

    def set_quota(self, quota: Quota) -> None:
        # Unset the quota first: the kernel checks each write against the other value, so the old quota with
        # the new period (or the reverse) could be refused.
        (self.path / "cpu.cfs_quota_us").write_text("-1")
        (self.path / "cpu.cfs_period_us").write_text(str(quota.period_us))
        (self.path / "cpu.cfs_quota_us").write_text(str(quota.quota_us))
        self.quota = quota

    @property
    def procs_file(self) -> Path:
        return self.path / "cgroup.procs"

    def add(self, pid: int) -> None:
        """Move a process (all its threads) into the group."""
        self.procs_file.write_text(str(pid))

    def command_prefix(self) -> list[str]:
        """A prefix that starts a command already inside the group (so not one instruction runs unthrottled)."""
        return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.procs_file)]

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in self.procs_file.read_text().split()]
        except OSError:
            return []

    def throttled_us(self) -> int:
        """Total time the kernel held the group back (cpu.stat throttled_time), in microseconds."""
        stat = dict(line.split() for line in (self.path / "cpu.stat").read_text().splitlines() if line.strip())
        return int(stat.get("throttled_time", 0)) // 1000

    def remove(self) -> None:
        """Remove the group; processes still in it go back to the root group first. Idempotent."""
        if not self.path.exists():
            return
        for pid in self.pids():
            try:
                (self.root / "cgroup.procs").write_text(str(pid))
            except OSError:
                pass  # it exited meanwhile
        self.path.rmdir()

    def __enter__(self) -> CpuCgroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _remove_stale(root: Path) -> None:
    """Remove empty groups left by edgeexit processes that died before cleaning up."""
    for path in root.glob(f"{_PREFIX}*"):
        owner = path.name[len(_PREFIX):].split("-", 1)[0]
        if owner.isdigit() and not Path(f"/proc/{owner}").exists():
            try:
                path.rmdir()
            except OSError:
                pass  # still has processes, or another run removed it
