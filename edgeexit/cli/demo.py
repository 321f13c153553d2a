"""`edgeexit demo BUNDLE`: serve + agent over an emulated network (edgeexit.testbed.demo)."""

from __future__ import annotations

import argparse

from edgeexit.testbed import demo  # light at import: its docstring is the command's description


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="serve + agent over an emulated network; stream a dataset through the agent",
                       description=demo.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="path to NAME.edgeexit (calibrate it first to see early exits)")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, help="first N samples only")
    p.add_argument("--batch", type=int, default=100, help="rows per request the app sends (default 100)")
    p.add_argument("--network", default="4g", help="network profile the link emulates (default 4g)")
    p.add_argument("--emulate-device", default="raspberry-pi-4", metavar="CLASS",
                   help="device class whose slowdown the agent emulates (default raspberry-pi-4; 'host' = none)")
    p.add_argument("--encoding", default="int8", choices=["fp32", "fp16", "int8"])
    p.add_argument("--agent-split", default="auto",
                   help="the agent's --split: auto (the planner's choice, adapted online), N, device or cloud")
    p.add_argument("--work", default="artifacts/demo", help="folder for the processes' logs")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    return demo.run_demo(demo.DemoOptions(
        args.bundle, data=args.data, split=args.split, limit=args.limit, batch=args.batch, network=args.network,
        emulate_device=args.emulate_device, encoding=args.encoding, agent_split=args.agent_split,
        work=Path(args.work)))
