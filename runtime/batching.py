"""Dynamic batching: concurrent requests for one model run together, and each caller gets its own rows.

A worker thread per model takes the first waiting request, then keeps collecting requests until the batch
holds ``max_batch_size`` rows or ``max_delay_ms`` has passed since the first one arrived, runs the batch once
and splits the outputs back by row offsets. While a batch computes, the next one queues up, so under load
batches fill without waiting for the delay. ``instances`` workers (Triton's instance count) take turns
collecting and run their batches at the same time: one worker with a one-thread session leaves the other cores
idle, while unbatched requests run on every gRPC thread at once. Each caller also learns when its batch started and how
long the batch ran, so the service can report queue and compute time per request.

Fleet safety: the queue is bounded (``max_queue`` rows waiting; a request that does not fit fails at once with
``Overloaded``, so a device falls back instead of waiting out its deadline; a request is always admitted into an
empty queue, however many rows it has), and a request whose ``deadline`` (a ``time.monotonic()`` instant) has
passed is dropped with ``LinkTimeout`` before any batch computes it: its client has gone. With batching off,
requests run in the callers' threads, and the same bound counts the rows in flight.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from edgeexit.errors import ConfigError, LinkTimeout, Overloaded

# A request's rows: one array, or a tuple of arrays with the same rows (a model's input and the extra inputs it
# carries, e.g. an attention mask); requests batch together only when every array's non-batch shape agrees.
Rows = np.ndarray | tuple[np.ndarray, ...]
RunFn = Callable[[Rows], dict[str, np.ndarray]]
DropFn = Callable[[str], None]  # called once per request refused or dropped, with the reason ("overloaded", "deadline")


@dataclass
class BatchOptions:
    max_batch_size: int = 16  # rows per batch; 1 turns batching off (every request runs on its own)
    max_delay_ms: float = 2.0  # how long the first request of a batch may wait for company
    max_queue: int = 256  # rows waiting (in flight with batching off) before new requests get Overloaded
    instances: int = 1  # batches computed at the same time (worker threads sharing the model's sessions)

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ConfigError("--max-batch-size must be at least 1 (1 turns batching off)")
        if self.max_delay_ms < 0:
            raise ConfigError("--max-batch-delay-ms must not be negative")
        if self.max_queue < 1:
            raise ConfigError("--max-queue must be at least 1 (rows waiting before new requests are refused)")
        if self.instances < 1:
            raise ConfigError("--instances must be at least 1 (batches computed at the same time)")

    @property
    def enabled(self) -> bool:
        return self.max_batch_size > 1


@dataclass
class Batched:
    """One request's share of a batch run."""

    outputs: dict[str, np.ndarray]  # exactly this request's rows of every output
    started: float  # time.perf_counter() when its batch started running
    run_s: float  # the whole batch's run time: shared by every request in the batch, not split between them


@dataclass
class _Item:
    x: Rows
    future: Future
    deadline: float | None  # time.monotonic() after which nobody waits for the answer


def _expired(deadline: float | None, now: float) -> bool:
    return deadline is not None and now >= deadline


def _rows(x: Rows) -> int:
    return len(x[0]) if isinstance(x, tuple) else len(x)


def _shape_key(x: Rows) -> tuple:
    return tuple(a.shape[1:] for a in x) if isinstance(x, tuple) else x.shape[1:]


def _concat(xs: list[Rows]) -> Rows:
    if isinstance(xs[0], tuple):
        return tuple(np.concatenate(parts, axis=0) for parts in zip(*xs, strict=True))
    return np.concatenate(xs, axis=0)


