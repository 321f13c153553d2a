"""What the emulated link does: `LinkConditions` (static settings, a trace, scheduled outages) and the
`Effective` state they resolve to at one instant.

Directions: "up" is client -> target (device -> cloud), "down" is target -> client.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from edgeexit.errors import ConfigError
from edgeexit.testbed.netsim.trace import Trace

OUTAGE_MODES = ("blackhole", "reset")


@dataclass(frozen=True)
class Outage:
    """An outage ``start`` seconds after the conditions were applied, lasting ``duration`` seconds.

    ``blackhole``: connections stay open and new ones are accepted, but no byte moves in either direction.
    ``reset``: open connections are reset (TCP RST) and new ones are reset right after accept.
    """

    start: float
    duration: float
    mode: str = "blackhole"

    def __post_init__(self) -> None:
        if self.mode not in OUTAGE_MODES:
            raise ConfigError(f"outage mode {self.mode!r} is unknown; use one of {', '.join(OUTAGE_MODES)}")
        if not (math.isfinite(self.start) and self.start >= 0 and math.isfinite(self.duration) and self.duration > 0):
            raise ConfigError(f"outage start must be >= 0 and duration > 0 seconds, got {self.start}:{self.duration}")

    @property
    def end(self) -> float:
        return self.start + self.duration

    @classmethod
    def parse(cls, text: str) -> Outage:
        """``START:DURATION[:MODE]`` in seconds, e.g. ``5:2`` or ``5:2:reset``."""
        parts = text.split(":")
        if len(parts) not in (2, 3):
            raise ConfigError(f"outage {text!r} must look like START:DURATION[:MODE], e.g. 5:2:blackhole")
        try:
            start, duration = float(parts[0]), float(parts[1])
        except ValueError as e:
            raise ConfigError(f"outage {text!r}: START and DURATION are seconds, e.g. 5:2 or 0.5:1.5:reset") from e
        return cls(start, duration, *(parts[2:] or ["blackhole"]))


@dataclass(frozen=True)
class LinkConditions:
    """Conditions of the emulated link. Rates are Mbit/s (None = unlimited, 0 = stalled).

    ``delay_ms`` and ``jitter_ms`` apply to each direction separately (so the RTT grows by twice the delay);
    each chunk gets ``delay_ms + uniform(-jitter_ms, +jitter_ms)`` (at least 0) but never overtakes the chunk
    before it, so bytes are not reordered. ``burst_bytes`` is the token bucket depth: how many bytes an idle
    link may send at once without paying serialisation time (0 = every byte pays ``size / rate``).
    A ``trace`` replaces ``up_mbit``, ``down_mbit`` and ``delay_ms`` (giving both is an error).
    Trace and outage times count from when the conditions were applied.
    """

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    up_mbit: float | None = None
    down_mbit: float | None = None
    burst_bytes: int = 0
    trace: Trace | None = None
    outages: tuple[Outage, ...] = ()

    def __post_init__(self) -> None:
        for name in ("delay_ms", "jitter_ms", "up_mbit", "down_mbit", "burst_bytes"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be a finite number >= 0, got {value}")
        if self.trace is not None and (self.delay_ms or self.up_mbit is not None or self.down_mbit is not None):
            raise ConfigError("a trace sets bandwidth and delay itself; drop delay_ms/up_mbit/down_mbit or the trace")
        object.__setattr__(self, "outages", tuple(self.outages))


@dataclass(frozen=True)
class Effective:
    """The link at one instant: per-direction rate in bytes/s (None = unlimited), one-way delay and jitter in
    seconds, and the outage mode in force (None when the link is up)."""

    up_bytes_per_s: float | None
    down_bytes_per_s: float | None
    delay_s: float
    jitter_s: float
    burst_bytes: int
    outage: str | None


def _bytes_per_s(mbit: float | None) -> float | None:
    return None if mbit is None else mbit * 1e6 / 8


def resolve(conditions: LinkConditions, elapsed: float, manual_outage: str | None = None) -> Effective:
    """The link ``elapsed`` seconds after ``conditions`` were applied; ``manual_outage`` wins over schedules."""
    up, down, delay_s = conditions.up_mbit, conditions.down_mbit, conditions.delay_ms / 1000
    if conditions.trace is not None:
        row = conditions.trace.at(elapsed)
        up, down, delay_s = row.up_mbit, row.down_mbit, row.rtt_ms / 2000
    outage = manual_outage
    if outage is None:
        for o in conditions.outages:
            if o.start <= elapsed < o.end:
                outage = o.mode
                break
    return Effective(
        up_bytes_per_s=_bytes_per_s(up),
        down_bytes_per_s=_bytes_per_s(down),
        delay_s=delay_s,
        jitter_s=conditions.jitter_ms / 1000,
        burst_bytes=conditions.burst_bytes,
        outage=outage,
    )

