"""`NetnsLink`: two network namespaces (device, cloud) joined by a veth pair whose bandwidth the kernel shapes
with ``tc htb`` (this kernel has no netem; delay, jitter and outages come from a `Relay` run inside a namespace).

Needs root, ``ip`` and ``tc`` (iproute2). `available()` says whether it can work here and why not; callers
fall back to loopback + `Relay` and report which mode ran. Names carry the creating pid
(``ee-<pid>-<k>-dev`` / ``-cloud``) so a later run can remove what a crashed run left behind (`cleanup_stale`).
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from edgeexit.errors import ConfigError
from edgeexit.testbed.closing import Closing

PREFIX = "ee"
_NAME = re.compile(rf"^({PREFIX}-(\d+)-[0-9a-z]+(?:-dev|-cloud)?)\b")
_serial = itertools.count()
TERMINATE_WAIT = 3.0


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise ConfigError(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}; run as root with iproute2 installed")
    return done


def _tc(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _ip("netns", "exec", ns, "tc", *args, check=check)


@lru_cache(maxsize=1)
def available() -> tuple[bool, str]:
    """(True, "") when namespaces can be made here, else (False, why) — checked by really adding one."""
    if os.geteuid() != 0:
        return False, "not root: network namespaces need root (the relay alone works without it)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return False, f"`{tool}` not found: install iproute2"
    probe = f"{PREFIX}-{os.getpid()}-probe"
    added = _ip("netns", "add", probe, check=False)
    if added.returncode != 0:
        return False, f"`ip netns add` does not work here: {added.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return True, ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _namespaces() -> list[str]:
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _kill_inside(ns: str) -> None:
    """Kill what still runs in a namespace we created (it would keep the namespace and its veth alive)."""
    pids = _ip("netns", "pids", ns, check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), 9)
        except (ProcessLookupError, ValueError):
            pass


def _delete(ns: str) -> None:
    _kill_inside(ns)
    _ip("netns", "del", ns, check=False)


def cleanup_stale() -> list[str]:
    """Delete ``ee-<pid>-…`` namespaces whose creating process is gone; returns their names."""
    removed = []
    for ns in _namespaces():
        m = _NAME.match(ns)
        if m and not _alive(int(m.group(2))):
            _delete(ns)
            removed.append(ns)
    return removed


def _check_rate(name: str, mbit: float | None) -> None:
    if mbit is not None and not mbit > 0:
        raise ConfigError(f"{name} must be > 0 Mbit/s or None (unlimited); for a dead link use a Relay outage")


class NetnsLink(Closing):
    """Device and cloud namespaces on one veth pair: ``dev_ip`` = 10.200.<n>.1, ``cloud_ip`` = 10.200.<n>.2.

    ``up_mbit`` shapes device->cloud (egress of the device end), ``down_mbit`` cloud->device; None = unshaped.
    """

    def __init__(self, up_mbit: float | None = None, down_mbit: float | None = None, subnet: int | None = None):
        _check_rate("up_mbit", up_mbit)
        _check_rate("down_mbit", down_mbit)
        k = next(_serial)
        pid = os.getpid()
        self.subnet = subnet if subnet is not None else (pid + k) % 250 + 1
        if not 0 <= self.subnet <= 255:
            raise ConfigError(f"subnet {self.subnet} must be 0..255 (addresses are 10.200.<subnet>.1/.2)")
        self.dev_ns, self.cloud_ns = f"{PREFIX}-{pid}-{k}-dev", f"{PREFIX}-{pid}-{k}-cloud"
        self.dev_if, self.cloud_if = f"{PREFIX}{pid}x{k}d", f"{PREFIX}{pid}x{k}c"  # <= 15 chars (IFNAMSIZ)
        self.dev_ip, self.cloud_ip = f"10.200.{self.subnet}.1", f"10.200.{self.subnet}.2"
        self.up_mbit, self.down_mbit = up_mbit, down_mbit
        self._procs: list[subprocess.Popen] = []
        self._shaped: set[str] = set()  # interfaces that carry our htb qdisc
        self._up = False

    # ---- lifecycle --------------------------------------------------------------------------------------------
    def open(self) -> None:
        ok, why = available()
        if not ok:
            raise ConfigError(f"network namespaces are not available: {why}; use loopback with a Relay instead")
        cleanup_stale()
        self._up = True
        self._create()
        self.set_rate(self.up_mbit, self.down_mbit)

    def _create(self) -> None:
        _ip("netns", "add", self.dev_ns)
        _ip("netns", "add", self.cloud_ns)
        _ip("link", "add", self.dev_if, "netns", self.dev_ns, "type", "veth",
            "peer", "name", self.cloud_if, "netns", self.cloud_ns)
        for ns, dev, addr in ((self.dev_ns, self.dev_if, self.dev_ip), (self.cloud_ns, self.cloud_if, self.cloud_ip)):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def close(self) -> None:
        """Stop the processes started with `run`, then delete both namespaces (which removes the veth pair)."""
        for p in self._procs:
            if p.poll() is None:
                p.terminate()
        for p in self._procs:
            try:
                p.wait(TERMINATE_WAIT)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self._procs.clear()
        if self._up:
            for ns in (self.dev_ns, self.cloud_ns):
                _delete(ns)
            self._up = False

    # ---- use ----------------------------------------------------------------------------------------------------
    def namespace(self, which: str) -> str:
        """``"dev"``/``"cloud"`` (or a full namespace name of this link) -> the namespace name."""
        names = {"dev": self.dev_ns, "cloud": self.cloud_ns, self.dev_ns: self.dev_ns, self.cloud_ns: self.cloud_ns}
        if which not in names:
            raise ConfigError(f"namespace {which!r} is not part of this link; use 'dev' or 'cloud'")
        return names[which]

    def run(self, ns: str, argv: Sequence[str], **popen: Any) -> subprocess.Popen:
        """Start ``argv`` inside namespace ``ns`` ("dev" or "cloud"); it is stopped when the link closes."""
        if not self._up:
            raise ConfigError("the link is not up; use NetnsLink as a context manager")
        proc = subprocess.Popen(["ip", "netns", "exec", self.namespace(ns), *argv], **popen)
        self._procs.append(proc)
        return proc

    def set_rate(self, up_mbit: float | None, down_mbit: float | None) -> None:
        """Change the kernel shaping now (None = unshaped); applies to packets from the next dequeue on."""
        _check_rate("up_mbit", up_mbit)
        _check_rate("down_mbit", down_mbit)
        self._shape(self.dev_ns, self.dev_if, up_mbit)
        self._shape(self.cloud_ns, self.cloud_if, down_mbit)
        self.up_mbit, self.down_mbit = up_mbit, down_mbit

    def _shape(self, ns: str, dev: str, mbit: float | None) -> None:
        if mbit is None:
            if dev in self._shaped:
                _tc(ns, "qdisc", "del", "dev", dev, "root")  # back to the default (unshaped) qdisc
                self._shaped.discard(dev)
            return
        rate = f"{int(mbit * 1e6)}bit"
        burst = str(max(16 * 1024, int(mbit * 1e6 / 8 * 0.01)))  # >= 10 ms of traffic so htb meets the rate
        if dev not in self._shaped:  # htb cannot be "replaced" in place; add it once, then change its class
            _tc(ns, "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "1")
            self._shaped.add(dev)
        _tc(ns, "class", "replace", "dev", dev, "parent", "1:", "classid", "1:1", "htb",
            "rate", rate, "ceil", rate, "burst", burst, "cburst", burst)
