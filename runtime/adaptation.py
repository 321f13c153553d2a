"""Online choice of the split point while the agent runs (torch-free).

Every adapter implements :class:`Adapter`: ``choose()`` before a request, ``observe()`` after it,
``probe_due()``/``probe_split()`` to ask for a background probe of the link, and ``expected_cloud_s()`` so the
runtime can tell the link's share of an offload from the cloud's. Two adapters:

- :class:`PlannerAdapter` (``--adapt planner``, the default behind ``--split auto``): the planner's choice
  for the link as currently estimated from real offloads (:class:`LinkStats`). It re-plans only when the
  bandwidth estimate leaves a hysteresis band around the value the current plan was made for, so noise does
  not make the split flap. While nothing is offloaded (device-only) there are no samples, so it asks for an
  occasional small probe offload (``probe_due()``) and notices when the link is good again.
- :class:`BanditAdapter` (``--adapt bandit``): SplitEE-style UCB1 over split points, needing no network
  model. Reward of a request at split ``s``: the confidence of the answer minus ``mu`` times its cost, where
  cost is device time (plus offload time when offloaded) relative to the device-only time. It explores every
  arm by itself (the device arm included), so it never asks for probes.

The link samples, the warm-up round trip and the probes themselves live in ``runtime/link_monitor.py``; static
split values (``--split N``, ``--adapt off``) in ``runtime/splits.py``.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

import numpy as np

from edgeexit.bundle import Manifest
from edgeexit.errors import ConfigError
from edgeexit.planner import Candidate, ExitSetting, Planner
from edgeexit.profiles import NetworkProfile
from edgeexit.runtime import codec
from edgeexit.runtime.link_stats import LinkStats
from edgeexit.runtime.splits import (
    CLOUD_SPLIT,
    DEVICE_SPLIT,
    Split,
    candidate_split,
    first_cloud_segment,
    offloads_input,
)

ADAPT_MODES = ("planner", "bandit", "off")


@dataclass
class AdaptOptions:
    """How ``--split auto`` adapts, and what the planner assumes until it has measured anything."""

    mode: str = "planner"
    network: str = "wifi"  # the planner's prior for the link (a profile name or TOML path) until offloads measure it
    # EMULATION: device compute is stretched to this many times its measured time; the device profile alike.
    slowdown: float = 1.0
    encoding: str = "fp32"  # the boundary encoding offloads use (so the planner prices that one)
    hysteresis: float = 0.35  # re-plan when bandwidth moves beyond x(1 +- h) of what the plan assumed
    probe_interval_s: float = 0.5  # while device-only, probe the link at most this often ...
    max_probe_interval_s: float = 4.0  # ... backing off (x2 per probe) while probes leave the plan unchanged
    min_samples: int = 2  # offload samples needed before the estimate is trusted
    mu: float = 0.5  # bandit: weight of cost against confidence
    seed: int = 0
    # The exit settings the planner may choose; None = every calibrated one. A policy the user fixed narrows
    # it to that policy's setting (runtime/setting_policy.py), so the plan prices what will run.
    settings: list[ExitSetting] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in ADAPT_MODES:
            raise ConfigError(f"adapt mode {self.mode!r}: choose one of {ADAPT_MODES}")
        if not self.slowdown >= 1.0:  # also refuses NaN
            raise ConfigError(f"slowdown {self.slowdown} emulates a slower device: it must be >= 1")
        if self.encoding not in codec.ENCODINGS:
            raise ConfigError(f"encoding {self.encoding!r}: choose one of {codec.ENCODINGS}")
        if not 0 < self.hysteresis < 10:
            raise ConfigError(f"hysteresis {self.hysteresis} must be in (0, 10)")
        if not 0 < self.probe_interval_s <= self.max_probe_interval_s:
            raise ConfigError("probe intervals: need 0 < probe_interval_s <= max_probe_interval_s, got "
                              f"{self.probe_interval_s} and {self.max_probe_interval_s}")
        if self.min_samples < 1 or not self.mu >= 0:
            raise ConfigError(f"min_samples must be >= 1 and mu >= 0, got {self.min_samples} and {self.mu}")


@dataclass(frozen=True)
class Choice:
    """An adapter's pick for the next request: the split and, when a plan made it, the exit setting that plan
    assumed (``setting`` None: keep the runtime's policy)."""

    split: Split
    setting: str | None = None
    thresholds: tuple[float, ...] = ()


@runtime_checkable
class Adapter(Protocol):
    """What DeviceRuntime needs from an online split chooser."""

    def choose(self) -> Split:
        """The split for the next request: a split point, "device", "cloud" or "cascade@N"."""
        ...

    def pick(self) -> Choice:
        """The split for the next request with the exit setting it was chosen for."""
        ...

    def observe(self, split: Split, result: Any) -> None:
        """Learn from a finished request that ran at ``split`` (a runtime.device.Result)."""
        ...

    def observe_cloud(self, split: Split, cloud_ms: float, rows: int) -> None:
        """The server reported ``cloud_ms`` (queue + compute) for ``rows`` rows offloaded at ``split`` (a probe's
        answer too: while nothing is offloaded, probes are the only news of the server)."""
        ...

    def probe_due(self) -> bool:
        """True when the runtime should send a background probe now (the choices send nothing to measure)."""
        ...

    def probe_split(self) -> Split:
        """Where a probe is sent: ``"cloud"`` (the raw input to the whole model, no device compute)."""
        ...

    def expected_cloud_s(self, split: Split, rows: int) -> float:
        """Expected cloud compute for ``rows`` rows offloaded at ``split`` (0 when the adapter cannot say)."""
        ...


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
        # A bundle without split points has no boundary to probe with; its plans are device- or cloud-only.
        self.replans = 0
        # observe() marks the plan stale when what the planner assumed about the cloud's time or the raw input's
        # wire size proved wrong; the next plan() re-plans even if the bandwidth stayed in its band.
        self._stale = False
        self._planned_scale = planner.cloud_scale

    def choose(self) -> Split:
        return candidate_split(self.plan())

    def pick(self) -> Choice:
        c = self.plan()
        if c.strategy == "cloud-only":
            # The device runs no exit under this plan; only a fallback would, and it keeps the calibrated policy.
            return Choice(candidate_split(c))
        return Choice(candidate_split(c), c.setting, tuple(c.thresholds))

    def plan(self) -> Candidate:
        """The current choice, re-planned first when the measured bandwidth left the hysteresis band."""
        with self._lock:
            est = self.link.estimate()
            h = self.options.hysteresis
            moved = False
            if est.bandwidth_bps is not None and est.samples >= self.options.min_samples:
                bw = est.bandwidth_bps / 1e6
                # The bandwidth, or the time the raw input takes (where the RTT dominates a fast link), moved.
                net = self.network
                planned = net.rtt_ms / 1e3 + 8 * self.planner.input_bytes / (net.up_mbit * 1e6)
                ratio = est.transfer_s(round(self.planner.input_bytes)) / planned
                moved = not (net.up_mbit / (1 + h) <= bw <= net.up_mbit * (1 + h) and 1 / (1 + h) <= ratio <= 1 + h)
            if not moved and not self._stale:
                return self.choice
            if moved:
                rtt = est.rtt_s * 1e3 if est.rtt_s is not None else self.network.rtt_ms
                self.network = replace(self.network, up_mbit=bw, rtt_ms=rtt)
            self._stale, self._planned_scale = False, self.planner.cloud_scale
            new = self.planner.plan(self.network).choice
            if new.label != self.choice.label:
                self._probe_interval = self.options.probe_interval_s  # the link moves: watch it closely again
            self.choice = new
            self.replans += 1
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

    def probe_split(self) -> Split:
        """A probe sends one row's raw input to the whole model: it costs the device no compute (a boundary
        probe would run the device's segments, inside the same CPU budget as the requests), only its bytes."""
        return CLOUD_SPLIT

    def observe(self, split: Split, result: Any) -> None:
        """Learn what the planner assumed: the cloud's reported queue + compute time moves its cloud cost, and a
        raw input that travelled bigger than 1 byte per element (pixels off the 8-bit grid go as fp32) its input
        size. A change beyond the hysteresis band re-plans at the next request (the link samples are the
        runtime's)."""
        rows = result.decided.count("cloud")
        if not rows or split == DEVICE_SPLIT:
            return
        stale = False
        if offloads_input(split) and result.bytes_sent > 0:
            per_row = result.bytes_sent / rows
            if abs(per_row - self.planner.input_bytes) > 0.1 * self.planner.input_bytes:
                self.planner.input_bytes = per_row
                stale = True
        if stale:
            with self._lock:
                self._stale = True
        if result.latency.cloud_ms is not None:
            self.observe_cloud(split, result.latency.cloud_ms, rows)

    def observe_cloud(self, split: Split, cloud_ms: float, rows: int) -> None:
        self.planner.observe_cloud(cloud_ms, first_cloud_segment(split), rows)
        if abs(self.planner.cloud_scale / self._planned_scale - 1) > self.options.hysteresis:
            with self._lock:
                self._stale = True

    def expected_cloud_s(self, split: Split, rows: int) -> float:
        if split == DEVICE_SPLIT:
            return 0.0
        return rows * sum(self.planner.cloud_ms[first_cloud_segment(split):]) / 1000.0


class BanditAdapter:
    """UCB1 over the device's split choices (SplitEE-style reward).

    Its arms are every split point and "device". It tries each arm once, then keeps exploring by UCB, so it
    needs no probes (``probe_due()`` is always False) and no network model.
    """

    def __init__(self, num_split_points: int, device_ms: list[float], options: AdaptOptions | None = None):
        self.options = options or AdaptOptions(mode="bandit")
        self.arms: list[Split] = [*range(num_split_points), DEVICE_SPLIT]
        self.device_only_ms = max(sum(device_ms), 1e-6)
        self.counts = np.zeros(len(self.arms))
        self.rewards = np.zeros(len(self.arms))
        self.t = 0
        self._lock = threading.Lock()

    def choose(self) -> Split:
        with self._lock:
            self.t += 1
            untried = np.flatnonzero(self.counts == 0)
            if len(untried):
                arm = int(untried[0])
            else:
                ucb = self.rewards / self.counts + np.sqrt(2 * math.log(self.t) / self.counts)
                arm = int(np.argmax(ucb))
            return self.arms[arm]

    def pick(self) -> Choice:
        return Choice(self.choose())  # the bandit has no exit settings: the runtime's policy applies

    def observe_cloud(self, split: Split, cloud_ms: float, rows: int) -> None:
        """Nothing: the bandit's rewards already hold each arm's whole latency, the cloud's share included."""

    def observe(self, split: Split, result: Any) -> None:
        """Reward from a finished request's Result (confidence, device time, network time)."""
        arm = self.arms.index(split)
        conf = float(np.mean(result.probabilities.max(axis=1)))
        lat = result.latency
        cost = (lat.device_ms + lat.encode_ms + lat.network_ms + (lat.cloud_ms or 0.0)) / self.device_only_ms
        reward = conf - self.options.mu * cost
        with self._lock:
            self.counts[arm] += 1
            self.rewards[arm] += reward

    def probe_due(self) -> bool:
        """Never: the bandit measures every arm, offloading ones included, by choosing it now and then."""
        return False

    def probe_split(self) -> Split:
        return CLOUD_SPLIT  # unused: the bandit never probes

    def expected_cloud_s(self, split: Split, rows: int) -> float:
        """0: the bandit has no cloud profile (its link samples then include the cloud's compute)."""
        return 0.0

    def best(self) -> Split:
        with self._lock:
            means = np.where(self.counts > 0, self.rewards / np.maximum(self.counts, 1), -np.inf)
            return self.arms[int(np.argmax(means))]


def build_adapter(manifest: Manifest, runner: Any, options: AdaptOptions, link: LinkStats,
                  clock: Callable[[], float] = time.monotonic) -> Adapter:
    """An adapter for a device runtime: profiles from the bundle when stored, else measured here now.
    ``clock`` is the runtime's (so a test's injected clock also paces the probes)."""
    from edgeexit.profiles import DeviceClass, LatencyProfile, load_network
    from edgeexit.runtime.profiling import measure_profile

    stored = manifest.profiles
    host = (LatencyProfile.from_dict(stored["device"]) if "device" in stored
            else measure_profile(runner, repeats=10, warmup=2))
    device = host.scaled(DeviceClass("emulated", options.slowdown)) if options.slowdown != 1.0 else host
    if options.mode == "bandit":
        return BanditAdapter(len(manifest.split_points), device.per_sample_ms(), options)
    # Without a stored cloud profile, assume the cloud is as fast as this host (a conservative guess).
    cloud = LatencyProfile.from_dict(stored["cloud"]) if "cloud" in stored else host
    planner = Planner(manifest, device, cloud, settings=options.settings, encodings=(options.encoding,))
    return PlannerAdapter(planner, load_network(options.network), link, options, clock)
