"""Execution providers on the cloud side (`edgeexit serve --providers`): names checked, resolved against this
onnxruntime in the order asked with CPU last, a missing one warned once, the sessions' real providers logged;
a real `serve --providers cuda,cpu` process answers on the CPU here. The CUDA test runs only where onnxruntime
has CUDA (a GPU machine with edgeexit[gpu]); elsewhere it is skipped, saying why."""

from __future__ import annotations

import json
import logging

import numpy as np
import onnxruntime as ort
import pytest

from edgeexit.cli import main
from edgeexit.errors import ConfigError
from edgeexit.runtime import codec
from edgeexit.runtime.backends import CPU, parse_providers, resolve_providers
from edgeexit.runtime.client import InferenceClient
from edgeexit.runtime.runner import SegmentRunner
from edgeexit.runtime.service import ServiceOptions, build_handlers
from edgeexit.testbed.harness import launch

CUDA, TRT = "CUDAExecutionProvider", "TensorrtExecutionProvider"
HAS_CUDA = CUDA in ort.get_available_providers()
FALLBACK = "CUDA requested but this onnxruntime has no CUDAExecutionProvider"


def pixels(runner: SegmentRunner, rows: int = 3) -> np.ndarray:
    shape = [int(d) for d in runner.manifest.input.shape[1:]]
    return np.random.default_rng(0).random((rows, *shape), dtype=np.float32)


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_names_are_checked_and_kept_in_order():
    assert parse_providers("CUDA, tensorrt,cpu,cuda") == ("cuda", "tensorrt", "cpu")
    for bad in ("gpu", "cuda,rocm", ""):
        with pytest.raises(ConfigError, match="choose from cuda, tensorrt, cpu"):
            parse_providers(bad)


def test_serve_refuses_an_unknown_provider_before_loading(tiny_bundle, capsys):
    assert main(["serve", str(tiny_bundle), "--port", "0", "--providers", "cuda,gpu"]) == 2
    err = capsys.readouterr().err
    assert "'gpu'" in err and "cuda, tensorrt, cpu" in err


def test_available_ones_in_the_order_asked_then_cpu(caplog):
    have = [TRT, CUDA, CPU]
    assert resolve_providers(["cuda", "tensorrt"], available=have) == [CUDA, TRT, CPU]
    assert resolve_providers(["tensorrt", "cpu", "cuda"], available=have, device_id=1) == [
        (TRT, {"device_id": "1"}), (CUDA, {"device_id": "1"}), CPU]
    assert not warnings_of(caplog)
    # A build with CUDA but without TensorRT: TensorRT is skipped, and the warning says CUDA runs instead.
    assert resolve_providers(["tensorrt", "cuda", "cpu"], available=[CUDA, CPU]) == [CUDA, CPU]
    assert warnings_of(caplog) == [
        "TensorRT requested but this onnxruntime has no TensorrtExecutionProvider (install edgeexit[gpu] on a "
        "machine with CUDA 13 and cuDNN 9; see the README's GPU section); falling back to CUDA"]


def test_missing_provider_warned_once_per_runner_and_sessions_run_on_cpu(tiny_bundle, caplog):
    if HAS_CUDA:
        pytest.skip("this onnxruntime has CUDAExecutionProvider: the fallback cannot be shown")
    caplog.set_level(logging.INFO)
    runner = SegmentRunner(tiny_bundle, providers=("cuda", "cpu"))
    assert runner.providers == [CPU]
    for k in range(runner.num_segments):
        assert runner.session(k).providers == [CPU]  # what onnxruntime really opened
    said = warnings_of(caplog)
    assert len(said) == 1 and said[0].startswith(FALLBACK) and said[0].endswith("falling back to CPU"), said
    x = runner.normalize(pixels(runner))
    want = SegmentRunner(tiny_bundle).run_all(x)
    for got, ref in zip(runner.run_all(x), want, strict=True):
        np.testing.assert_array_equal(got, ref)


@pytest.mark.filterwarnings("ignore:Specified provider:UserWarning")  # onnxruntime says it too
def test_a_session_that_did_not_get_a_provider_says_so(tiny_bundle, caplog, monkeypatch):
    """A GPU wheel without CUDA's libraries lists CUDA as available, then opens sessions on the CPU: here the
    CPU wheel is told CUDA is available, and really opens the sessions without it."""
    if HAS_CUDA:
        pytest.skip("this onnxruntime has CUDAExecutionProvider: it would not drop it")
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    caplog.set_level(logging.INFO)
    handlers = build_handlers(tiny_bundle, ServiceOptions(providers=("cuda", "cpu")))
    try:
        runner = handlers[0].runner
        assert runner.providers == [CUDA, CPU] and runner.session_providers == [CPU]
        lost = [m for m in warnings_of(caplog) if "asked onnxruntime for ['CUDAExecutionProvider']" in m]
        assert len(lost) == 1 and "runs on ['CPUExecutionProvider']" in lost[0], warnings_of(caplog)
        logged = [r for r in caplog.records if getattr(r, "event", None) == "session_providers"]
        assert [r.fields["providers"] for r in logged] == [[CPU]]  # said once: every session got the same
    finally:
        for h in handlers:
            h.close()


def test_litert_takes_no_gpu_provider(tiny_bundle):
    with pytest.raises(ConfigError, match="onnxruntime backend"):
        SegmentRunner(tiny_bundle, backend="litert", fmt="tflite", providers=("cuda", "cpu"))


@pytest.mark.slow
def test_real_serve_with_cuda_asked_answers_on_cpu_and_logs_it(tiny_bundle, tmp_path):
    if HAS_CUDA:
        pytest.skip("this onnxruntime has CUDAExecutionProvider: there is no fallback to show")
    runner = SegmentRunner(tiny_bundle)
    x = pixels(runner)
    want = runner.run_all(runner.normalize(x))
    with launch("serve-cuda", ["serve", str(tiny_bundle), "--port", "0", "--providers", "cuda,cpu"], tmp_path) as p, \
            InferenceClient(p.target) as c:
        got = c.infer(runner.manifest.name, "input", codec.encode(x), timeout=10).outputs
        for j, ref in enumerate(want):
            np.testing.assert_allclose(got[f"exit{j}"], ref, atol=1e-5)
    lines = [json.loads(line) for line in p.log().splitlines() if line.startswith("{")]
    fallback = [e for e in lines if e["level"] == "warning" and FALLBACK in e.get("msg", "")]
    assert len(fallback) == 1 and "falling back to CPU" in fallback[0]["msg"]
    ready = next(e for e in lines if e["event"] == "ready")
    assert ready["providers"] == [CPU]


@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime's CUDAExecutionProvider (edgeexit[gpu] on a machine "
                                         "with an NVIDIA GPU, CUDA 13 and cuDNN 9); this onnxruntime has "
                                         f"{ort.get_available_providers()}")
def test_cuda_sessions_answer_as_cpu(tiny_bundle):
    gpu, cpu = SegmentRunner(tiny_bundle, providers=("cuda", "cpu")), SegmentRunner(tiny_bundle)
    assert gpu.session(0).providers[0] == CUDA, "CUDA is available but the session did not get it"
    x = gpu.normalize(pixels(gpu, 8))
    for got, ref in zip(gpu.run_all(x), cpu.run_all(x), strict=True):
        np.testing.assert_allclose(got, ref, atol=1e-4)
