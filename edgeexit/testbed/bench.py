"""The end-to-end split-computing benchmark behind `edgeexit bench`.

Real `edgeexit agent` and `edgeexit serve` processes over an emulated link, for every condition of a grid of
EMULATED device classes x network profiles, on the camera-class reference model (camera-resnet on
Fashion-MNIST resized to 96x96). Strategies, each a long-lived agent per condition:

- device-only: the whole model on the device, no early exit (``--split device --policy never``);
- cloud-only: the raw uint8 input to the cloud's whole model (``--split cloud``);
- neurosurgeon: the static split without exits that the cost model picks from the measured profiles and the
  network (device-only, cloud-only or ``--split N --policy never``); measured as its own agent unless it is
  identical to device-only or cloud-only, whose rows it then shares;
- branchynet: local exits only (``--split device``, calibrated policy);
- cascade@N: the device's exits in segments 0..N, then the raw input to the cloud (``--split cascade@N``);
- split@N: every static split with the calibrated policy, int8 boundary (``--split N``);
- edgeexit: ``--split auto`` (the planner, with online adaptation to the measured link and server time);
- bandit: ``--split auto --adapt bandit`` (SplitEE-style UCB, no cost model).

Method: per condition every strategy answers the same requests, interleaved request by request, warm-up
excluded. Means and p95s carry 95% bootstrap intervals; the **best static configuration in hindsight** (with
its interval) and the **per-request hindsight bound** are the two oracles; edgeexit / best static is a paired
bootstrap ratio. The planner's expected latency for every strategy is printed next to the measured one.
Conditions run ``--parallel`` at a time, the longest first, each on its own service, link and agents: most of
an emulated request is spent throttled or on the emulated link, so concurrent conditions share the 2 cores
with little interference, and every strategy of a condition is measured under the same load.

The last stdout line is one JSON object: worst_over_oracle, mean_over_oracle, distinct_winners,
best_speedup_over_baselines, mean_speedup_over_baselines, cost_model_error, samples_per_condition, emulation.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeexit.errors import ConfigError

if TYPE_CHECKING:
    from edgeexit.bundle import Manifest
    from edgeexit.planner import Candidate, Planner
    from edgeexit.testbed.experiment import Sample, Strategy

DEFAULT_MODEL = "artifacts/camera_resnet.edgeexit"
DEFAULT_DEVICES = "mid-range-phone,raspberry-pi-4,jetson-nano"
DEFAULT_NETWORKS = "wifi,5g,4g,3g,congested"
log = logging.getLogger(__name__)
# Module-level imports stay light: `edgeexit --help` (and every command's parser) reads this docstring.


@dataclass
class BenchOptions:
    bundle: Path = Path(DEFAULT_MODEL)  # exported; calibrated and profiled here if it is not
    devices: list[str] = field(default_factory=lambda: DEFAULT_DEVICES.split(","))
    networks: list[str] = field(default_factory=lambda: DEFAULT_NETWORKS.split(","))
    samples: int = 200  # requests per strategy and condition
    warmup: int = 10  # per agent and condition, excluded
    deadline_ms: float = 3000.0
    emulation: str = "auto"  # auto | cgroup | stretch
    bandit: bool = True
    parallel: int = 6  # conditions measured at once (each on its own service, link and agents)
    out: Path = Path("benchmarks/results")
    progress: bool = True
    seed: int = 0
    logs: Path | None = None  # keep every process's log here, one folder per condition (default: discarded)

    def __post_init__(self) -> None:
        if self.samples < 2 or self.warmup < 0 or self.deadline_ms <= 0 or self.parallel < 1:
            raise ConfigError("--samples must be >= 2, --warmup >= 0, --parallel >= 1 and --deadline-ms positive")
        if not self.networks or not self.devices:
            raise ConfigError("--networks and --devices need at least one name each (e.g. 4g,wifi)")


@dataclass
class ConditionRun:
    """One device class x network: the measured rows, what the planner predicted, the emulation that ran."""

    device: str
    network: str
    rows: list[Sample] = field(default_factory=list)
    predicted: dict[str, float] = field(default_factory=dict)  # strategy -> the planner's expected ms
    choice: str = ""  # the planner's choice (label) for this condition
    neurosurgeon: str = ""  # the strategy neurosurgeon resolved to
    emulation: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def calibrated_setting(manifest: Manifest) -> str | None:
    """The name of the planner's exit setting that the bundle's calibrated policy uses (None: uncalibrated)."""
    from edgeexit.planner import exit_settings

    policy = manifest.policy or {}
    want = [float(t) for t in policy.get("thresholds") or []]
    for s in exit_settings(manifest)[1:]:
        if len(s.thresholds) == len(want) and all(abs(a - b) <= 1e-9 * max(1, abs(b)) for a, b in
                                                  zip(s.thresholds, want, strict=True)):
            return s.name
    return None


def cascade_points(manifest: Manifest) -> list[int]:
    """Device prefixes worth a cascade: those that end with an early exit (a prefix past it only adds work)."""
    final = len(manifest.exits) - 1
    return [k for k, seg in enumerate(manifest.segments) if any(j < final for j in seg.exits)]


def static_strategies(manifest: Manifest) -> list[Strategy]:
    from edgeexit.testbed.experiment import Strategy

    out = [Strategy("device-only", "device", "never"), Strategy("cloud-only", "cloud", "never"),
           Strategy("branchynet", "device")]
    out += [Strategy(f"cascade@{k}", f"cascade@{k}") for k in cascade_points(manifest)]
    out += [Strategy(f"split@{s}", str(s), encoding="int8") for s in range(len(manifest.split_points))]
    return out


def candidate_of(strategy: str, planner: Planner, net: Any, setting: str | None) -> Candidate | None:
    """The planner's candidate that a static strategy runs (None when it has none)."""
    from edgeexit.planner import NO_EXIT

    label = {"device-only": f"device-only/{NO_EXIT}", "cloud-only": f"cloud-only/{NO_EXIT}",
             "branchynet": f"device-only/{setting}"}.get(strategy)
    if label is None and strategy.startswith("cascade@"):
        label = f"{strategy}/{setting}"
    elif label is None and strategy.startswith("split@"):
        label = f"{strategy}/int8/{setting}"
    return next((c for c in planner.candidates(net) if c.label == label), None)


