"""Fleet-safe `edgeexit serve` (issue 12 §4, §5, server side), on real servers on loopback.

Bundle identity: ModelMetadata versions = [digest], every response's model_version is the digest, a request
naming another bundle (parameter ``edgeexit.bundle``) is refused FAILED_PRECONDITION with the served digest, one
naming none is served, an unknown model_version is NOT_FOUND (what a real Triton 2.51 answers for an integral
version it does not serve; checked by hand). Deadlines: a request whose client deadline passes while it is
queued behind a slow batch is never computed. Bounded queue: a full queue answers RESOURCE_EXHAUSTED at once,
admitted requests are served and the server recovers. Keepalive: a client pinging every second, also idle, keeps
its connection (gRPC's default server settings GOAWAY it: the control case).

A slow runner (a real TailHandler whose batcher runs the real model after a sleep) only isolates the queueing;
one case runs a real `edgeexit serve` process with a tiny --max-queue.
"""

from __future__ import annotations

import re
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from edgeexit.bundle import Bundle
from edgeexit.errors import BundleMismatch, LinkTimeout, Overloaded
from edgeexit.runtime import oip_server
from edgeexit.runtime.batching import BatchOptions, DynamicBatcher
from edgeexit.runtime.metrics import ServerMetrics
from edgeexit.runtime.oip_messages import P_BUNDLE, params_to_pb
from edgeexit.runtime.oip_server import ServerOptions, build_server
from edgeexit.runtime.proto import grpc_service_pb2 as pb
from edgeexit.runtime.proto import grpc_service_pb2_grpc as pb_grpc
from edgeexit.runtime.service import ServiceOptions, TailHandler, build_handlers
from edgeexit.runtime.status import error_for
from edgeexit.testbed.harness import launch

C = grpc.StatusCode
DROPPED = "edgeexit_server_dropped_total"


@pytest.fixture(scope="module")
def digest(service_bundle) -> str:
    return Bundle.load(service_bundle).digest


def request(model: str, x: np.ndarray, params: dict | None = None, version: str = "",
            input_name: str = "boundary0") -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model, model_version=version, raw_input_contents=[x.tobytes()])
    req.inputs.add(name=input_name, datatype="FP32", shape=list(x.shape))
    params_to_pb(params or {}, req.parameters)
    return req


def code_of(call, *args, **kwargs) -> tuple[C, str]:
    try:
        call(*args, **kwargs)
    except grpc.RpcError as e:
        return e.code(), e.details()
    return C.OK, ""


@pytest.fixture
def stub_for():
    channels: list[grpc.Channel] = []

    def make(target: str, options: list | None = None) -> pb_grpc.GRPCInferenceServiceStub:
        channels.append(grpc.insecure_channel(target, options=options or []))
        return pb_grpc.GRPCInferenceServiceStub(channels[-1])

    yield make
    for ch in channels:
        ch.close()


# ---- identity ----------------------------------------------------------------------------------------------

def test_metadata_and_responses_name_the_served_bundle(serve, stub_for, digest, service_bundle, boundary_batch):
    server = serve()
    stub = stub_for(server.target)
    name = Bundle.load(service_bundle).name
    for model in server.servicer.handlers:
        assert list(stub.ModelMetadata(pb.ModelMetadataRequest(name=model)).versions) == [digest]
    x = boundary_batch(0, 2)
    # No parameter (tritonclient, KServe, curl), the right digest, and every accepted model_version are served.
    for params, version in (({}, ""), ({P_BUNDLE: digest}, ""), ({}, "1"), ({P_BUNDLE: digest}, digest)):
        resp = stub.ModelInfer(request(f"{name}@0", x, params, version), timeout=10)
        assert resp.model_version == digest and [o.shape[0] for o in resp.outputs] == [2] * len(resp.outputs)


def test_another_bundle_is_refused_with_the_served_digest(serve, stub_for, digest, service_bundle, boundary_batch):
    server = serve()
    stub = stub_for(server.target)
    name = Bundle.load(service_bundle).name
    other = "0" * 64
    code, message = code_of(stub.ModelInfer, request(f"{name}@0", boundary_batch(0, 1), {P_BUNDLE: other}),
                            timeout=10)
    assert code == C.FAILED_PRECONDITION, message
    assert digest[:12] in message and "000000000000" in message and "same bundle" in message
    err = error_for(code, message)  # what the agent's client makes of it
    assert isinstance(err, BundleMismatch) and digest.startswith(err.served)
    code, message = code_of(stub.ModelInfer, request(f"{name}@0", boundary_batch(0, 1), {P_BUNDLE: 7}), timeout=10)
    assert code == C.INVALID_ARGUMENT and P_BUNDLE in message
    assert server.metrics.value("edgeexit_requests_total",
                                {"model": f"{name}@0", "code": "FAILED_PRECONDITION"}) == 1


