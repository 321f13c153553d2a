"""One direction of one relayed connection: read -> shape (bandwidth) -> delay (+jitter) -> write.

Two coroutines per direction. The *shaper* reads the source socket and stamps each piece with the time it
finishes crossing the emulated bottleneck; it stops reading while the bottleneck is more than ``LOOKAHEAD``
behind, so TCP back-pressure reaches the sender and a rate change applies to bytes still in flight within
about ``LOOKAHEAD``. The *deliverer* writes each piece at ``departure + delay + jitter``, never before the piece
ahead of it (no reordering). Both re-read the conditions at least every ``TICK`` so run-time changes, traces
and outages apply to open connections, and neither busy-waits.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from edgeexit.testbed.netsim.conditions import Effective
from edgeexit.testbed.netsim.shaping import TokenBucket, piece_size

TICK = 0.025  # longest sleep before conditions are looked at again
LOOKAHEAD = 0.030  # how far ahead of real time the shaper may schedule the bottleneck
READ_SIZE = 64 * 1024
BUFFERED_S = 0.0005  # a read shorter than this returned buffered bytes without waiting for the socket
MAX_QUEUED = 8 * 1024 * 1024  # bytes "in propagation" per direction (bounds memory on unlimited, delayed links)

EOF = b""


@dataclass
class _Piece:
    departure: float
    jitter_s: float
    data: bytes


class Pipe:
    """Moves bytes from ``reader`` to ``writer`` under the conditions ``effective()`` returns."""

    def __init__(
        self,
        direction: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        effective: Callable[[], Effective],
        count: Callable[[str, int], None],
    ) -> None:
        self.direction = direction
        self._reader, self._writer = reader, writer
        self._effective, self._count = effective, count
        self._queue: deque[_Piece] = deque()
        self._queued_bytes = 0
        self._has_data = asyncio.Event()
        self._has_space = asyncio.Event()
        self._has_space.set()
        self._rng = random.Random()

    async def run(self) -> None:
        deliver = asyncio.ensure_future(self._deliver())
        try:
            await self._shape()
            await deliver
        finally:
            deliver.cancel()

    def _rate(self, eff: Effective) -> float | None:
        return eff.up_bytes_per_s if self.direction == "up" else eff.down_bytes_per_s

    def _push(self, piece: _Piece) -> None:
        self._queue.append(piece)
        self._queued_bytes += len(piece.data)
        if self._queued_bytes > MAX_QUEUED:
            self._has_space.clear()
        self._has_data.set()

    async def _shape(self) -> None:
        bucket = TokenBucket()
        last_available = time.monotonic()  # not 0: the link did not exist before the connection
        while True:
            await self._has_space.wait()
            asked = time.monotonic()
            data = await self._reader.read(READ_SIZE)
            available = time.monotonic()
            if len(data) == READ_SIZE and available - asked < BUFFERED_S:
                # A full read that did not wait returned bytes already buffered while we were late (a busy CPU): a
                # real link would not have idled meanwhile, so they count as available once the link was free
                # again. A read that waited got bytes that arrived just now (a large message after an idle
                # spell): crediting them with the idle time would carry them faster than the link's rate.
                available = min(available, max(bucket.free_at, last_available))
            last_available = available
            if not data:
                self._push(_Piece(available, 0.0, EOF))
                return
            eff = self._effective()
            jitter = self._rng.uniform(-eff.jitter_s, eff.jitter_s) if eff.jitter_s else 0.0
            view, off = memoryview(data), 0
            while off < len(data):
                eff = self._effective()
                rate, now = self._rate(eff), time.monotonic()
                if eff.outage is not None or rate == 0:
                    await asyncio.sleep(TICK)
                    available = time.monotonic()  # the link carried nothing meanwhile
                    continue
                if rate is None:
                    size = len(data) - off
                    departure = bucket.unlimited(available)
                else:
                    ahead = bucket.backlog(now) - LOOKAHEAD
                    if ahead > 0:
                        await asyncio.sleep(min(ahead, TICK))
                        continue
                    size = min(len(data) - off, piece_size(rate))
                    departure = bucket.schedule(size, available, rate, eff.burst_bytes)
                self._push(_Piece(departure, jitter, bytes(view[off : off + size])))
                off += size

    def _due(self, piece: _Piece, eff: Effective, not_before: float) -> float:
        return max(piece.departure + max(0.0, eff.delay_s + piece.jitter_s), not_before)

    async def _deliver(self) -> None:
        last_due = 0.0
        while True:
            if not self._queue:
                self._has_data.clear()
                await self._has_data.wait()
                continue
            eff = self._effective()
            if eff.outage is not None:
                await asyncio.sleep(TICK)
                continue
            now = time.monotonic()
            due = self._due(self._queue[0], eff, last_due)
            if due > now:
                await asyncio.sleep(min(due - now, TICK))
                continue
            batch: list[bytes] = []
            while self._queue and self._queue[0].data and due <= now:
                piece = self._queue.popleft()
                batch.append(piece.data)
                last_due = due
                if self._queue:
                    due = self._due(self._queue[0], eff, last_due)
            if batch:
                self._send(batch)
                await self._writer.drain()
            elif self._queue and not self._queue[0].data:  # EOF reached the head: half-close like TCP does
                if self._writer.can_write_eof():
                    self._writer.write_eof()
                return

    def _send(self, batch: list[bytes]) -> None:
        data = b"".join(batch)
        self._count(self.direction, len(data))  # before the write: a peer that saw the bytes sees them counted
        self._writer.write(data)
        self._queued_bytes -= len(data)
        if self._queued_bytes <= MAX_QUEUED:
            self._has_space.set()
