"""Bandwidth/RTT traces replayed over time by the relay.

CSV format (one header line, then one row per step; ``#`` starts a comment line)::

    t_seconds,up_mbit,down_mbit,rtt_ms
    0,20,50,40
    5.0,2,5,120
    12.5,0,0,120

- ``t_seconds``: when the row takes effect, in seconds since the conditions were applied (relay start, or the
  ``Relay.set`` call). The first row must be at 0 and times must increase strictly.
- ``up_mbit`` / ``down_mbit``: bandwidth client->target / target->client in Mbit/s (10**6 bit/s); 0 stalls
  that direction until a later row.
- ``rtt_ms``: round-trip time; each direction gets half of it as one-way delay.

Rows are steps, not ramps: a row holds until the next one; the last row holds for ever.
"""

from __future__ import annotations

import bisect
import csv
from dataclasses import dataclass
from pathlib import Path

from edgeexit.errors import ConfigError

HEADER = ("t_seconds", "up_mbit", "down_mbit", "rtt_ms")


@dataclass(frozen=True)
class TraceRow:
    t_seconds: float
    up_mbit: float
    down_mbit: float
    rtt_ms: float


@dataclass(frozen=True)
class Trace:
    rows: tuple[TraceRow, ...]

    def __post_init__(self) -> None:
        if not self.rows:
            raise ConfigError("a trace needs at least one row (t_seconds,up_mbit,down_mbit,rtt_ms)")
        if self.rows[0].t_seconds != 0:
            raise ConfigError(f"a trace must start at t_seconds=0, not {self.rows[0].t_seconds}; add a row at 0")
        for prev, row in zip(self.rows, self.rows[1:], strict=False):
            if row.t_seconds <= prev.t_seconds:
                raise ConfigError(f"trace times must increase strictly: {row.t_seconds} follows {prev.t_seconds}")
        for row in self.rows:
            if min(row.up_mbit, row.down_mbit, row.rtt_ms) < 0:
                raise ConfigError(f"trace row at t={row.t_seconds}: bandwidth and rtt must be >= 0")
        object.__setattr__(self, "_times", [r.t_seconds for r in self.rows])  # for bisect on every lookup

    @property
    def duration(self) -> float:
        """Time of the last step (it then holds for ever)."""
        return self.rows[-1].t_seconds

    def at(self, elapsed: float) -> TraceRow:
        """The row in force ``elapsed`` seconds after the trace started."""
        i = bisect.bisect_right(self._times, elapsed) - 1
        return self.rows[max(i, 0)]

    @classmethod
    def load(cls, path: str | Path) -> Trace:
        """Read a trace CSV (format in this module's docstring)."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise ConfigError(f"cannot read trace {path}: {e.strerror}; pass an existing CSV file") from e
        return cls.parse(text, source=str(path))

    @classmethod
    def parse(cls, text: str, source: str = "<trace>") -> Trace:
        lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        reader = csv.reader(lines)
        header = tuple(h.strip() for h in next(reader, ()))
        if header != HEADER:
            raise ConfigError(f"{source}: the first line must be the header {','.join(HEADER)}, got {','.join(header)}")
        rows = []
        for lineno, cells in enumerate(reader, start=2):
            if len(cells) != len(HEADER):
                raise ConfigError(f"{source}: data row {lineno} has {len(cells)} cells; expected {len(HEADER)}")
            try:
                rows.append(TraceRow(*(float(c) for c in cells)))
            except ValueError as e:
                raise ConfigError(f"{source}: data row {lineno} has a non-number ({e}); use plain decimals") from e
        return cls(tuple(rows))

    def to_csv(self) -> str:
        lines = [",".join(HEADER)]
        lines += [f"{r.t_seconds:g},{r.up_mbit:g},{r.down_mbit:g},{r.rtt_ms:g}" for r in self.rows]
        return "\n".join(lines) + "\n"
