"""A REAL Triton (the nvidia-pytriton wheel's tritonserver 2.51, started by `edgeexit triton` as a process) on a
repository from `edgeexit triton-repo`: an unmodified tritonclient calls every model, an unmodified `edgeexit
agent` offloads to it, the answers equal `edgeexit serve`'s, bad tensors get INVALID_ARGUMENT with our message,
and concurrent offloads are batched (Triton's own metrics). `make setup` installs the server and the models'
environment (.venv-triton); nothing is installed here.

Batching is shown with 16 concurrent offloading clients (the agent's own InferenceClient and codec, one channel
each), not 16 agent processes, which 2 cores cannot start and run in a test's time.
"""

from __future__ import annotations

import re
import threading
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as tc

from edgeexit.errors import InvalidTensor
from edgeexit.exporters.triton_repo import RepoOptions, write_repository
from edgeexit.policies import softmax
from edgeexit.runtime import codec
from edgeexit.runtime.client import InferenceClient
from edgeexit.runtime.runner import SegmentRunner
from edgeexit.testbed.harness import AgentClient, free_port, launch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def triton(agent_bundle, tmp_path_factory):
    """`edgeexit triton` on the tiny bundle's repository: split 0 travels INT8, split 1 FP32, raw pixels UINT8."""
    tmp = tmp_path_factory.mktemp("triton")
    write_repository(agent_bundle, tmp / "repo", RepoOptions(encoding={0: "int8", 1: "fp32"}, raw_input="uint8"))
    ports = {k: free_port() for k in ("grpc", "http", "metrics")}
    proc = launch("triton", ["triton", str(tmp / "repo"), "--grpc-port", str(ports["grpc"]), "--http-port",
                             str(ports["http"]), "--metrics-port", str(ports["metrics"])], tmp)
    proc.ports = ports
    yield proc
    assert proc.stop(timeout=60) == 0, proc.log()[-3000:]  # SIGTERM forwarded; Triton exits, ports free


@pytest.fixture(scope="module")
def runner(agent_bundle) -> SegmentRunner:
    return SegmentRunner(agent_bundle)


def pixels(runner: SegmentRunner, rows: int, seed: int = 0) -> np.ndarray:
    """Raw pixels on the k/255 grid (what 8-bit cameras give): they travel as UINT8."""
    shape = [int(d) for d in runner.manifest.input.shape[1:]]
    return np.rint(np.random.default_rng(seed).random((rows, *shape), dtype=np.float32) * 255) / 255


def boundary(runner: SegmentRunner, split: int, rows: int, seed: int = 0) -> np.ndarray:
    return runner.run(runner.normalize(pixels(runner, rows, seed)), 0, split + 1).boundary


def tc_input(name: str, x: np.ndarray, datatype: str) -> tc.InferInput:
    inp = tc.InferInput(name, list(x.shape), datatype)
    inp.set_data_from_numpy(x)
    return inp


def test_tritonclient_calls_every_model_and_answers_equal_serve(triton, cloud, runner):
    name = runner.manifest.name
    t, s = tc.InferenceServerClient(triton.target), tc.InferenceServerClient(cloud.target)
    assert t.is_server_ready() and all(t.is_model_ready(m) for m in (name, f"{name}@0", f"{name}@1"))
    for model in (name, f"{name}@0", f"{name}@1"):
        tm, sm = t.get_model_metadata(model), s.get_model_metadata(model)
        assert [(i.name, list(i.shape)) for i in tm.inputs] == [(i.name, list(i.shape)) for i in sm.inputs]
        assert [(o.name, o.datatype, list(o.shape)) for o in tm.outputs] == [
            (o.name, o.datatype, list(o.shape)) for o in sm.outputs]
    x = pixels(runner, 3)
    b0, b1 = boundary(runner, 0, 3), boundary(runner, 1, 3)
    q = runner.manifest.split_points[0].quantization
    w0 = codec.encode(b0, "int8", q)
    # tritonclient 2.41 refuses float parameters, so it sends the scale as an int64 (which the codec takes for
    # clients without doubles): the answer is not the bundle's, but Triton's and serve's must still agree.
    # The agent test below sends the real calibrated scale as a double.
    params0 = {codec.P_SCALE: 1, codec.P_ZERO: int(w0.params[codec.P_ZERO])}
    calls = [
        (name, tc_input("input", codec.pixel_levels(x), "UINT8"), {}),
        (f"{name}@0", tc_input("boundary0", np.frombuffer(w0.data, np.int8).reshape(b0.shape), "INT8"), params0),
        (f"{name}@1", tc_input("boundary1", b1, "FP32"), {}),
    ]
    exact = runner.run(runner.normalize(x)).exits
    for model, inp, params in calls:
        got, want = t.infer(model, [inp], parameters=params), s.infer(model, [inp], parameters=params)
        outs = [o.name for o in got.get_response().outputs]
        assert outs == [o.name for o in want.get_response().outputs] and outs
        for o in outs:
            np.testing.assert_allclose(got.as_numpy(o), want.as_numpy(o), atol=1e-5)
            if model != f"{name}@0":  # fp32 and lossless pixels: the bundle's own answer
                np.testing.assert_allclose(got.as_numpy(o), exact[int(o[4:])], atol=1e-5)
    t.close()
    s.close()


