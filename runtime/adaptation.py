"""Online choice of the split point while the agent runs (torch-free).

Two adapters, one interface (``choose()`` before a request, ``observe()`` after it):

- :class:`PlannerAdapter` (``--adapt planner``, the default behind ``--split auto``): the planner's choice
  for the link as currently estimated from real offloads (:class:`LinkStats`). It re-plans only when the
  bandwidth estimate leaves a hysteresis band around the value the current plan was made for, so noise does
  not make the split flap. While nothing is offloaded (device-only) there are no samples, so it asks for an
  occasional small probe offload (``probe_due()``) and notices when the link is good again.
- :class:`BanditAdapter` (``--adapt bandit``): SplitEE-style UCB1 over split points, needing no network
  model. Reward of a request at split ``s``: the confidence of the answer minus ``mu`` times its cost, where
  cost is device time (plus offload time when offloaded) relative to the device-only time.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from edgeexit.bundle import Manifest
from edgeexit.errors import ConfigError
from edgeexit.planner import Candidate, Planner
from edgeexit.profiles import NetworkProfile
from edgeexit.runtime.link_stats import LinkStats

ADAPT_MODES = ("planner", "bandit", "off")
SPLIT_WORDS = ("auto", "device", "cloud")


@dataclass
class AdaptOptions:
    mode: str = "planner"
    hysteresis: float = 0.35  # re-plan when bandwidth moves beyond x(1 +- h) of what the plan assumed
    probe_interval_s: float = 0.5  # while device-only, probe the link at most this often ...
    max_probe_interval_s: float = 4.0  # ... backing off (x2 per probe) while probes leave the plan unchanged
    min_samples: int = 2  # offload samples needed before the estimate is trusted
    mu: float = 0.5  # bandit: weight of cost against confidence
    seed: int = 0

    def check(self) -> None:
        if self.mode not in ADAPT_MODES:
            raise ConfigError(f"adapt mode {self.mode!r}: choose one of {ADAPT_MODES}")
        if not 0 < self.hysteresis < 10:
            raise ConfigError("hysteresis must be in (0, 10)")


def auto_split(manifest: Manifest) -> int:
    """`--adapt off`: the cheapest fp32 boundary among the first half of the network (no measurements)."""
    half = max(1, len(manifest.segments) // 2)
    candidates = manifest.split_points[:half]
    if not candidates:
        raise ConfigError("the bundle has a single segment: there is no split point; use --split device or cloud")

    def fp32_bytes(p: Any) -> int:
        return int(p.bytes_per_sample.get("fp32", p.tensor.sample_elements() * 4))

    return min(candidates, key=lambda p: (fp32_bytes(p), p.index)).index


def resolve_split(manifest: Manifest, split: int | str, has_cloud: bool) -> int | str:
    """An int split point, "device" or "cloud"; validated against the bundle."""
    if isinstance(split, str) and split not in SPLIT_WORDS:
        try:
            split = int(split)
        except ValueError:
            raise ConfigError(f"split {split!r} is not a number or one of {SPLIT_WORDS}") from None
    if not has_cloud:
        if split == "cloud":
            raise ConfigError("split 'cloud' sends every input to the cloud: give the address (--cloud HOST:PORT)")
        return "device"
    if split == "auto":
        return auto_split(manifest)
    if isinstance(split, int):
        last = len(manifest.split_points) - 1
        if not 0 <= split <= last:
            raise ConfigError(f"split {split} is outside this bundle's split points 0..{last}; "
                              "use 'device' to run everything locally")
    return split


def candidate_split(c: Candidate) -> int | str:
    """The DeviceRuntime split value of a planner candidate."""
    if c.strategy == "device-only":
        return "device"
    if c.strategy == "cloud-only":
        return "cloud"
    return int(c.split)


class PlannerAdapter:
    """The planner's choice for the link as measured, re-planned with hysteresis."""

    def __init__(self, planner: Planner, network: NetworkProfile, link: LinkStats,
                 options: AdaptOptions | None = None, clock: Any = time.monotonic):
        self.planner = planner
        self.options = options or AdaptOptions()
        self.link = link
        self._clock = clock
        self._lock = threading.Lock()
        self.network = network
        self.choice = planner.plan(network).choice
        self._last_probe = clock()
        self._probe_interval = self.options.probe_interval_s
        self.replans = 0
        self.history: list[tuple[float, str]] = [(network.up_mbit, self.choice.label)]

    def choose(self) -> Candidate:
        with self._lock:
            est = self.link.estimate()
            if est.bandwidth_bps is None or est.samples < self.options.min_samples:
                return self.choice
            bw = est.bandwidth_bps / 1e6
            h = self.options.hysteresis
            if self.network.up_mbit / (1 + h) <= bw <= self.network.up_mbit * (1 + h):
                return self.choice
            rtt = est.rtt_s * 1e3 if est.rtt_s is not None else self.network.rtt_ms
            self.network = replace(self.network, up_mbit=bw, rtt_ms=rtt)
            new = self.planner.plan(self.network).choice
            if new.label != self.choice.label:
                self._probe_interval = self.options.probe_interval_s  # the link moves: watch it closely again
            self.choice = new
            self.replans += 1
            self.history.append((bw, self.choice.label))
            return self.choice

    def probe_due(self) -> bool:
        """True (at most once per interval) when the current choice sends nothing, so a probe should."""
        if self.choice.offload_fraction > 0 and self.choice.strategy != "device-only":
            return False
        now = self._clock()
        with self._lock:
            if now - self._last_probe < self._probe_interval:
                return False
            self._last_probe = now
            self._probe_interval = min(2 * self._probe_interval, self.options.max_probe_interval_s)
            return True

    def probe_split(self) -> int:
        """The split point whose boundary a probe sends: the fewest bytes, so a probe is cheap."""
        pts = self.planner.manifest.split_points
        return min(pts, key=lambda p: (p.bytes_per_sample["fp32"], p.index)).index

    def observe(self, split: int | str, result: Any) -> None:
        """Nothing to learn beyond the link samples the runtime records."""


