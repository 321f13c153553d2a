"""OIP v2 REST (runtime/oip_rest.py): unmodified ``tritonclient.http`` and ``curl`` against real servers.

Fast tests run the real service in-process (real HTTP and gRPC servers on loopback) and compare every answer and
error with gRPC's; the slow ones start real `edgeexit serve` and `edgeexit agent` processes with ``--http-port 0``
and run the README's curl block against both.
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from edgeexit.runtime import oip_rest
from edgeexit.runtime.oip_server import ServerOptions
from tests.fixtures_agent import input_shape

httpclient = pytest.importorskip("tritonclient.http")
grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

TOKEN = "s3cret-token"
README = Path(__file__).resolve().parents[1] / "README.md"


def _tail(handle) -> str:
    return next(n for n in handle.servicer.handlers if n.endswith("@0"))


def _http_infer(client, model: str, x: np.ndarray, binary: bool, headers=None, outputs=None):
    inp = httpclient.InferInput("input" if "@" not in model else _input_name(client, model, headers), list(x.shape),
                                "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    wanted = [httpclient.InferRequestedOutput(o, binary_data=binary) for o in outputs] if outputs else None
    # A copy: tritonclient writes Inference-Header-Content-Length into the caller's dict, and a stale one would
    # misframe the next (JSON) request.
    return client.infer(model, [inp], outputs=wanted, headers=dict(headers) if headers else None)


def _input_name(client, model: str, headers=None) -> str:
    return client.get_model_metadata(model, headers=headers)["inputs"][0]["name"]


def _grpc_infer(target: str, model: str, name: str, x: np.ndarray):
    client = grpcclient.InferenceServerClient(target)
    inp = grpcclient.InferInput(name, list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client, client.infer(model, [inp])


def test_tritonclient_http_gets_what_grpc_gets_from_serve(serve, boundary_batch):
    handle = serve(ServerOptions(http_port=0))
    tail, x = _tail(handle), boundary_batch(0, 3)
    hc = httpclient.InferenceServerClient(f"127.0.0.1:{handle.http_port}")
    gc, want = _grpc_infer(handle.target, tail, _input_name(hc, tail), x)
    assert hc.is_server_live() and hc.is_server_ready() and hc.is_model_ready(tail)
    assert hc.get_server_metadata()["name"] == gc.get_server_metadata(as_json=True)["name"] == "edgeexit"
    meta, gmeta = hc.get_model_metadata(tail), gc.get_model_metadata(tail, as_json=True)
    assert meta["name"] == gmeta["name"] == tail and meta["versions"] == gmeta["versions"]
    for side in ("inputs", "outputs"):
        assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in meta[side]] == \
               [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in gmeta[side]]
    assert meta["parameters"]["edgeexit.max_batch_rows"] == 256  # REST has a field for it
    digest = meta["versions"][0]  # the /versions/{v} forms
    assert hc.is_model_ready(tail, digest) and hc.get_model_metadata(tail, digest)["name"] == tail
    assert not hc.is_model_ready(tail, "7")  # a version not served: 404, as the infer below
    names = [o["name"] for o in meta["outputs"]]
    for binary in (True, False):  # the binary-data extension, and JSON tensors both ways
        got = _http_infer(hc, tail, x, binary, outputs=names)
        for name in names:
            np.testing.assert_array_equal(got.as_numpy(name), want.as_numpy(name))
        outs = got.get_response()["outputs"]
        assert all(("data" in o) != binary for o in outs), outs
        assert got.get_response()["parameters"]["edgeexit.compute_us"] >= 0
    every = _http_infer(hc, tail, x, True)  # no outputs named: all of them, binary (binary_data_output)
    assert sorted(o["name"] for o in every.get_response()["outputs"]) == sorted(names)
    assert handle.metrics.value("edgeexit_requests_total", {"model": tail, "code": "OK"}) == 4  # 1 gRPC + 3 REST


def test_errors_are_grpcs_mapped_to_http_statuses(serve, boundary_batch):
    handle = serve(ServerOptions(http_port=0))
    tail, x = _tail(handle), boundary_batch(0, 2)
    hc = httpclient.InferenceServerClient(f"127.0.0.1:{handle.http_port}")
    name = _input_name(hc, tail)
    gc = grpcclient.InferenceServerClient(handle.target)
    cases = [(tail, x[:, :1], "400", "INVALID_ARGUMENT"),  # a bad tensor: wrong shape
             ("nope", x, "404", "NOT_FOUND")]
    for model, tensor, status, code in cases:
        with pytest.raises(InferenceServerException) as rest:
            _http_infer(hc, model, tensor, True) if model == "nope" else hc.infer(model, [_inp(name, tensor)])
        with pytest.raises(InferenceServerException) as grpc_err:
            ginp = grpcclient.InferInput(name, list(tensor.shape), "FP32")
            ginp.set_data_from_numpy(tensor)
            gc.infer(model, [ginp])
        assert rest.value.status() == status and grpc_err.value.status() == f"StatusCode.{code}"
        assert rest.value.message() == grpc_err.value.message()  # the same words on both protocols
    with pytest.raises(InferenceServerException) as e:
        hc.get_model_metadata("nope")
    assert e.value.status() == "404" and "not served here" in e.value.message()
    assert not hc.is_model_ready("nope")
    assert handle.metrics.value("edgeexit_requests_total", {"model": tail, "code": "INVALID_ARGUMENT"}) == 2


def _inp(name: str, x: np.ndarray):
    inp = httpclient.InferInput(name, list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return inp


def test_token_guards_everything_but_health(serve, boundary_batch):
    handle = serve(ServerOptions(http_port=0, token=TOKEN))
    tail, x = _tail(handle), boundary_batch(0, 1)
    hc = httpclient.InferenceServerClient(f"127.0.0.1:{handle.http_port}")
    assert hc.is_server_live() and hc.is_server_ready()  # probes carry no token, as with gRPC health
    for headers, why in ((None, "missing"), ({"Authorization": "Bearer wrong"}, "wrong bearer token")):
        for call in (lambda h: hc.get_model_metadata(tail, headers=h), lambda h: hc.get_server_metadata(headers=h)):
            with pytest.raises(InferenceServerException) as e:
                call(headers)
            assert e.value.status() == "401" and why in e.value.message()
    ok = {"Authorization": f"Bearer {TOKEN}"}
    assert _http_infer(hc, tail, x, True, headers=ok).get_response()["model_name"] == tail


def _raw(port: int, method: str, path: str, body: bytes = b"", headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, data


def _read_until_closed(s: socket.socket, limit: int = 1 << 16) -> bytes:
    """Everything the server sends before it closes the connection (its error answers say Connection: close)."""
    data = b""
    while len(data) < limit and (chunk := s.recv(4096)):
        data += chunk
    return data


def test_hostile_requests_get_clear_json_errors_and_the_server_keeps_serving(serve):
    handle = serve(ServerOptions(http_port=0, max_message_bytes=4096))
    port, tail = handle.http_port, _tail(handle)
    infer = f"/v2/models/{tail.replace('@', '%40')}/infer"
    claimed = b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]}'
    cases = [
        ("POST", infer, b"{not json", {}, 400, "not valid JSON"),
        ("POST", infer, b"[1, 2]", {}, 400, "must be a JSON object"),
        ("POST", infer, b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1, "a"]}]}', {},
         400, "list of numbers"),
        ("POST", infer, claimed + b"\0" * 8, {"Inference-Header-Content-Length": str(len(claimed))}, 400,
         "binary bytes no input claims"),
        ("POST", infer, b"{}", {"Inference-Header-Content-Length": "99"}, 400, "the body has 2 bytes"),
        ("POST", infer, b"x" * 5000, {}, 413, "above this server's limit"),
        ("GET", infer, b"", {}, 405, "use POST"),
        ("GET", "/v3/anything", b"", {}, 404, "/v2"),
    ]
    for method, path, body, headers, status, words in cases:
        got, data = _raw(port, method, path, body, headers)
        assert got == status and words in json.loads(data)["error"], (path, body[:40], data)
        assert b"Traceback" not in data
    # A huge declared body is refused from its header alone, before anything is read.
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"POST {infer} HTTP/1.1\r\nHost: x\r\nContent-Length: {10**12}\r\n\r\n".encode())
        head = _read_until_closed(s)  # headers and body may come in separate segments
    assert head.startswith(b"HTTP/1.1 413") and b'"error"' in head
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:  # not HTTP at all: JSON, not HTML
        s.sendall(b"\x16\x03\x01garbage\r\n\r\n")
        assert b'{"error"' in _read_until_closed(s)
    assert _raw(port, "GET", "/v2/health/live") == (200, b'{"live":true}')


def test_connections_are_bounded_and_freed(serve, monkeypatch):
    monkeypatch.setattr(oip_rest, "MAX_CONNECTIONS", 2)
    handle = serve(ServerOptions(http_port=0))
    idle = [socket.create_connection(("127.0.0.1", handle.http_port), timeout=5) for _ in range(2)]
    time.sleep(0.3)
    with socket.create_connection(("127.0.0.1", handle.http_port), timeout=5) as extra:
        extra.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert extra.recv(100) == b""  # refused (closed) instead of a third thread
    idle[0].close()
    time.sleep(0.3)
    assert _raw(handle.http_port, "GET", "/v2/health/live")[0] == 200
    idle[1].close()


def _gevent_tls(ca: str):
    import gevent.ssl

    def factory():
        ctx = gevent.ssl.create_default_context(cafile=ca)
        ctx.check_hostname = False  # geventhttpclient matches the host name itself, after connecting
        return ctx

    return factory


def test_tls_and_token_with_tritonclient_and_mtls(serve, pki, boundary_batch):
    handle = serve(ServerOptions(http_port=0, tls_cert=pki["server_cert"], tls_key=pki["server_key"], token=TOKEN))
    tail, x = _tail(handle), boundary_batch(0, 2)
    hc = httpclient.InferenceServerClient(f"127.0.0.1:{handle.http_port}", ssl=True,
                                          ssl_context_factory=_gevent_tls(pki["ca"]))
    got = _http_infer(hc, tail, x, True, headers={"Authorization": f"Bearer {TOKEN}"})
    assert got.get_response()["model_name"] == tail
    with pytest.raises(InferenceServerException) as e:
        hc.get_model_metadata(tail)
    assert e.value.status() == "401"
    with pytest.raises((http.client.HTTPException, OSError)):  # plain HTTP to the TLS port gets nothing
        _raw(handle.http_port, "GET", "/v2/health/live")
    # mTLS: a client certificate signed by the client CA is required.
    mtls = serve(ServerOptions(http_port=0, tls_cert=pki["server_cert"], tls_key=pki["server_key"],
                               tls_client_ca=pki["ca"]))
    ctx = ssl.create_default_context(cafile=pki["ca"])
    with pytest.raises((ssl.SSLError, OSError)):
        _tls_get(mtls.http_port, ctx)
    ctx.load_cert_chain(pki["client_cert"], pki["client_key"])
    assert _tls_get(mtls.http_port, ctx) == 200


def _tls_get(port: int, ctx: ssl.SSLContext) -> int:
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
    conn.request("GET", "/v2/health/ready")
    status = conn.getresponse().status
    conn.close()
    return status


# -- real processes -----------------------------------------------------------------------------------------


def _http_target(proc) -> str:
    m = re.search(r"^http on (\S+)$", proc.log(), re.M)
    assert m, proc.log()[-2000:]
    return m.group(1)


def readme_curl_block() -> str:
    text = README.read_text()
    m = re.search(r"<!-- rest-curl -->\s*```bash\n(.*?)```", text, re.S)
    assert m, "README's REST section lost its curl block (marked <!-- rest-curl -->)"
    return m.group(1)


def run_curl_block(target: str, model: str, shape: tuple[int, ...], cwd: Path) -> list[str]:
    """The README's block as written, with its first line (the variables) pointed at this server."""
    lines = readme_curl_block().splitlines()
    assert lines[0].startswith("HTTP=")
    lines[0] = re.sub(r"HTTP=\S+", f"HTTP={target}", lines[0])
    lines[0] = re.sub(r"MODEL=\S+", f"MODEL={model}", lines[0])
    lines[0] = re.sub(r"SHAPE=\S+", "SHAPE=" + ",".join(map(str, (1, *shape))), lines[0])
    script = "set -e\n" + "\n".join(lines) + "\n"
    done = subprocess.run(["bash", "-c", script], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, (script, done.stdout, done.stderr)
    return done.stdout.splitlines()


@pytest.mark.slow
def test_real_serve_and_agent_over_rest_tritonclient_and_readme_curl(agent_bundle, tmp_path):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    from edgeexit.bundle import Bundle
    from edgeexit.testbed.harness import launch

    name, shape = Bundle.load(agent_bundle, verify=False).name, input_shape(agent_bundle)
    (tmp_path / "token.txt").write_text(TOKEN + "\n")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    x = np.random.default_rng(3).random((4, *shape), dtype=np.float32)
    with launch("serve", ["serve", str(agent_bundle), "--port", "0", "--http-port", "0", "--token-file",
                          str(tmp_path / "token.txt"), "--max-batch-size", "1"], tmp_path) as srv:
        with launch("agent", ["agent", str(agent_bundle), "--cloud", srv.target, "--split", "0", "--policy", "never",
                              "--listen", "127.0.0.1:0", "--http-port", "0", "--deadline-ms", "10000",
                              "--token-file", str(tmp_path / "token.txt")], tmp_path) as agent:
            for proc, headers in ((srv, auth), (agent, None)):  # every endpoint, JSON and binary, on both
                hc = httpclient.InferenceServerClient(_http_target(proc))
                assert hc.is_server_live() and hc.is_server_ready() and hc.is_model_ready(name, headers=headers)
                assert hc.get_server_metadata(headers=headers)["name"] in ("edgeexit", "edgeexit-agent")
                meta = hc.get_model_metadata(name, headers=headers)
                outs = [o["name"] for o in meta["outputs"]]
                _, want = _grpc_infer(proc.target, name, "input", x) if headers is None else (None, None)
                for binary in (True, False):
                    got = _http_infer(hc, name, x, binary, headers=headers, outputs=outs)
                    assert got.as_numpy(outs[-1]).shape[0] == 4
                    if want is not None:  # the agent: the same answer as over gRPC, rows offloaded to serve
                        np.testing.assert_array_equal(got.as_numpy("label"), want.as_numpy("label"))
                        np.testing.assert_allclose(got.as_numpy("probabilities"), want.as_numpy("probabilities"),
                                                   atol=1e-6)
                        assert set(got.as_numpy("decided").tolist()) == {1}  # decided by the cloud
                with pytest.raises(InferenceServerException) as e:
                    _http_infer(hc, name, x[:, :, :3], True, headers=headers)
                assert e.value.status() == "400"
                out = run_curl_block(_http_target(proc), name, shape, tmp_path)
                assert out[0] == '{"ready":true}' and json.loads(out[1])["name"] == name
                answer = json.loads(out[2])
                assert answer["model_name"] == name and len(answer["outputs"]) == len(outs)
                assert out[3].endswith(" 404") and "not served here" in out[3]
            assert agent.stop() == 0
        assert srv.stop() == 0
