"""Run strategies under link conditions through real processes and return measured rows.

One :class:`Testbed` holds one `edgeexit serve` process and one userspace :class:`Relay` in front of it; only
the relay's conditions and the agents change between measurements. An agent (a real `edgeexit agent`
process) is started per strategy; agents whose behaviour does not depend on the link (static splits) are
started once and reused across conditions (unless ``restart_per_condition``), adaptive ones (``--split auto``)
are restarted per condition with a matching ``--network`` prior, so one condition's link estimate never leaks
into the next.

:func:`run_condition` interleaves the strategies sample by sample (sample i goes to every strategy before
sample i+1), so a noisy neighbour on a shared machine slows every strategy alike. Warm-up requests per agent
and condition are sent first and excluded. Every row is what the app saw (wall time around the agent call)
plus the agent's own breakdown and the service's compute time (from its Prometheus histogram).

Used by ``edgeexit bench`` and ``benchmarks/planner.py``. The device is EMULATED when a device class is given,
as ``TestbedOptions.emulation`` says (``device_emulation``): "auto" runs every agent process under a calibrated
CPU quota when root, else the agent stretches its segments' compute; ``Testbed.emulation.describe()`` says which.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeexit.errors import ConfigError
from edgeexit.profiles import NetworkProfile
from edgeexit.testbed.closing import Closing
from edgeexit.testbed.device_emulation import AgentEmulation, CalibrationOptions, resolve_emulation
from edgeexit.testbed.harness import AgentClient, Proc, free_port, launch, launch_agent
from edgeexit.testbed.netsim import LinkConditions, Relay

CALIBRATED = None  # Strategy.policy: the bundle's calibrated policy (the agent's default)
_METRIC_SUM = re.compile(r'^edgeexit_request_seconds_sum\{model="([^"]+)"\} (\S+)$', re.M)


@dataclass(frozen=True)
class Condition:
    """One emulated link. The relay imposes rtt/2 one-way delay per direction and jitter/2 per direction."""

    name: str
    up_mbit: float
    down_mbit: float
    rtt_ms: float
    jitter_ms: float = 0.0

    @classmethod
    def from_network(cls, net: NetworkProfile) -> Condition:
        return cls(net.name, net.up_mbit, net.down_mbit, net.rtt_ms, net.jitter_ms)

    def link(self) -> LinkConditions:
        return LinkConditions(delay_ms=self.rtt_ms / 2, jitter_ms=self.jitter_ms / 2,
                              up_mbit=self.up_mbit, down_mbit=self.down_mbit)

    def write_prior(self, folder: Path) -> Path:
        """A network profile TOML describing this condition (the agent's ``--network`` prior)."""
        path = folder / f"net_{re.sub(r'[^A-Za-z0-9_.-]', '_', self.name)}.toml"
        path.write_text(f'name = "{self.name}"\nup_mbit = {self.up_mbit}\ndown_mbit = {self.down_mbit}\n'
                        f'rtt_ms = {self.rtt_ms}\njitter_ms = {self.jitter_ms}\n'
                        'source = "edgeexit.testbed.experiment: the emulated link of this measurement"\n')
        return path


@dataclass(frozen=True)
class Strategy:
    """How an agent runs: its ``--split``, ``--policy`` (None = calibrated) and, for ``auto``, its prior.

    ``prior``: None = a profile matching the condition (written per condition); a name or path = that
    network profile whatever the condition (e.g. "wifi" for a cold prior).
    """

    name: str
    split: str  # "device" | "cloud" | "auto" | "<split point>"
    policy: str | None = CALIBRATED
    adapt: str = "planner"
    prior: str | None = None
    encoding: str = "fp32"

    @property
    def adaptive(self) -> bool:
        return self.split == "auto"

    def agent_args(self, bundle: Path, cloud: str, device_class: str | None, prior: str) -> list[str]:
        args = ["agent", str(bundle), "--cloud", cloud, "--split", self.split, "--listen", "127.0.0.1:0",
                "--encoding", self.encoding]
        if self.policy is not CALIBRATED:
            args += ["--policy", self.policy]
        if self.adaptive:
            args += ["--adapt", self.adapt, "--network", prior]
        if device_class:
            args += ["--emulate-device", device_class]
        return args


@dataclass
class Sample:
    """One measured request (batch 1)."""

    strategy: str
    condition: str
    index: int  # position in the evaluated subsample
    label: int
    truth: int
    exit: int
    decided: str  # device | cloud | device-fallback
    split: str
    bytes_sent: int
    wall_ms: float  # what the app saw
    device_ms: float  # agent compute incl. encoding (emulated when a device class is set)
    network_ms: float  # offload call time as the agent saw it, minus the cloud's own time when it reports it
    cloud_ms: float  # service compute from its metrics (0 when not offloaded)
    fallback: bool


@dataclass
class TestbedOptions:
    bundle: Path
    device_class: str | None = "raspberry-pi-4"  # EMULATION; None = this host's speed
    emulation: str = "auto"  # "auto" | "cgroup" | "stretch": how agents emulate device_class (device_emulation)
    # One intra-op thread: on these 2-vCPU machines onnxruntime with 2 threads ran the camera model's segments
    # 1.5-3x SLOWER at batch 1 (`edgeexit profile --role cloud --threads 1|2`, measured side by side).
    service_threads: int = 1
    warmup: int = 3  # requests per agent and condition, excluded from the rows
    # A just-started agent (every adaptive one, per condition) gets at least this many warm-up requests, so
    # its first-request costs (cold caches, arenas, JIT-ed kernels), which the emulated slowdown multiplies,
    # are not charged to it while long-running static agents are already warm.
    warmup_fresh: int = 10
    # Restart static agents per condition too, so every strategy runs in an equally fresh process (a long-lived
    # agent was measured faster than a just-started one doing the identical work).
    restart_per_condition: bool = False
    deadline_ms: float = 1000.0
    log_dir: Path | None = None  # process logs (default: a temporary directory)


@dataclass
class _Running:
    proc: Proc
    client: AgentClient
    condition: str | None  # the condition an adaptive agent was started for
    requests: int = 0  # answered so far, warm-ups included


class Testbed(Closing):
    """One service process behind one relay; agents started on demand. Use as a context manager."""

    def __init__(self, options: TestbedOptions):
        self.options = options
        self._tmp = tempfile.TemporaryDirectory(prefix="edgeexit-experiment-")
        self.log_dir = options.log_dir or Path(self._tmp.name)
        self.model = _model_name(options.bundle)
        self.service: Proc | None = None
        self.relay: Relay | None = None
        self._metrics_url = ""
        self._agents: dict[str, _Running] = {}
        self.exit_codes: list[tuple[str, int]] = []  # (process name, exit code) of every stopped process
        self.emulation: AgentEmulation | None = None  # resolved (and calibrated) on entry

    def open(self) -> None:
        # Calibrate before the service starts, on a quieter machine; cached per class, bundle and host.
        self.emulation = resolve_emulation(self.options.device_class, self.options.emulation,
                                           CalibrationOptions(workload=Path(self.options.bundle)))
        # The service's stdout goes to a buffered log, so pick the metrics port here rather than parse it.
        metrics_port = free_port()
        self.service = launch("serve", ["serve", str(self.options.bundle), "--port", "0", "--metrics-port",
                                        str(metrics_port), "--max-batch-size", "1",
                                        "--threads", str(self.options.service_threads)], self.log_dir)
        self._metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        self.relay = Relay(self.service.address).start()

    def close(self) -> None:
        for name in list(self._agents):
            self._stop_agent(name)
        if self.relay is not None:
            self.relay.close()
        if self.service is not None:
            self.exit_codes.append(("serve", self.service.stop()))
        self._tmp.cleanup()

    @property
    def cloud(self) -> str:
        host, port = self.relay.address
        return f"{host}:{port}"

    def set_condition(self, condition: Condition) -> None:
        self.relay.set(condition.link())

    def agent(self, strategy: Strategy, condition: Condition) -> AgentClient:
        """A client of a running agent for ``strategy`` (adaptive ones restarted when the condition changed)."""
        running = self._agents.get(strategy.name)
        restart = strategy.adaptive or self.options.restart_per_condition
        if running is not None and restart and running.condition != condition.name:
            self._stop_agent(strategy.name)
            running = None
        if running is None:
            prior = strategy.prior or str(condition.write_prior(Path(self._tmp.name)))
            bundle = self._no_exit_view() if strategy.policy == "never" else self.options.bundle
            args = strategy.agent_args(bundle, self.cloud, None, prior)  # emulation flags: launch_agent
            args += ["--deadline-ms", str(self.options.deadline_ms)]
            proc = launch_agent(f"agent-{_slug(strategy.name)}", args, self.log_dir, self.emulation)
            running = _Running(proc, AgentClient(proc.target, self.model), condition.name)
            self._agents[strategy.name] = running
        return running.client

    def warm_up(self, strategy: Strategy, condition: Condition, x: np.ndarray, y: np.ndarray) -> int:
        """Warm-up requests (not recorded): ``warmup`` per condition, and at least ``warmup_fresh`` per agent
        life. Returns how many were sent."""
        self.agent(strategy, condition)
        running = self._agents[strategy.name]
        n = max(self.options.warmup, self.options.warmup_fresh - running.requests)
        for i in range(n):
            self.measure(strategy, condition, -1, x[i % len(x)], int(y[i % len(y)]))
        return n

    def _no_exit_view(self) -> Path:
        """The bundle with its calibrated policy removed (segments copied: a bundle refuses a symlink out of it).

        `edgeexit agent --policy never` refuses a bundle calibrated for another policy (policy_from_manifest
        insists the kinds match), so "no early exit" runs on this view of the same files."""
        view = Path(self._tmp.name) / f"no-exit-{Path(self.options.bundle).name}"
        if not view.exists():
            view.mkdir()
            manifest = json.loads((Path(self.options.bundle) / "manifest.json").read_text())
            manifest["policy"] = None
            (view / "manifest.json").write_text(json.dumps(manifest))
            shutil.copytree(Path(self.options.bundle) / "segments", view / "segments")
        return view

    def _stop_agent(self, name: str) -> None:
        running = self._agents.pop(name)
        running.client.close()
        self.exit_codes.append((running.proc.name, running.proc.stop()))

    def cloud_seconds(self) -> float:
        """Total compute seconds the service has spent so far (sum over its models)."""
        with urllib.request.urlopen(self._metrics_url, timeout=5) as resp:
            text = resp.read().decode()
        return sum(float(v) for _, v in _METRIC_SUM.findall(text))

    def measure(self, strategy: Strategy, condition: Condition, index: int, x: np.ndarray, truth: int) -> Sample:
        client = self.agent(strategy, condition)
        before = self.cloud_seconds()
        ans = client.infer(x[None])
        self._agents[strategy.name].requests += 1
        cloud_ms = (self.cloud_seconds() - before) * 1e3
        p = ans.params
        offloaded = int(p.get("edgeexit.bytes_sent", 0)) > 0
        return Sample(
            strategy=strategy.name, condition=condition.name, index=index, label=int(ans.labels[0]),
            truth=int(truth), exit=int(ans.exits[0]), decided=ans.decided[0], split=str(p.get("edgeexit.split")),
            bytes_sent=int(p.get("edgeexit.bytes_sent", 0)), wall_ms=ans.seconds * 1e3,
            # The agent reports int64 microseconds (edgeexit.device_us, ...).
            device_ms=(int(p.get("edgeexit.device_us", 0)) + int(p.get("edgeexit.encode_us", 0))) / 1e3,
            network_ms=int(p.get("edgeexit.network_us", 0)) / 1e3, cloud_ms=cloud_ms if offloaded else 0.0,
            fallback="edgeexit.fallback" in p,
        )


def run_condition(bed: Testbed, strategies: Sequence[Strategy], condition: Condition, x: np.ndarray,
                  y: np.ndarray, on_request: Callable[[], None] | None = None) -> list[Sample]:
    """Every strategy on every sample under ``condition``, interleaved sample by sample; warm-ups excluded."""
    bed.set_condition(condition)
    for s in strategies:
        bed.warm_up(s, condition, x, y)
    rows = []
    for i in range(len(x)):
        for s in strategies:
            rows.append(bed.measure(s, condition, i, x[i], int(y[i])))
            if on_request is not None:
                on_request()
    return rows


def subsample(n: int, total: int) -> np.ndarray:
    """``n`` indices spread evenly over ``total`` (deterministic; covers the whole split, not its head)."""
    if n <= 0:
        raise ConfigError(f"--samples must be positive, got {n}")
    return np.unique(np.linspace(0, total - 1, min(n, total)).round().astype(int))


def _model_name(bundle: Path) -> str:
    from edgeexit.bundle import Bundle

    return Bundle.load(bundle, verify=False).manifest.name


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def dataset_for(manifest: Any) -> str:
    """The Fashion-MNIST variant that matches a bundle's input size (28 = the original, else resized)."""
    size = int(manifest.input.shape[-1])
    return "fashion-mnist" if size == 28 else f"fashion-mnist-{size}"


def prepare_bundle(bundle: Path, say: Callable[[str], None] = print) -> tuple[Path, list[str]]:
    """A bundle ready to measure: calibrated and profiled (each missing step runs the real CLI and is reported
    in the notes), on the Fashion-MNIST variant of its input size."""
    from edgeexit.bundle import Bundle

    notes: list[str] = []
    if not (Path(bundle) / "manifest.json").is_file():
        raise ConfigError(f"bundle {bundle} not found (no manifest.json); create it with `edgeexit export` "
                          "(`make bench` exports the shipped camera model)")
    manifest = Bundle.load(bundle, verify=False).manifest
    data = dataset_for(manifest)
    if not manifest.policy or manifest.policy.get("kind") in (None, "never"):
        _cli(["calibrate", str(bundle), "--data", data, "--split", "val", "--no-progress"], say)
        notes.append(f"calibrated the exits on the {data} val split (the calibrate command's defaults)")
    for role, threads in (("device", "1"), ("cloud", "1")):  # the service runs 1 thread: see TestbedOptions
        if role not in manifest.profiles:
            _cli(["profile", str(bundle), "--role", role, "--threads", threads, "--store"], say)
            notes.append(f"profiled this host as the {role} ({threads} thread(s)) and stored it in the bundle")
    return Path(bundle), notes


def _cli(args: list[str], say: Callable[[str], None]) -> None:
    import subprocess
    import sys

    say(f"running: edgeexit {' '.join(args)}")
    done = subprocess.run([sys.executable, "-m", "edgeexit", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise ConfigError(f"`edgeexit {' '.join(args)}` failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