def test_an_unknown_model_version_is_not_found_like_triton(serve, stub_for, digest, service_bundle, boundary_batch):
    server = serve()
    stub = stub_for(server.target)
    model = f"{Bundle.load(service_bundle).name}@0"
    for version in ("2", "f" * 64):
        code, message = code_of(stub.ModelInfer, request(model, boundary_batch(0, 1), version=version), timeout=10)
        assert code == C.NOT_FOUND and digest in message and "is not served" in message, message
        code, _ = code_of(stub.ModelMetadata, pb.ModelMetadataRequest(name=model, version=version), timeout=10)
        assert code == C.NOT_FOUND
        assert not stub.ModelReady(pb.ModelReadyRequest(name=model, version=version), timeout=10).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name=model, version=digest), timeout=10).ready


# ---- deadline and bounded queue: a real TailHandler whose batches are slow ----------------------------------

def slow_service(service_bundle, batching: BatchOptions, delay: float,
                 options: ServerOptions | None = None) -> tuple[oip_server.ServerHandle, TailHandler, list[int]]:
    """A real server whose ``<model>@0`` runs the real tail after sleeping ``delay`` s; ``runs`` counts batches."""
    metrics = ServerMetrics()
    handlers = build_handlers(service_bundle, ServiceOptions(batching=batching), metrics)
    h, runs = handlers[1], []

    def slow(x: np.ndarray) -> dict[str, np.ndarray]:
        runs.append(len(x))
        time.sleep(delay)
        return real(x)

    real = h._run
    h.batcher.close()
    h.batcher = DynamicBatcher(slow, batching, name=h.name, on_drop=metrics.observe_drop)
    return build_server(handlers, options or ServerOptions(), metrics).start(), h, runs


@pytest.mark.parametrize("where", ["batcher", "worker_queue"])
def test_a_request_whose_deadline_passes_in_the_queue_is_not_computed(service_bundle, boundary_batch, stub_for,
                                                                      where):
    # batcher: queued behind a slow batch in the dynamic batcher; worker_queue: batching off and the only gRPC
    # worker busy, so it waits in gRPC's own queue.
    batching = BatchOptions(max_batch_size=2, max_delay_ms=0) if where == "batcher" else BatchOptions(1)
    server, h, runs = slow_service(service_bundle, batching, 0.6, ServerOptions(workers=1 if where != "batcher"
                                                                                 else 16))
    try:
        stub = stub_for(server.target)
        x = boundary_batch(0, 2)
        first = stub.ModelInfer.future(request(h.name, x), timeout=10)  # fills a batch: runs ~0.6 s
        time.sleep(0.15)
        code, _ = code_of(stub.ModelInfer, request(h.name, x[:1]), timeout=0.2)  # gives up while queued
        assert code == C.DEADLINE_EXCEEDED
        later = stub.ModelInfer(request(h.name, x[1:]), timeout=10)  # queued behind it, no deadline trouble
        assert first.result().outputs and later.outputs
        assert runs == [2, 1], runs  # the expired request never ran, alone or in a batch
        # In gRPC's queue grpcio itself skips an RPC whose deadline passed (our handler never sees it to count it).
        assert server.metrics.value(DROPPED, {"reason": "deadline"}) == (where == "batcher")
    finally:
        server.stop(0.5)


def test_the_batcher_refuses_at_once_when_full_and_recovers():
    gate = threading.Event()

    def run(x: np.ndarray) -> dict[str, np.ndarray]:
        gate.wait(5)
        return {"y": x + 1}

    drops: list[str] = []
    for options in (BatchOptions(max_batch_size=2, max_delay_ms=0, max_queue=2), BatchOptions(1, max_queue=2)):
        b = DynamicBatcher(run, options, name="m", on_drop=drops.append)
        gate.clear()
        with ThreadPoolExecutor(4) as pool:
            held = [pool.submit(b.submit, np.zeros((2, 3), np.float32), 10)]  # running (batching off: in flight)
            time.sleep(0.1)
            if options.enabled:
                held.append(pool.submit(b.submit, np.zeros((2, 3), np.float32), 10))  # waits: the queue is full
                time.sleep(0.1)
            t0 = time.perf_counter()
            with pytest.raises(Overloaded, match=r"overloaded \(2 rows queued for m, --max-queue 2\); retry later"):
                b.submit(np.zeros((1, 3), np.float32), 10)
            assert time.perf_counter() - t0 < 0.05
            gate.set()
            assert all(f.result(5).outputs["y"].shape == (2, 3) for f in held)
        assert b.waiting_rows == 0
        assert b.submit(np.zeros((5, 3), np.float32), 5).outputs["y"].shape == (5, 3)  # an empty queue takes any
        b.close()
    assert drops == ["overloaded", "overloaded"]


