"""Is the cloud usable, and if not, why: background health checks that close the circuit as soon as the cloud
answers, and the cloud's status as an operator sees it (torch-free).

- :class:`HealthChecker` runs one check at start-up (a wrong token shows before the first request) and, while
  the circuit is open, checks again on a backoff: ``check_s`` doubling to ``check_max_s`` while the cloud is
  unreachable, from 1 s doubling to ``cooldown_s`` while it refuses our credentials (a config mistake: asking
  every 0.25 s would not fix it). A check is the client's ``check_health`` (an authenticated ServerReady, so a
  wrong token fails it; gRPC's own health service takes no token), never a user request.
- :class:`CloudStatus` is ``ok``, ``unreachable`` (the circuit opened on link failures) or ``refused`` (auth,
  tls, or bundle: the cloud runs another bundle), starting ``unknown``. Each change is logged once, at WARNING
  (``cloud_unreachable``, ``cloud_refused``, and ``cloud_ok`` on recovery), and passed on as an event so the
  agent can flip its ``edgeexit.cloud`` health status and count ``edgeexit_agent_cloud_errors_total{reason}``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edgeexit.errors import EdgeExitError
from edgeexit.runtime.breaker import BUNDLE, OVERLOADED, REFUSED, BreakerOptions, CircuitBreaker, failure_reason

log = logging.getLogger("edgeexit.device")

UNKNOWN, OK, UNREACHABLE, REFUSED_STATUS = "unknown", "ok", "unreachable", "refused"
REFUSED_FIRST_S = 1.0  # the first re-check after a refusal (then doubling up to cooldown_s)
DETAIL_CHARS = 300  # an error message in a log line, clipped


@dataclass(frozen=True)
class CloudStatus:
    state: str = UNKNOWN  # unknown | ok | unreachable | refused
    reason: str | None = None  # for unreachable/refused: breaker.failure_reason (auth, tls, unavailable, timeout)
    detail: str = ""  # the last error's message

    @property
    def usable(self) -> bool:
        return self.state == OK


class CloudHealth:
    """The cloud's status from the breaker's outcomes; logs and emits each change once."""

    def __init__(self, breaker_open: Callable[[], bool], emit: Callable[..., None]):
        self._breaker_open = breaker_open
        self._emit = emit  # (event name, **fields)
        self._status = CloudStatus()
        self._lock = threading.Lock()

    @property
    def status(self) -> CloudStatus:
        return self._status

    def observe(self, error: BaseException | None) -> None:
        """The outcome of one cloud call (an offload or a check): None = it answered."""
        if error is None:
            new = CloudStatus(OK)
        else:
            reason = failure_reason(error)
            self._emit("cloud_error", reason=reason)  # counted, not logged: one per failed call
            detail = str(error)[:DETAIL_CHARS]
            if reason == OVERLOADED:
                return  # the service answered (busy): no news about whether it is usable
            if reason in REFUSED:
                new = CloudStatus(REFUSED_STATUS, reason, detail)
            elif self._breaker_open():
                new = CloudStatus(UNREACHABLE, reason, detail)
            else:
                return  # one failed call with the circuit closed is a blip, not a status
        with self._lock:
            old, changed = self._status, (self._status.state, self._status.reason) != (new.state, new.reason)
            self._status = new
        if changed:
            self._announce(old, new)

    def _announce(self, old: CloudStatus, new: CloudStatus) -> None:
        fields: dict[str, Any] = {"was": old.state}
        if new.state == OK:
            name = "cloud_ok"
            level = logging.INFO if old.state == UNKNOWN else logging.WARNING  # first contact is no recovery
        elif new.state == REFUSED_STATUS:
            name, level = "cloud_refused", logging.WARNING
            fix = ("roll the same bundle out to the device and the cloud" if new.reason == BUNDLE
                   else "fix the token (--token-file) or TLS settings")
            fields.update(reason=new.reason, detail=new.detail,
                          action=f"{fix}; offloads resume by themselves once a health check passes; answering on the "
                                 "device meanwhile")
        else:
            name, level = "cloud_unreachable", logging.WARNING
            fields.update(reason=new.reason, detail=new.detail, action="answering on the device until it is back")
        log.log(level, name, extra={"event": name, "fields": fields})
        self._emit(name, **fields)


class HealthChecker:
    """A background thread: one check at start, then checks while the circuit is open, until one passes."""

    def __init__(self, breaker: CircuitBreaker, check: Callable[[float], None], options: BreakerOptions,
                 timeout_s: float):
        self._breaker = breaker
        self._check = check  # raises an edgeexit error when the cloud is not usable
        self._options = options
        self._timeout_s = timeout_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._wake.set()  # the start-up check
        self._thread = threading.Thread(target=self._run, name="edgeexit-health", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """The circuit opened: check until the cloud answers."""
        self._wake.set()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self._timeout_s + 1.0)

    def _run(self) -> None:
        o = self._options
        delay, successes = 0.0, None  # the start-up check runs at once
        while True:
            self._wake.wait()
            if self._stop.is_set():
                return
            self._wake.clear()
            if successes is not None:
                # Re-opened with no offload succeeding since a check closed it (e.g. a link that answers a check but
                # is too slow for the deadline): keep backing off, up to cooldown_s, rather than flap every check_s.
                flapping = self._breaker.successes == successes
                delay = max(min(2 * delay, max(o.cooldown_s, o.check_max_s)) if flapping else 0.0, o.check_s)
            delay = self._until_healthy(delay)
            successes = self._breaker.successes

    def _until_healthy(self, delay: float) -> float:
        """Check until one passes (or close()); returns the wait before the passing check."""
        o = self._options
        while not self._stop.wait(delay):
            try:
                self._check(self._timeout_s)
            except EdgeExitError as e:
                self._breaker.record_failure(e)
                if failure_reason(e) in REFUSED:
                    delay = min(max(2 * delay, REFUSED_FIRST_S), max(o.cooldown_s, REFUSED_FIRST_S))
                else:
                    delay = min(max(2 * delay, o.check_s), o.check_max_s)
                continue
            self._breaker.close_after_check()
            return delay
        return delay
