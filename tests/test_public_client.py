"""edgeexit.client: the apps' client against a real agent process, an agent handler behind TLS and a token, and
nothing at all; it imports with onnxruntime and torch absent, and every failure is a typed edgeexit error."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from edgeexit.client import EdgeExitClient, Result
from edgeexit.errors import (
    ConfigError,
    InvalidTensor,
    LinkTimeout,
    OffloadError,
    Overloaded,
    PeerRefused,
    PeerUnavailable,
)
from edgeexit.runtime.status import ModelNotFound, app_error_for
from edgeexit.testbed.harness import AgentClient, free_port, launch

ROOT = Path(__file__).resolve().parents[1]
C = grpc.StatusCode


def test_imports_with_only_numpy_grpc_and_protobuf(tmp_path):
    # Packages that refuse to import, earlier on the path: any import of them fails loudly.
    blocked = ("torch", "onnxruntime", "ai_edge_litert", "prometheus_client", "zstandard")
    for name in blocked:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('{name} is not for apps')\n")
    code = ("import sys\nimport edgeexit.client\n"
            "print(sorted({m.split('.')[0] for m in sys.modules}))\n"
            "print(sorted(m for m in sys.modules if m.startswith('edgeexit')))\n"
            "try:\n    import onnxruntime\nexcept ImportError as e:\n    print('blocked:', e)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    tops, ours, blocker = out.stdout.splitlines()
    assert "blocked: onnxruntime is not for apps" in blocker  # the blockers were active
    for name in blocked:
        assert f"'{name}'" not in tops
    # What the client may pull in of edgeexit: errors, the OIP messages (with the codec they decode with), the
    # status mapping, TLS/token helpers and the package root (which loads the bundle schema, stdlib only).
    allowed = {"edgeexit", "edgeexit.client", "edgeexit.errors", "edgeexit.bundle", "edgeexit.manifest_schema",
               "edgeexit.runtime", "edgeexit.runtime.codec", "edgeexit.runtime.decided",
               "edgeexit.runtime.oip_messages", "edgeexit.runtime.proto", "edgeexit.runtime.proto.grpc_service_pb2",
               "edgeexit.runtime.proto.grpc_service_pb2_grpc", "edgeexit.runtime.security",
               "edgeexit.runtime.status"}
    assert set(eval(ours)) <= allowed, set(eval(ours)) - allowed


@pytest.fixture(scope="module")
def device_agent(agent_bundle, tmp_path_factory):
    """A real `edgeexit agent` process, device-only, with the bundle's calibrated exit policy."""
    with launch("agent", ["agent", str(agent_bundle), "--listen", "127.0.0.1:0"],
                tmp_path_factory.mktemp("agent")) as agent:
        yield agent


@pytest.fixture(scope="module")
def local(agent_bundle):
    from edgeexit.runtime.device import DeviceOptions, DeviceRuntime

    rt = DeviceRuntime(agent_bundle, DeviceOptions())
    yield rt
    rt.close()


@pytest.mark.slow
def test_answers_equal_the_local_run_and_the_model_is_discovered(device_agent, local, raw_batch):
    with EdgeExitClient(device_agent.target) as app:
        assert app.ready()
        assert app.model == local.model_name  # from the agent's ModelMetadata: none was given
        r = app.infer(raw_batch)
    want = local.infer(raw_batch)
    assert isinstance(r, Result) and r.model == local.model_name
    np.testing.assert_array_equal(r.label, want.labels)
    np.testing.assert_array_equal(r.exit, want.exits)
    np.testing.assert_allclose(r.probabilities, want.probabilities, atol=1e-6)
    assert r.decided == want.decided == ["device"] * len(raw_batch)
    assert r.latency.total_ms > 0 and r.latency.device_ms > 0 and r.latency.cloud_ms is None
    assert r.params["edgeexit.split"] == "device"
    # The testbed's AgentClient is this client underneath: the same answer under its field names.
    with AgentClient(device_agent.target, local.model_name) as old:
        ans = old.infer(raw_batch)
    np.testing.assert_array_equal(ans.labels, r.label)
    assert ans.decided == r.decided and ans.seconds > 0


@pytest.mark.slow
def test_uint8_images_answer_as_their_pixels_over_255(device_agent, raw_batch):
    images = np.round(raw_batch * 255).astype(np.uint8)
    with EdgeExitClient(device_agent.target) as app:
        got = app.infer(images)
        want = app.infer(images.astype(np.float32) / 255)
        half = app.infer(raw_batch.astype(np.float16))  # sent as FP16, which the agent takes too
    np.testing.assert_array_equal(got.label, want.label)
    np.testing.assert_allclose(got.probabilities, want.probabilities, atol=1e-6)
    assert half.label.shape == (len(raw_batch),)


@pytest.mark.slow
def test_bad_inputs_are_refused_before_sending(device_agent, agent_bundle, raw_batch, tmp_path):
    # Its own agent, stopped once the client knows the model: whatever the client sent now would be UNAVAILABLE.
    with launch("agent-2", ["agent", str(agent_bundle), "--listen", "127.0.0.1:0"], tmp_path) as agent, \
            EdgeExitClient(agent.target, timeout_s=5) as app:
        shape = app.metadata().inputs[0].shape
        agent.stop()
        with pytest.raises(InvalidTensor, match=r"does not fit .*any number of rows\)$"):
            app.infer(raw_batch[:, :, :-1])
        with pytest.raises(InvalidTensor, match=r"add the batch axis \(x\[None\]\)"):
            app.infer(raw_batch[0])
        with pytest.raises(InvalidTensor, match="dtype int32 are not supported"):
            app.infer(raw_batch.astype(np.int32))
        with pytest.raises(InvalidTensor, match="empty"):
            app.infer(raw_batch[:0])
        with pytest.raises(PeerUnavailable, match=f"is the agent running on {agent.target}"):
            app.infer(raw_batch)  # the one valid input was sent, and found nobody
    assert shape[0] == -1 and list(raw_batch.shape[1:]) == shape[1:]


