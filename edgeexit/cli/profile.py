"""`edgeexit profile`: measure per-segment latency, codec cost and per-request overhead on this machine."""

from __future__ import annotations

import argparse

from edgeexit.cli.common import add_backend_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help="measure per-segment latency and wire codec cost on this machine",
                       description=__doc__)
    p.add_argument("bundle", help="path to NAME.edgeexit")
    add_backend_args(p)
    p.add_argument("--threads", type=int, default=1, help="inference threads (default 1: one phone-class core)")
    p.add_argument("--role", default="device", choices=["device", "cloud"],
                   help="which side this machine plays: its per-request overhead is measured (device: a local "
                        "agent called like an app calls it; cloud: the service) and --store saves the profile under it")
    p.add_argument("--batch", default="1", help="comma-separated batch sizes (default 1)")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--out", help="write the profile JSON here")
    p.add_argument("--store", action="store_true", help="store the profile in the bundle's manifest")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from edgeexit.cli.common import parse_int_list
    from edgeexit.runtime.profiling import measure_profile, profile_table
    from edgeexit.runtime.request_cost import measure_request_ms
    from edgeexit.runtime.runner import SegmentRunner

    runner = SegmentRunner(args.bundle, backend=args.backend, threads=args.threads, fmt=args.fmt)
    prof = measure_profile(runner, parse_int_list(args.batch, "--batch"), repeats=args.repeats, progress=True)
    prof.request_ms = measure_request_ms(runner, args.role, repeats=args.repeats)
    print(profile_table(prof))
    where = "agent request path, app call included" if args.role == "device" else "service request handling"
    print(f"\nper-request overhead ({args.role}: {where}, outside segment compute): {prof.request_ms:.3f} ms")
    if args.out:
        prof.save(args.out)
        print(f"wrote {args.out}")
    if args.store:
        runner.bundle.manifest.profiles[args.role] = prof.to_dict()
        runner.bundle.save()
        print(f"stored the {args.role} profile in {args.bundle}")
    return 0