class DynamicBatcher:
    """Groups ``submit`` calls into batches for ``run`` (a function of a batch array to named outputs)."""

    def __init__(self, run: RunFn, options: BatchOptions, on_batch: Callable[[int], None] | None = None,
                 name: str = "model", on_drop: DropFn | None = None):
        self._run, self.options, self._on_batch, self._on_drop = run, options, on_batch, on_drop
        self.name = name
        self._lock = threading.Lock()
        self._waiting = 0  # rows admitted and not yet started (batching off: not yet finished)
        self._queue: queue.Queue[_Item | None] = queue.Queue()
        self._carry: _Item | None = None  # a request that did not fit into the previous batch
        self._collecting = threading.Lock()  # one worker gathers a batch at a time; running them overlaps
        self._stopping = False
        self._closed = False
        self._threads: list[threading.Thread] = []
        if options.enabled:
            self._threads = [threading.Thread(target=self._loop, name=f"batcher-{name}-{i}", daemon=True)
                             for i in range(options.instances)]
            for t in self._threads:
                t.start()

    @property
    def waiting_rows(self) -> int:
        """Rows admitted and not yet started (with batching off: not yet finished)."""
        return self._waiting

    def submit(self, x: Rows, timeout: float | None = None, deadline: float | None = None) -> Batched:
        """Run ``x`` (rows on axis 0) in some batch; return exactly its rows of every output, with timing.

        Raises ``Overloaded`` at once when the queue is full, ``LinkTimeout`` when ``deadline`` (monotonic) passes
        before its batch starts."""
        rows = _rows(x)
        if not self.options.enabled:
            self._admit(rows)
            try:
                if _expired(deadline, time.monotonic()):
                    self._drop("deadline")
                    raise self._timeout()
                if self._on_batch:
                    self._on_batch(1)
                started = time.perf_counter()
                outputs = self._run(x)
                return Batched(outputs, started, time.perf_counter() - started)
            finally:
                with self._lock:
                    self._waiting -= rows
        if self._closed:
            raise RuntimeError("batcher is closed")
        item = _Item(x, Future(), deadline)
        self._admit(rows)
        self._queue.put(item)
        return item.future.result(timeout)

    def _admit(self, rows: int) -> None:
        with self._lock:
            waiting = self._waiting
            # An empty queue takes any request: a bound below --max-batch-rows must not refuse big ones forever.
            if waiting and waiting + rows > self.options.max_queue:
                full = True
            else:
                full = False
                self._waiting += rows
        if full:
            self._drop("overloaded")
            raise Overloaded(f"the service is overloaded ({waiting} rows queued for {self.name}, --max-queue "
                             f"{self.options.max_queue}); retry later or add replicas")

    def _drop(self, reason: str) -> None:
        if self._on_drop:
            self._on_drop(reason)

    def _timeout(self) -> LinkTimeout:
        return LinkTimeout(f"{self.name}: the request's deadline passed while it waited in the queue; it was not "
                           "computed (the client has given up). Give requests a longer deadline or add replicas")

    def close(self) -> None:
        """Finish queued work, then stop the worker."""
        if self._threads and not self._closed:
            self._closed = True
            self._queue.put(None)
            for t in self._threads:
                t.join(timeout=10)

    def _next(self, timeout: float | None) -> _Item | None:
        if self._carry is not None:
            item, self._carry = self._carry, None
            return item
        return self._queue.get(timeout=timeout) if timeout is None or timeout > 0 else self._queue.get_nowait()

    def _collect(self, first: _Item) -> tuple[list[_Item], bool]:
        """Gather a batch starting with ``first``; returns the batch and whether the stop marker was seen."""
        batch, rows = [first], _rows(first.x)
        deadline = time.monotonic() + self.options.max_delay_ms / 1000.0
        while rows < self.options.max_batch_size:
            try:
                item = self._next(deadline - time.monotonic())
            except queue.Empty:
                break
            if item is None:
                return batch, True
            if _expired(item.deadline, time.monotonic()):
                self._expire([item])  # takes no room in the batch
                continue
            if rows + _rows(item.x) > self.options.max_batch_size or _shape_key(item.x) != _shape_key(first.x):
                self._carry = item  # starts the next batch
                break
            batch.append(item)
            rows += _rows(item.x)
        return batch, False

    def _loop(self) -> None:
        while True:
            with self._collecting:
                if self._stopping and self._carry is None and self._queue.empty():
                    return
                try:
                    first = self._next(0 if self._stopping else None)
                except queue.Empty:
                    return
                if first is None:  # the stop marker: finish what is queued, then every worker returns
                    self._stopping = True
                    continue
                batch, saw_stop = self._collect(first)
                self._stopping = self._stopping or saw_stop
            self._execute(batch)

    def _expire(self, items: list[_Item]) -> None:
        with self._lock:
            self._waiting -= sum(_rows(it.x) for it in items)
        for it in items:
            self._drop("deadline")
            it.future.set_exception(self._timeout())

    def _execute(self, batch: list[_Item]) -> None:
        now = time.monotonic()  # the last moment to spare the CPU for clients that have gone
        self._expire([it for it in batch if _expired(it.deadline, now)])
        batch = [it for it in batch if not _expired(it.deadline, now)]
        if not batch:
            return
        with self._lock:
            self._waiting -= sum(_rows(it.x) for it in batch)
        if self._on_batch:
            self._on_batch(len(batch))
        started = time.perf_counter()
        try:
            x = batch[0].x if len(batch) == 1 else _concat([it.x for it in batch])
            outputs = self._run(x)
            run_s = time.perf_counter() - started
        except Exception as e:  # noqa: BLE001 - the callers get the error; the worker keeps running
            for it in batch:
                it.future.set_exception(e)
            return
        start = 0
        for it in batch:
            stop = start + _rows(it.x)
            it.future.set_result(Batched({k: v[start:stop] for k, v in outputs.items()}, started, run_s))
            start = stop