def test_a_full_queue_answers_resource_exhausted_fast_while_serving_the_admitted(service_bundle, boundary_batch,
                                                                                  stub_for):
    server, h, runs = slow_service(service_bundle, BatchOptions(max_batch_size=2, max_delay_ms=0, max_queue=2), 0.4)
    try:
        stub = stub_for(server.target)
        x = boundary_batch(0, 2)
        admitted = [stub.ModelInfer.future(request(h.name, x), timeout=10)]
        time.sleep(0.1)  # its batch runs; the next fills the queue
        admitted.append(stub.ModelInfer.future(request(h.name, x), timeout=10))
        time.sleep(0.1)
        t0 = time.perf_counter()
        code, message = code_of(stub.ModelInfer, request(h.name, x[:1]), timeout=10)
        refused_s = time.perf_counter() - t0
        assert code == C.RESOURCE_EXHAUSTED and "retry later or add replicas" in message
        assert refused_s < 0.1, refused_s  # at once, not after the 0.4 s batches
        assert isinstance(error_for(code, message), Overloaded)
        assert all(len(f.result().outputs) for f in admitted)
        assert stub.ModelInfer(request(h.name, x), timeout=10).outputs  # recovered
        assert runs == [2, 2, 2]
        assert server.metrics.value(DROPPED, {"reason": "overloaded"}) == 1
    finally:
        server.stop(0.5)


@pytest.mark.slow
def test_real_serve_with_a_tiny_max_queue_refuses_fast_and_keeps_serving(service_bundle, tmp_path, stub_for):
    args = ["serve", str(service_bundle), "--port", "0", "--max-batch-size", "4", "--max-batch-delay-ms", "5",
            "--max-queue", "1", "--metrics-port", "0"]
    with launch("serve", args, tmp_path) as proc:
        stub = stub_for(proc.target)
        model = Bundle.load(service_bundle).name
        shape = [int(d) for d in Bundle.load(service_bundle).manifest.input.shape[1:]]
        x = np.random.default_rng(0).random((64, *shape), dtype=np.float32)

        def call(_: int) -> tuple[C, float]:
            t0 = time.perf_counter()
            code, _msg = code_of(stub.ModelInfer, request(model, x, input_name="input"), timeout=20)
            return code, time.perf_counter() - t0

        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(call, range(120)))
        codes = [c for c, _ in results]
        refused = [s for c, s in results if c == C.RESOURCE_EXHAUSTED]
        served = [s for c, s in results if c == C.OK]
        assert set(codes) <= {C.OK, C.RESOURCE_EXHAUSTED} and served and refused, codes
        # Refusals do not wait for the queue: faster than the served calls (both include sending 200 KB, with 12
        # client threads and the server sharing 2 loaded cores, so no absolute few-ms bound here).
        print(f"median refused {np.median(refused) * 1e3:.1f} ms, served {np.median(served) * 1e3:.1f} ms, "
              f"{len(refused)} of {len(codes)} refused")
        assert np.median(refused) < np.median(served) and np.median(refused) < 0.5
        assert all(code_of(stub.ModelInfer, request(model, x, input_name="input"), timeout=20)[0] == C.OK
                   for _ in range(3))  # alone again: served
        port = re.search(r"metrics on [\d.]+:(\d+)", proc.log()).group(1)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert f'{DROPPED}{{reason="overloaded"}} {float(len(refused))}' in body


# ---- keepalive ------------------------------------------------------------------------------------------------

PINGING_CLIENT = [("grpc.keepalive_time_ms", 1000), ("grpc.keepalive_timeout_ms", 5000),
                  ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0)]


def idle_states(target: str, seconds: float) -> tuple[list[grpc.ChannelConnectivity], bool]:
    """One call, then ``seconds`` idle while the client pings every second; the channel's states and whether a
    call afterwards succeeds without reconnecting."""
    with grpc.insecure_channel(target, options=PINGING_CLIENT) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live
        states: list[grpc.ChannelConnectivity] = []
        channel.subscribe(states.append)
        time.sleep(seconds)
        channel.unsubscribe(states.append)
        return states, stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live


@pytest.mark.slow
def test_a_client_pinging_every_second_keeps_its_connection(serve):
    server = serve()
    states, ok = idle_states(server.target, 5.0)
    assert ok and set(states) == {grpc.ChannelConnectivity.READY}, states  # never GOAWAYed to IDLE


@pytest.mark.slow
def test_control_grpc_defaults_goaway_that_client(serve, monkeypatch):
    monkeypatch.setattr(oip_server, "KEEPALIVE_OPTIONS", ())  # gRPC's server defaults
    server = serve()
    states, _ = idle_states(server.target, 5.0)
    assert grpc.ChannelConnectivity.IDLE in states, states  # too_many_pings: the connection was dropped


def test_link_timeout_and_overloaded_map_to_their_codes():
    from edgeexit.runtime.status import status_for

    assert status_for(Overloaded("x"))[0] == C.RESOURCE_EXHAUSTED
    assert status_for(BundleMismatch("x"))[0] == C.FAILED_PRECONDITION
    assert status_for(LinkTimeout("x"))[0] == C.DEADLINE_EXCEEDED
    # gRPC's own RESOURCE_EXHAUSTED (a message over the size limit) is the client's mistake, not overload.
    assert not isinstance(error_for(C.RESOURCE_EXHAUSTED, "Received message larger than max"), Overloaded)
