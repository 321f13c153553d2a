"""The agent in a fleet (issue 12 §4-§5, device side): it names its bundle and a cloud on another bundle is
answered on the device; an overloaded service falls back at once without opening the circuit; keepalive pings
keep an idle channel; several cloud targets round-robin with health-aware failover; --workers and the agent's
own input bounds. Real servers on loopback throughout; real processes for the rollout and failover scenarios."""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import numpy_helper

from edgeexit.bundle import Bundle, sha256_file
from edgeexit.errors import BundleMismatch, ConfigError, InvalidTensor, Overloaded, PeerUnavailable
from edgeexit.runtime import codec, oip_server
from edgeexit.runtime.agent import AgentHandler, AgentOptions
from edgeexit.runtime.batching import BatchOptions
from edgeexit.runtime.breaker import CLOSED, OPEN, BreakerOptions
from edgeexit.runtime.client import ClientOptions, InferenceClient
from edgeexit.runtime.cloud_targets import HEALTH_SERVICE, parse_cloud
from edgeexit.runtime.decided import CLOUD, FALLBACK
from edgeexit.runtime.device import DeviceOptions, DeviceRuntime
from edgeexit.runtime.oip_messages import InferRequest, InputTensor
from edgeexit.runtime.oip_server import ServerOptions
from edgeexit.runtime.runner import SegmentRunner
from edgeexit.runtime.status import error_for
from edgeexit.testbed.harness import AgentClient, free_port, launch

C = grpc.StatusCode


def local_labels(bundle: Path, x: np.ndarray) -> np.ndarray:
    r = SegmentRunner(bundle)
    return r.run_all(r.normalize(x))[-1].argmax(1)


@pytest.fixture(scope="module")
def bundle_b(tiny_bundle, tmp_path_factory) -> Path:
    """``tiny_bundle`` with the last segment's weights changed (its sha256 updated): a valid bundle whose
    digest and answers differ, as after a re-export that reached only the cloud."""
    dest = tmp_path_factory.mktemp("bundle_b") / Path(tiny_bundle).name
    shutil.copytree(tiny_bundle, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    entry = manifest["segments"][-1]["files"]["onnx"]
    model = onnx.load(dest / entry["path"])
    big = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    w = numpy_helper.to_array(big)
    big.CopyFrom(numpy_helper.from_array((w + np.random.default_rng(0).normal(0, 2 * w.std() + 0.1, w.shape))
                                         .astype(w.dtype), big.name))
    onnx.save(model, dest / entry["path"])
    entry["sha256"], entry["bytes"] = sha256_file(dest / entry["path"]), (dest / entry["path"]).stat().st_size
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=1))
    assert Bundle.load(dest).digest != Bundle.load(tiny_bundle).digest
    return dest


