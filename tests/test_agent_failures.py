"""Issue 13, items 9 and 10 at the agent: a cloud that refuses our credentials is said so (one WARNING per change,
a metric, the ``edgeexit.cloud`` health status) while every request is still answered on the device; and
offloading resumes within 2 s of the link (or the service) coming back, through background health checks, not
user requests. The breaker and checker are unit-tested with scripted checks; the rest runs real servers, and
the real-process cases (`edgeexit serve` + `edgeexit agent`, the netsim relay between them) are marked slow."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edgeexit.bundle import Bundle
from edgeexit.errors import LinkTimeout, PeerRefused, PeerUnavailable
from edgeexit.runtime import cloud_health
from edgeexit.runtime.breaker import (
    CLOSED,
    HALF_OPEN,
    OPEN,
    BreakerOptions,
    CircuitBreaker,
    RetryOptions,
    call_with_retries,
)
from edgeexit.runtime.client import ClientOptions, InferenceClient
from edgeexit.runtime.cloud_health import HealthChecker
from edgeexit.runtime.decided import CLOUD, FALLBACK
from edgeexit.runtime.device import DeviceOptions, DeviceRuntime
from edgeexit.runtime.oip_server import ServerOptions
from edgeexit.testbed.harness import AgentClient, Pacer, Proc, free_port, launch
from edgeexit.testbed.netsim import Relay

RECOVERY_S = 2.0  # the requirement: offloading resumes within 2 s of the link coming back
CLOUD_SERVICE = "edgeexit.cloud"


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


def wait_for(condition, timeout: float, what: str, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = condition()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"not within {timeout} s: {what}")


def cloud_health_status(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=CLOUD_SERVICE),
                                                          timeout=5)
    return reply.status


def log_events(proc: Proc) -> list[dict]:
    return [json.loads(line) for line in proc.log().splitlines() if line.startswith("{")]


# ---- the breaker and the checker (scripted, fast) -------------------------------------------------------------------
def test_a_refusal_opens_at_once_is_not_retried_and_only_a_check_closes_it():
    clock, changes = FakeClock(), []
    b = CircuitBreaker(BreakerOptions(failure_threshold=3, cooldown_s=5), clock, lambda o, n: changes.append((o, n)),
                       health_checks=True)
    calls = []

    def refused(timeout: float) -> str:
        calls.append(timeout)
        raise PeerRefused("UNAUTHENTICATED: wrong bearer token", "auth")

    with pytest.raises(PeerRefused):
        call_with_retries(refused, clock.t + 10, RetryOptions(retries=3), b, clock, clock.sleep)
    assert len(calls) == 1, "a refusal would be refused again: no retry"
    assert b.state == OPEN and b.reason == "auth"
    clock.t += 3600
    assert not b.allow(), "with health checks, no user request is let through as a probe"
    with pytest.raises(PeerUnavailable, match="circuit open: the cloud refused our credentials"):
        call_with_retries(refused, clock.t + 10, RetryOptions(), b, clock, clock.sleep)
    assert len(calls) == 1
    b.close_after_check()
    assert b.state == CLOSED and b.reason is None and b.allow()
    assert changes == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]


def _checked(errors: list, options: BreakerOptions) -> tuple[CircuitBreaker, list[float]]:
    """Run a HealthChecker on an open breaker against scripted check results; returns it and the call times."""
    b = CircuitBreaker(options, health_checks=True)
    b.record_failure(PeerUnavailable("down"))
    b.record_failure(PeerUnavailable("down"))
    assert b.state == OPEN
    times: list[float] = []

    def check(timeout: float) -> None:
        times.append(time.monotonic())
        error = errors.pop(0)
        if error is not None:
            raise error

    checker = HealthChecker(b, check, options, timeout_s=0.1)
    checker.start()
    try:
        wait_for(lambda: b.state == CLOSED, 5, "a passing check closes the circuit")
    finally:
        checker.close()
    return b, times


def test_checks_back_off_to_the_cap_while_unreachable_and_close_on_the_first_pass():
    options = BreakerOptions(failure_threshold=2, check_s=0.04, check_max_s=0.08)
    errors = [PeerUnavailable("refused"), PeerUnavailable("refused"), LinkTimeout("late"), PeerUnavailable("x"), None]
    _, times = _checked(errors, options)
    gaps = np.diff(times)
    assert len(times) == 5 and not errors
    assert gaps[0] >= 0.04 and gaps[1] >= 0.08 and gaps[2] >= 0.08, gaps  # 0.04, 0.08, then the cap
    assert gaps.max() < 0.5, gaps


def test_checks_back_off_longer_while_the_cloud_refuses_us(monkeypatch):
    monkeypatch.setattr(cloud_health, "REFUSED_FIRST_S", 0.1)
    options = BreakerOptions(failure_threshold=2, cooldown_s=0.2, check_s=0.01, check_max_s=0.02)
    refusal = PeerRefused("wrong token", "auth")
    _, times = _checked([refusal, refusal, refusal, None], options)
    gaps = np.diff(times)
    assert gaps[0] >= 0.1 and gaps[1] >= 0.2 and gaps[2] >= 0.2, gaps  # not the link's 0.01-0.02 s


def test_a_circuit_that_reopens_with_no_offload_succeeding_backs_off_instead_of_flapping():
    """A link that answers a health check but fails every offload (too slow for the deadline) must not flip the
    circuit every check_s; one real success starts the next outage from check_s again."""
    options = BreakerOptions(failure_threshold=1, cooldown_s=0.2, check_s=0.02, check_max_s=0.04)
    b = CircuitBreaker(options, health_checks=True)
    checked = threading.Event()

    def check(timeout: float) -> None:
        checked.set()

    checker = HealthChecker(b, check, options, timeout_s=0.1)
    checker.start()
    assert checked.wait(5)
    waits = []
    try:
        for succeed_first in (False,) * 5 + (True,):
            wait_for(lambda: b.state == CLOSED, 5, "closed")
            if succeed_first:
                b.record_success()
            checked.clear()
            t0 = time.monotonic()
            b.record_failure(LinkTimeout("late"))
            checker.wake()  # what the device runtime does when its circuit opens
            assert checked.wait(5)
            waits.append(time.monotonic() - t0)
    finally:
        checker.close()
    assert waits[0] >= 0.02 and waits[1] >= 0.04 and waits[2] >= 0.08 and waits[4] >= 0.2, waits  # doubling to 0.2
    assert waits[4] < 0.6 and waits[5] < 0.15, waits  # the cap, and back to check_s after a real success


# ---- TLS refused, in process -----------------------------------------------------------------------------------------
def test_a_failed_tls_handshake_is_a_refusal_said_once(agent_bundle, serve, pki, raw_batch, caplog):
    server = serve(ServerOptions(tls_cert=pki["server_cert"], tls_key=pki["server_key"]))
    options = DeviceOptions(policy="never", split=0, cloud=server.target, client=ClientOptions(tls_ca=pki["rogue_ca"]))
    caplog.set_level(logging.INFO, logger="edgeexit.device")
    rt = DeviceRuntime(agent_bundle, options)
    try:
        # The start-up check finds out before any request is sent.
        wait_for(lambda: rt.cloud_health.status.state == "refused", 10, "the start-up check sees the refusal")
        assert rt.cloud_health.status.reason == "tls" and rt.breaker.state == OPEN
        for _ in range(3):
            res = rt.infer(raw_batch)
            assert set(res.decided) == {FALLBACK} and "refused our credentials (tls)" in res.fallback_reason
    finally:
        rt.close()
    refused = [r for r in caplog.records if getattr(r, "event", None) == "cloud_refused"]
    assert len(refused) == 1 and refused[0].levelno == logging.WARNING
    assert refused[0].fields["reason"] == "tls" and "handshake" in refused[0].fields["detail"]


# ---- wrong token, real processes -------------------------------------------------------------------------------------
def _metric(port: int, name: str) -> float | None:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    m = re.search(rf"^{re.escape(name)} (\S+)$", body, re.M)
    return float(m.group(1)) if m else None


@pytest.mark.slow
def test_wrong_token_is_answered_on_the_device_said_counted_and_shown_then_fixed(agent_bundle, raw_batch, tmp_path):
    model = Bundle.load(agent_bundle, verify=False).manifest.name
    right, wrong = tmp_path / "right.token", tmp_path / "wrong.token"
    right.write_text("s3cret-right\n")
    wrong.write_text("s3cret-wrong\n")
    port, metrics_port = free_port(), free_port()
    serve = launch("serve", ["serve", str(agent_bundle), "--port", str(port), "--token-file", str(right)], tmp_path)
    try:
        agent = launch("agent", ["agent", str(agent_bundle), "--cloud", serve.target, "--split", "0", "--policy",
                                 "never", "--listen", "127.0.0.1:0", "--token-file", str(wrong), "--metrics-port",
                                 str(metrics_port), "--breaker-cooldown-s", "1"], tmp_path)
        with agent, AgentClient(agent.target, model) as app:
            wait_for(lambda: cloud_health_status(agent.target) == health_pb2.HealthCheckResponse.NOT_SERVING, 10,
                     "the edgeexit.cloud health status turns NOT_SERVING")
            assert InferenceClient(agent.target).ready(), "the agent itself stays ready: the device answers"
            for _ in range(5):
                ans = app.infer(raw_batch)
                assert ans.decided == [FALLBACK] * len(raw_batch) and np.isfinite(ans.probabilities).all()
                assert "refused our credentials (auth)" in ans.params["edgeexit.fallback"]
            assert _metric(metrics_port, 'edgeexit_agent_cloud_errors_total{reason="auth"}') >= 1
            assert _metric(metrics_port, "edgeexit_agent_cloud_status") == -2
            refused = [e for e in log_events(agent) if e["event"] == "cloud_refused"]
            assert len(refused) == 1, refused  # once per change, not per request or per check
            assert refused[0]["level"] == "warning" and refused[0]["reason"] == "auth"
            assert "wrong bearer token" in refused[0]["detail"]

            # The operator fixes it on the service side: the same port, now with the agent's token.
            serve.stop()
            serve = launch("serve", ["serve", str(agent_bundle), "--port", str(port), "--token-file", str(wrong)],
                           tmp_path)
            fixed_at = time.monotonic()
            wait_for(lambda: app.infer(raw_batch[:1]).decided == [CLOUD], 10, "offloads resume after the fix")
            resumed_s = time.monotonic() - fixed_at
            assert cloud_health_status(agent.target) == health_pb2.HealthCheckResponse.SERVING
            assert _metric(metrics_port, "edgeexit_agent_cloud_status") == 1
            changes = [e for e in log_events(agent) if e["event"].startswith("cloud_")]
            # unreachable while the service restarted (it was), then ok: each change once, at WARNING
            assert [e["event"] for e in changes] in (["cloud_refused", "cloud_ok"],
                                                    ["cloud_refused", "cloud_unreachable", "cloud_ok"]), changes
            assert all(e["level"] == "warning" for e in changes)
        print(f"wrong token: answered on the device, said once; offloading again {resumed_s:.2f} s after the fix")
        assert resumed_s < 1.0 + RECOVERY_S  # checks every 1 s (--breaker-cooldown-s 1) while refused
    finally:
        serve.stop()


# ---- recovery after the link or the service comes back, real processes ------------------------------------------
def _circuit(agent: Proc, new: str, after: float) -> float | None:
    """Wall time of the agent's first circuit change to ``new`` after ``after``."""
    return next((e["ts"] for e in log_events(agent) if e["event"] == "circuit" and e["new"] == new
                 and e["ts"] > after), None)


