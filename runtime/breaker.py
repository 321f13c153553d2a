"""Retries with exponential backoff inside a deadline, and a circuit breaker in front of the cloud.

The breaker exists so a device with a dead uplink stops paying a connect timeout on every request: after
``failure_threshold`` consecutive failed offloads the circuit opens and offloads are skipped (the caller
falls back at once). After ``cooldown_s`` it goes half-open and lets exactly one probe through; a success
closes it, a failure re-opens it for another cooldown. Clock and sleep are injectable so this is unit-tested
without waiting.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from edgeexit.errors import ConfigError, LinkTimeout, OffloadError, PeerUnavailable

T = TypeVar("T")
Clock = Callable[[], float]

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"


@dataclass
class BreakerOptions:
    failure_threshold: int = 3  # consecutive failures that open the circuit
    cooldown_s: float = 5.0  # how long it stays open before one probe is allowed

    def __post_init__(self) -> None:
        if self.failure_threshold < 1 or not self.cooldown_s >= 0:
            raise ConfigError(f"breaker: failure_threshold must be >= 1 and cooldown_s >= 0 (--breaker-failures, "
                              f"--breaker-cooldown-s), got {self.failure_threshold} and {self.cooldown_s}")


@dataclass
class RetryOptions:
    retries: int = 1  # extra attempts after the first, while the deadline allows
    backoff_s: float = 0.01  # first wait; doubles each retry
    max_backoff_s: float = 0.5

    def __post_init__(self) -> None:
        if self.retries < 0 or not 0 <= self.backoff_s <= self.max_backoff_s:
            raise ConfigError(f"retries must be >= 0 (--retries) and 0 <= backoff_s <= max_backoff_s, got "
                              f"{self.retries}, {self.backoff_s} and {self.max_backoff_s}")


class CircuitBreaker:
    """Closed → (N failures) → open → (cooldown) → half-open → one probe → closed or open again."""

    def __init__(self, options: BreakerOptions | None = None, clock: Clock = time.monotonic,
                 on_change: Callable[[str, str], None] | None = None):
        self.options = options or BreakerOptions()
        self._clock = clock
        self._on_change = on_change  # (old_state, new_state), e.g. for logs and metrics
        self._state = CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False
        self._lock = threading.Lock()

    @property
    def state(self) -> str:
        with self._lock:
            return self._current_state()

    def allow(self) -> bool:
        """May a request go out now? In half-open state only one caller (the probe) gets True."""
        with self._lock:
            state = self._current_state()
            if state == CLOSED:
                return True
            if state == HALF_OPEN and not self._probing:
                self._probing = True
                return True
            return False

    def record_success(self) -> None:
        with self._lock:
            self._failures = 0
            self._probing = False
            self._set(CLOSED)

    def record_failure(self) -> None:
        with self._lock:
            self._failures += 1
            was_probe = self._probing
            self._probing = False
            if was_probe or self._failures >= self.options.failure_threshold:
                self._opened_at = self._clock()
                self._set(OPEN)

    def _current_state(self) -> str:
        if self._state == OPEN and self._clock() - self._opened_at >= self.options.cooldown_s:
            self._set(HALF_OPEN)
        return self._state

    def _set(self, new: str) -> None:
        old, self._state = self._state, new
        if old != new and self._on_change is not None:
            self._on_change(old, new)


def call_with_retries(fn: Callable[[float], T], deadline: float, retry: RetryOptions,
                      breaker: CircuitBreaker, clock: Clock = time.monotonic,
                      sleep: Callable[[float], None] = time.sleep) -> T:
    """Call ``fn(timeout_s)`` until it succeeds, the retries run out or the deadline (a ``clock()`` time) passes.

    Only PeerUnavailable is retried (a refused or dropped connection may be transient); a LinkTimeout means
    the budget is spent, and other errors (a bad tensor) would fail the same way again. Every failure is
    counted by the breaker; an open circuit raises PeerUnavailable without calling ``fn``.
    """
    attempt = 0
    while True:
        remaining = deadline - clock()
        if remaining <= 0:
            # The device spent the budget; that says nothing about the cloud, so the breaker is not told.
            raise LinkTimeout("no time budget left for the offload")
        if not breaker.allow():
            raise PeerUnavailable("circuit open: the cloud failed repeatedly; answering on the device")
        try:
            result = fn(remaining)
        except PeerUnavailable:
            breaker.record_failure()
            delay = min(retry.backoff_s * (2 ** attempt), retry.max_backoff_s)
            if attempt >= retry.retries or clock() + delay >= deadline:
                raise
            attempt += 1
            sleep(delay)
            continue
        except OffloadError:
            breaker.record_failure()
            raise
        except Exception:
            # The peer answered (e.g. rejected the tensor) or we have a bug: not a link failure.
            breaker.record_success()
            raise
        breaker.record_success()
        return result
