"""`edgeexit` command line: one module per subcommand in this package.

Each command module defines ``register(subparsers)`` and keeps its imports light at module level (heavy
imports such as torch go inside the function that runs the command), so `edgeexit agent` never imports
torch and `--help` is instant. User errors (``EdgeExitError``) print one line and exit 2, no traceback.
Logging is configured here, once, for every command (edgeexit.logs): JSON lines for agent and serve.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from edgeexit import logs
from edgeexit.errors import EdgeExitError
from edgeexit.extras import missing_extra

# Subcommand name -> module in edgeexit.cli (the triton module registers triton-repo too).
COMMANDS = ["train", "bottleneck", "export", "calibrate", "evaluate", "profile", "plan", "serve", "agent", "triton",
            "netsim", "bench", "demo", "doctor", "info"]
JSON_LOGS = {"agent", "serve"}  # long-running services: one JSON object per log line (edgeexit.logs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeexit",
        description="Deploy early-exit neural networks across an edge device and a server.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"edgeexit.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # One logging path for every command; --quiet keeps warnings only, --verbose shows other libraries' noise.
    logs.configure(json=args.command in JSON_LOGS, level=logging.WARNING if getattr(args, "quiet", False)
                   else logging.INFO, verbose=getattr(args, "verbose", False), prog=args.command)
    try:
        rc = args.func(args)
    except EdgeExitError as e:
        print(f"edgeexit {args.command}: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:  # an optional package this install lacks: name its extra (edgeexit.extras)
        err = missing_extra(e, args.command)
        if err is None:
            raise
        print(f"edgeexit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"edgeexit {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


def one_line(message: str, limit: int = 2000) -> str:
    """An error message as one bounded line (a message may quote a file or library text with newlines)."""
    text = " / ".join(part.strip() for part in message.splitlines() if part.strip()) or "(no message)"
    return text if len(text) <= limit else text[: limit - 3] + "..."


if __name__ == "__main__":
    sys.exit(main())
