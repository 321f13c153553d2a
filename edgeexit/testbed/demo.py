"""The whole system on one machine, behind `edgeexit demo`.

Starts `edgeexit serve` and `edgeexit agent` processes (one agent per strategy) with an emulated network
between them (a userspace relay shaped like a network profile) and an EMULATED device class, then, per
network, sends the same test images through every agent the way an app would (one OIP v2 request per
image, strategies interleaved image by image) and prints what each answered: the planner's choice
(``--split auto``) next to device-only and cloud-only, with measured latency, accuracy and where the
answers were decided. Every process stops cleanly at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edgeexit.errors import ConfigError

STRATEGIES = ("device-only", "cloud-only", "edgeexit")


@dataclass
class DemoOptions:
    bundle: Path  # an exported, calibrated and profiled NAME.edgeexit
    data: str | None = None  # None = the Fashion-MNIST variant of the bundle's input size
    networks: list[str] = field(default_factory=lambda: ["4g", "wifi"])
    device: str = "raspberry-pi-4"  # device class the agents EMULATE ("host" = none)
    emulation: str = "auto"  # auto | cgroup | stretch
    samples: int = 40  # test images per network, spread over the split
    warmup: int = 5
    work: Path = Path("artifacts/demo")  # the processes' logs

    def __post_init__(self) -> None:
        if self.samples < 1 or self.warmup < 0:
            raise ConfigError("--samples must be at least 1 and --warmup at least 0")
        if not self.networks:
            raise ConfigError("--networks needs at least one profile name, e.g. 4g,wifi")


def run_demo(o: DemoOptions) -> int:
    """Run the demo and print its report; 0 when every process stopped cleanly."""
    import numpy as np

    from edgeexit import datasets
    from edgeexit.bundle import Bundle
    from edgeexit.planner import Planner
    from edgeexit.profiles import LatencyProfile, load_device_class, load_network
    from edgeexit.reports import markdown_table
    from edgeexit.testbed.experiment import (
        Condition,
        Strategy,
        Testbed,
        TestbedOptions,
        dataset_for,
        run_condition,
        subsample,
    )

    bundle = Bundle.load(o.bundle)
    m = bundle.manifest
    nets = [load_network(n) for n in o.networks]
    device = load_device_class(o.device)
    data = o.data or dataset_for(m)
    x_all, y_all = datasets.load(data, "test")
    want = [int(d) for d in m.input.shape[1:]]
    if list(x_all.shape[1:]) != want:
        raise ConfigError(f"{data} samples are {list(x_all.shape[1:])} but {bundle.name} takes {want}; "
                          "pick the dataset the model was trained on")
    missing = [r for r in ("device", "cloud") if r not in m.profiles]
    if missing:
        raise ConfigError(f"the bundle has no {' or '.join(missing)} latency profile: run `edgeexit profile "
                          f"{o.bundle} --role {missing[0]} --store` first")
    idx = subsample(o.samples, len(x_all))
    x, y = x_all[idx], y_all[idx]
    planner = Planner(m, LatencyProfile.from_dict(m.profiles["device"]).scaled(device),
                      LatencyProfile.from_dict(m.profiles["cloud"]), encodings=("int8",))
    strategies = [Strategy("device-only", "device", "never"), Strategy("cloud-only", "cloud", "never"),
                  Strategy("edgeexit", "auto", encoding="int8")]
    o.work.mkdir(parents=True, exist_ok=True)
    with Testbed(TestbedOptions(o.bundle, device.name if device.emulated else None, emulation=o.emulation,
                                warmup=o.warmup, warmup_fresh=o.warmup, log_dir=o.work)) as bed:
        print(f"demo: {bundle.name}, {len(x)} {data} test images per network, device "
              f"{bed.emulation.describe()}; the cloud is this host")
        for net in nets:
            rows = run_condition(bed, strategies, Condition.from_network(net), x, y)
            plan = planner.plan(net)
            print(f"\n== {net.name}: up {net.up_mbit:g} Mbit/s, RTT {net.rtt_ms:g} ms (EMULATED link). The planner "
                  f"chooses {plan.choice.label} (expected {plan.choice.latency_ms:.1f} ms)")
            table = []
            for s in STRATEGIES:
                mine = [r for r in rows if r.strategy == s]
                wall = np.array([r.wall_ms for r in mine])
                where = {d: sum(r.decided == d for r in mine) for d in ("device", "cloud", "device-fallback")}
                used = sorted({r.split for r in mine})
                table.append([s, f"{wall.mean():.1f}", f"{np.percentile(wall, 95):.1f}",
                              f"{100 * np.mean([r.label == r.truth for r in mine]):.1f}%",
                              " / ".join(str(where[d]) for d in where), f"{np.mean([r.bytes_sent for r in mine]):.0f}",
                              ", ".join(used)])
            print(markdown_table(["strategy", "mean ms", "p95 ms", "accuracy", "device / cloud / fallback",
                                  "bytes/img", "splits used"], table, left=1))
    failed = [(name, code) for name, code in bed.exit_codes if code != 0]
    print(f"\n{len(bed.exit_codes)} processes stopped, " + (f"NOT cleanly: {failed}" if failed else "all cleanly")
          + f" (logs in {o.work})")
    return 1 if failed else 0
