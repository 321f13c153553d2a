"""The whole system on one machine, behind `edgeexit demo`.

Starts `edgeexit serve` and `edgeexit agent` as real processes with an emulated network between them
(a userspace relay shaped like a network profile), sends a dataset split through the agent the way an app
would (OIP v2 requests of ``batch`` rows), prints accuracy and where each answer was decided, and stops both
processes cleanly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgeexit.errors import ConfigError


@dataclass
class DemoOptions:
    bundle: str  # path to NAME.edgeexit
    data: str = "fashion-mnist"
    split: str = "test"
    limit: int | None = None  # first N samples only
    batch: int = 100  # rows per request the app sends
    network: str = "4g"  # network profile the link emulates
    emulate_device: str = "raspberry-pi-4"  # device class whose slowdown the agent emulates ("host" = none)
    encoding: str = "int8"
    agent_split: str = "auto"  # the agent's --split
    work: Path = Path("artifacts/demo")  # the processes' logs

    def __post_init__(self) -> None:
        if self.batch < 1:
            raise ConfigError("--batch must be at least 1")


def run_demo(o: DemoOptions) -> int:
    """Run the demo, print its report; 0 when both processes stopped cleanly."""
    import numpy as np

    from edgeexit import datasets
    from edgeexit.bundle import Bundle
    from edgeexit.logs import ProgressBar
    from edgeexit.profiles import load_device_class, load_network
    from edgeexit.reports import markdown_table
    from edgeexit.testbed.experiment import Condition
    from edgeexit.testbed.harness import AgentClient, launch
    from edgeexit.testbed.netsim import Relay

    bundle = Bundle.load(o.bundle)
    net = load_network(o.network)
    device = load_device_class(o.emulate_device)
    x, y = datasets.load(o.data, o.split, o.limit)
    want = [int(d) for d in bundle.manifest.input.shape[1:]]
    if list(x.shape[1:]) != want:
        raise ConfigError(f"{o.data} samples are {list(x.shape[1:])} but {bundle.name} takes {want}; "
                          "pick the dataset the model was trained on")
    work = Path(o.work)
    emulated = f"EMULATED {device.name} (x{device.slowdown:g})" if device.emulated else "this host (no emulation)"
    print(f"demo: {len(y)} {o.data}/{o.split} samples, device {emulated}, link {net.name} "
          f"(up {net.up_mbit:g} Mbit/s, RTT {net.rtt_ms:g} ms), split {o.agent_split}, "
          f"{o.encoding} boundary tensors")
    rows = {"device": [0, 0], "cloud": [0, 0], "device-fallback": [0, 0]}  # decided -> [count, correct]
    seconds, sent = [], 0
    with launch("serve", ["serve", o.bundle, "--port", "0"], work) as serve, \
            Relay(serve.address, Condition.from_network(net).link()) as relay:
        cloud = f"{relay.address[0]}:{relay.address[1]}"
        agent_args = ["agent", o.bundle, "--cloud", cloud, "--listen", "127.0.0.1:0", "--split", o.agent_split,
                      "--network", o.network, "--encoding", o.encoding, "--emulate-device", o.emulate_device]
        with launch("agent", agent_args, work) as agent, AgentClient(agent.target, bundle.name) as app, \
                ProgressBar(len(y), True, "agent", unit="img") as bar:
            for start in range(0, len(y), o.batch):
                ans = app.infer(x[start:start + o.batch])
                seconds.append(ans.seconds)
                sent += int(ans.params.get("edgeexit.bytes_sent", 0))
                for where, label, truth in zip(ans.decided, ans.labels, y[start:start + o.batch], strict=True):
                    rows[where][0] += 1
                    rows[where][1] += int(label == truth)
                bar.update(len(ans.labels))
    codes = {"agent": agent.popen.returncode, "serve": serve.popen.returncode}  # both stopped by now
    total = sum(c for c, _ in rows.values())
    print(f"\naccuracy {100 * sum(k for _, k in rows.values()) / total:.2f}% on {total} samples")
    print(markdown_table(["decided", "rows", "share", "accuracy"],
                         [[where, str(count), f"{100 * count / total:.1f}%",
                           f"{100 * correct / count:.2f}%" if count else "-"]
                          for where, (count, correct) in rows.items()], left=1))
    lat = np.array(seconds) * 1e3
    print(f"\nper request of {o.batch} rows: mean {lat.mean():.1f} ms, p95 {np.percentile(lat, 95):.1f} ms; "
          f"{sent / total:.0f} bytes sent per sample; relay carried {relay.stats.bytes_up} bytes up")
    print(f"stopped cleanly: agent exit {codes['agent']}, serve exit {codes['serve']} (logs in {work})")
    return 0 if codes == {"agent": 0, "serve": 0} else 1
