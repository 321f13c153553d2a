"""Choose where to split and how aggressively to exit, from profiles, exit statistics and the network.

The model of one request (batch 1), for split point ``s`` (device runs segments 0..s) and an exit setting
whose calibrated exit rates are ``r_j`` (fraction of all inputs that leave at exit j):

    reach_k   = fraction of inputs still running when segment k starts (1 - exits taken before k)
    device    = sum_{k<=s} reach_k * D_k                                  expected device compute
    offload   = reach_{s+1}                                               fraction sent to the cloud
    local     = sum_{k<=s} (reach_k - reach_{k+1}) * D_0..k               inputs answered by a device exit
    split     = R_dev + local + offload * (D_0..s + encode_s + RTT + bytes_s / uplink + decode_s + C_{s+1}..end
                                           + reply / downlink + R_cloud)
    cascade   = R_dev + local + offload * (D_0..s + RTT + input_bytes / uplink + C_0..end + reply / downlink
                                           + R_cloud)
    cloud     = R_dev + RTT + input_bytes / uplink + C_0..end + reply / downlink + R_cloud

``R_dev`` and ``R_cloud`` are the profiles' ``request_ms``: the fixed cost of one request outside segment
compute (every request goes through the agent on the device; offloaded ones also through the service). The
device's busy time per input is ``R_dev + device`` (+ the encode share for a split). Device-only is ``s = last``
(offload = 0). Cloud-only (``cloud``) sends the raw input as uint8 (1 byte per element) and runs everything in
the cloud. A **cascade** (``cascade@s``) runs the device's exits in segments 0..s and sends
an input none of them takes to the cloud as its raw uint8 input for the whole model ``<model>`` (uint8
encode/decode cost ~0): it beats split@s when the boundary tensor is bigger than the input, which is common.
The cloud costs ``C_k`` are the cloud profile times ``cloud_scale``, which :meth:`Planner.observe_cloud`
moves towards the compute time the server reports. Decisions at exit j depend only on exits <= j for every
policy we ship, so a split never changes the rates of the exits before it. Only exit settings that passed
calibration are candidates (SPINN's constraint: the accuracy bound is met first, then latency is minimised);
each candidate carries its setting's thresholds so the runtime applies what was planned. Torch-free.
"""

from __future__ import annotations

import math
import statistics
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from edgeexit.bundle import Manifest
from edgeexit.errors import ConfigError
from edgeexit.profiles import LatencyProfile, NetworkProfile

OBJECTIVES = ("latency", "throughput", "bytes")
REPLY_BYTES_PER_CLASS = 4
# Planner.cloud_scale is the median of the last CLOUD_WINDOW server-reported / profiled ratios, once there are
# CLOUD_MIN_SAMPLES: one slow request (a cold session, a GC pause) must not move the plan, a busy server must.
CLOUD_WINDOW = 15
CLOUD_MIN_SAMPLES = 3


@dataclass(frozen=True)
class ExitSetting:
    """One calibrated threshold setting and what it does on the calibration data."""

    name: str
    thresholds: tuple[float, ...]
    exit_rates: tuple[float, ...]  # per early exit; the final exit takes the rest
    # Per early exit: accuracy change vs the final exit on the inputs that leave there (None = unknown).
    accuracy_delta: tuple[float | None, ...] = ()
    final_accuracy: float | None = None


NO_EXIT = "no-exit"
RAW_ENCODING = "uint8"  # how cloud-only and cascade send the raw input: 1 byte per element


@dataclass
class Candidate:
    strategy: str  # "device-only" | "cloud-only" | "split" | "cascade"
    split: int | None  # split point for "split"; last device segment for "cascade"
    encoding: str | None
    setting: str
    latency_ms: float
    device_ms: float  # expected device busy time per input (request path + compute + encode)
    cloud_ms: float  # expected cloud time per input (request handling + decode + compute, offloaded share)
    bytes: float  # expected bytes sent per input
    offload_fraction: float
    accuracy: float | None
    thresholds: tuple[float, ...] = ()  # the setting's per-early-exit thresholds (() for no-exit)

    @property
    def label(self) -> str:
        if self.strategy == "split":
            return f"split@{self.split}/{self.encoding}/{self.setting}"
        if self.strategy == "cascade":
            return f"cascade@{self.split}/{self.setting}"
        return f"{self.strategy}/{self.setting}"

    @property
    def family(self) -> str:
        """The strategy without its exit setting and encoding (``split@1``, ``cascade@0``, ``cloud-only``)."""
        return f"{self.strategy}@{self.split}" if self.strategy in ("split", "cascade") else self.strategy


@dataclass
class Plan:
    choice: Candidate
    candidates: list[Candidate]
    network: NetworkProfile
    objective: str
    notes: list[str] = field(default_factory=list)

    def table(self, limit: int | None = None) -> str:
        from edgeexit.reports import markdown_table

        rows = [[c.label + (" **(chosen)**" if c is self.choice else ""), f"{c.latency_ms:.2f}", f"{c.device_ms:.2f}",
                 f"{c.cloud_ms:.2f}", f"{c.bytes:.0f}", f"{100 * c.offload_fraction:.0f}%",
                 "-" if c.accuracy is None else f"{100 * c.accuracy:.2f}%"]
                for c in sorted(self.candidates, key=lambda c: c.latency_ms)[:limit]]
        return markdown_table(["strategy", "expected latency ms", "device ms", "cloud ms", "bytes/req", "offloaded",
                               "accuracy"], rows, left=1)