def test_bad_tensors_get_invalid_argument_with_our_message(triton, runner):
    name = runner.manifest.name
    b0, b1 = boundary(runner, 0, 2), boundary(runner, 1, 2)
    with InferenceClient(triton.target) as c:
        no_scale = codec.encode(b0, "int8", runner.manifest.split_points[0].quantization)
        no_scale.params.clear()
        with pytest.raises(InvalidTensor, match="without 'edgeexit.scale'"):
            c.infer(f"{name}@0", "boundary0", no_scale, timeout=10)
        nan = np.full_like(b1, np.nan)
        with pytest.raises(InvalidTensor, match="NaN or inf"):
            c.infer(f"{name}@1", "boundary1", codec.encode(nan), timeout=10)
        # What Triton itself refuses before the model: another datatype than the repository's, and zstd.
        with pytest.raises(InvalidTensor, match="expects 'FP32'"):
            c.infer(f"{name}@1", "boundary1", codec.encode(b1, "fp16"), timeout=10)
        with pytest.raises(InvalidTensor, match="byte size mismatch"):
            c.infer(f"{name}@1", "boundary1", codec.encode(b1, compress=True), timeout=10)
        # A good request still works after the bad ones (errors are per request, not per batch).
        assert c.infer(f"{name}@1", "boundary1", codec.encode(b1), timeout=10)["exit2"].shape == (2, 10)


@pytest.mark.parametrize("split,encoding", [("0", "int8"), ("cloud", "fp32")])
def test_unmodified_agent_offloads_to_triton_like_to_serve(triton, cloud, runner, agent_bundle, tmp_path, split,
                                                           encoding):
    x = pixels(runner, 6, seed=3)
    answers = {}
    for label, target in (("triton", triton.target), ("serve", cloud.target)):
        args = ["agent", str(agent_bundle), "--cloud", target, "--split", split, "--encoding", encoding,
                "--policy", "never", "--listen", "127.0.0.1:0"]
        with launch(f"agent-{label}-{split}", args, tmp_path) as agent, \
                AgentClient(agent.target, runner.manifest.name) as app:
            answers[label] = app.infer(x)
    assert answers["triton"].decided == ["cloud"] * len(x), answers["triton"].params
    np.testing.assert_allclose(answers["triton"].probabilities, answers["serve"].probabilities, atol=1e-5)
    assert (answers["triton"].labels == answers["serve"].labels).all()
    # And both are the bundle's answer: exactly for fp32 and lossless pixels, within int8's rounding otherwise
    # (the calibrated scale and zero point really reached the Triton model: without them, no answer at all).
    final = runner.run(runner.normalize(x)).exits[len(runner.manifest.exits) - 1]
    atol = 1e-5 if encoding == "fp32" else 1e-2
    np.testing.assert_allclose(answers["triton"].probabilities, softmax(final), atol=atol)


def metric(body: str, name: str, model: str) -> float:
    m = re.search(rf'^{name}{{model="{re.escape(model)}",version="1"}} (\S+)$', body, re.M)
    assert m, f"{name} for {model} missing from Triton's metrics"
    return float(m.group(1))


def test_concurrent_offloads_are_batched(triton, runner):
    model, clients, per_client = f"{runner.manifest.name}@1", 16, 12
    url = f"http://127.0.0.1:{triton.ports['metrics']}/metrics"

    def counts() -> tuple[float, float]:
        body = urllib.request.urlopen(url, timeout=5).read().decode()
        return metric(body, "nv_inference_request_success", model), metric(body, "nv_inference_exec_count", model)

    b1 = boundary(runner, 1, clients)
    want = runner.run(b1, start=2).exits[2]
    ok0, exec0 = counts()
    errors: list[str] = []
    start = threading.Barrier(clients)

    def offload(i: int) -> None:
        with InferenceClient(triton.target) as c:  # its own channel, as each device has
            start.wait()
            for _ in range(per_client):
                got = c.infer(model, "boundary1", codec.encode(b1[i:i + 1]), timeout=30)["exit2"]
                if not np.allclose(got, want[i:i + 1], atol=1e-5):
                    errors.append(f"client {i}: wrong answer")

    threads = [threading.Thread(target=offload, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    ok1, exec1 = counts()
    requests, executions = ok1 - ok0, exec1 - exec0
    assert requests == clients * per_client
    assert executions <= requests / 3, f"{requests:.0f} requests ran in {executions:.0f} executions: not batched"
