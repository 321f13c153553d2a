"""`edgeexit bench`: the end-to-end benchmark (edgeexit.testbed.bench), real agent + service over emulated
networks."""

from __future__ import annotations

import argparse

from edgeexit.testbed import bench  # light at import: its docstring is the command's description
from edgeexit.testbed.bench import DEFAULT_NETWORKS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="end-to-end benchmark: real agent + service over emulated networks",
                       description=bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from edgeexit.testbed.bench import BenchOptions, bench

    bundle = Path(args.bundle) if args.bundle else None
    bench(BenchOptions(model=None if bundle else Path(args.model), bundle=bundle, device=args.device,
                       networks=[n.strip() for n in args.networks.split(",") if n.strip()], samples=args.samples,
                       warmup=args.warmup, deadline_ms=args.deadline_ms, out=Path(args.out),
                       progress=not args.no_progress))
    return 0