def _agent(agent_bundle: Path, cloud: str, tmp_path: Path) -> Proc:
    return launch("agent", ["agent", str(agent_bundle), "--cloud", cloud, "--split", "0", "--policy", "never",
                            "--listen", "127.0.0.1:0", "--deadline-ms", "300"], tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["reset", "blackhole"])
def test_offloading_resumes_within_2s_of_the_link_returning(agent_bundle, raw_batch, tmp_path, mode):
    model = Bundle.load(agent_bundle, verify=False).manifest.name
    with launch("serve", ["serve", str(agent_bundle), "--port", "0"], tmp_path) as serve, \
            Relay(serve.address) as relay:
        with _agent(agent_bundle, "{}:{}".format(*relay.address), tmp_path) as agent, \
                AgentClient(agent.target, model) as app, Pacer(app, raw_batch[:1]) as pacer:
            wait_for(lambda: pacer.first_cloud_after(0), 10, "offloading before the cut")
            outage_s = 3.0
            relay.outage(outage_s, mode)
            restored_at = time.time() + outage_s
            wait_for(lambda: _circuit(agent, OPEN, restored_at - outage_s), outage_s, "the circuit opens")
            time.sleep(max(0.0, restored_at - time.time()))
            wait_for(lambda: pacer.first_cloud_after(restored_at), 10, "offloading resumes")
            closed = wait_for(lambda: _circuit(agent, CLOSED, restored_at - outage_s), 5, "the circuit closes")
        resumed = pacer.first_cloud_after(restored_at)
    inside = [d for when, d in pacer.answers if restored_at - outage_s + 0.5 < when < restored_at - 0.05]
    assert inside and set(inside) == {FALLBACK}, "during the outage every answer came from the device"
    assert not pacer.failures, pacer.failures[:3]  # nothing lost
    print(f"[{mode}] circuit closed {closed - restored_at:.2f} s and the first offload came "
          f"{resumed - restored_at:.2f} s after the link returned")
    assert closed - restored_at <= RECOVERY_S
    assert resumed - restored_at <= RECOVERY_S


