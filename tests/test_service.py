"""The cloud service on a real loopback server: every tail and the whole model agree with local runs."""

from __future__ import annotations

import threading
import time
import urllib.request

import numpy as np
import pytest

from edgeexit.bundle import Bundle
from edgeexit.errors import OffloadError
from edgeexit.runtime import codec
from edgeexit.runtime.batching import BatchOptions
from edgeexit.runtime.client import InferenceClient
from edgeexit.runtime.oip_server import ServerOptions
from edgeexit.runtime.runner import SegmentRunner
from tests.fixtures_service import SlowHandler

# int8 per-tensor affine error is at most scale/2 per element; logits move by a measured small amount.
TOL = {"fp32": 1e-5, "fp16": 2e-2, "int8": 0.25}


@pytest.fixture
def local(service_bundle) -> SegmentRunner:
    return SegmentRunner(service_bundle)


def _expected_tail(runner: SegmentRunner, split: int, x: np.ndarray) -> dict[str, np.ndarray]:
    out = runner.run(x, start=split + 1)
    return {f"exit{j}": v for j, v in out.exits.items()}


@pytest.mark.parametrize("encoding", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("compress", [False, True])
def test_every_split_matches_local_run(serve, local, boundary_batch, encoding, compress):
    server = serve()
    manifest = local.manifest
    with InferenceClient(server.target) as client:
        for sp in manifest.split_points:
            x = boundary_batch(sp.index, 4)
            wire = codec.encode(x, encoding, sp.quantization, compress=compress)
            got = client.infer(f"{manifest.name}@{sp.index}", f"boundary{sp.index}", wire, timeout=10)
            # Compare with the tail run on exactly what the server decoded, and with the exact fp32 tail.
            decoded = codec.decode(wire.data, wire.datatype, wire.shape, wire.params)
            want_decoded = _expected_tail(local, sp.index, decoded)
            want_exact = _expected_tail(local, sp.index, x)
            assert sorted(got) == sorted(want_exact) and got
            for name in got:
                assert got[name].dtype == np.float32 and got[name].shape == want_exact[name].shape
                np.testing.assert_allclose(got[name], want_decoded[name], atol=1e-5, rtol=1e-5)
                assert np.abs(got[name] - want_exact[name]).max() <= TOL[encoding]


def test_whole_model_matches_run_all(serve, local):
    server = serve()
    m = local.manifest
    raw = np.random.default_rng(3).random((5, *[int(d) for d in m.input.shape[1:]]), dtype=np.float32)
    with InferenceClient(server.target) as client:
        got = client.infer(m.name, m.input.name, codec.encode(raw), timeout=10)
    want = local.run_all(local.normalize(raw))
    assert sorted(got) == [f"exit{j}" for j in range(len(m.exits))]
    for j, w in enumerate(want):
        np.testing.assert_allclose(got[f"exit{j}"], w, atol=1e-5)


def test_tritonclient_health_metadata_and_infer(serve, local, boundary_batch):
    tc = pytest.importorskip("tritonclient.grpc")
    server = serve()
    m = local.manifest
    client = tc.InferenceServerClient(server.target)
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready(f"{m.name}@0") and not client.is_model_ready("nope")
        meta = client.get_model_metadata(f"{m.name}@0", as_json=True)
        assert meta["inputs"][0]["name"] == "boundary0" and meta["inputs"][0]["shape"][0] == "-1"
        assert [o["name"] for o in meta["outputs"]] == [f"exit{j}" for s in m.segments[1:] for j in s.exits]
        assert client.get_server_metadata().name == "edgeexit"
        x = boundary_batch(0, 3)
        inp = tc.InferInput("boundary0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        last = f"exit{len(m.exits) - 1}"
        result = client.infer(f"{m.name}@0", [inp], outputs=[tc.InferRequestedOutput(last)])
        np.testing.assert_allclose(result.as_numpy(last), _expected_tail(local, 0, x)[last], atol=1e-5)
        assert result.as_numpy("exit0") is None  # only the requested output came back
        with pytest.raises(tc.InferenceServerException) as e:
            client.get_model_metadata("nope")
        assert "StatusCode.NOT_FOUND" in str(e.value.status())
    finally:
        client.close()


def test_standard_grpc_health_service(serve):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    server = serve(ServerOptions(token="secret"))  # health probes need no token
    with grpc.insecure_channel(server.target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ("", "inference.GRPCInferenceService"):
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_concurrent_clients_with_batching_get_their_own_rows(serve, local, boundary_batch):
    server = serve(batching=BatchOptions(max_batch_size=16, max_delay_ms=20))
    m = local.manifest
    n_threads, rounds = 16, 3
    inputs = [boundary_batch(0, 1 + i % 3, seed=i) for i in range(n_threads)]
    wants = [_expected_tail(local, 0, x) for x in inputs]
    errors: list[str] = []
    barrier = threading.Barrier(n_threads)

    def worker(i: int) -> None:
        with InferenceClient(server.target) as client:
            barrier.wait()
            for _ in range(rounds):
                got = client.infer(f"{m.name}@0", "boundary0", codec.encode(inputs[i]), timeout=20)
                for name, w in wants[i].items():
                    if got[name].shape != w.shape or not np.allclose(got[name], w, atol=1e-5):
                        errors.append(f"thread {i}: {name} differs")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    model = f"{m.name}@0"
    batches = server.metrics.value("edgeexit_batch_size_count", {"model": model})
    requests = server.metrics.value("edgeexit_requests_total", {"model": model, "code": "OK"})
    assert requests == n_threads * rounds
    assert 0 < batches < requests  # some batches held more than one request
    le1 = server.metrics.value("edgeexit_batch_size_bucket", {"model": model, "le": "1.0"})
    assert le1 < batches


def test_metrics_over_http(serve, local, boundary_batch):
    server = serve(ServerOptions(metrics_port=0))
    with InferenceClient(server.target) as client:
        client.infer(f"{local.manifest.name}@0", "boundary0", codec.encode(boundary_batch(0, 2)), timeout=10)
        with pytest.raises(OffloadError, match="NOT_FOUND"):
            client.infer("nope", "boundary0", codec.encode(boundary_batch(0, 2)), timeout=10)
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    assert f'edgeexit_requests_total{{code="OK",model="{local.manifest.name}@0"}} 1.0' in body
    assert 'edgeexit_errors_total{code="NOT_FOUND"} 1.0' in body
    assert "edgeexit_request_seconds_bucket" in body and "edgeexit_batch_size_bucket" in body


def test_graceful_shutdown_drains_in_flight_requests():
    from edgeexit.errors import PeerUnavailable
    from edgeexit.runtime.oip_server import build_server

    handler = SlowHandler(0.8)
    server = build_server([handler]).start()
    client = InferenceClient(server.target)
    result: dict = {}

    def call() -> None:
        result["y"] = client.infer("slow", "x", codec.encode(np.zeros(3, np.float32)), timeout=10)

    t = threading.Thread(target=call)
    t.start()
    assert handler.started.wait(5)
    stopped = time.monotonic()
    server.stop(grace=5)  # blocks until the in-flight call is done
    assert time.monotonic() - stopped >= 0.3
    t.join(5)
    np.testing.assert_array_equal(result["y"]["y"], np.ones(3, np.float32))
    with pytest.raises(PeerUnavailable):
        client.infer("slow", "x", codec.encode(np.zeros(3, np.float32)), timeout=2)
    assert not client.ready(0.5)
    client.close()


def test_bundle_integrity_is_checked_before_serving(serve, service_bundle, tmp_path):
    import shutil

    from edgeexit.errors import BundleError

    copy = tmp_path / "copy.edgeexit"
    shutil.copytree(service_bundle, copy)
    seg = Bundle.load(copy).segment_path(1)
    seg.write_bytes(seg.read_bytes()[:-10])
    with pytest.raises(BundleError, match="sha256"):
        serve(bundle=copy)
