"""Simulated-network scenarios: a real `edgeexit serve` and real `edgeexit agent` processes joined by an
emulated link whose conditions change while they run.

Two modes behind one interface (`Scenario`), and every scenario says which one ran (`Scenario.describe()`):

- ``namespace`` (root, iproute2): the service runs in a cloud namespace on 10.200.<n>.2, the agents in a
  device namespace, joined by a veth pair whose bandwidth the kernel shapes (``tc htb``); delay and outages
  come from a relay process in the device namespace (the kernel here has no netem).
- ``loopback`` (anywhere): everything on 127.0.0.1; the relay process also shapes the bandwidth.

The relay is a separate process (``edgeexit netsim --control``) driven by JSON commands on its stdin, so a test
can cut the link, slow it down or restore it at a chosen moment in either mode. Agents listen on a
unix socket, which the test process reaches whatever namespace the agent runs in. Everything started here is
stopped on exit, also after a failure; the namespaces are deleted (`NetnsLink` kills what still runs there).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeexit.errors import ConfigError
from edgeexit.testbed.closing import Closing
from edgeexit.testbed.harness import AgentClient, Proc, launch

MODES = ("auto", "namespace", "loopback")
STOP_TIMEOUT = 5.0


def pick_mode(requested: str = "auto") -> tuple[str, str]:
    """(mode, why): ``namespace`` when requested or possible, else ``loopback`` with the reason."""
    from edgeexit.testbed.netsim.namespaces import available

    if requested not in MODES:
        raise ConfigError(f"scenario mode {requested!r} is unknown; use one of {', '.join(MODES)}")
    if requested == "loopback":
        return "loopback", "loopback was requested"
    ok, why = available()
    if ok:
        return "namespace", ""
    if requested == "namespace":
        raise ConfigError(f"namespace mode is not available here: {why}; use mode 'loopback' or 'auto'")
    return "loopback", why


# ---- the relay process ------------------------------------------------------------------------------------------
class RelayControl:
    """A relay process (``edgeexit netsim --control``) whose conditions the test changes at run time."""

    def __init__(self, target: str, log_path: Path, prefix: tuple[str, ...] = (), **conditions: Any):
        self.conditions: dict[str, Any] = dict(conditions)
        self._lock = threading.Lock()
        self._log = open(log_path, "w")  # noqa: SIM115  closed in close()
        self.log_path = log_path
        self.popen = subprocess.Popen(
            [*prefix, sys.executable, "-m", "edgeexit", "netsim", "--target", target, "--control"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True)
        line = self.popen.stdout.readline()
        if not line.startswith("relaying "):
            self.close()
            raise ConfigError(f"the relay did not start: {line.strip()!r}; see {log_path}")
        self.address = line.split()[1]  # HOST:PORT the agents connect to
        try:
            self._command({"op": "set", "conditions": self.conditions})  # before any agent connects
        except BaseException:
            self.close()
            raise

    def update(self, **changes: Any) -> dict[str, Any]:
        """Merge ``changes`` (LinkConditions fields) into the conditions and apply them now."""
        merged = {**self.conditions, **changes}
        reply = self._command({"op": "set", "conditions": merged})
        self.conditions = merged
        return reply

    def outage(self, seconds: float, mode: str = "blackhole") -> dict[str, Any]:
        """Cut the link now for ``seconds`` (``blackhole``: nothing moves; ``reset``: connections get RST)."""
        return self._command({"op": "outage", "seconds": seconds, "mode": mode})

    def stats(self) -> dict[str, Any]:
        return self._command({"op": "stats"})["stats"]

    def _command(self, cmd: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            if self.popen.poll() is not None:
                raise ConfigError(f"the relay process has exited; see {self.log_path}")
            self.popen.stdin.write(json.dumps(cmd) + "\n")
            self.popen.stdin.flush()
            line = self.popen.stdout.readline()
        if not line:
            raise ConfigError(f"the relay process died; see {self.log_path}")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise ConfigError(f"the relay refused {cmd['op']}: {reply.get('error')}")
        return reply

    def close(self) -> None:
        if self.popen.poll() is None:
            try:
                self.popen.stdin.close()  # EOF: the relay closes its connections and exits
                self.popen.wait(STOP_TIMEOUT)
            except (OSError, subprocess.TimeoutExpired):
                self.popen.kill()
                self.popen.wait()
        self._log.close()


# ---- the scenario ---------------------------------------------------------------------------------------------
@dataclass
class ScenarioOptions:
    mode: str = "auto"  # auto | namespace | loopback
    # Bandwidth of the device<->cloud link: the kernel shapes it in namespace mode, the relay in loopback mode.
    up_mbit: float | None = None
    down_mbit: float | None = None
    delay_ms: float = 0.0  # one-way, each direction, by the relay (both modes)
    service_args: tuple[str, ...] = ()  # extra `edgeexit serve` arguments
    relay: dict[str, Any] = field(default_factory=dict)  # extra LinkConditions fields for the relay


class Scenario(Closing):
    """One cloud service, a relay, and any number of agents; a context manager that tears everything down."""

    def __init__(self, bundle: str | Path, work_dir: str | Path, options: ScenarioOptions | None = None):
        self.bundle = str(bundle)
        self.work_dir = Path(work_dir)
        self.options = options or ScenarioOptions()
        self.mode, self.why = pick_mode(self.options.mode)
        self.link: Any = None
        self.service: Proc | None = None
        self.relay: RelayControl | None = None
        self.agents: list[Proc] = []
        self._sock_dir = Path(tempfile.mkdtemp(prefix="ee-sock-"))  # short: unix socket paths max 107 bytes

    # ---- lifecycle --------------------------------------------------------------------------------------------
    def open(self) -> None:
        o = self.options
        relay_rates = {}
        if self.mode == "namespace":
            from edgeexit.testbed.netsim.namespaces import NetnsLink

            self.link = NetnsLink(up_mbit=o.up_mbit, down_mbit=o.down_mbit).__enter__()
        else:
            relay_rates = {"up_mbit": o.up_mbit, "down_mbit": o.down_mbit}
        self.service = self.start_service()
        self.relay = RelayControl(self.service.target, self.work_dir / "relay.log", self.device_prefix,
                                  delay_ms=o.delay_ms, **relay_rates, **o.relay)

    def close(self) -> None:
        """Stop agents, relay and service, then delete the namespaces; every step runs even if one fails."""
        steps = [lambda a=a: a.stop(STOP_TIMEOUT) for a in self.agents]
        if self.relay is not None:
            steps.append(self.relay.close)
        if self.service is not None:
            steps.append(lambda: self.service.stop(STOP_TIMEOUT))
        if self.link is not None:
            steps.append(self.link.close)
        for step in steps:
            try:
                step()
            except Exception:  # noqa: BLE001  teardown must go on; the process logs stay in work_dir
                pass
        self.agents.clear()
        self.relay = self.service = self.link = None
        shutil.rmtree(self._sock_dir, ignore_errors=True)

    # ---- where things run -------------------------------------------------------------------------------------
    @property
    def device_prefix(self) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.link.dev_ns) if self.link is not None else ()

    @property
    def cloud_prefix(self) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.link.cloud_ns) if self.link is not None else ()

    @property
    def service_host(self) -> str:
        return self.link.cloud_ip if self.link is not None else "127.0.0.1"

    def describe(self) -> str:
        """Which mode ran, in words a test report can show."""
        if self.mode == "namespace":
            rates = f"up {self.link.up_mbit} / down {self.link.down_mbit} Mbit/s"
            return (f"namespace: service in {self.link.cloud_ns} ({self.link.cloud_ip}), agents in {self.link.dev_ns}; "
                    f"kernel htb shapes the veth ({rates}); relay (delay, outages) in the device namespace")
        return f"loopback: service, relay and agents on 127.0.0.1; the relay shapes the link (namespaces: {self.why})"

    # ---- processes ----------------------------------------------------------------------------------------------
    def start_service(self, port: int = 0) -> Proc:
        args = ["serve", self.bundle, "--host", self.service_host, "--port", str(port), *self.options.service_args]
        return launch("serve", args, self.work_dir, prefix=self.cloud_prefix)

    def kill_service(self) -> None:
        """SIGKILL the service: a crash, with no drain."""
        self.service.kill()

    def restart_service(self) -> Proc:
        """Start the service again on the port it had (the relay keeps pointing there)."""
        port = self.service.address[1]
        self.service.stop(STOP_TIMEOUT)
        self.service = self.start_service(port)
        return self.service

    def start_agent(self, *args: str, name: str = "agent") -> Proc:
        """An agent whose cloud is the relay; ``args`` are extra `edgeexit agent` arguments."""
        sock = self._sock_dir / f"{name}.sock"
        agent = launch(name, ["agent", self.bundle, "--cloud", self.relay.address, "--listen", f"unix:{sock}", *args],
                       self.work_dir, prefix=self.device_prefix)
        self.agents.append(agent)
        return agent

    def client(self, agent: Proc, model: str, timeout: float = 30.0) -> AgentClient:
        return AgentClient(agent.target, model, timeout=timeout)

    # ---- the link -------------------------------------------------------------------------------------------------
    def set_rate(self, up_mbit: float | None, down_mbit: float | None) -> None:
        """Change the bandwidth now: the kernel's shaping in namespace mode, the relay's in loopback mode."""
        if self.link is not None:
            self.link.set_rate(up_mbit, down_mbit)
        else:
            self.relay.update(up_mbit=up_mbit, down_mbit=down_mbit)