@pytest.mark.slow
def test_offloading_resumes_within_2s_of_a_restarted_service(agent_bundle, raw_batch, tmp_path):
    model = Bundle.load(agent_bundle, verify=False).manifest.name
    port = free_port()
    serve = launch("serve", ["serve", str(agent_bundle), "--port", str(port)], tmp_path)
    try:
        with _agent(agent_bundle, serve.target, tmp_path) as agent, AgentClient(agent.target, model) as app, \
                Pacer(app, raw_batch[:1]) as pacer:
            wait_for(lambda: pacer.first_cloud_after(0), 10, "offloading before the kill")
            killed_at = time.time()
            serve.kill()
            wait_for(lambda: _circuit(agent, OPEN, killed_at), 5, "the circuit opens")
            serve = launch("serve", ["serve", str(agent_bundle), "--port", str(port)], tmp_path)
            ready_at = time.time()  # it printed "ready on": serving from here
            wait_for(lambda: pacer.first_cloud_after(ready_at), 10, "offloading resumes")
            closed = wait_for(lambda: _circuit(agent, CLOSED, killed_at), 5, "the circuit closes")
        resumed = pacer.first_cloud_after(ready_at)
    finally:
        serve.stop()
    print(f"[restart] circuit closed {closed - ready_at:.2f} s and the first offload came "
          f"{resumed - ready_at:.2f} s after the service was ready again")
    assert not pacer.failures, pacer.failures[:3]  # nothing lost
    assert closed - ready_at <= RECOVERY_S
    assert resumed - ready_at <= RECOVERY_S
