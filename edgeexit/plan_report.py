"""Profiles for planning (stored in the bundle, given as files, or measured now) and the sweep plot."""

from __future__ import annotations

import sys
from typing import Any

from edgeexit.bundle import Bundle
from edgeexit.profiles import DeviceClass, LatencyProfile


def _profile(bundle: Bundle, role: str, path: str | None, threads: int) -> LatencyProfile:
    if path:
        return LatencyProfile.load(path)
    if role in bundle.manifest.profiles:
        return LatencyProfile.from_dict(bundle.manifest.profiles[role])
    from edgeexit.runtime.profiling import measure_profile
    from edgeexit.runtime.runner import SegmentRunner

    print(f"note: no {role} profile stored in the bundle; measuring this host now "
          f"(store one with `edgeexit profile --role {role} --store`)", file=sys.stderr)
    return measure_profile(SegmentRunner(bundle, threads=threads), repeats=15)


def load_profiles(bundle: Bundle, device_class: DeviceClass, device_path: str | None = None,
                  cloud_path: str | None = None) -> tuple[LatencyProfile, LatencyProfile]:
    """(device profile scaled to the device class, cloud profile)."""
    device = _profile(bundle, "device", device_path, threads=1).scaled(device_class)
    cloud = _profile(bundle, "cloud", cloud_path, threads=2)
    return device, cloud


def plot_sweep(sweep: dict[str, Any], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    bws = sweep["bandwidths_mbit"]
    for name, ys in sorted(sweep["series"].items()):
        if name == "planner":
            continue
        ax.plot(bws, ys, marker=".", linewidth=1, label=name)
    ax.plot(bws, sweep["series"]["planner"], color="black", linewidth=2.5, linestyle="--", label="planner's choice")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("uplink bandwidth (Mbit/s)")
    ax.set_ylabel("expected latency per request (ms)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