class BanditAdapter:
    """UCB1 over the device's split choices (SplitEE-style reward)."""

    def __init__(self, num_split_points: int, device_ms: list[float], options: AdaptOptions | None = None):
        self.options = options or AdaptOptions(mode="bandit")
        # arms: every split point, then device-only
        self.arms: list[int | str] = list(range(num_split_points)) + ["device"]
        self.device_only_ms = max(sum(device_ms), 1e-6)
        self.counts = np.zeros(len(self.arms))
        self.rewards = np.zeros(len(self.arms))
        self.t = 0
        self._lock = threading.Lock()

    def choose(self) -> int | str:
        with self._lock:
            self.t += 1
            untried = np.flatnonzero(self.counts == 0)
            if len(untried):
                arm = int(untried[0])
            else:
                ucb = self.rewards / self.counts + np.sqrt(2 * math.log(self.t) / self.counts)
                arm = int(np.argmax(ucb))
            return self.arms[arm]

    def observe(self, split: int | str, result: Any) -> None:
        """Reward from a finished request's Result (confidence, device time, network time)."""
        arm = self.arms.index(split)
        conf = float(np.mean(result.probabilities.max(axis=1)))
        lat = result.latency
        cost = (lat.device_ms + lat.encode_ms + lat.network_ms + (lat.cloud_ms or 0.0)) / self.device_only_ms
        reward = conf - self.options.mu * cost
        with self._lock:
            self.counts[arm] += 1
            self.rewards[arm] += reward

    def best(self) -> int | str:
        with self._lock:
            means = np.where(self.counts > 0, self.rewards / np.maximum(self.counts, 1), -np.inf)
            return self.arms[int(np.argmax(means))]


def next_split(adapter: PlannerAdapter | BanditAdapter) -> int | str:
    """The split value (int, "device" or "cloud") the adapter wants for the next request."""
    if isinstance(adapter, PlannerAdapter):
        return candidate_split(adapter.choose())
    return adapter.choose()


def build_adapter(manifest: Any, runner: Any, options: AdaptOptions, network: str, slowdown: float,
                  encoding: str, link: LinkStats) -> PlannerAdapter | BanditAdapter:
    """An adapter for a device runtime: profiles from the bundle when stored, else measured here now."""
    from edgeexit.profiles import DeviceClass, LatencyProfile, load_network
    from edgeexit.runtime.profiling import measure_profile

    options.check()
    stored = manifest.profiles
    host = (LatencyProfile.from_dict(stored["device"]) if "device" in stored
            else measure_profile(runner, repeats=10, warmup=2))
    device = host.scaled(DeviceClass("emulated", slowdown)) if slowdown != 1.0 else host
    if options.mode == "bandit":
        return BanditAdapter(len(manifest.split_points), device.per_sample_ms(), options)
    # Without a stored cloud profile, assume the cloud is as fast as this host (a conservative guess).
    cloud = LatencyProfile.from_dict(stored["cloud"]) if "cloud" in stored else host
    planner = Planner(manifest, device, cloud, encodings=(encoding,))
    return PlannerAdapter(planner, load_network(network), link, options)
