"""Real `edgeexit serve` and `edgeexit agent` processes, and an app-side client for the agent.

The demo, `edgeexit bench`, the benchmarks and the simulated-network scenarios all run the real processes
through this module, so "start, wait until ready, talk, stop cleanly" is written once. A process's stderr
(its JSON event log) goes to a file, and its stdout is drained after "ready on", so a chatty process can
never block on a full pipe.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeexit.errors import ConfigError
from edgeexit.hostport import parse_hostport
from edgeexit.runtime.decided import CLOUD


@dataclass
class Proc:
    """A running edgeexit process that has printed "ready on TARGET"."""

    name: str
    popen: subprocess.Popen
    target: str
    log_path: Path
    cgroup: Any = None  # cpu_quota.CpuCgroup the process runs in (emulation), removed once it has stopped

    @property
    def address(self) -> tuple[str, int]:
        """``target`` as (host, port)."""
        return parse_hostport(self.target, self.name)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM (graceful drain), then SIGKILL after ``timeout``. Returns the exit code."""
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._release()
        return self.popen.returncode

    def kill(self) -> None:
        """SIGKILL: a crash, as a scenario needs it."""
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()
        self._release()

    def _release(self) -> None:
        if self.cgroup is not None:
            self.cgroup.remove()
            self.cgroup = None

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def __enter__(self) -> Proc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now (for options such as ``serve --metrics-port`` whose chosen port we must know)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def launch(name: str, args: Sequence[str], log_dir: Path, prefix: Sequence[str] = (), timeout: float = 90.0,
           env: dict[str, str] | None = None) -> Proc:
    """Start ``python -m edgeexit ARGS`` (optionally behind ``prefix``, e.g. ``ip netns exec NS``)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    log_file = open(log_path, "w", buffering=1)  # noqa: SIM115  line-buffered; the drain thread closes it
    popen = subprocess.Popen(
        [*prefix, sys.executable, "-m", "edgeexit", *args], stdout=subprocess.PIPE, stderr=log_file, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    deadline = time.monotonic() + timeout
    target = None
    while time.monotonic() < deadline:
        line = popen.stdout.readline()
        if not line:
            if popen.poll() is not None:
                break
            continue
        log_file.write(line)
        if "ready on" in line:
            target = line.split("ready on", 1)[1].split()[0].strip()
            break
    if target is None:
        popen.kill()
        popen.wait()
        log_file.close()
        raise ConfigError(f"`edgeexit {' '.join(args)}` did not become ready: see {log_path}\n"
                          + log_path.read_text()[-2000:])

    def drain() -> None:
        for rest in popen.stdout:
            log_file.write(rest)
        log_file.close()

    threading.Thread(target=drain, name=f"drain-{name}", daemon=True).start()
    return Proc(name, popen, target, log_path)


def launch_agent(name: str, args: Sequence[str], log_dir: Path, emulation: Any = None) -> Proc:
    """Start `edgeexit ARGS` (an agent) emulating a device as ``emulation`` (device_emulation.AgentEmulation) says:
    its flags are appended, and under cgroup emulation the process starts inside its own CPU quota group."""
    if emulation is None:
        return launch(name, args, log_dir)
    args = [*args, *emulation.agent_args()]
    group = emulation.cgroup(name)
    if group is None:
        return launch(name, args, log_dir)
    try:
        proc = launch(name, args, log_dir, prefix=group.command_prefix())
    except BaseException:
        group.remove()
        raise
    proc.cgroup = group
    return proc


@dataclass
class AgentAnswer:
    labels: np.ndarray
    probabilities: np.ndarray
    exits: np.ndarray
    decided: list[str]
    params: dict[str, Any]
    seconds: float  # wall time as the app saw it


class AgentClient:
    """What an app on the device does: the public client (edgeexit.client), answering under the testbed's names.
    Errors are edgeexit errors, as apps see them."""

    def __init__(self, target: str, model: str, timeout: float = 30.0):
        from edgeexit.client import EdgeExitClient

        self.model = model
        self.timeout = timeout
        self._client = EdgeExitClient(target, model=model, timeout_s=timeout)

    def infer(self, x: np.ndarray) -> AgentAnswer:
        r = self._client.infer(x)
        return AgentAnswer(r.label, r.probabilities, r.exit, r.decided, r.params, r.seconds)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Pacer:
    """An app sending one row every ``every`` s from a thread: ``answers`` holds (wall time, decided) per answer,
    ``failures`` what went wrong when no answer came (a lost request)."""

    def __init__(self, app: AgentClient, x: np.ndarray, every: float = 0.02):
        self.app, self.x, self.every = app, x, every
        self.answers: list[tuple[float, str]] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Pacer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                ans = self.app.infer(self.x)
            except Exception as e:  # noqa: BLE001 - a lost request is what callers count
                self.failures.append(f"{type(e).__name__}: {e}"[:200])
                continue
            self.answers.append((time.time(), ans.decided[0]))

    def first_cloud_after(self, t: float) -> float | None:
        return next((when for when, decided in list(self.answers) if when > t and decided == CLOUD), None)
