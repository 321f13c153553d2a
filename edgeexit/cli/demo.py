"""`edgeexit demo BUNDLE`: serve + agents over an emulated network (edgeexit.testbed.demo)."""

from __future__ import annotations

import argparse

from edgeexit.testbed import demo  # light at import: its docstring is the command's description


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="serve + agents over emulated networks: the planner's choice next to device-only "
                                    "and cloud-only", description=demo.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="path to NAME.edgeexit (calibrated and profiled: see `make demo`)")
    p.add_argument("--data", default=None,
                   help="dataset (default: the Fashion-MNIST variant of the bundle's input size: fashion-mnist-96)")
    p.add_argument("--networks", default="4g,wifi", help="network profiles the link emulates, one after another "
                                                         "(default 4g,wifi)")
    p.add_argument("--emulate-device", default="raspberry-pi-4", metavar="CLASS",
                   help="device class the agents EMULATE (default raspberry-pi-4; 'host' = none)")
    p.add_argument("--emulation", choices=("auto", "cgroup", "stretch"), default="auto",
                   help="a CPU quota on the whole agent process (cgroup, as root) or a stretch of its compute")
    p.add_argument("--samples", type=int, default=40, help="test images per network (default 40)")
    p.add_argument("--warmup", type=int, default=5, help="warm-up requests per agent and network (default 5)")
    p.add_argument("--work", default="artifacts/demo", help="folder for the processes' logs")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    return demo.run_demo(demo.DemoOptions(
        Path(args.bundle), data=args.data, networks=[n.strip() for n in args.networks.split(",") if n.strip()],
        device=args.emulate_device, emulation=args.emulation, samples=args.samples, warmup=args.warmup,
        work=Path(args.work)))
