"""`edgeexit bench`: the end-to-end split-computing benchmark (edgeexit.testbed.bench), real agent + service
processes over emulated networks and EMULATED device classes."""

from __future__ import annotations

import argparse

from edgeexit.testbed import bench  # light at import: its docstring is the command's description
from edgeexit.testbed.bench import DEFAULT_DEVICES, DEFAULT_MODEL, DEFAULT_NETWORKS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="end-to-end benchmark: real agent + service over emulated networks",
                       description=bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default=DEFAULT_MODEL,
                   help="an exported NAME.edgeexit, calibrated and profiled here if it is not "
                        f"(default {DEFAULT_MODEL}, which `make bench` exports from the shipped camera model)")
    p.add_argument("--devices", default=DEFAULT_DEVICES,
                   help=f"device classes to EMULATE (devices/classes; default {DEFAULT_DEVICES})")
    p.add_argument("--networks", default=DEFAULT_NETWORKS, help=f"network profiles (default {DEFAULT_NETWORKS})")
    p.add_argument("--samples", type=int, default=200,
                   help="test images per condition, every strategy answering each (default 200; the default grid "
                        "takes ~27 min on 2 cores; fewer --devices/--networks for a shorter run)")
    p.add_argument("--warmup", type=int, default=10, help="warm-up requests per agent and condition, excluded (10)")
    p.add_argument("--deadline-ms", type=float, default=3000.0, help="the agents' per-request deadline (3000)")
    p.add_argument("--emulation", choices=("auto", "cgroup", "stretch"), default="auto",
                   help="how agents EMULATE the device: a CPU quota on the whole process (cgroup, as root), a "
                        "stretch of segment compute, or auto (cgroup when possible)")
    p.add_argument("--parallel", type=int, default=6,
                   help="conditions measured at once, each on its own service, link and agents (default 6)")
    p.add_argument("--no-bandit", action="store_true", help="skip the bandit strategy (--adapt bandit)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (0)")
    p.add_argument("--out", default="benchmarks/results", help="where bench.json/.md/.png go")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--logs", help="keep every process's log (agents' split moves, probes, fallbacks) in this "
                                  "folder, one subfolder per condition")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from edgeexit.testbed.bench import BenchOptions

    def names(text: str) -> list[str]:
        return [n.strip() for n in text.split(",") if n.strip()]

    bench.bench(BenchOptions(bundle=Path(args.bundle), devices=names(args.devices), networks=names(args.networks),
                             samples=args.samples, warmup=args.warmup, deadline_ms=args.deadline_ms,
                             emulation=args.emulation, bandit=not args.no_bandit, parallel=args.parallel,
                             out=Path(args.out), progress=not args.no_progress, seed=args.seed,
                             logs=Path(args.logs) if args.logs else None))
    return 0
