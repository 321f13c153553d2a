"""`edgeexit bench`: the end-to-end benchmark. Fashion-MNIST test samples through real `edgeexit agent` and
`edgeexit serve` processes over an emulated link, per network profile, for six strategies:

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

import argparse
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_NETWORKS = "3g,4g,5g,wifi,congested"
BASELINES = ("device-only", "cloud-only", "neurosurgeon", "branchynet")
ORDER = ("device-only", "cloud-only", "neurosurgeon", "branchynet", "edgeexit", "oracle")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="end-to-end benchmark: real agent + service over emulated networks",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default="artifacts/resnet_exits.pt2",
                     help="a trained model to export first (default artifacts/resnet_exits.pt2)")
    src.add_argument("--bundle", help="an exported NAME.edgeexit (calibrated and profiled here if it is not)")
    p.add_argument("--device", default="raspberry-pi-4",
                   help="device class to EMULATE on the agent (devices/classes; 'host' = no emulation)")
    p.add_argument("--networks", default=DEFAULT_NETWORKS, help=f"network profiles to run (default {DEFAULT_NETWORKS})")
    p.add_argument("--samples", type=int, default=20,
                   help="Fashion-MNIST test images per network, spread evenly over the 10k (default 20: bounded "
                        "for a shared 2-core machine; raise it on a quiet one)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up requests per agent and network, excluded (3)")
    p.add_argument("--deadline-ms", type=float, default=1000.0, help="the agents' per-request deadline (1000)")
    p.add_argument("--out", default="benchmarks/results", help="where bench.json/.md/.png go")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


@dataclass
class BenchOptions:
    model: Path | None
    bundle: Path | None
    device: str = "raspberry-pi-4"
    networks: list[str] = field(default_factory=lambda: DEFAULT_NETWORKS.split(","))
    samples: int = 20
    warmup: int = 3
    deadline_ms: float = 1000.0
    out: Path = Path("benchmarks/results")
    progress: bool = True


def strategies(num_split_points: int) -> list[Any]:
    """Every measured strategy: the static configurations, then edgeexit (adaptive)."""
    from edgeexit.testbed.experiment import Strategy

    static = [Strategy("device-only", "device", "never"), Strategy("cloud-only", "cloud", "never"),
              Strategy("branchynet", "device")]
    for s in range(num_split_points):
        static += [Strategy(f"split@{s}/never", str(s), "never"), Strategy(f"split@{s}/calibrated", str(s))]
    return [*static, Strategy("edgeexit", "auto", adapt="planner")]


def derive(by_strategy: dict[str, Any]) -> dict[str, Any]:
    """Add neurosurgeon (best measured no-exit static split) and oracle (best measured static config)."""
    from edgeexit.testbed.experiment_report import best_of

    measured = [n for n in by_strategy if n != "edgeexit"]
    no_exit = [n for n in measured if n.endswith("/never") or n in ("device-only", "cloud-only")]
    return {**by_strategy, "neurosurgeon": best_of(by_strategy, no_exit, "neurosurgeon"),
            "oracle": best_of(by_strategy, measured, "oracle")}


def run_bench(o: BenchOptions) -> dict[str, Any]:
    from tqdm import tqdm

    from edgeexit import datasets
    from edgeexit.bundle import Bundle
    from edgeexit.testbed.experiment import Condition, Testbed, TestbedOptions, prepare_bundle, run_condition, subsample
    from edgeexit.testbed.experiment_report import ratio_stats, summarize_all
    from edgeexit.profiles import load_device_class, load_network

    device = load_device_class(o.device)  # fail on a wrong name before any work
    conditions = [Condition.from_network(load_network(n)) for n in o.networks]
    work = Path(o.model).parent if o.model else Path("artifacts")
    bundle, notes = prepare_bundle(o.model, o.bundle, work, say=lambda m: tqdm.write(m))
    manifest = Bundle.load(bundle, verify=False).manifest
    x_all, y_all = datasets.load("fashion-mnist", "test")
    idx = subsample(o.samples, len(x_all))
    x, y = x_all[idx], y_all[idx]
    strats = strategies(len(manifest.split_points))
    emulated = f"EMULATED {device.name} (host compute x {device.slowdown:g})" if device.emulated else "host speed"
    bar = tqdm(total=len(conditions) * len(strats) * len(x), desc="bench", unit="req", disable=not o.progress)
    rows = []
    with Testbed(TestbedOptions(bundle, device.name if device.emulated else None, warmup=o.warmup,
                                deadline_ms=o.deadline_ms)) as bed:
        for cond in conditions:
            bar.set_postfix_str(cond.name)
            rows += run_condition(bed, strats, cond, x, y, on_request=bar.update)
    bar.close()
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
    import json

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


def run(args: argparse.Namespace) -> int:
    import json

    from edgeexit.errors import ConfigError

    if args.samples <= 0 or args.warmup < 0 or args.deadline_ms <= 0:
        raise ConfigError("--samples and --deadline-ms must be positive and --warmup >= 0")
    bundle = Path(args.bundle) if args.bundle else None
    opts = BenchOptions(model=None if bundle else Path(args.model), bundle=bundle,
                        device=args.device, networks=[n.strip() for n in args.networks.split(",") if n.strip()],
                        samples=args.samples, warmup=args.warmup, deadline_ms=args.deadline_ms, out=Path(args.out),
                        progress=not args.no_progress)
    if not opts.networks:
        raise ConfigError("--networks is empty; give profile names such as 4g,wifi")
    result = run_bench(opts)
    print(write_outputs(result, opts.out))
    print(f"wrote {opts.out / 'bench.json'}, bench.md and bench.png")
    print(json.dumps({"edgeexit_over_oracle_worst": round(result["edgeexit_over_oracle_worst"], 4),
                      "edgeexit_over_best_baseline_mean": round(result["edgeexit_over_best_baseline_mean"], 4)}))
    return 0
