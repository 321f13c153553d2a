"""Faults end to end, on real `edgeexit serve` and `edgeexit agent` processes: mTLS + token (and a wrong token),
the service SIGKILLed with requests in flight, a response larger than the client may receive, and 32 apps at
once on one agent with ``--split auto``. Every row of every request is always answered."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edgeexit.runtime.runner import SegmentRunner
from edgeexit.testbed.harness import AgentAnswer, AgentClient, launch

pytestmark = pytest.mark.slow


def _local(bundle: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The whole model run locally: final-exit labels, and each row's top-1 minus top-2 logit."""
    runner = SegmentRunner(bundle)
    final = runner.run_all(runner.normalize(x))[-1]
    top2 = np.sort(final, axis=1)[:, -2:]
    return final.argmax(1), top2[:, 1] - top2[:, 0]


def _inputs(bundle: Path, rows: int, seed: int = 0) -> np.ndarray:
    runner = SegmentRunner(bundle)
    shape = [int(d) for d in runner.manifest.input.shape[1:]]
    return np.random.default_rng(seed).random((rows, *shape), dtype=np.float32)


def _agent_args(bundle: Path, cloud: str, *extra: str) -> list[str]:
    return ["agent", str(bundle), "--cloud", cloud, "--listen", "127.0.0.1:0", "--policy", "never", *extra]


def _clean(log: str) -> bool:
    """No traceback and nothing at error level in a process's JSON log."""
    return "Traceback" not in log and '"level": "error"' not in log and '"level": "critical"' not in log


def test_agent_offloads_over_mtls_with_a_token_and_a_wrong_token_falls_back_loudly(tiny_bundle, pki, tmp_path):
    token, wrong = tmp_path / "token", tmp_path / "wrong"
    token.write_text("s3cret-edge-token\n")
    wrong.write_text("not-the-token\n")
    x = _inputs(tiny_bundle, 4)
    want, _ = _local(tiny_bundle, x)
    tls = ["--tls-ca", pki["ca"], "--tls-cert", pki["client_cert"], "--tls-key", pki["client_key"]]
    serve_args = ["serve", str(tiny_bundle), "--port", "0", "--tls-cert", pki["server_cert"], "--tls-key",
                  pki["server_key"], "--tls-client-ca", pki["ca"], "--token-file", str(token)]
    with launch("serve", serve_args, tmp_path) as serve:
        with launch("agent", _agent_args(tiny_bundle, serve.target, "--split", "0", *tls, "--token-file",
                                         str(token)), tmp_path) as agent, \
                AgentClient(agent.target, "tiny") as app:
            answers = [app.infer(x) for _ in range(3)]
        for ans in answers:
            assert ans.decided == ["cloud"] * 4, ans.params.get("edgeexit.fallback")
            np.testing.assert_array_equal(ans.labels, want)
        assert _clean(agent.log())

        with launch("agent-wrong", _agent_args(tiny_bundle, serve.target, "--split", "0", *tls, "--token-file",
                                               str(wrong)), tmp_path) as bad, \
                AgentClient(bad.target, "tiny") as app:
            answers = [app.infer(x) for _ in range(3)]
            log = bad.log()
    for ans in answers:  # the app still gets every row, from the device
        assert ans.decided == ["device-fallback"] * 4
    # An operator sees it: the refusal is logged at warning level (once per change of the cloud's status).
    refused = [line for line in log.splitlines() if "cloud_refused" in line]
    assert refused and all('"level": "warning"' in line for line in refused), log[-2000:]
    assert "UNAUTHENTICATED" in log or "token" in log.lower()


def test_service_killed_with_requests_in_flight_every_row_answered_on_the_device(tiny_bundle, tmp_path):
    """The service batches for 5 s, so the apps' first requests are inside it when it is SIGKILLed."""
    apps, more = 4, 3
    x = _inputs(tiny_bundle, 2, seed=1)
    want, margin = _local(tiny_bundle, x)
    serve_args = ["serve", str(tiny_bundle), "--port", "0", "--max-batch-size", "64", "--max-batch-delay-ms", "5000"]
    calls: list[tuple[float, float, AgentAnswer | Exception]] = []
    lock = threading.Lock()
    with launch("serve", serve_args, tmp_path) as serve, \
            launch("agent", _agent_args(tiny_bundle, serve.target, "--split", "0", "--deadline-ms", "20000",
                                        "--on-failure", "finish-local"), tmp_path) as agent:

        def app() -> None:
            with AgentClient(agent.target, "tiny", timeout=30) as client:
                for _ in range(1 + more):
                    t0 = time.monotonic()
                    try:
                        out: AgentAnswer | Exception = client.infer(x)
                    except Exception as e:  # noqa: BLE001 - a lost request is what this test counts
                        out = e
                    with lock:
                        calls.append((t0, time.monotonic(), out))

        threads = [threading.Thread(target=app) for _ in range(apps)]
        for t in threads:
            t.start()
        time.sleep(2.0)
        killed_at = time.monotonic()
        serve.kill()
        for t in threads:
            t.join(60)
        log = agent.log()
        assert agent.alive()
    lost = [out for _, _, out in calls if isinstance(out, Exception)]
    assert not lost and len(calls) == apps * (1 + more), lost
    in_flight = [(t1, out) for t0, t1, out in calls if t0 < killed_at < t1]
    assert len(in_flight) == apps  # every app's first request was inside the service at the kill
    for t1, out in in_flight:
        assert out.decided == ["device-fallback"] * 2
        assert t1 - killed_at < 5.0  # the broken connection is noticed, not waited out to the 20 s deadline
    for _, _, out in calls:
        ok = (out.labels == want) | (margin < 1e-4)  # finish-local runs the same model on the device
        assert ok.all() and set(out.decided) <= {"device-fallback"}
    assert _clean(log)


