"""`edgeexit demo BUNDLE`: the whole system on one machine.

Starts `edgeexit serve` and `edgeexit agent` as real processes with an emulated network between them
(a userspace relay shaped like a network profile), sends a dataset split through the agent the way an app
would (OIP v2 requests of --batch rows), prints accuracy and where each answer was decided, and stops both
processes cleanly.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="serve + agent over an emulated network; stream a dataset through the agent",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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

    import numpy as np
    from tqdm import tqdm

    from edgeexit import datasets
    from edgeexit.bundle import Bundle
    from edgeexit.errors import ConfigError
    from edgeexit.testbed.experiment import Condition
    from edgeexit.testbed.harness import AgentClient, launch
    from edgeexit.testbed.netsim import Relay
    from edgeexit.profiles import load_device_class, load_network

    if args.batch < 1:
        raise ConfigError("--batch must be at least 1")
    bundle = Bundle.load(args.bundle)
    net = load_network(args.network)
    device = load_device_class(args.emulate_device)
    x, y = datasets.load(args.data, args.split, args.limit)
    want = [int(d) for d in bundle.manifest.input.shape[1:]]
    if list(x.shape[1:]) != want:
        raise ConfigError(f"{args.data} samples are {list(x.shape[1:])} but {bundle.name} takes {want}; "
                          "pick the dataset the model was trained on")
    work = Path(args.work)
    emulated = f"EMULATED {device.name} (x{device.slowdown:g})" if device.emulated else "this host (no emulation)"
    print(f"demo: {len(y)} {args.data}/{args.split} samples, device {emulated}, link {net.name} "
          f"(up {net.up_mbit:g} Mbit/s, RTT {net.rtt_ms:g} ms), split {args.agent_split}, "
          f"{args.encoding} boundary tensors")
    rows = {"device": [0, 0], "cloud": [0, 0], "device-fallback": [0, 0]}  # decided -> [count, correct]
    seconds, sent = [], 0
    with launch("serve", ["serve", args.bundle, "--port", "0"], work) as serve, \
            Relay(serve.address, Condition.from_network(net).link()) as relay:
        cloud = f"{relay.address[0]}:{relay.address[1]}"
        agent_args = ["agent", args.bundle, "--cloud", cloud, "--listen", "127.0.0.1:0", "--split", args.agent_split,
                      "--network", args.network, "--encoding", args.encoding, "--emulate-device", args.emulate_device]
        with launch("agent", agent_args, work) as agent, AgentClient(agent.target, bundle.name) as app:
            for start in tqdm(range(0, len(y), args.batch), desc="agent", unit="req"):
                ans = app.infer(x[start:start + args.batch])
                seconds.append(ans.seconds)
                sent += int(ans.params.get("edgeexit.bytes_sent", 0))
                for where, label, truth in zip(ans.decided, ans.labels, y[start:start + args.batch], strict=True):
                    rows[where][0] += 1
                    rows[where][1] += int(label == truth)
    codes = {"agent": agent.popen.returncode, "serve": serve.popen.returncode}  # both stopped by now
    total = sum(c for c, _ in rows.values())
    print(f"\naccuracy {100 * sum(k for _, k in rows.values()) / total:.2f}% on {total} samples")
    print("| decided | rows | share | accuracy |\n|---|---:|---:|---:|")
    for where, (count, correct) in rows.items():
        acc = f"{100 * correct / count:.2f}%" if count else "-"
        print(f"| {where} | {count} | {100 * count / total:.1f}% | {acc} |")
    lat = np.array(seconds) * 1e3
    print(f"\nper request of {args.batch} rows: mean {lat.mean():.1f} ms, p95 {np.percentile(lat, 95):.1f} ms; "
          f"{sent / total:.0f} bytes sent per sample; relay carried {relay.stats.bytes_up} bytes up")
    print(f"stopped cleanly: agent exit {codes['agent']}, serve exit {codes['serve']} (logs in {work})")
    return 0 if codes == {"agent": 0, "serve": 0} else 1