def exit_settings(manifest: Manifest) -> list[ExitSetting]:
    """The "never exit early" setting plus every setting the calibration validated."""
    n_early = len(manifest.exits) - 1
    policy = manifest.policy or {}
    final_acc = policy.get("final_accuracy")
    settings = [ExitSetting(NO_EXIT, (), (0.0,) * n_early, (), final_acc)]
    for i, cand in enumerate(policy.get("candidates", [])):
        if not cand.get("valid", False):
            continue
        rates = tuple(float(r) for r in cand["exit_rates"][:n_early])
        deltas = tuple(cand.get("accuracy_delta", [None] * n_early)[:n_early])
        if len(rates) != n_early:
            raise ConfigError(f"calibration candidate {i} has {len(rates)} exit rates for {n_early} early exits; "
                              "re-run `edgeexit calibrate`")
        settings.append(ExitSetting(cand.get("name", f"lambda{i}"), tuple(cand.get("thresholds", ())), rates,
                                    deltas, final_acc))
    return settings


def _network_ms(nbytes: float, reply_bytes: float, net: NetworkProfile) -> float:
    return net.rtt_ms + nbytes * 8 / (net.up_mbit * 1e3) + reply_bytes * 8 / (net.down_mbit * 1e3)


class Planner:
    """Enumerates every split point x encoding x exit setting, every cascade, device-only and cloud-only."""

    def __init__(self, manifest: Manifest, device: LatencyProfile, cloud: LatencyProfile,
                 settings: list[ExitSetting] | None = None, encodings: tuple[str, ...] = ("fp32", "fp16", "int8")):
        self.manifest = manifest
        self.n = len(manifest.segments)
        self.device_ms = device.per_sample_ms(1)
        self._cloud_profile_ms = cloud.per_sample_ms(1)
        if len(self.device_ms) != self.n or len(self._cloud_profile_ms) != self.n:
            raise ConfigError(f"profiles cover {len(self.device_ms)}/{len(self._cloud_profile_ms)} segments but the "
                              f"bundle has {self.n}; profile this bundle with `edgeexit profile`")
        self.device = device
        self.cloud = cloud
        # Measured cloud time / profiled cloud time (robust median of observe_cloud): the stored profile was made
        # on some machine at some load; the server's own figures say what it costs now.
        self.cloud_scale = 1.0
        self._cloud_ratios: deque[float] = deque(maxlen=CLOUD_WINDOW)
        self._scale_lock = threading.Lock()
        self.settings = settings if settings is not None else exit_settings(manifest)
        self.encodings = tuple(e for e in encodings if self._encoding_usable(e))
        # the segment each early exit lives in
        self.exit_segment = [e.segment for e in manifest.exits]
        self.reply_bytes = manifest.num_classes * REPLY_BYTES_PER_CLASS
        self.input_bytes = manifest.input_bytes()  # the raw input as uint8 pixels, or token ids and mask

    @property
    def cloud_ms(self) -> list[float]:
        """Expected cloud compute per segment for one sample: the cloud profile x ``cloud_scale``."""
        return [t * self.cloud_scale for t in self._cloud_profile_ms]

    def observe_cloud(self, compute_ms: float, first_segment: int = 0, rows: int = 1) -> None:
        """Take a server-reported compute time into ``cloud_scale`` (the median of recent ratios to the profile).

        ``compute_ms`` is what the cloud spent on ``rows`` rows of segments ``first_segment..last`` (0 for the
        whole model, ``s + 1`` for the tail after split ``s``).
        """
        if not 0 <= first_segment < self.n:
            raise ConfigError(f"first_segment {first_segment} is outside this bundle's segments 0..{self.n - 1}")
        if rows < 1 or not math.isfinite(compute_ms) or compute_ms < 0:
            raise ConfigError(f"observe_cloud needs compute_ms >= 0 and rows >= 1; got {compute_ms!r}, {rows!r}")
        expected = sum(self._cloud_profile_ms[first_segment:])
        if expected <= 0:
            return  # a profile of zeros has nothing to scale
        with self._scale_lock:
            self._cloud_ratios.append(compute_ms / rows / expected)
            if len(self._cloud_ratios) >= CLOUD_MIN_SAMPLES:
                self.cloud_scale = float(statistics.median(self._cloud_ratios))

    def _encoding_usable(self, enc: str) -> bool:
        return enc != "int8" or all(p.quantization for p in self.manifest.split_points)

    def _reach(self, setting: ExitSetting) -> list[float]:
        """reach[k] = fraction of inputs that start segment k (reach[n] = 0: the final exit always answers)."""
        left = [0.0] * (self.n + 1)
        for j, rate in enumerate(setting.exit_rates):
            left[self.exit_segment[j] + 1] += rate
        reach, cur = [], 1.0
        for k in range(self.n):
            cur -= left[k]
            reach.append(max(cur, 0.0))
        return reach + [0.0]

    def _accuracy(self, setting: ExitSetting, last_device_segment: int) -> float | None:
        if setting.final_accuracy is None:
            return None
        acc = setting.final_accuracy
        for j, rate in enumerate(setting.exit_rates):
            if self.exit_segment[j] <= last_device_segment and rate > 0:
                delta = setting.accuracy_delta[j] if j < len(setting.accuracy_delta) else None
                if delta is None:
                    return None
                acc += rate * delta
        return acc

    def _codec_ms(self, table: dict[str, list[float]], enc: str, s: int) -> float:
        vals = table.get(enc)
        return float(vals[s]) if vals and s < len(vals) else 0.0

    def candidates(self, net: NetworkProfile) -> list[Candidate]:
        out: list[Candidate] = []
        cloud_ms = self.cloud_ms
        cum_d = [sum(self.device_ms[: k + 1]) for k in range(self.n)]
        total_c = sum(cloud_ms)
        raw_net = _network_ms(self.input_bytes, self.reply_bytes, net)
        r_dev, r_cloud = self.device.request_ms, self.cloud.request_ms
        for setting in self.settings:
            reach = self._reach(setting)
            th = tuple(setting.thresholds)
            for s in range(self.n):  # s = n-1 is device-only
                local = sum((reach[k] - reach[k + 1]) * cum_d[k] for k in range(s + 1))
                dev = r_dev + sum(reach[k] * self.device_ms[k] for k in range(s + 1))
                acc = self._accuracy(setting, s)
                if s == self.n - 1:
                    out.append(Candidate("device-only", None, None, setting.name, r_dev + local, dev, 0.0,
                                         0.0, 0.0, acc, th))
                    continue
                p = reach[s + 1]
                tail = sum(cloud_ms[s + 1:])
                for enc in self.encodings:
                    nbytes = self.manifest.split_points[s].bytes_per_sample[enc]
                    enc_ms = self._codec_ms(self.device.encode_ms, enc, s)
                    dec_ms = self._codec_ms(self.cloud.decode_ms, enc, s)
                    wire = enc_ms + _network_ms(nbytes, self.reply_bytes, net) + dec_ms
                    lat = r_dev + local + p * (cum_d[s] + wire + tail + r_cloud)
                    out.append(Candidate("split", s, enc, setting.name, lat, dev + p * enc_ms,
                                         p * (dec_ms + tail + r_cloud), p * nbytes, p, acc, th))
                if p >= 1.0:
                    continue  # no device exit up to s takes anything: cloud-only without the device work wins
                lat = r_dev + local + p * (cum_d[s] + raw_net + total_c + r_cloud)
                out.append(Candidate("cascade", s, RAW_ENCODING, setting.name, lat, dev, p * (total_c + r_cloud),
                                     p * self.input_bytes, p, acc, th))
        out.append(Candidate("cloud-only", None, RAW_ENCODING, NO_EXIT, r_dev + raw_net + total_c + r_cloud, r_dev,
                             total_c + r_cloud, float(self.input_bytes), 1.0, self.settings[0].final_accuracy))
        return out

    def plan(self, net: NetworkProfile, objective: str = "latency") -> Plan:
        if objective not in OBJECTIVES:
            raise ConfigError(f"unknown objective {objective!r}; choose one of {OBJECTIVES}")
        cands = self.candidates(net)
        key = {
            "latency": lambda c: (c.latency_ms, c.bytes),
            "throughput": lambda c: (c.device_ms, c.latency_ms),
            "bytes": lambda c: (c.bytes, c.latency_ms),
        }[objective]
        notes = []
        if self.device.slowdown != 1.0:
            notes.append(f"device latencies are EMULATED: host measurement x {self.device.slowdown:g} "
                         f"({self.device.device_class})")
        if len(self.settings) == 1:
            notes.append("bundle is not calibrated: only 'never exit early' is considered (run `edgeexit calibrate`)")
        return Plan(min(cands, key=key), cands, net, objective, notes)

    def sweep(self, net: NetworkProfile, bandwidths_mbit: list[float]) -> dict[str, Any]:
        """Expected latency per strategy across uplink bandwidths (for the plan PNG)."""
        series: dict[str, list[float]] = {}
        chosen: list[str] = []
        for bw in bandwidths_mbit:
            n = NetworkProfile(net.name, bw, max(bw, net.down_mbit), net.rtt_ms, net.jitter_ms)
            plan = self.plan(n)
            chosen.append(plan.choice.label)
            best: dict[str, float] = {}
            for c in plan.candidates:
                name = c.family
                best[name] = min(best.get(name, float("inf")), c.latency_ms)
            for name, v in best.items():
                series.setdefault(name, []).append(v)
            series.setdefault("planner", []).append(plan.choice.latency_ms)
        return {"bandwidths_mbit": bandwidths_mbit, "series": series, "chosen": chosen}
