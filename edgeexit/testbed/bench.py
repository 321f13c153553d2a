"""The end-to-end benchmark behind `edgeexit bench`. Fashion-MNIST test samples through real `edgeexit agent`
and `edgeexit serve` processes over an emulated link, per network profile, for six strategies:

- device-only: the full model on the device, no early exit (``--split device --policy never``);
- cloud-only: send the input (``--split cloud``);
- neurosurgeon: the best static split without exits, picked from MEASUREMENTS (the fastest of every
  ``--split N --policy never``, device-only and cloud-only under that network: an upper bound for
  Neurosurgeon, which picks from a model);
- branchynet: local exits only (``--split device``, calibrated policy);
- edgeexit: the planner with online adaptation (``--split auto --adapt planner``, calibrated policy,
  ``--network`` prior = the network profile under test);
- oracle: the fastest measured static configuration (every split point x {never, calibrated}, device, cloud).

The device's speed is EMULATED (``--emulate-device``: the agent stretches its compute by the device class's
slowdown); the cloud is this host. Writes bench.json, bench.md and bench.png into --out; the last stdout
line is one JSON object with ``edgeexit_over_oracle_worst`` and ``edgeexit_over_best_baseline_mean``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeexit.errors import ConfigError

if TYPE_CHECKING:
    from edgeexit.testbed.experiment import Strategy
    from edgeexit.testbed.experiment_report import Summary

DEFAULT_NETWORKS = "3g,4g,5g,wifi,congested"
BASELINES = ("device-only", "cloud-only", "neurosurgeon", "branchynet")
ORDER = ("device-only", "cloud-only", "neurosurgeon", "branchynet", "edgeexit", "oracle")
log = logging.getLogger(__name__)
# Module-level imports stay light: `edgeexit --help` (and every command's parser) reads this docstring.


@dataclass
class BenchOptions:
    model: Path | None  # a trained model to export first, or
    bundle: Path | None  # an exported bundle (calibrated and profiled here if it is not)
    device: str = "raspberry-pi-4"  # device class to EMULATE on the agents ("host" = no emulation)
    networks: list[str] = field(default_factory=lambda: DEFAULT_NETWORKS.split(","))
    samples: int = 20
    warmup: int = 3
    deadline_ms: float = 1000.0
    out: Path = Path("benchmarks/results")
    progress: bool = True

    def __post_init__(self) -> None:
        if self.samples <= 0 or self.warmup < 0 or self.deadline_ms <= 0:
            raise ConfigError("--samples and --deadline-ms must be positive and --warmup >= 0")
        if not self.networks:
            raise ConfigError("--networks is empty; give profile names such as 4g,wifi")


def strategies(num_split_points: int) -> list[Strategy]:
    """Every measured strategy: the static configurations, then edgeexit (adaptive)."""
    from edgeexit.testbed.experiment import Strategy

    static = [Strategy("device-only", "device", "never"), Strategy("cloud-only", "cloud", "never"),
              Strategy("branchynet", "device")]
    for s in range(num_split_points):
        static += [Strategy(f"split@{s}/never", str(s), "never"), Strategy(f"split@{s}/calibrated", str(s))]
    return [*static, Strategy("edgeexit", "auto", adapt="planner")]


def derive(by_strategy: dict[str, Summary]) -> dict[str, Summary]:
    """Add neurosurgeon (best measured no-exit static split) and oracle (best measured static config)."""
    from edgeexit.testbed.experiment_report import best_of

    measured = [n for n in by_strategy if n != "edgeexit"]
    no_exit = [n for n in measured if n.endswith("/never") or n in ("device-only", "cloud-only")]
    return {**by_strategy, "neurosurgeon": best_of(by_strategy, no_exit, "neurosurgeon"),
            "oracle": best_of(by_strategy, measured, "oracle")}


def run_bench(o: BenchOptions) -> dict[str, Any]:
    from edgeexit import datasets
    from edgeexit.bundle import Bundle
    from edgeexit.logs import ProgressBar
    from edgeexit.profiles import load_device_class, load_network
    from edgeexit.testbed.experiment import Condition, Testbed, TestbedOptions, prepare_bundle, run_condition, subsample
    from edgeexit.testbed.experiment_report import ratio_stats, summarize_all

    device = load_device_class(o.device)  # fail on a wrong name before any work
    conditions = [Condition.from_network(load_network(n)) for n in o.networks]
    work = Path(o.model).parent if o.model else Path("artifacts")
    bundle, notes = prepare_bundle(o.model, o.bundle, work, say=log.info)
    manifest = Bundle.load(bundle, verify=False).manifest
    x_all, y_all = datasets.load("fashion-mnist", "test")
    idx = subsample(o.samples, len(x_all))
    x, y = x_all[idx], y_all[idx]
    strats = strategies(len(manifest.split_points))
    emulated = f"EMULATED {device.name} (host compute x {device.slowdown:g})" if device.emulated else "host speed"
    rows = []
    with Testbed(TestbedOptions(bundle, device.name if device.emulated else None, warmup=o.warmup,
                                deadline_ms=o.deadline_ms)) as bed:
        for cond in conditions:
            with ProgressBar(len(strats) * len(x), o.progress, f"bench {cond.name}", unit="req") as bar:
                rows += run_condition(bed, strats, cond, x, y, on_request=bar.update)
    table = {c: derive(by) for c, by in summarize_all(rows).items()}
    over_oracle = [table[c.name]["edgeexit"].mean_ms / table[c.name]["oracle"].mean_ms for c in conditions]
    over_base = [table[c.name]["edgeexit"].mean_ms / min(table[c.name][b].mean_ms for b in BASELINES)
                 for c in conditions]
    return {
        "bundle": str(bundle), "model": manifest.name, "device": emulated, "device_class": device.name,
        "emulated": device.emulated, "samples_per_network": int(len(x)), "warmup_per_agent": o.warmup,
        "dataset": "fashion-mnist test, evenly spaced subsample", "deadline_ms": o.deadline_ms,
        "networks": [asdict(c) for c in conditions], "notes": notes,
        "neurosurgeon": "the fastest MEASURED static split without exits (incl. device-only and cloud-only)",
        "results": {c: {s: asdict(v) for s, v in by.items()} for c, by in table.items()},
        "edgeexit_over_oracle": dict(zip([c.name for c in conditions], over_oracle, strict=True)),
        "edgeexit_over_best_baseline": dict(zip([c.name for c in conditions], over_base, strict=True)),
        "edgeexit_over_oracle_worst": ratio_stats(over_oracle)["worst"],
        "edgeexit_over_best_baseline_mean": ratio_stats(over_base)["mean"],
        "_table": table,
    }


def write_outputs(result: dict[str, Any], out: Path) -> str:
    """bench.json, bench.md and bench.png into ``out``; returns the Markdown."""
    from edgeexit.testbed.experiment_report import markdown, plot_latency_vs_bandwidth

    table = result.pop("_table")
    main = [by[s] for by in table.values() for s in ORDER]
    every = [v for by in table.values() for s, v in by.items() if s not in ("neurosurgeon", "oracle", "edgeexit")]
    md = (f"# edgeexit bench: {result['model']} on {result['device']}\n\n"
          f"{result['samples_per_network']} Fashion-MNIST test images per network (evenly spaced over the 10k), "
          f"{result['warmup_per_agent']} warm-up requests per agent excluded, one request at a time, strategies "
          "interleaved sample by sample. Device compute is "
          f"{'EMULATED' if result['emulated'] else 'measured on this host'}; cloud compute is this host "
          "(from the service's metrics). Latency is what the app saw.\n\n"
          + "".join(f"- note: {n}\n" for n in result["notes"]) + "\n"
          + markdown(main) + "\n\nEvery static configuration measured (the oracle's pool):\n\n" + markdown(every)
          + f"\n\nedgeexit / oracle (worst): {result['edgeexit_over_oracle_worst']:.3f}; edgeexit / best baseline "
          f"(mean): {result['edgeexit_over_best_baseline_mean']:.3f}\n")
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "bench.md").write_text(md)
    bw = {n["name"]: n["up_mbit"] for n in result["networks"]}
    series: dict[str, list[tuple[float, float]]] = {}
    for cond, by in table.items():
        for s in ORDER:
            series.setdefault(s, []).append((bw[cond], by[s].mean_ms))
    plot_latency_vs_bandwidth(out / "bench.png", {"networks: " + ", ".join(table): series},
                              f"{result['model']}: measured latency per strategy; device {result['device']}")
    return md


def bench(o: BenchOptions) -> dict[str, Any]:
    """Run, write the outputs, print the Markdown and, last, the headline figures as one JSON line."""
    result = run_bench(o)
    print(write_outputs(result, o.out))
    print(f"wrote {o.out / 'bench.json'}, bench.md and bench.png")
    print(json.dumps({"edgeexit_over_oracle_worst": round(result["edgeexit_over_oracle_worst"], 4),
                      "edgeexit_over_best_baseline_mean": round(result["edgeexit_over_best_baseline_mean"], 4)}))
    return result
