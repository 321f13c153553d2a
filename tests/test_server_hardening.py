"""The gRPC server layer under hostile input (issue 13 items 6, 7 and 9's /metrics half), on real loopback servers.

- Requests that are not valid protobuf get INVALID_ARGUMENT from every RPC, log no traceback and keep no memory.
- Error messages echo client input only clipped, and every status message is capped, so a huge model name or
  10,000 input names get NOT_FOUND / INVALID_ARGUMENT, not RESOURCE_EXHAUSTED "Stream removed".
- /metrics listens on loopback unless asked, whatever address the gRPC side listens on.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edgeexit.bundle import Bundle
from edgeexit.errors import ConfigError, InvalidTensor
from edgeexit.runtime.oip_server import RPCS, SERVICE_NAME, ServerOptions
from edgeexit.runtime.proto import grpc_service_pb2 as pb
from edgeexit.runtime.proto import grpc_service_pb2_grpc as pb_grpc
from edgeexit.runtime.status import MAX_MESSAGE_BYTES, cap_message, clip, clip_names, status_for

C = grpc.StatusCode
ROOT = Path(__file__).resolve().parents[1]
GARBAGE_REQUESTS = 8000
RSS_BUDGET_MB = 20.0


@pytest.fixture
def tail(service_bundle) -> str:
    return f"{Bundle.load(service_bundle).name}@0"


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise AssertionError("no VmRSS in /proc/self/status")


def _garbage(rng: np.random.Generator, n: int) -> list[bytes]:
    """``n`` random byte strings (1..600 bytes) that no request message of the service parses."""
    out: list[bytes] = []
    while len(out) < n:
        data = rng.bytes(int(rng.integers(1, 600)))
        for _, request_cls, _ in RPCS:
            try:
                request_cls.FromString(data)
                break  # parses as some request: not garbage for every RPC
            except Exception:  # noqa: BLE001 - DecodeError, the only thing FromString raises on bad bytes
                pass
        else:
            out.append(data)
    return out


def _send_all(channel: grpc.Channel, payloads: list[bytes], metadata=(), window: int = 64) -> list[C]:
    """Send each payload raw to an RPC (ModelInfer for most, every RPC in turn); the status codes, in order."""
    calls = {name: channel.unary_unary(f"/{SERVICE_NAME}/{name}", request_serializer=None,
                                       response_deserializer=None) for name, _, _ in RPCS}
    names = [name for name, _, _ in RPCS]
    codes: list[C] = []
    for start in range(0, len(payloads), window):  # a window of calls in flight keeps the server busy
        futures = [calls["ModelInfer" if i % 4 else names[(i // 4) % len(names)]].future(
                       p, metadata=metadata, timeout=30)
                   for i, p in enumerate(payloads[start:start + window], start)]
        for f in futures:
            try:
                f.result()
                codes.append(C.OK)
            except grpc.RpcError as e:
                codes.append(e.code())
    return codes


def _triton_every_rpc(target: str, model: str, x: np.ndarray) -> None:
    """An unmodified tritonclient.grpc calls every RPC of the service and gets sensible answers."""
    import tritonclient.grpc as tc

    client = tc.InferenceServerClient(target)
    try:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(model)
        assert client.get_server_metadata().name == "edgeexit"
        assert client.get_model_metadata(model).inputs[0].name == "boundary0"
        inp = tc.InferInput("boundary0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        res = client.infer(model, [inp])
        assert all(res.as_numpy(o.name).shape[0] == len(x) for o in res.get_response().outputs)
    finally:
        client.close()


@pytest.mark.slow  # ~12 s on 2 cores: 8,000 RPCs (grpcio's own deserializer kept ~150 MB and answered INTERNAL)
def test_garbage_requests_get_invalid_argument_with_no_traceback_or_growth(serve, tail, boundary_batch, caplog):
    server = serve()
    rng = np.random.default_rng(13)
    with grpc.insecure_channel(server.target) as channel:
        assert set(_send_all(channel, _garbage(rng, 500))) == {C.INVALID_ARGUMENT}  # warm-up: pools, arenas
        payloads = _garbage(rng, GARBAGE_REQUESTS)
        before = _rss_mb()
        with caplog.at_level(logging.WARNING):
            codes = _send_all(channel, payloads)
        growth = _rss_mb() - before
        # One message per call: a client can tell which message the server wanted.
        with pytest.raises(grpc.RpcError) as e:
            channel.unary_unary(f"/{SERVICE_NAME}/ModelMetadata")(b"\xff\xff", timeout=5)
        assert e.value.code() == C.INVALID_ARGUMENT
        assert e.value.details().startswith("request is not a valid ModelMetadataRequest protobuf")
    assert codes.count(C.INVALID_ARGUMENT) == GARBAGE_REQUESTS, {c.name: codes.count(c) for c in set(codes)}
    assert growth <= RSS_BUDGET_MB, f"RSS grew {growth:.1f} MB over {GARBAGE_REQUESTS} garbage requests"
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    assert server.metrics.value("edgeexit_requests_total",
                                {"model": "<unknown>", "code": "INVALID_ARGUMENT"}) >= GARBAGE_REQUESTS * 3 / 4
    _triton_every_rpc(server.target, tail, boundary_batch(0, 2))


def test_token_and_health_still_guard_raw_rpcs(serve, tail, boundary_batch):
    server = serve(ServerOptions(token="s3cret"))
    garbage = _garbage(np.random.default_rng(1), 24)
    with grpc.insecure_channel(server.target) as channel:
        assert set(_send_all(channel, garbage)) == {C.UNAUTHENTICATED}
        assert set(_send_all(channel, garbage, metadata=(("authorization", "Bearer s3cret"),))) == {
            C.INVALID_ARGUMENT}
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=tail), timeout=5,
                                  metadata=(("authorization", "Bearer s3cret"),))
        assert meta.name == tail
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                                                           timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_huge_model_name_is_not_found_with_a_clipped_message(serve, tail):
    server = serve()
    name = "m" * 100_000
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for call in (lambda: stub.ModelMetadata(pb.ModelMetadataRequest(name=name), timeout=5),
                     lambda: stub.ModelInfer(pb.ModelInferRequest(model_name=name), timeout=5)):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == C.NOT_FOUND, e.value.details()
            assert "(100000 chars)" in e.value.details() and tail in e.value.details()
            assert len(e.value.details().encode()) <= MAX_MESSAGE_BYTES
        assert not stub.ModelReady(pb.ModelReadyRequest(name=name), timeout=5).ready
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live  # still serving


def test_ten_thousand_input_or_output_names_are_invalid_argument(serve, tail, boundary_batch):
    server = serve()
    x = boundary_batch(0, 1)
    many_inputs = pb.ModelInferRequest(model_name=tail)
    for i in range(10_000):
        many_inputs.inputs.add(name=f"input_with_a_long_name_{i:05d}", datatype="FP32", shape=[1])
    many_outputs = pb.ModelInferRequest(model_name=tail, raw_input_contents=[x.tobytes()])
    many_outputs.inputs.add(name="boundary0", datatype="FP32", shape=list(x.shape))
    for i in range(10_000):
        many_outputs.outputs.add(name=f"output_that_does_not_exist_{i:05d}")
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for request in (many_inputs, many_outputs):
            with pytest.raises(grpc.RpcError) as e:
                stub.ModelInfer(request, timeout=10)
            assert e.value.code() == C.INVALID_ARGUMENT, e.value.details()
            assert len(e.value.details().encode()) <= MAX_MESSAGE_BYTES
        assert stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready


def test_typed_contents_out_of_range_are_invalid_argument_not_internal(serve, tail):
    server = serve()
    request = pb.ModelInferRequest(model_name=tail)
    request.inputs.add(name="boundary0", datatype="INT8", shape=[1]).contents.int_contents.append(1000)
    with grpc.insecure_channel(server.target) as channel:
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=5)
    assert e.value.code() == C.INVALID_ARGUMENT, e.value.details()


def test_clip_and_cap():
    assert clip("abc") == "'abc'"
    assert clip("x" * 1000) == f"{'x' * 64!r}… (1000 chars)"
    assert clip_names(["a", "b"]) == "['a', 'b']"
    assert clip_names(str(i) for i in range(10_000)).endswith(", …] (10000 names)")
    capped = cap_message("é" * 5000)  # 2 bytes each: the cut must not split a character
    assert len(capped.encode()) <= MAX_MESSAGE_BYTES and capped.endswith("(message cut; 10000 bytes)")
    assert cap_message("short") == "short"
    code, message = status_for(InvalidTensor("bad " + "n" * 50_000))
    assert code == C.INVALID_ARGUMENT and len(message.encode()) <= MAX_MESSAGE_BYTES
    code, message = status_for(RuntimeError("boom " * 10_000))
    assert code == C.INTERNAL and len(message.encode()) <= MAX_MESSAGE_BYTES and message.endswith("server log")


def _http_ok(host: str, port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as r:
            return r.status == 200 and b"edgeexit_requests" in r.read()
    except (ConnectionError, urllib.error.URLError):
        return False


def test_metrics_bind_loopback_unless_asked(serve):
    # The gRPC side on another address (127.0.0.2 stands in for 0.0.0.0 without leaving loopback).
    server = serve(ServerOptions(host="127.0.0.2", metrics_port=0))
    assert _http_ok("127.0.0.1", server.metrics_port) and not _http_ok("127.0.0.2", server.metrics_port)
    asked = serve(ServerOptions(host="127.0.0.1", metrics_port=0, metrics_host="127.0.0.2"))
    assert _http_ok("127.0.0.2", asked.metrics_port) and not _http_ok("127.0.0.1", asked.metrics_port)
    with pytest.raises(ConfigError, match="metrics host"):
        ServerOptions(metrics_host="")


def test_cli_help_documents_metrics_host():
    for command in ("serve", "agent"):
        out = subprocess.run([sys.executable, "-m", "edgeexit", command, "--help"], cwd=ROOT, text=True,
                             capture_output=True, check=True).stdout
        assert "--metrics-host" in out and "loopback" in out, command


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_serve_process_metrics_on_loopback_when_grpc_listens_elsewhere(service_bundle):
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "edgeexit", "serve", str(service_bundle), "--host", "127.0.0.2",
                             "--port", "0", "--metrics-port", str(port)], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (lines and lines[-1].startswith("ready on ")):
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                raise AssertionError(f"serve exited {proc.returncode}: {proc.stderr.read()}")
            lines.append(line)
        assert lines[-1].startswith("ready on 127.0.0.2:"), lines
        assert f"metrics on 127.0.0.1:{port}/metrics" in "".join(lines)
        assert _http_ok("127.0.0.1", port) and not _http_ok("127.0.0.2", port)
    finally:
        proc.kill()
        proc.wait()
