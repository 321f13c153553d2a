"""`edgeexit netsim`: relay TCP from --listen to --target under emulated link conditions until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse

from edgeexit.testbed.netsim.trace import HEADER


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "netsim", help="userspace link emulator: delay, jitter, bandwidth, outages, traces (no root needed)",
        description="Relay TCP connections from --listen to --target, imposing one-way delay and jitter (each "
                    "direction), per-direction bandwidth (token bucket), outages and traces, on open connections "
                    "too. Prints 'relaying LISTEN -> TARGET' once listening; runs until SIGINT or SIGTERM. "
                    f"Trace CSV columns: {','.join(HEADER)} (steps; first row at 0; rtt is split evenly).")
    p.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to accept on (port 0 = any free port)")
    p.add_argument("--target", required=True, help="HOST:PORT to relay to")
    p.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay, applied in each direction")
    p.add_argument("--jitter-ms", type=float, default=0.0, help="uniform +-jitter on the delay (no reordering)")
    p.add_argument("--up-mbit", type=float, default=None, help="client->target Mbit/s (default unlimited)")
    p.add_argument("--down-mbit", type=float, default=None, help="target->client Mbit/s (default unlimited)")
    p.add_argument("--burst-bytes", type=int, default=0, help="token bucket depth (default 0: pure rate)")
    p.add_argument("--trace", default=None, help="CSV trace replayed from start (replaces rates and delay)")
    p.add_argument("--outage", action="append", default=[], metavar="START:DURATION[:MODE]",
                   help="outage in seconds after start; MODE blackhole (default) or reset; repeatable")
    p.add_argument("--stats-every", type=float, default=0.0, help="print counters every N seconds (0 = at exit)")
    p.add_argument("--control", action="store_true",
                   help="for test harnesses: answer JSON commands on stdin (set, outage, stats; one JSON reply "
                        "line each) and stop when stdin closes")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from edgeexit.testbed.netsim import LinkConditions, Outage, Trace
    from edgeexit.testbed.netsim.process import RelayProcessOptions, run_relay

    conditions = LinkConditions(
        delay_ms=args.delay_ms, jitter_ms=args.jitter_ms, up_mbit=args.up_mbit, down_mbit=args.down_mbit,
        burst_bytes=args.burst_bytes, trace=Trace.load(args.trace) if args.trace else None,
        outages=tuple(Outage.parse(o) for o in args.outage))
    stats = run_relay(RelayProcessOptions(args.target, args.listen, conditions, args.stats_every, args.control))
    print(f"stats {stats}", flush=True)
    return 0