def wait_for(condition, timeout: float, what: str, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if got := condition():
            return got
        time.sleep(every)
    raise AssertionError(f"not within {timeout} s: {what}")


def runtime(bundle: Path, cloud: str, events: list | None = None, **kw) -> DeviceRuntime:
    opts = DeviceOptions(cloud=cloud, split=0, policy="never", on_failure="finish-local", **kw)
    return DeviceRuntime(bundle, opts, on_event=(lambda n, f: events.append((n, f))) if events is not None else None)


def served(handle, model: str, code: str = "OK") -> float:
    return handle.metrics.value("edgeexit_requests_total", {"model": model, "code": code})


# ---- --cloud ----------------------------------------------------------------------------------------------------
def test_cloud_targets_one_a_list_or_a_dns_name():
    assert parse_cloud("127.0.0.1:8000").target == "127.0.0.1:8000" and not parse_cloud("h:1").balanced
    many = parse_cloud("127.0.0.1:8000, 10.0.0.2:8001")
    assert many.target == "ipv4:127.0.0.1:8000,10.0.0.2:8001" and many.balanced and many.servers == 2
    assert parse_cloud("[::1]:1,[::2]:2").target == "ipv6:[::1]:1,[::2]:2"
    dns = parse_cloud("dns:///cloud.example:8000")
    assert dns.target == "dns:///cloud.example:8000" and dns.balanced and dns.tls_name(None) is None
    config = json.loads(many.service_config())
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert config["healthCheckConfig"]["serviceName"] == HEALTH_SERVICE == oip_server.SERVICE_NAME
    assert parse_cloud("unix:/run/x.sock").target == "unix:/run/x.sock"  # gRPC's own syntax passes
    for bad, says in [("a.example:1,b.example:1", "dns:///"), ("127.0.0.1:1,[::1]:1", "IPv4 and IPv6"),
                      ("127.0.0.1:1,127.0.0.1:1", "once"), ("127.0.0.1", "HOST:PORT"), (" ", "empty")]:
        with pytest.raises(ConfigError, match=re.escape(says)):
            parse_cloud(bad)
    with pytest.raises(ConfigError, match="--tls-server-name"):
        many.tls_name(None)
    assert many.tls_name("cloud.example") == "cloud.example"
    with pytest.raises(ConfigError, match="--cloud"):
        DeviceOptions(cloud="a.example:1,b.example:1")  # refused before the bundle is loaded


# ---- identity ---------------------------------------------------------------------------------------------------
def test_offloads_name_the_bundle_and_a_cloud_on_another_is_answered_on_the_device(tiny_bundle, bundle_b, serve,
                                                                                   raw_batch):
    digest_a, digest_b = Bundle.load(tiny_bundle).digest, Bundle.load(bundle_b).digest
    cloud_b = serve(bundle=bundle_b)
    with InferenceClient(cloud_b.target, bundle=digest_a, model="tiny") as c:
        with pytest.raises(BundleMismatch) as e:
            c.check_health(5)  # ModelMetadata lists B's digest: said before any request
    assert e.value.served == digest_b and digest_a in str(e.value) and digest_b in str(e.value)
    events: list = []
    rt = runtime(tiny_bundle, cloud_b.target, events, breaker=BreakerOptions(cooldown_s=1.0))
    try:
        want = local_labels(tiny_bundle, raw_batch)
        for _ in range(10):
            res = rt.infer(raw_batch)
            assert res.decided == [FALLBACK] * len(raw_batch)
            np.testing.assert_array_equal(res.labels, want)  # A's answers, never B's
        assert rt.breaker.state == OPEN and rt.breaker.reason == "bundle"
        assert rt.cloud_health.status.state == "refused" and rt.cloud_health.status.reason == "bundle"
        assert served(cloud_b, "tiny@0", "FAILED_PRECONDITION") <= 1  # the circuit stops them: no retry storm
        refused = [f for n, f in events if n == "cloud_refused"]
        assert len(refused) == 1 and refused[0]["reason"] == "bundle", events
        assert digest_a in refused[0]["detail"] and digest_b[:12] in refused[0]["detail"]
        assert "same bundle" in refused[0]["action"]
        assert ("cloud_error", {"reason": "bundle"}) in events
    finally:
        rt.close()


def test_requests_carry_the_digest_and_the_matching_cloud_serves_them(tiny_bundle, serve, raw_batch):
    cloud = serve()
    rt = runtime(tiny_bundle, cloud.target)
    try:
        res = rt.infer(raw_batch)
        assert res.decided == [CLOUD] * len(raw_batch)
        np.testing.assert_array_equal(res.labels, local_labels(tiny_bundle, raw_batch))
    finally:
        rt.close()
    # The wire carries it: the same server serves a client naming A and refuses one naming another digest.
    r = SegmentRunner(tiny_bundle)
    wire = codec.encode(r.run(r.normalize(raw_batch), 0, 1).boundary, "fp32")
    with InferenceClient(cloud.target, bundle=Bundle.load(tiny_bundle).digest, model="tiny") as c:
        c.check_health(5)
        assert c.infer("tiny@0", "boundary0", wire, timeout=5)
    with InferenceClient(cloud.target, bundle="0" * 64) as c, pytest.raises(BundleMismatch):
        c.infer("tiny@0", "boundary0", wire, timeout=5)


def test_mismatch_and_overload_messages_map_back_from_any_server():
    msg = "tiny@0: this service runs bundle 0123456789ab, the request names bundle 'ffff'; their answers differ"
    for code in (C.FAILED_PRECONDITION, C.INTERNAL, C.UNKNOWN, C.INVALID_ARGUMENT):  # serve, and Triton's codes
        assert isinstance(error_for(code, msg), BundleMismatch) and error_for(code, msg).served == "0123456789ab"
    assert isinstance(error_for(C.RESOURCE_EXHAUSTED, "the service is overloaded (3 rows queued)"), Overloaded)
    assert isinstance(error_for(C.UNAVAILABLE, "Exceeds maximum queue size"), Overloaded)  # Triton's queue
    assert type(error_for(C.UNAVAILABLE, "connection refused")) is PeerUnavailable


# ---- overloaded -------------------------------------------------------------------------------------------------
def test_an_overloaded_service_falls_back_at_once_and_never_opens_the_circuit(tiny_bundle, serve, raw_batch):
    """A real service batching for 3 s with room for 1 row: one app's request holds the queue, the device's
    offloads are refused at once (RESOURCE_EXHAUSTED) and answered locally long before their 2 s deadline."""
    cloud = serve(batching=BatchOptions(max_batch_size=64, max_delay_ms=3000, max_queue=1))
    r = SegmentRunner(tiny_bundle)
    boundary = r.run(r.normalize(raw_batch[:1]), 0, 1).boundary
    holder = threading.Thread(target=lambda: InferenceClient(cloud.target).infer(
        "tiny@0", "boundary0", codec.encode(boundary, "fp32"), timeout=10), daemon=True)
    events: list = []
    rt = runtime(tiny_bundle, cloud.target, events, deadline_ms=2000)
    try:
        wait_for(lambda: rt.cloud_health.status.state == "ok", 5, "the start-up check passes")
        holder.start()
        wait_for(lambda: cloud.metrics.value("edgeexit_batch_size_count", {"model": "tiny@0"}) == 0
                 and holder.is_alive(), 2, "the holder is queued")
        time.sleep(0.2)
        recorded = []
        rt.monitor.record_offload = lambda *a: recorded.append(a)
        for _ in range(8):
            t0 = time.monotonic()
            res = rt.infer(raw_batch)
            assert res.decided == [FALLBACK] * len(raw_batch) and "Overloaded" in res.fallback_reason
            assert time.monotonic() - t0 < 1.0  # not the 2 s deadline, nor the 3 s batch
        assert rt.breaker.state == CLOSED  # 8 in a row: still closed
        assert [f["reason"] for n, f in events if n == "cloud_error"] == ["overloaded"] * 8
        assert not [n for n, _ in events if n in ("cloud_unreachable", "cloud_refused")]
        assert not recorded  # not a link measurement
        # Each one reached the service (no circuit in the way) and was refused there without queueing.
        assert cloud.metrics.value("edgeexit_server_dropped_total", {"reason": "overloaded"}) == 8
        holder.join(10)
    finally:
        rt.close()


# ---- keepalive --------------------------------------------------------------------------------------------------
def test_client_keepalive_matches_what_serve_accepts():
    server = dict(oip_server.KEEPALIVE_OPTIONS)
    o = ClientOptions()
    assert o.keepalive_s * 1000 >= server["grpc.http2.min_ping_interval_without_data_ms"]
    assert (o.keepalive_s, o.keepalive_timeout_s) == (30.0, 10.0)
    with pytest.raises(ConfigError, match="keepalive"):
        ClientOptions(keepalive_s=0.1)


@pytest.mark.slow
def test_a_pinging_idle_channel_against_serve_stays_usable(serve, tiny_bundle):
    """Pings every second (the agent's 30 s, sped up) on an idle channel: serve never GOAWAYs it."""
    cloud = serve()
    with InferenceClient(cloud.target, ClientOptions(keepalive_s=1.0, keepalive_timeout_s=5.0)) as c:
        c.check_health(5)
        states: list = []
        c._channel.subscribe(states.append)
        time.sleep(4.0)
        c._channel.unsubscribe(states.append)
        c.check_health(5)
    assert set(states) == {grpc.ChannelConnectivity.READY}, states


# ---- several cloud targets --------------------------------------------------------------------------------------
def test_two_targets_round_robin_and_a_not_serving_one_is_skipped(tiny_bundle, serve, raw_batch):
    one, two = serve(), serve()
    rt = runtime(tiny_bundle, f"{one.target},{two.target}")
    try:
        wait_for(lambda: rt.cloud_health.status.state == "ok", 5, "the start-up check passes")
        for _ in range(8):
            assert rt.infer(raw_batch[:2]).decided == [CLOUD] * 2
        assert served(one, "tiny@0") >= 2 and served(two, "tiny@0") >= 2  # spread over both
        # One marks itself NOT_SERVING (as when it drains): client-side health checks skip it.
        one.health.set(HEALTH_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        time.sleep(0.5)
        before = served(one, "tiny@0")
        for _ in range(6):
            assert rt.infer(raw_batch[:2]).decided == [CLOUD] * 2
        assert served(one, "tiny@0") == before
        one.health.set(HEALTH_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        wait_for(lambda: rt.infer(raw_batch[:1]).decided == [CLOUD] and served(one, "tiny@0") > before, 5,
                 "the serving-again server gets requests")
    finally:
        rt.close()


def test_tls_to_two_targets_checks_one_server_name(tiny_bundle, serve, pki, raw_batch):
    tls = ServerOptions(tls_cert=pki["server_cert"], tls_key=pki["server_key"])
    one, two = serve(server_options=tls), serve(server_options=tls)
    cloud = f"{one.target},{two.target}"
    with pytest.raises(ConfigError, match="--tls-server-name"):
        runtime(tiny_bundle, cloud, client=ClientOptions(tls_ca=pki["ca"]))
    rt = runtime(tiny_bundle, cloud, client=ClientOptions(tls_ca=pki["ca"], tls_server_name="localhost"))
    try:
        for _ in range(4):
            assert rt.infer(raw_batch[:2]).decided == [CLOUD] * 2
        assert served(one, "tiny@0") >= 1 and served(two, "tiny@0") >= 1
    finally:
        rt.close()


# ---- workers and input bounds -----------------------------------------------------------------------------------
def test_workers_and_bounds_are_validated_options():
    assert AgentOptions(workers=16).server_options().workers == 16
    for bad in ({"workers": 0}, {"max_batch_rows": 0}, {"max_message_bytes": 0}):
        with pytest.raises(ConfigError, match="--workers|--max-batch-rows"):
            AgentOptions(**bad)
    assert AgentOptions(max_message_bytes=1 << 20).server_options().max_message_bytes == 1 << 20


def test_the_cli_passes_workers_and_bounds(monkeypatch, tiny_bundle):
    import edgeexit.runtime.agent as agent_mod
    from edgeexit.cli import main

    got = {}

    class Fake:
        def __init__(self, bundle, options):
            got["options"] = options

        def serve_forever(self):
            pass

    monkeypatch.setattr(agent_mod, "Agent", Fake)
    main(["agent", str(tiny_bundle), "--workers", "12", "--max-batch-rows", "32", "--max-message-mb", "2",
          "--cloud", "127.0.0.1:1,127.0.0.1:2", "--tls-server-name", "cloud.example"])
    o = got["options"]
    assert (o.workers, o.max_batch_rows, o.max_message_bytes) == (12, 32, 2 << 20)
    assert o.device.cloud == "127.0.0.1:1,127.0.0.1:2" and o.device.client.tls_server_name == "cloud.example"


def test_the_agent_bounds_rows_and_decoded_bytes_before_any_compute(tiny_bundle, raw_batch):
    rt = DeviceRuntime(tiny_bundle, DeviceOptions(split="device", policy="never"))
    calls = []
    rt.runner.run_segment = lambda *a, **k: calls.append(a)  # nothing may reach segment 0
    handler = AgentHandler(rt, max_rows=4, max_bytes=1 << 16)
    shape = list(raw_batch.shape[1:])

    def request(rows: int, data: bytes, params: dict | None = None) -> InferRequest:
        return InferRequest("tiny", {"input": InputTensor("FP32", [rows, *shape], data, params or {})})

    try:
        with pytest.raises(InvalidTensor, match="--max-batch-rows"):
            handler.infer(request(8, raw_batch.tobytes()))
        rows = (1 << 20) // (4 * int(np.prod(shape)))  # a 1 MiB zstd bomb within the row limit's reach
        bomb = codec.encode(np.zeros((rows, *shape), np.float32), "fp32", compress=True)
        handler.max_rows = rows
        assert len(bomb.data) < 1 << 12
        with pytest.raises(InvalidTensor):
            handler.infer(request(rows, bytes(bomb.data), bomb.params))
        assert not calls
    finally:
        rt.close()


# ---- real processes ---------------------------------------------------------------------------------------------
def _metric(port: int, pattern: str) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(float(m.group(1)) for m in re.finditer(pattern + r"\S* (\S+)$", body, re.M))


def _ok(port: int) -> float:
    return _metric(port, r'^edgeexit_requests_total\{(?=[^}]*code="OK")(?=[^}]*model="tiny@0")')


def _log_events(proc) -> list[dict]:
    return [json.loads(line) for line in proc.log().splitlines() if line.startswith("{")]


def _cloud_status(target: str) -> int:
    with grpc.insecure_channel(target) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="edgeexit.cloud"),
                                                    timeout=5).status


@pytest.mark.slow
def test_rollout_cloud_on_bundle_b_is_refused_answered_on_the_device_then_bundle_a_offloads(
        tiny_bundle, bundle_b, raw_batch, tmp_path):
    digest_a, digest_b = Bundle.load(tiny_bundle).digest, Bundle.load(bundle_b).digest
    want = local_labels(tiny_bundle, raw_batch)
    port, metrics = free_port(), free_port()
    serve = launch("serve-b", ["serve", str(bundle_b), "--port", str(port)], tmp_path)
    try:
        agent = launch("agent", ["agent", str(tiny_bundle), "--cloud", serve.target, "--split", "0", "--policy",
                                 "never", "--on-failure", "finish-local", "--listen", "127.0.0.1:0",
                                 "--metrics-port", str(metrics), "--breaker-cooldown-s", "1"], tmp_path)
        with agent, AgentClient(agent.target, "tiny") as app:
            for _ in range(5):
                ans = app.infer(raw_batch)
                assert ans.decided == [FALLBACK] * len(raw_batch), ans.params
                np.testing.assert_array_equal(ans.labels, want)
            assert _metric(metrics, r'^edgeexit_agent_cloud_errors_total\{reason="bundle"\}') >= 1
            assert _cloud_status(agent.target) == health_pb2.HealthCheckResponse.NOT_SERVING
            refused = [e for e in _log_events(agent) if e["event"] == "cloud_refused"]
            assert len(refused) == 1 and refused[0]["level"] == "warning" and refused[0]["reason"] == "bundle"
            assert digest_a in refused[0]["detail"] and digest_b[:12] in refused[0]["detail"]

            serve.stop()  # the rollout finishes: the cloud runs A on the same address
            serve = launch("serve-a", ["serve", str(tiny_bundle), "--port", str(port)], tmp_path)
            wait_for(lambda: app.infer(raw_batch[:1]).decided == [CLOUD], 15, "offloads once the cloud runs A")
            ans = app.infer(raw_batch)
            assert ans.decided == [CLOUD] * len(raw_batch)
            np.testing.assert_array_equal(ans.labels, want)
            assert _cloud_status(agent.target) == health_pb2.HealthCheckResponse.SERVING
    finally:
        serve.stop()


@pytest.mark.slow
def test_two_serve_processes_share_the_load_one_dies_the_other_takes_it_then_both_again(
        tiny_bundle, raw_batch, tmp_path):
    ports, metrics = [free_port(), free_port()], [free_port(), free_port()]

    def start(i: int):
        return launch(f"serve{i}-{time.monotonic_ns()}", ["serve", str(tiny_bundle), "--port", str(ports[i]),
                                                          "--metrics-port", str(metrics[i])], tmp_path)

    serves = [start(0), start(1)]
    try:
        cloud = ",".join(f"127.0.0.1:{p}" for p in ports)
        agent = launch("agent", ["agent", str(tiny_bundle), "--cloud", cloud, "--split", "0", "--policy", "never",
                                 "--listen", "127.0.0.1:0", "--workers", "8"], tmp_path)
        x = raw_batch[:2]
        with agent, AgentClient(agent.target, "tiny") as app:
            for _ in range(10):
                assert app.infer(x).decided == [CLOUD] * 2
            assert _ok(metrics[0]) >= 2 and _ok(metrics[1]) >= 2  # both served

            serves[0].kill()
            decided = [app.infer(x).decided for _ in range(10)]
            assert all(d == [CLOUD] * 2 for d in decided[3:]), decided  # at most a few fall back, then the other
            assert all(r in (CLOUD, FALLBACK) for d in decided for r in d)
            assert _ok(metrics[1]) >= 2 + 7
            print(f"after the kill: {sum(d != [CLOUD] * 2 for d in decided)} of 10 requests fell back")

            metrics[0] = free_port()  # its old /metrics port may linger after the SIGKILL; its gRPC one does not
            serves[0] = start(0)  # back on the same address: used again
            wait_for(lambda: app.infer(x).decided == [CLOUD] * 2 and _ok(metrics[0]) > 0, 10,
                     "the restarted server gets requests")
        assert "Traceback" not in agent.log()
    finally:
        for s in serves:
            s.stop()
