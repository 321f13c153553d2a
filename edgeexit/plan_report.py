"""Profiles for planning (stored in the bundle, given as files, or measured now) and the sweep plot."""

from __future__ import annotations

import logging
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

    logging.getLogger(__name__).warning("no %s profile stored in the bundle; measuring this host now (store one "
                                        "with `edgeexit profile --role %s --store`)", role, role)
    return measure_profile(SegmentRunner(bundle, threads=threads), repeats=15)


def load_profiles(bundle: Bundle, device_class: DeviceClass, device_path: str | None = None,
                  cloud_path: str | None = None) -> tuple[LatencyProfile, LatencyProfile]:
    """(device profile scaled to the device class, cloud profile)."""
    device = _profile(bundle, "device", device_path, threads=1).scaled(device_class)
    cloud = _profile(bundle, "cloud", cloud_path, threads=2)
    return device, cloud


def plot_sweep(sweep: dict[str, Any], path: str, title: str) -> None:
    from edgeexit.reports import bandwidth_axes, figure

    bws = sweep["bandwidths_mbit"]
    with figure(path, dpi=110) as (ax,):
        for name, ys in sorted(sweep["series"].items()):
            if name == "planner":
                continue
            ax.plot(bws, ys, marker=".", linewidth=1, label=name)
        ax.plot(bws, sweep["series"]["planner"], color="black", linewidth=2.5, linestyle="--",
                label="planner's choice")
        bandwidth_axes(ax, "expected latency per request (ms)", title)
        ax.legend(fontsize=8)
