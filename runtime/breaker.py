"""Retries with exponential backoff inside a deadline, and a circuit breaker in front of the cloud.

The breaker exists so a device with a dead uplink stops paying a connect timeout on every request: after
``failure_threshold`` consecutive failed offloads the circuit opens and offloads are skipped (the caller
falls back at once). A refusal (``PeerRefused``: a wrong token, a failed TLS handshake; ``BundleMismatch``:
the cloud runs another bundle) opens it at once: every request would be refused alike, a config problem.

``Overloaded`` (the service's queue is full: RESOURCE_EXHAUSTED at once) never opens it, however many in a
row: the refusal costs one round trip, proves the link and the service work, and a health check would pass at
once, so an open circuit would only flap while stopping offloads the service may have room for a moment later
(or, with several cloud targets, another replica has room now). It is counted (reason "overloaded"), not
retried (the caller falls back at once), and resets the run of link failures like any answer does.

How it closes again depends on who probes the cloud:
- with ``health_checks`` (the device runtime's client can check the server's health; see
  ``cloud_health.HealthChecker``) no user request is sent while the circuit is open: a background check that
  passes calls ``close_after_check`` (open -> half-open -> closed at once);
- without, after ``cooldown_s`` it goes half-open and lets exactly one request through as the probe; a success
  closes it, a failure re-opens it for another cooldown.
Clock and sleep are injectable so this is unit-tested without waiting.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from edgeexit.errors import (
    BundleMismatch,
    ConfigError,
    LinkTimeout,
    OffloadError,
    Overloaded,
    PeerRefused,
    PeerUnavailable,
)

T = TypeVar("T")
Clock = Callable[[], float]

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"
# Why a cloud call failed (a metric label: keep this set small and fixed). "auth", "tls" and "bundle" are refusals.
AUTH, TLS, UNAVAILABLE, TIMEOUT, ERROR = "auth", "tls", "unavailable", "timeout", "error"
BUNDLE, OVERLOADED = "bundle", "overloaded"
REFUSED = (AUTH, TLS, BUNDLE)
_REFUSALS = {AUTH: "the cloud refused our credentials", TLS: "the cloud refused our credentials",
             BUNDLE: "the cloud runs another bundle"}


def failure_reason(error: BaseException | None) -> str:
    """The bounded reason label of a failed cloud call (None: an unspecified link failure)."""
    if isinstance(error, PeerRefused):
        return error.reason if error.reason in (AUTH, TLS) else AUTH
    if isinstance(error, BundleMismatch):
        return BUNDLE
    if isinstance(error, Overloaded):
        return OVERLOADED
    if isinstance(error, LinkTimeout):
        return TIMEOUT
    if error is None or isinstance(error, PeerUnavailable):
        return UNAVAILABLE
    return ERROR


@dataclass
class BreakerOptions:
    failure_threshold: int = 3  # consecutive failures that open the circuit
    # Without health checks: how long it stays open before one request probes. With them: the longest wait
    # between two checks while the cloud refuses our credentials (a config mistake: no point asking often).
    cooldown_s: float = 5.0
    check_s: float = 0.25  # the first background health check after the circuit opens; doubles per failure...
    # ...up to this while the cloud is unreachable. A check that fails locally (the channel is reconnecting) costs
    # nothing on the wire; with grpc's 0.5 s reconnect backoff, offloads resume within ~1.1 s of the link.
    check_max_s: float = 0.5

    def __post_init__(self) -> None:
        if self.failure_threshold < 1 or not self.cooldown_s >= 0:
            raise ConfigError(f"breaker: failure_threshold must be >= 1 and cooldown_s >= 0 (--breaker-failures, "
                              f"--breaker-cooldown-s), got {self.failure_threshold} and {self.cooldown_s}")
        if not 0 < self.check_s <= self.check_max_s:
            raise ConfigError(f"breaker: health checks need 0 < check_s <= check_max_s, got {self.check_s} and "
                              f"{self.check_max_s}")


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
    """Closed → (N failures, or one refusal) → open → (health check passes | cooldown + one probe) → closed.

    ``on_change(old, new)`` runs on every state change and ``on_outcome(error or None)`` after every recorded
    call (for logs, metrics and health); both run outside the breaker's lock, so they may read ``state``.
    """

    def __init__(self, options: BreakerOptions | None = None, clock: Clock = time.monotonic,
                 on_change: Callable[[str, str], None] | None = None, *,
                 on_outcome: Callable[[BaseException | None], None] | None = None, health_checks: bool = False):
        self.options = options or BreakerOptions()
        self._clock = clock
        self._on_change = on_change
        self._on_outcome = on_outcome
        self._health_checks = health_checks
        self._state = CLOSED
        self._reason = UNAVAILABLE  # why it last opened
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False
        self._successes = 0
        self._lock = threading.Lock()

    @property
    def state(self) -> str:
        with self._lock:
            changes = self._advance()
            state = self._state
        self._notify(changes)
        return state

    @property
    def reason(self) -> str | None:
        """Why the circuit is not closed (``failure_reason`` of the failure that opened it); None when closed."""
        with self._lock:
            return None if self._state == CLOSED else self._reason

    @property
    def successes(self) -> int:
        """Calls recorded as successes so far (a health check closing the circuit is not one)."""
        return self._successes

    def allow(self) -> bool:
        """May a request go out now? In half-open state without health checks, one caller (the probe) gets True."""
        with self._lock:
            changes = self._advance()
            allowed = self._state == CLOSED
            if self._state == HALF_OPEN and not self._probing and not self._health_checks:
                self._probing = allowed = True
        self._notify(changes)
        return allowed

    def record_success(self) -> None:
        with self._lock:
            self._successes += 1
            self._failures = 0
            self._probing = False
            changes = self._set(CLOSED)
        self._notify(changes, outcome=True)

    def record_failure(self, error: BaseException | None = None) -> None:
        """A cloud call failed with ``error`` (None: a link failure). A refusal opens the circuit at once."""
        reason = failure_reason(error)
        with self._lock:
            self._failures += 1
            was_probe = self._probing
            self._probing = False
            changes: list[tuple[str, str]] = []
            if self._state != CLOSED or was_probe or reason in REFUSED \
                    or self._failures >= self.options.failure_threshold:
                self._opened_at = self._clock()
                self._reason = reason
                changes = self._set(OPEN)
        self._notify(changes, outcome=True, error=error if error is not None else PeerUnavailable(reason))

    def record_overload(self, error: Overloaded) -> None:
        """The service answered that it is overloaded: counted, but the state stays (see the module docstring)."""
        with self._lock:
            self._failures = 0
            self._probing = False
        self._notify([], outcome=True, error=error)

    def close_after_check(self) -> None:
        """A background health check passed: the cloud answers and accepts us, so offloads may resume now."""
        with self._lock:
            changes = self._set(HALF_OPEN) if self._state == OPEN else []
            self._failures = 0
            self._probing = False
            changes += self._set(CLOSED)
        self._notify(changes, outcome=True)

    def _advance(self) -> list[tuple[str, str]]:
        if (self._state == OPEN and not self._health_checks
                and self._clock() - self._opened_at >= self.options.cooldown_s):
            return self._set(HALF_OPEN)
        return []

    def _set(self, new: str) -> list[tuple[str, str]]:
        old, self._state = self._state, new
        return [(old, new)] if old != new else []

    def _notify(self, changes: list[tuple[str, str]], outcome: bool = False,
                error: BaseException | None = None) -> None:
        if self._on_change is not None:
            for old, new in changes:
                self._on_change(old, new)
        if outcome and self._on_outcome is not None:
            self._on_outcome(error)


def call_with_retries(fn: Callable[[float], T], deadline: float, retry: RetryOptions,
                      breaker: CircuitBreaker, clock: Clock = time.monotonic,
                      sleep: Callable[[float], None] = time.sleep) -> T:
    """Call ``fn(timeout_s)`` until it succeeds, the retries run out or the deadline (a ``clock()`` time) passes.

    Only PeerUnavailable is retried (a refused or dropped connection may be transient; with several cloud targets
    the retry goes to another), but not PeerRefused (our credentials will be refused again); a LinkTimeout means
    the budget is spent, Overloaded asks us to answer locally now, and other errors (a bad tensor, another
    bundle) would fail the same way again. Every failure is counted by the breaker; an open circuit raises
    PeerUnavailable without calling ``fn``.
    """
    attempt = 0
    while True:
        remaining = deadline - clock()
        if remaining <= 0:
            # The device spent the budget; that says nothing about the cloud, so the breaker is not told.
            raise LinkTimeout("no time budget left for the offload")
        if not breaker.allow():
            why = _REFUSALS.get(breaker.reason or "", "the cloud failed repeatedly")
            raise PeerUnavailable(f"circuit open: {why} ({breaker.reason}); answering on the device")
        try:
            result = fn(remaining)
        except PeerRefused as e:
            breaker.record_failure(e)
            raise
        except Overloaded as e:
            breaker.record_overload(e)
            raise
        except PeerUnavailable as e:
            breaker.record_failure(e)
            delay = min(retry.backoff_s * (2 ** attempt), retry.max_backoff_s)
            if attempt >= retry.retries or clock() + delay >= deadline:
                raise
            attempt += 1
            sleep(delay)
            continue
        except OffloadError as e:
            breaker.record_failure(e)
            raise
        except Exception:
            # The peer answered (e.g. rejected the tensor) or we have a bug: not a link failure.
            breaker.record_success()
            raise
        breaker.record_success()
        return result
