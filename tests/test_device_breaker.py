"""Circuit breaker, retries and link statistics, with an injectable clock (no waiting)."""

from __future__ import annotations

import pytest

from edgeexit.errors import InvalidTensor, LinkTimeout, PeerUnavailable
from edgeexit.runtime.breaker import (
    CLOSED,
    HALF_OPEN,
    OPEN,
    BreakerOptions,
    CircuitBreaker,
    RetryOptions,
    call_with_retries,
)
from edgeexit.runtime.link_stats import LinkStats


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.t += s


def test_breaker_opens_after_n_failures_then_half_open_probe_closes_it():
    clock = FakeClock()
    changes = []
    b = CircuitBreaker(BreakerOptions(failure_threshold=3, cooldown_s=5.0), clock,
                       on_change=lambda o, n: changes.append((o, n)))
    for _ in range(2):
        assert b.allow()
        b.record_failure()
    assert b.state == CLOSED
    b.record_failure()
    assert b.state == OPEN and not b.allow()
    clock.t += 4.9
    assert not b.allow()
    clock.t += 0.2
    assert b.state == HALF_OPEN
    assert b.allow() and not b.allow()  # exactly one probe
    b.record_success()
    assert b.state == CLOSED and b.allow()
    assert changes == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]


def test_failed_probe_reopens_for_another_cooldown():
    clock = FakeClock()
    b = CircuitBreaker(BreakerOptions(failure_threshold=1, cooldown_s=2.0), clock)
    b.record_failure()
    clock.t += 2.0
    assert b.allow()
    b.record_failure()
    assert b.state == OPEN
    clock.t += 1.9
    assert not b.allow()
    clock.t += 0.1
    assert b.allow()


def test_success_resets_the_consecutive_count():
    b = CircuitBreaker(BreakerOptions(failure_threshold=2), FakeClock())
    b.record_failure()
    b.record_success()
    b.record_failure()
    assert b.state == CLOSED


def test_retries_back_off_exponentially_and_then_succeed():
    clock = FakeClock()
    calls = []

    def flaky(timeout: float) -> str:
        calls.append(timeout)
        if len(calls) < 3:
            raise PeerUnavailable("refused")
        return "ok"

    b = CircuitBreaker(BreakerOptions(failure_threshold=10), clock)
    out = call_with_retries(flaky, clock.t + 10, RetryOptions(retries=3, backoff_s=0.1), b, clock, clock.sleep)
    assert out == "ok" and clock.sleeps == [0.1, 0.2]
    assert calls[1] == pytest.approx(10 - 0.1) and b.state == CLOSED


def test_retries_stop_at_the_deadline_and_timeouts_are_not_retried():
    clock = FakeClock()
    b = CircuitBreaker(BreakerOptions(failure_threshold=10), clock)

    def down(timeout: float) -> str:
        raise PeerUnavailable("refused")

    with pytest.raises(PeerUnavailable):
        call_with_retries(down, clock.t + 0.15, RetryOptions(retries=5, backoff_s=0.1), b, clock, clock.sleep)
    assert clock.sleeps == [0.1]  # the second wait (0.2) would pass the deadline

    calls = []

    def slow(timeout: float) -> str:
        calls.append(timeout)
        raise LinkTimeout("late")

    with pytest.raises(LinkTimeout):
        call_with_retries(slow, clock.t + 1, RetryOptions(retries=5), b, clock, clock.sleep)
    assert len(calls) == 1


def test_open_circuit_skips_the_call_and_spent_budget_is_not_a_peer_failure():
    clock = FakeClock()
    b = CircuitBreaker(BreakerOptions(failure_threshold=1, cooldown_s=60), clock)
    with pytest.raises(LinkTimeout):
        call_with_retries(lambda t: "x", clock.t - 1, RetryOptions(), b, clock, clock.sleep)
    assert b.state == CLOSED
    b.record_failure()
    called = []
    with pytest.raises(PeerUnavailable, match="circuit open"):
        call_with_retries(lambda t: called.append(t), clock.t + 1, RetryOptions(), b, clock, clock.sleep)
    assert not called


def test_a_rejected_tensor_proves_the_peer_is_up():
    clock = FakeClock()
    b = CircuitBreaker(BreakerOptions(failure_threshold=1, cooldown_s=1), clock)
    b.record_failure()
    clock.t += 1
    with pytest.raises(InvalidTensor):
        call_with_retries(lambda t: (_ for _ in ()).throw(InvalidTensor("bad")), clock.t + 1, RetryOptions(), b,
                          clock, clock.sleep)
    assert b.state == CLOSED


def test_link_stats_recovers_bandwidth_and_rtt_despite_outliers():
    stats = LinkStats(window=32, smoothing=1.0)
    assert stats.estimate().bandwidth_bps is None
    bw, rtt = 10e6, 0.02  # 10 Mbit/s, 20 ms
    sizes = [1_000, 5_000, 20_000, 50_000, 100_000] * 5
    for i, n in enumerate(sizes):
        t = rtt + 8 * n / bw
        stats.record(n, t * (8.0 if i % 6 == 0 else 1.0))  # every 6th sample is a huge outlier
    est = stats.estimate()
    assert est.bandwidth_bps == pytest.approx(bw, rel=0.1)
    assert est.rtt_s == pytest.approx(rtt, rel=0.2)
    assert est.samples == 25
    assert est.transfer_s(100_000) == pytest.approx(rtt + 0.08, rel=0.1)


def test_link_stats_with_equal_sizes_uses_probed_rtt():
    stats = LinkStats(smoothing=1.0)
    stats.record_rtt(0.01)
    for _ in range(5):
        stats.record(10_000, 0.01 + 8 * 10_000 / 1e6)
    stats.record(10_000, 5.0)  # outlier
    est = stats.estimate()
    assert est.rtt_s == pytest.approx(0.01)
    assert est.bandwidth_bps == pytest.approx(1e6, rel=0.01)


def test_link_stats_ewma_smooths_a_step():
    stats = LinkStats(window=2, smoothing=0.5)
    stats.record(1000, 0.008)  # 1 Mbit/s
    stats.record(1000, 0.008)
    stats.record(1000, 0.0008)
    stats.record(1000, 0.0008)  # window now all 10 Mbit/s; the estimate moves partway
    est = stats.estimate().bandwidth_bps
    assert 1e6 < est < 10e6
