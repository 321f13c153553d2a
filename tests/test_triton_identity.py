"""Triton repositories on GPUs and with the bundle's identity (issue 12 §3, §4).

Fast: `edgeexit triton-repo --kind gpu / --gpus / --accelerator` configs parsed with Triton's ModelConfig schema
(tritonclient ships it), the digest in every config and the README. Slow: a REAL Triton (the pytriton wheel's
tritonserver 2.51, CPU) on a python-flavour repository answers a request naming its bundle, refuses one naming
another (UNSUPPORTED -> gRPC UNIMPLEMENTED, the served digest in the message; the agent's client raises
BundleMismatch) and serves one naming none. No GPU
here: KIND_GPU repositories are checked as configs only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.utils import InferenceServerException

from edgeexit.bundle import Bundle
from edgeexit.cli import main
from edgeexit.errors import BundleMismatch, ConfigError
from edgeexit.exporters.triton_repo import RepoOptions, write_repository
from edgeexit.runtime import codec
from edgeexit.runtime.client import InferenceClient
from edgeexit.runtime.oip_messages import P_BUNDLE
from edgeexit.runtime.runner import SegmentRunner
from edgeexit.testbed.harness import free_port, launch

GPU = mc.ModelInstanceGroup.KIND_GPU


def configs(repo: Path) -> dict[str, mc.ModelConfig]:
    return {d.name: text_format.Parse((d / "config.pbtxt").read_text(), mc.ModelConfig())
            for d in sorted(repo.iterdir()) if d.is_dir()}


def test_python_flavour_on_gpus_asks_onnxruntime_for_them(tiny_bundle, tmp_path):
    digest = Bundle.load(tiny_bundle).digest
    write_repository(tiny_bundle, tmp_path / "r", RepoOptions(kind="gpu", instances=2))
    got = configs(tmp_path / "r")
    assert len(got) == 3
    for c in got.values():
        assert [(g.kind, g.count, list(g.gpus)) for g in c.instance_group] == [(GPU, 2, [])]  # every GPU
        assert c.parameters["edgeexit.providers"].string_value == "tensorrt,cuda,cpu"
        assert c.parameters[P_BUNDLE].string_value == digest
        assert not c.optimization.execution_accelerators.gpu_execution_accelerator  # onnx flavour only
    readme = (tmp_path / "r" / "README.md").read_text()
    assert digest in readme and "KIND_GPU" in readme and "UNIMPLEMENTED" in readme


def test_onnx_flavour_on_named_gpus_with_tensorrt_or_cuda(tiny_bundle, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["triton-repo", str(tiny_bundle), "--out", str(out), "--flavour", "onnx", "--gpus", "0,1"]) == 0
    assert "on GPUs" in capsys.readouterr().out
    digest = Bundle.load(tiny_bundle).digest
    for c in configs(out).values():
        assert [(g.kind, list(g.gpus)) for g in c.instance_group] == [(GPU, [0, 1])]
        accel = c.optimization.execution_accelerators.gpu_execution_accelerator
        assert [a.name for a in accel] == ["tensorrt"]
        assert c.parameters[P_BUNDLE].string_value == digest
    assert "**The onnx flavour cannot check it**" in (out / "README.md").read_text()
    assert main(["triton-repo", str(tiny_bundle), "--out", str(out), "--flavour", "onnx", "--kind", "gpu",
                 "--accelerator", "cuda", "--force"]) == 0
    for c in configs(out).values():  # CUDA is what the onnxruntime backend runs on a GPU instance anyway
        assert c.instance_group[0].kind == GPU and not c.HasField("optimization")


def test_cpu_is_the_default_and_bad_gpus_are_refused(tiny_bundle, tmp_path, capsys):
    write_repository(tiny_bundle, tmp_path / "r", RepoOptions())
    for c in configs(tmp_path / "r").values():
        assert c.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU and not c.instance_group[0].gpus
        assert c.parameters["edgeexit.providers"].string_value == "cpu"
    for gpus in ([-1], [0, 0], []):
        with pytest.raises(ConfigError, match="--gpus"):
            write_repository(tiny_bundle, tmp_path / "x", RepoOptions(gpus=gpus))
    assert main(["triton-repo", str(tiny_bundle), "--out", str(tmp_path / "y"), "--gpus", "zero"]) == 2
    assert "GPU indices" in capsys.readouterr().err


@pytest.fixture(scope="module")
def triton_fp32(tiny_bundle, tmp_path_factory):
    """`edgeexit triton` on the tiny bundle's python-flavour repository, every boundary FP32."""
    tmp = tmp_path_factory.mktemp("triton_identity")
    write_repository(tiny_bundle, tmp / "repo", RepoOptions(encoding="fp32", raw_input="fp32"))
    ports = [str(free_port()) for _ in range(3)]
    proc = launch("triton", ["triton", str(tmp / "repo"), "--grpc-port", ports[0], "--http-port", ports[1],
                             "--metrics-port", ports[2]], tmp)
    yield proc
    assert proc.stop(timeout=60) == 0, proc.log()[-3000:]


@pytest.mark.slow
def test_triton_python_models_check_the_bundle(triton_fp32, tiny_bundle):
    runner = SegmentRunner(tiny_bundle)
    digest, model = runner.bundle.digest, f"{runner.manifest.name}@1"
    shape = [int(d) for d in runner.manifest.input.shape[1:]]
    x = runner.normalize(np.random.default_rng(1).random((2, *shape), dtype=np.float32))
    b1 = runner.run(x, 0, 2).boundary
    want = runner.run(b1, start=2).exits[2]
    t = tc.InferenceServerClient(triton_fp32.target)
    assert t.get_model_config(model).config.parameters[P_BUNDLE].string_value == digest  # visible over the wire
    inp = tc.InferInput("boundary1", list(b1.shape), "FP32")
    inp.set_data_from_numpy(b1)
    for params in ({P_BUNDLE: digest}, {P_BUNDLE: digest.upper()}, {}):  # its own digest, or none: served
        np.testing.assert_allclose(t.infer(model, [inp], parameters=params).as_numpy("exit2"), want, atol=1e-5)
    other = "0" * 64
    with pytest.raises(InferenceServerException) as refused:
        t.infer(model, [inp], parameters={P_BUNDLE: other})
    assert refused.value.status() == "StatusCode.UNIMPLEMENTED"
    assert f"runs bundle {digest[:12]}" in refused.value.message() and "'000000000000'" in refused.value.message()
    t.close()
    # What the agent's client sees: BundleMismatch with the served digest (it answers on the device, reason bundle).
    with InferenceClient(triton_fp32.target) as c:
        wire = codec.encode(b1)
        wire.params[P_BUNDLE] = other
        with pytest.raises(BundleMismatch, match=f"runs bundle {digest[:12]}") as seen:
            c.infer(model, "boundary1", wire, timeout=10)
        assert seen.value.served == digest[:12]
        wire.params[P_BUNDLE] = digest
        np.testing.assert_allclose(c.infer(model, "boundary1", wire, timeout=10).outputs["exit2"], want, atol=1e-5)
