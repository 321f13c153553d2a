"""KServe's own gRPC client (kserve 0.21 ``InferenceGRPCClient``, unmodified) against `edgeexit serve` and a real
agent: health, ModelReady, ModelMetadata (through KServe's generated stub), ModelInfer with FP32, and the INT8
tail as far as a client without ``double_param`` can send it (README, "The wire").

kserve's ``inference.*`` protobuf messages clash with tritonclient's in the default pool, so the client runs in
a process of its own (tests/kserve_probe.py), and in a venv of its own: kserve 0.21 pins protobuf<7, which our
protobuf 7 excludes, so `make setup` builds `.venv-kserve` (pinned by constraints-kserve.txt).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc

from edgeexit.bundle import Bundle
from edgeexit.runtime import codec
from edgeexit.runtime.agent import Agent, AgentOptions
from edgeexit.runtime.device import DeviceOptions

KSERVE_PY = Path(__file__).resolve().parents[1] / ".venv-kserve" / "bin" / "python"
pytestmark = pytest.mark.skipif(
    not KSERVE_PY.exists(),
    reason="no .venv-kserve: `make setup` builds it (kserve 0.21 needs protobuf<7, so not in .venv)")
PROBE = Path(__file__).with_name("kserve_probe.py")


def run_probe(tmp_path: Path, target: str, model: str, ready: list[str], metadata: str | None,
              infers: list[tuple[str, str, np.ndarray, dict | None]]) -> tuple[dict, dict[str, np.ndarray]]:
    specs = []
    for k, (name, datatype, x, params) in enumerate(infers):
        np.save(tmp_path / f"in{k}.npy", x)
        specs.append({"name": name, "datatype": datatype, "npy": str(tmp_path / f"in{k}.npy"), "params": params})
    spec = {"target": target, "model": model, "ready": ready, "metadata": metadata, "infers": specs}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    r = subprocess.run([str(KSERVE_PY), str(PROBE), str(tmp_path / "spec.json"), str(tmp_path / "out.npz")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    with np.load(tmp_path / "out.npz") as f:
        return json.loads(str(f["report"])), {k: f[k] for k in f.files if k != "report"}


def triton_outputs(target: str, model: str, name: str, x: np.ndarray) -> dict[str, np.ndarray]:
    client = tc.InferenceServerClient(target)
    inp = tc.InferInput(name, list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    res = client.infer(model, [inp])
    client.close()
    return {o.name: res.as_numpy(o.name) for o in res.get_response().outputs}


def test_kserve_client_against_serve(serve, service_bundle, boundary_batch, tmp_path):
    server = serve()
    m = Bundle.load(service_bundle).manifest
    tail, name = f"{m.name}@0", m.split_points[0].tensor.name
    b = boundary_batch(0, 3)
    q = np.clip(np.rint(b), -128, 127).astype(np.int8)
    report, out = run_probe(tmp_path, server.target, tail, [tail, m.name, "nope"], tail, [
        (name, "FP32", b, None),
        # KServe's InferParameter has no double_param: an int8 scale travels only as an int64 ...
        (name, "INT8", q, {codec.P_SCALE: 1, codec.P_ZERO: 0}),
        # ... and a fractional one is refused by the client before anything is sent
        (name, "INT8", q, {codec.P_SCALE: 0.05, codec.P_ZERO: 0}),
    ])
    assert report["live"] and report["server_ready"]
    assert report["ready"] == {tail: True, m.name: True, "nope": False}  # false, not an error (README, wire)
    meta = report["metadata"]
    assert meta["name"] == tail and meta["inputs"][0][:2] == [name, "FP32"] and meta["versions"]
    assert meta["outputs"] == [f"exit{j}" for s in m.segments[1:] for j in s.exits]

    fp32, int8, frac = report["infers"]
    want = triton_outputs(server.target, tail, name, b)
    for k, v in want.items():
        np.testing.assert_allclose(out[f"0/{k}"], v, atol=1e-6)
    assert fp32["params"]["edgeexit.queue_us"] >= 0 and fp32["params"]["edgeexit.compute_us"] > 0
    want = triton_outputs(server.target, tail, name, q.astype(np.float32))
    for k, v in want.items():
        np.testing.assert_allclose(out[f"1/{k}"], v, atol=1e-5)
    assert "error" not in int8
    assert "invalid parameter value: 0.05" in frac["error"]


def test_kserve_client_against_a_real_agent(agent_bundle, raw_batch, tmp_path):
    agent = Agent(agent_bundle, AgentOptions(DeviceOptions(policy="never", split="device"),
                                             listen="127.0.0.1:0")).start()
    model = agent.runtime.model_name
    try:
        report, out = run_probe(tmp_path, agent.target, model, [model, "nope"], model,
                                [("input", "FP32", raw_batch, None)])
        assert report["live"] and report["server_ready"] and report["ready"] == {model: True, "nope": False}
        assert report["metadata"]["outputs"] == ["label", "probabilities", "exit", "decided"]
        want = triton_outputs(agent.target, model, "input", raw_batch)
        np.testing.assert_array_equal(out["0/label"], want["label"])
        np.testing.assert_allclose(out["0/probabilities"], want["probabilities"], atol=1e-6)
        assert report["infers"][0]["params"]["edgeexit.total_us"] > 0  # the agent's times are int64 too
    finally:
        agent.stop()