def test_a_response_larger_than_the_client_may_receive_falls_back(tiny_bundle, tmp_path):
    """200 identical rows: the int8+zstd request is tiny, the answer is not; a 4 KiB receive limit refuses it."""
    from edgeexit.runtime.client import ClientOptions
    from edgeexit.runtime.device import DeviceOptions, DeviceRuntime

    x = np.zeros((200, *_inputs(tiny_bundle, 1).shape[1:]), np.float32)
    want, margin = _local(tiny_bundle, x)
    with launch("serve", ["serve", str(tiny_bundle), "--port", "0"], tmp_path) as serve:
        results = {}
        for limit in (64 << 20, 4096):
            opts = DeviceOptions(cloud=serve.target, split=1, policy="never", encoding="int8", compress=True,
                                 on_failure="finish-local", client=ClientOptions(max_message_bytes=limit))
            rt = DeviceRuntime(tiny_bundle, opts)
            try:
                results[limit] = rt.infer(x)
            finally:
                rt.close()
        assert serve.alive() and _clean(serve.log())
    big, small = results[64 << 20], results[4096]
    assert big.decided == ["cloud"] * 200 and 0 < big.bytes_sent < 4096  # the request itself fits
    assert small.decided == ["device-fallback"] * 200
    assert "RESOURCE_EXHAUSTED" in (small.fallback_reason or ""), small.fallback_reason
    for res in (big, small):
        assert ((res.labels == want) | (margin < 1e-4)).all()


def test_32_apps_at_once_on_one_adaptive_agent(tiny_bundle, tmp_path):
    """``--split auto``: the adapter and the link statistics are shared by every request thread."""
    apps, per_app, rows = 32, 6, 2
    x = _inputs(tiny_bundle, apps * per_app * rows, seed=5).reshape(apps, per_app, rows, -1)
    shape = _inputs(tiny_bundle, 1).shape[1:]
    want, margin = _local(tiny_bundle, x.reshape(-1, *shape))
    want, margin = want.reshape(apps, per_app, rows), margin.reshape(apps, per_app, rows)
    got: dict[tuple[int, int], AgentAnswer | Exception] = {}
    # A device class far slower than the network, so the planner offloads and every thread feeds its link stats.
    slow = tmp_path / "slow-device.toml"
    slow.write_text('name = "slow-device"\ndescription = "EMULATED: 300x this host"\nslowdown = 300.0\n'
                    'source = "a test device: slow enough that offloading wins on loopback"\n')
    with launch("serve", ["serve", str(tiny_bundle), "--port", "0"], tmp_path) as serve, \
            launch("agent", _agent_args(tiny_bundle, serve.target, "--split", "auto", "--on-failure",
                                        "finish-local", "--emulate-device", str(slow)), tmp_path) as agent:
        start = threading.Barrier(apps)

        def app(a: int) -> None:
            with AgentClient(agent.target, "tiny", timeout=60) as client:
                start.wait()
                for r in range(per_app):
                    try:
                        got[(a, r)] = client.infer(x[a, r].reshape(rows, *shape))
                    except Exception as e:  # noqa: BLE001 - a lost request is a failure this test reports
                        got[(a, r)] = e

        threads = [threading.Thread(target=app, args=(a,)) for a in range(apps)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        log = agent.log()
        assert agent.alive() and serve.alive()
    lost = {k: v for k, v in got.items() if isinstance(v, Exception)}
    assert not lost and len(got) == apps * per_app, lost
    wrong = [(a, r) for (a, r), ans in got.items()
             if not ((ans.labels == want[a, r]) | (margin[a, r] < 1e-4)).all()]
    assert not wrong, wrong
    decided = {d for ans in got.values() for d in ans.decided}
    assert "cloud" in decided and decided <= {"device", "cloud", "device-fallback"}
    assert _clean(log), log[-3000:]
