"""Uplink bandwidth and RTT estimated from the timing of real offloads, robust to outliers.

Each offload gives one sample: bytes sent and the network time (wall time of the call minus the cloud's own
compute when the server reports it). The link model is ``time = rtt + bytes / bandwidth``. Over a window of
recent samples we fit it with the Theil-Sen estimator (median of pairwise slopes, median intercept), which
ignores up to ~29% outliers (a GC pause, a retransmit burst) where a mean or least squares would not. When
every sample has the same size the two terms cannot be separated: RTT then comes from explicit probes
(``record_rtt``, e.g. timing ``client.ready()``) and the bandwidth is the median of ``bytes / (time - rtt)``.
The RTT is the fastest of the last ``RTT_WINDOW`` probes, and never more than the offloads' fastest tenth: a probe
that waited for the device's CPU (a loading agent, a throttled one) times that wait too, and the bytes of an
offload cannot cross faster than the RTT. On an emulated Raspberry Pi the probes read 35-66 ms on an 8-20 ms
link, the planner priced every offload 30-50 ms too high and the agent ran device-only where offloading was
twice as fast (`edgeexit bench --logs`).
The fitted bandwidth is smoothed with an EWMA so a single window shift does not make the planner flap.

A real change of the link (a handover, congestion) must not take a whole window to show, though: when
``SHIFT_RUN`` samples in a row take more than ``SHIFT_FACTOR`` times longer (or shorter) than the estimate
predicts, the samples from before the change are dropped and the smoothing restarts from the new ones.
One outlier never does this; three in a row in the same direction do.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

import numpy as np

# Distinct payload sizes must differ by this factor before their slope is trusted (avoids dividing noise).
_MIN_SIZE_RATIO = 1.05
SHIFT_RUN = 3
SHIFT_FACTOR = 1.6
RTT_WINDOW = 8  # RTT probes kept; the estimate is their minimum
# The offloads' network times cap the RTT at this quantile (not the minimum: one glitched sample must not pull it).
RTT_CAP_QUANTILE = 0.1


@dataclass(frozen=True)
class LinkEstimate:
    bandwidth_bps: float | None  # uplink bits per second; None until there is a usable sample
    rtt_s: float | None  # round-trip time in seconds; None until known
    samples: int  # offload samples in the window

    def transfer_s(self, nbytes: int) -> float | None:
        """Expected network time of one offload of ``nbytes`` (None while unknown)."""
        if self.bandwidth_bps is None:
            return None
        return (self.rtt_s or 0.0) + 8.0 * nbytes / self.bandwidth_bps


class LinkStats:
    """Thread-safe window of offload samples with a robust ``estimate()``."""

    def __init__(self, window: int = 32, smoothing: float = 0.3):
        if window < 2:
            raise ValueError("window must hold at least 2 samples")
        if not 0.0 < smoothing <= 1.0:
            raise ValueError("smoothing must be in (0, 1]")
        self._samples: deque[tuple[float, float]] = deque(maxlen=window)
        self._rtts: deque[float] = deque(maxlen=RTT_WINDOW)
        self._smoothing = smoothing
        self._bw: float | None = None
        self._rtt: float | None = None
        self._shift = (0, 0)  # (direction +1 slower / -1 faster, consecutive samples)
        self.shifts = 0  # how many link changes were detected
        self._lock = threading.Lock()

    def record(self, nbytes: int, seconds: float) -> None:
        """One offload: ``nbytes`` on the wire took ``seconds`` of network time."""
        if seconds <= 0 or nbytes < 0:
            return  # clock glitch; a non-positive duration carries no information
        with self._lock:
            self._track_shift(nbytes, seconds)
            self._samples.append((float(nbytes), float(seconds)))
            if self._shift[1] >= SHIFT_RUN:
                recent = list(self._samples)[-SHIFT_RUN:]
                self._samples.clear()
                self._samples.extend(recent)
                self._bw = self._rtt = None
                self._shift = (0, 0)
                self.shifts += 1
            self._update()

    def _track_shift(self, nbytes: int, seconds: float) -> None:
        predicted = LinkEstimate(self._bw, self._rtt, len(self._samples)).transfer_s(nbytes)
        if not predicted or len(self._samples) < SHIFT_RUN:
            return
        ratio = seconds / predicted
        direction = 1 if ratio > SHIFT_FACTOR else -1 if ratio < 1 / SHIFT_FACTOR else 0
        run = self._shift[1] + 1 if direction and direction == self._shift[0] else int(direction != 0)
        self._shift = (direction, run)

    def record_rtt(self, seconds: float) -> None:
        """An empty round trip (health probe): pure RTT."""
        if seconds <= 0:
            return
        with self._lock:
            self._rtts.append(float(seconds))
            self._update()

    def estimate(self) -> LinkEstimate:
        with self._lock:
            return LinkEstimate(self._bw, self._rtt, len(self._samples))

    def _update(self) -> None:
        bw, rtt = _fit(list(self._samples), list(self._rtts))
        self._rtt = rtt if rtt is not None else self._rtt  # a minimum and a cap: steady without smoothing
        self._bw = _ewma(self._bw, bw, self._smoothing)


def _ewma(old: float | None, new: float | None, alpha: float) -> float | None:
    if new is None:
        return old
    return new if old is None else (1 - alpha) * old + alpha * new


def _fit(samples: list[tuple[float, float]], rtts: list[float]) -> tuple[float | None, float | None]:
    """(bandwidth bits/s, rtt s) from the window; either may be None."""
    probe_rtt = min(rtts) if rtts else None  # waiting for a CPU only ever adds to a probe
    if not samples:
        return None, probe_rtt
    b = np.array([s[0] for s in samples])
    t = np.array([s[1] for s in samples])
    cap = float(np.quantile(t, RTT_CAP_QUANTILE))  # no offload crossed faster than the RTT
    slope = _theil_sen_slope(b, t)
    if slope is not None and slope > 0:
        rtt = probe_rtt if probe_rtt is not None else max(float(np.median(t - slope * b)), 0.0)
        return 8.0 / slope, min(rtt, cap)
    rtt = min(probe_rtt, cap) if probe_rtt is not None else 0.0
    # An offload cannot take less than the RTT, so a sample at or below it says the probed RTT is stale (timed
    # while the process was busy, or the path got shorter) and the bytes crossed fast: its transfer time is
    # floored at a tenth of the sample rather than dropped (dropping every sample left no estimate at all, and an
    # agent that had moved to the device for a slow link never saw the link recover).
    payload = np.maximum(t - rtt, t / 10)
    ok = b > 0
    if not ok.any():
        return None, rtt
    return float(np.median(8.0 * b[ok] / payload[ok])), rtt


def _theil_sen_slope(b: np.ndarray, t: np.ndarray) -> float | None:
    """Median seconds-per-byte over pairs whose sizes differ enough; None if no such pair."""
    i, j = np.triu_indices(len(b), k=1)
    lo, hi = np.minimum(b[i], b[j]), np.maximum(b[i], b[j])
    usable = hi > lo * _MIN_SIZE_RATIO
    if not usable.any():
        return None
    i, j = i[usable], j[usable]
    return float(np.median((t[j] - t[i]) / (b[j] - b[i])))