def neurosurgeon(planner_no_exit: Planner, net: Any) -> Strategy:
    """Neurosurgeon: the fastest static split without exits by the cost model (profiles + network)."""
    from edgeexit.runtime.splits import candidate_split
    from edgeexit.testbed.experiment import Strategy

    c = planner_no_exit.plan(net).choice
    return Strategy("neurosurgeon", str(candidate_split(c)), "never", encoding=c.encoding or "fp32")


@dataclass
class _Planners:
    full: Planner  # every exit setting, int8 boundaries
    no_exit: Planner  # "never exit early" only: Neurosurgeon's view
    setting: str  # the calibrated setting's name


def _planners(manifest: Manifest, device: str) -> _Planners:
    from edgeexit.planner import NO_EXIT, Planner, exit_settings
    from edgeexit.profiles import LatencyProfile, load_device_class

    dev = LatencyProfile.from_dict(manifest.profiles["device"]).scaled(load_device_class(device))
    cloud = LatencyProfile.from_dict(manifest.profiles["cloud"])
    return _Planners(Planner(manifest, dev, cloud, encodings=("int8",)),
                     Planner(manifest, dev, cloud, settings=exit_settings(manifest)[:1], encodings=("int8",)),
                     calibrated_setting(manifest) or NO_EXIT)


def run_one(o: BenchOptions, device: str, network: str, x: Any, y: Any, bar: Any) -> ConditionRun:
    """One condition on its own service, link and long-lived agents (one per strategy)."""
    from edgeexit.bundle import Bundle
    from edgeexit.profiles import load_network
    from edgeexit.testbed.experiment import Condition, Strategy, Testbed, TestbedOptions, run_condition

    run = ConditionRun(device, network)
    manifest = Bundle.load(o.bundle, verify=False).manifest
    plans = _planners(manifest, device)
    statics = static_strategies(manifest)
    net = load_network(network)
    ns = neurosurgeon(plans.no_exit, net)
    same = next((s.name for s in statics[:2] if (s.split, s.policy) == (ns.split, ns.policy)), None)
    strategies = [*statics, *([] if same else [ns]), Strategy("edgeexit", "auto", encoding="int8")]
    if o.bandit:
        strategies.append(Strategy("bandit", "auto", adapt="bandit", encoding="int8"))
    log_dir = None
    if o.logs is not None:
        log_dir = Path(o.logs) / f"{device}-{network}"
        log_dir.mkdir(parents=True, exist_ok=True)
    with Testbed(TestbedOptions(o.bundle, device, emulation=o.emulation, warmup=o.warmup, warmup_fresh=o.warmup,
                                deadline_ms=o.deadline_ms, log_dir=log_dir)) as bed:
        run.emulation = bed.emulation.to_dict()
        run.rows = run_condition(bed, strategies, Condition.from_network(net), x, y, on_request=bar)
    if same:  # neurosurgeon IS that static strategy: the same agent, the same rows
        run.rows += [_renamed(r, "neurosurgeon") for r in run.rows if r.strategy == same]
    run.neurosurgeon = same or f"split@{ns.split}/never"
    run.predicted = {s.name: c.latency_ms for s in statics
                     if (c := candidate_of(s.name, plans.full, net, plans.setting)) is not None}
    run.predicted["neurosurgeon"] = plans.no_exit.plan(net).choice.latency_ms
    choice = plans.full.plan(net).choice
    run.predicted["edgeexit"], run.choice = choice.latency_ms, choice.label
    return run


