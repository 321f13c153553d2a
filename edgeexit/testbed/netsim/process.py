"""A relay as a process, what `edgeexit netsim` runs: until SIGINT/SIGTERM, or, with ``control``, until stdin
closes while answering one JSON line per JSON command (how `scenarios.RelayControl` drives a relay running in
another network namespace). In-process code uses `Relay` directly; both are this one relay.

Commands: ``{"op": "set", "conditions": {LinkConditions fields}}``, ``{"op": "outage", "seconds": S,
"mode": "blackhole"|"reset"}``, ``{"op": "stats"}``; replies ``{"ok": true, "stats": {...}}`` or
``{"ok": false, "error": "..."}``.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

from edgeexit.errors import ConfigError, EdgeExitError
from edgeexit.hostport import parse_hostport
from edgeexit.testbed.netsim.conditions import LinkConditions
from edgeexit.testbed.netsim.relay import Relay, RelayStats


@dataclass
class RelayProcessOptions:
    target: str  # HOST:PORT
    listen: str = "127.0.0.1:0"  # HOST:PORT; port 0 = any free port
    conditions: LinkConditions = field(default_factory=LinkConditions)
    stats_every: float = 0.0  # print counters every N seconds (0 = only at exit)
    control: bool = False  # answer JSON commands on stdin until it closes, instead of waiting for a signal


def run_relay(options: RelayProcessOptions, stdin: TextIO | None = None, stdout: TextIO | None = None) -> RelayStats:
    """Print ``relaying HOST:PORT -> TARGET`` once listening, relay until told to stop; return the counters."""
    target = parse_hostport(options.target, "--target")
    listen = parse_hostport(options.listen, "--listen")
    out = stdout or sys.stdout
    with Relay(target, options.conditions, listen=listen) as relay:
        host, port = relay.address
        print(f"relaying {host}:{port} -> {target[0]}:{target[1]}", file=out, flush=True)
        if options.control:
            _answer_commands(relay, stdin or sys.stdin, out)
        else:
            _until_signal(relay, options.stats_every, out)
    return relay.stats  # after close: every delivery has been counted


def _until_signal(relay: Relay, stats_every: float, out: TextIO) -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(stats_every or None):
        print(f"stats {relay.stats}", file=out, flush=True)


def _answer_commands(relay: Relay, stdin: TextIO, out: TextIO) -> None:
    for line in stdin:
        try:
            _apply(relay, json.loads(line))
            reply: dict[str, Any] = {"ok": True, "stats": asdict(relay.stats)}
        except (EdgeExitError, KeyError, TypeError, ValueError) as e:
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        print(json.dumps(reply), file=out, flush=True)


def _apply(relay: Relay, cmd: dict[str, Any]) -> None:
    if cmd["op"] == "set":
        relay.set(LinkConditions(**cmd["conditions"]))
    elif cmd["op"] == "outage":
        relay.outage(float(cmd["seconds"]), cmd.get("mode", "blackhole"))
    elif cmd["op"] != "stats":
        raise ConfigError(f"unknown command {cmd['op']!r}; use set, outage or stats")