@pytest.mark.slow
def test_a_wrong_model_is_typed(device_agent, raw_batch):
    with EdgeExitClient(device_agent.target, model="nope") as app, pytest.raises(ModelNotFound, match="nope"):
        app.infer(raw_batch)


def test_a_silent_peer_is_a_link_timeout_after_timeout_s(raw_batch):
    # A listener that accepts and never speaks: the call can only end by its deadline. (A microsecond deadline
    # against the real agent is no test: gRPC keeps deadlines in milliseconds and a small batch answers in one.)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        target = f"127.0.0.1:{silent.getsockname()[1]}"
        with EdgeExitClient(target, timeout_s=30) as app:
            t0 = time.monotonic()
            with pytest.raises(LinkTimeout, match="raise timeout_s"):
                app.infer(raw_batch, timeout_s=0.3)
            assert 0.25 < time.monotonic() - t0 < 10  # the call's timeout_s, not the client's 30 s


def test_agent_down_is_peer_unavailable_fast(raw_batch):
    target = f"127.0.0.1:{free_port()}"
    with EdgeExitClient(target, timeout_s=10) as app:
        t0 = time.monotonic()
        assert app.ready() is False
        with pytest.raises(PeerUnavailable, match=f"is the agent running on {target}") as err:
            app.infer(raw_batch)
        assert time.monotonic() - t0 < 3  # refused connections fail at once, not after timeout_s
    assert not isinstance(err.value, PeerRefused)


def test_several_models_need_a_name(cloud):
    # `edgeexit serve` serves the whole model and every tail: there is no one model to discover.
    with EdgeExitClient(cloud.target) as app, pytest.raises(ModelNotFound, match=r"available: .*pass the model"):
        app.metadata()


@pytest.fixture(scope="module")
def secure_agent(agent_bundle, pki):
    """The agent's handler behind TLS and a bearer token (the `edgeexit agent` listener itself has neither)."""
    from edgeexit.runtime.agent import AgentHandler
    from edgeexit.runtime.device import DeviceOptions, DeviceRuntime
    from edgeexit.runtime.oip_server import ServerOptions, build_server

    handler = AgentHandler(DeviceRuntime(agent_bundle, DeviceOptions(policy="never")))
    options = ServerOptions(tls_cert=pki["server_cert"], tls_key=pki["server_key"], token="s3cret")
    handle = build_server([handler], options).start()
    yield handle
    handle.stop(1.0)


def test_token_and_tls(secure_agent, pki, raw_batch):
    target = f"localhost:{secure_agent.port}"
    with EdgeExitClient(target, token="s3cret", tls_ca=pki["ca"]) as app:
        assert app.ready()
        r = app.infer(raw_batch)
        assert r.decided == ["device"] * len(raw_batch)
    for token in ("wrong", None):
        with EdgeExitClient(target, token=token, tls_ca=pki["ca"]) as app:
            with pytest.raises(PeerRefused, match="refused our credentials") as err:
                app.infer(raw_batch)
            assert err.value.reason == "auth"
    with EdgeExitClient(target, token="s3cret", tls_ca=pki["rogue_ca"], timeout_s=5) as app:
        with pytest.raises(PeerRefused, match="TLS handshake") as err:
            app.ready()  # a wrong CA is a mistake to fix, not "not ready yet"
        assert err.value.reason == "tls"
    with pytest.raises(ConfigError, match="need tls_ca"):
        EdgeExitClient(target, server_name="localhost")


@pytest.mark.parametrize(("code", "message", "cls"), [
    (C.UNAVAILABLE, "connection refused", PeerUnavailable),
    (C.UNAVAILABLE, "Ssl handshake failed", PeerRefused),
    (C.DEADLINE_EXCEEDED, "Deadline Exceeded", LinkTimeout),
    (C.INVALID_ARGUMENT, "tiny takes input 'input'", InvalidTensor),
    (C.UNAUTHENTICATED, "wrong bearer token", PeerRefused),
    (C.NOT_FOUND, "model 'x' is not served here", ModelNotFound),
    (C.RESOURCE_EXHAUSTED, "Received message larger than max", InvalidTensor),
    (C.RESOURCE_EXHAUSTED, "tiny is overloaded", Overloaded),
    (C.INTERNAL, "boom", OffloadError),
])
def test_every_status_becomes_an_error_naming_the_agent(code, message, cls):
    err = app_error_for(code, message, "127.0.0.1:8001")
    assert type(err) is cls and message in str(err)
    assert "127.0.0.1:8001" in str(err) or cls is Overloaded


@pytest.mark.slow
def test_the_readme_example_runs(device_agent, local):
    text = (ROOT / "README.md").read_text()
    code = text.split("<!-- for-apps -->\n```python\n", 1)[1].split("```", 1)[0]
    assert '"127.0.0.1:8101"' in code  # the agent's default --listen; this test's agent took a free port
    out = subprocess.run([sys.executable, "-c", code.replace("127.0.0.1:8101", device_agent.target)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"{local.model_name} [") and "ms in the agent" in out.stdout