def expected_seconds(manifest: Manifest, device: str, network: str, samples: int) -> float:
    """The planner's estimate of one condition's duration (every static strategy, ``samples`` times)."""
    from edgeexit.profiles import load_network

    plans = _planners(manifest, device)
    net = load_network(network)
    per_round = sum(c.latency_ms for s in static_strategies(manifest)
                    if (c := candidate_of(s.name, plans.full, net, plans.setting)) is not None)
    return per_round * samples / 1e3


def _renamed(row: Sample, name: str) -> Sample:
    from dataclasses import replace

    return replace(row, strategy=name)


def run_bench(o: BenchOptions) -> dict[str, Any]:
    from edgeexit import datasets
    from edgeexit.bundle import Bundle
    from edgeexit.logs import ProgressBar
    from edgeexit.profiles import load_device_class, load_network
    from edgeexit.testbed.bench_report import analyse
    from edgeexit.testbed.device_emulation import CalibrationOptions, resolve_emulation
    from edgeexit.testbed.experiment import dataset_for, prepare_bundle, subsample

    for d in o.devices:
        load_device_class(d)  # fail on a wrong name before any work
    for n in o.networks:
        load_network(n)
    bundle, notes = prepare_bundle(o.bundle, say=log.info)
    o.bundle = bundle
    manifest = Bundle.load(bundle, verify=False).manifest
    dataset = dataset_for(manifest)
    x_all, y_all = datasets.load(dataset, "test")
    idx = subsample(o.samples, len(x_all))
    x, y = x_all[idx], y_all[idx]
    per_condition = len(static_strategies(manifest)) + 2 + int(o.bandit)
    grid = [(d, n) for d in o.devices for n in o.networks]
    # The longest conditions first, so the pool ends together; each condition has its own processes.
    grid.sort(key=lambda dn: -expected_seconds(manifest, dn[0], dn[1], len(x)))
    # Calibrate each class's CPU quota now, one at a time, before anything else runs. Always afresh: how much a
    # quota slows a request drifted on this VM within hours (a cached quota slowed it x3.9 instead of x5.7).
    for d in o.devices:
        resolve_emulation(d, o.emulation, CalibrationOptions(workload=Path(bundle), refresh=True))
    runs: dict[tuple[str, str], ConditionRun] = {}
    with ProgressBar(len(grid) * per_condition * len(x), o.progress, "bench", unit="req") as bar:
        lock = threading.Lock()

        def tick() -> None:
            with lock:
                bar.update()

        def work(cond: tuple[str, str]) -> None:
            try:
                runs[cond] = run_one(o, cond[0], cond[1], x, y, tick)
            except Exception as e:  # reported below; the other conditions finish
                log.exception("bench: condition %s failed", cond)
                runs[cond] = ConditionRun(*cond, error=f"{type(e).__name__}: {e}")

        with ThreadPoolExecutor(max_workers=o.parallel, thread_name_prefix="bench") as pool:
            list(pool.map(work, grid))
    failed = {f"{d}/{n}": r.error for (d, n), r in runs.items() if r.error}
    if failed:
        raise ConfigError(f"the benchmark failed for {failed}; see the agents' logs")
    result = analyse([runs[(d, n)] for d in o.devices for n in o.networks], o, seed=o.seed)
    result.update({"bundle": str(bundle), "model": manifest.name, "notes": notes,
                   "dataset": f"{dataset} (Fashion-MNIST resized to {manifest.input.shape[-1]}x"
                              f"{manifest.input.shape[-1]}), test split, {len(x)} evenly spaced images"})
    return result


def bench(o: BenchOptions) -> dict[str, Any]:
    """Run the benchmark, write bench.json/.md/.png into ``o.out`` and print the headline JSON last."""
    import json

    from edgeexit.testbed.bench_report import write_outputs

    result = run_bench(o)
    print(write_outputs(result, o.out))
    print(json.dumps(result["headline"]))
    return result
