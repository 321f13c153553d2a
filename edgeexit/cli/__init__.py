"""`edgeexit` command line: one module per subcommand in this package.

Each command module defines ``register(subparsers)`` and keeps its imports light at module level (heavy
imports such as torch go inside the function that runs the command), so `edgeexit agent` never imports
torch and `--help` is instant. User errors (``EdgeExitError``) print one line and exit 2, no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from edgeexit.errors import EdgeExitError

# Subcommand name -> module in edgeexit.cli. A command whose module is not there yet is simply not listed.
COMMANDS = ["train", "export", "calibrate", "evaluate", "profile", "plan", "serve", "agent", "netsim", "bench", "demo"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeexit",
        description="Deploy early-exit neural networks across an edge device and a server.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"edgeexit.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"edgeexit.cli.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except EdgeExitError as e:
        print(f"edgeexit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"edgeexit {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
