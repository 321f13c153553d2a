"""Bandwidth shaping: a token bucket kept as a virtual clock.

Instead of sleeping until tokens accrue, the bucket computes when each piece *would* finish crossing a link of
the given rate (``departure``), given when its bytes became available. Late wake-ups of the relay therefore do
not lose link capacity (the schedule never depends on when we happened to run), and one piece costs a few
float operations. Bursts: an idle link has up to ``burst`` bytes of credit, exactly like a bucket of that depth.
"""

from __future__ import annotations

# A piece is the unit the relay schedules and writes: ~5 ms of transmission at the current rate, so pacing is
# smooth (about 200 writes/s per busy direction) without a syscall per packet.
PIECE_SECONDS = 0.005
MIN_PIECE = 512
MAX_PIECE = 64 * 1024


def piece_size(bytes_per_s: float | None) -> int:
    if bytes_per_s is None:
        return MAX_PIECE
    return int(min(MAX_PIECE, max(MIN_PIECE, bytes_per_s * PIECE_SECONDS)))


class TokenBucket:
    """Departure times for a stream of pieces crossing a link whose rate may change between pieces."""

    def __init__(self) -> None:
        self.free_at = 0.0  # when the emulated link has finished sending everything scheduled so far

    def schedule(self, nbytes: int, available_at: float, bytes_per_s: float, burst: int = 0) -> float:
        """Departure time of ``nbytes`` that became available at ``available_at`` (rate > 0)."""
        credit = burst / bytes_per_s
        start = max(self.free_at, available_at - credit)
        self.free_at = start + nbytes / bytes_per_s
        return max(self.free_at, available_at)

    def unlimited(self, available_at: float) -> float:
        """An unlimited link sends at once; it is free again immediately."""
        self.free_at = max(self.free_at, available_at)
        return available_at

    def backlog(self, now: float) -> float:
        """Seconds of scheduled transmission still ahead of ``now``."""
        return max(0.0, self.free_at - now)
