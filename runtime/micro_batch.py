"""Micro-batching of concurrent device-only requests in the agent: apps that call at the same time share one run.

With many apps and ``--threads`` = cores, running every request on its own gRPC thread puts workers x threads
compute threads on the cores (oversubscribed, and a batch-1 run parallelises poorly anyway). Here up to ``lanes``
requests at a time are *leaders*: a leader takes every request waiting (up to ``max_rows`` rows, its own first),
runs them as one batch on its own thread, hands each its rows, and passes the lead to the oldest request that
arrived meanwhile. So at most ``lanes`` batches compute at a time, nobody waits on purpose (an idle agent runs a
lone request at once, on the calling thread, with no hand-off), and under load batches fill while others run.
Two lanes by default: with one, a batch's intra-op threads are the only work, and on cores shared with other
processes (the apps themselves) the batch stalls whenever one of its threads is descheduled (measured on a
loaded 2-core host, with onnxruntime's spinning still on: one lane ran at half the rate of unbatched requests).

Off by default (``AgentOptions.micro_batch_rows`` = 1, ``--micro-batch-rows``): measured on the camera model with
the default 4 workers, batches held 2-3 rows and saved no CPU per request, and on cores shared with other
processes fewer runnable threads got less of the CPU; with 16 workers batches saved ~12% CPU per request but
the agent's RSS under 32 apps went from 112 to 158 MB.

Rows are independent on the device (every exit policy decides row by row, no network), so a request's rows of
the batch are its answer; a batch that fails is retried request by request, so one app's bad tensor (say, logits
that overflow) fails only that app. Torch-free.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np

T = TypeVar("T")


@dataclass
class Share(Generic[T]):
    """One request's part of a batch run: rows ``start:stop`` of ``result`` (the whole batch's)."""

    result: T
    start: int
    stop: int
    batch_rows: int


@dataclass
class _Ticket:
    x: np.ndarray
    done: threading.Event = field(default_factory=threading.Event)
    share: Share | None = None
    error: BaseException | None = None
    lead: bool = False  # woken to lead the next batch rather than with an answer


class MicroBatcher(Generic[T]):
    """Run ``run(batch)`` for concurrent ``submit(x)`` calls together; each gets its rows' share."""

    def __init__(self, run: Callable[[np.ndarray], T], max_rows: int = 32, lanes: int = 2):
        self._run, self.max_rows, self.lanes = run, max_rows, lanes
        self._lock = threading.Lock()
        self._waiting: deque[_Ticket] = deque()
        self._leaders = 0  # requests holding a lead (computing a batch, or about to)

    def submit(self, x: np.ndarray) -> Share[T]:
        """Run ``x`` (rows on axis 0, same trailing shape and dtype as every other request) in some batch."""
        ticket = _Ticket(x)
        with self._lock:
            lead = self._leaders < self.lanes
            if lead:
                self._leaders += 1
            else:
                self._waiting.append(ticket)
        if not lead:
            ticket.done.wait()
            if not ticket.lead:
                return self._outcome(ticket)
        self._lead(ticket)
        return self._outcome(ticket)

    def _lead(self, own: _Ticket) -> None:
        """Run ``own`` with the requests waiting, then pass the lead on (a ticket leaves the queue exactly once:
        into a batch, or promoted to lead one)."""
        with self._lock:
            batch, rows = [own], len(own.x)
            while self._waiting and rows + len(self._waiting[0].x) <= self.max_rows:
                batch.append(self._waiting.popleft())
                rows += len(batch[-1].x)
        try:
            self._compute(batch, rows)
        finally:
            with self._lock:
                nxt = self._waiting.popleft() if self._waiting else None
                if nxt is None:
                    self._leaders -= 1
            if nxt is not None:
                nxt.lead = True
                nxt.done.set()
            for t in batch[1:]:  # batch[0] is the leader's own ticket: it reads it on return
                t.done.set()

    def _compute(self, batch: list[_Ticket], rows: int) -> None:
        x = batch[0].x if len(batch) == 1 else np.concatenate([t.x for t in batch], axis=0)
        try:
            result = self._run(x)
        except Exception as e:  # noqa: BLE001 - handed to the callers
            if len(batch) == 1:
                batch[0].error = e
                return
            for t in batch:  # find whose rows failed: only that request gets the error
                self._compute([t], len(t.x))
            return
        start = 0
        for t in batch:
            t.share = Share(result, start, start + len(t.x), rows)
            start += len(t.x)

    @staticmethod
    def _outcome(ticket: _Ticket) -> Share:
        if ticket.error is not None:
            raise ticket.error
        if ticket.share is None:  # the leader sets one or the other before waking us
            raise RuntimeError("micro-batch finished without an answer for this request")
        return ticket.share
