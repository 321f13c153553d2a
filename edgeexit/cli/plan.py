"""`edgeexit plan`: choose the split point, encoding and exit setting for a device class and a network."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="choose split point and exit thresholds for a device and a network",
                       description=__doc__)
    p.add_argument("bundle", help="path to NAME.edgeexit")
    p.add_argument("--device", default="host", help="device class name (devices/classes) or a .toml path")
    p.add_argument("--network", default="4g", help="network profile name (devices/networks) or a .toml path")
    p.add_argument("--up-mbit", type=float, help="override the network's uplink bandwidth")
    p.add_argument("--rtt-ms", type=float, help="override the network's round-trip time")
    p.add_argument("--objective", default="latency", choices=["latency", "throughput", "bytes"])
    p.add_argument("--device-profile", help="measured device profile JSON (default: the bundle's, else measure now)")
    p.add_argument("--cloud-profile", help="measured cloud profile JSON (default: the bundle's, else measure now)")
    p.add_argument("--png", help="write expected latency per strategy across 1-100 Mbit/s here")
    p.add_argument("--json", help="write the plan as JSON here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict, replace

    from edgeexit.bundle import Bundle
    from edgeexit.plan_report import load_profiles, plot_sweep
    from edgeexit.planner import Planner
    from edgeexit.profiles import load_device_class, load_network

    bundle = Bundle.load(args.bundle)
    device_class = load_device_class(args.device)
    net = load_network(args.network)
    if args.up_mbit is not None:
        net = replace(net, up_mbit=args.up_mbit)
    if args.rtt_ms is not None:
        net = replace(net, rtt_ms=args.rtt_ms)
    device, cloud = load_profiles(bundle, device_class, args.device_profile, args.cloud_profile)
    planner = Planner(bundle.manifest, device, cloud)
    plan = planner.plan(net, args.objective)
    print(f"network {net.name}: up {net.up_mbit:g} Mbit/s, down {net.down_mbit:g} Mbit/s, RTT {net.rtt_ms:g} ms; "
          f"objective {args.objective}")
    for note in plan.notes:
        print(f"note: {note}")
    print(plan.table(limit=15))
    print(f"chosen: {plan.choice.label} (expected {plan.choice.latency_ms:.2f} ms)")
    if args.png:
        plot_sweep(planner.sweep(net, [1, 2, 3, 5, 10, 20, 30, 50, 100]), args.png,
                   title=f"{bundle.name} on {device_class.name} ({'emulated' if device_class.emulated else 'measured'})"
                         f", RTT {net.rtt_ms:g} ms")
        print(f"wrote {args.png}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"choice": asdict(plan.choice), "candidates": [asdict(c) for c in plan.candidates],
                       "network": asdict(net), "notes": plan.notes}, f, indent=2)
    return 0
