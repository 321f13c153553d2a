"""Issue 17, small things a new user trips on: calibrate on a user's .npz (used whole, rows counted, rows
needed), wire errors that fit the model they are sent to (serve and agent), ModelReady on an unknown model."""

from __future__ import annotations

import shutil

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc

from edgeexit.bundle import Bundle
from edgeexit.calibration import CalibrationOptions, calibrate
from edgeexit.cli import main
from edgeexit.runtime.agent import Agent, AgentOptions
from edgeexit.runtime.device import DeviceOptions
from edgeexit.runtime.proto import grpc_service_pb2 as pb
from edgeexit.runtime.proto import grpc_service_pb2_grpc as pb_grpc
from tests.fixtures_bundles import digits_28
from tests.fixtures_policies import exit_manifest


@pytest.fixture
def my_npz(tmp_path):
    """300 rows shaped like the tiny bundle's input (digits upsampled to 28x28), as a user saves them."""
    from sklearn.datasets import load_digits

    y = load_digits().target[np.random.default_rng(0).permutation(1797)[:300]]  # digits_28's rows, seed 0
    path = tmp_path / "my.npz"
    np.savez(path, x=digits_28(300).astype(np.float32), y=y.astype(np.int64))
    return path


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    return shutil.copytree(tiny_bundle, tmp_path / "tiny.edgeexit")


def test_calibrate_uses_a_user_file_whole_and_says_how_many_rows(bundle_copy, my_npz, capsys):
    assert main(["calibrate", str(bundle_copy), "--data", str(my_npz), "--no-progress"]) == 0
    cap = capsys.readouterr()
    assert f"calibrating on 300 rows: all of {my_npz}" in cap.out
    need = CalibrationOptions().rows_needed()  # epsilon 0.01, delta 0.05, pareto: 428
    assert need > 300 and f"need at least {need} rows" in cap.out  # said before the work
    assert f"need at least {need} calibration rows (pareto scheme) and 300 were given" in cap.err
    assert Bundle.load(bundle_copy).manifest.policy["calibration"] == {"split": "all", "n": 300,
                                                                      "dataset": str(my_npz)}

    # asked for: the fixed 10% carve, said so
    assert main(["calibrate", str(bundle_copy), "--data", str(my_npz), "--split", "val", "--epsilon", "0.5",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"calibrating on 30 rows: the 'val' carve of {my_npz}" in out and "omit --split" in out
    assert Bundle.load(bundle_copy).manifest.policy["calibration"]["n"] == 30


def test_a_named_dataset_keeps_its_splits(bundle_copy, capsys):
    assert main(["calibrate", str(bundle_copy), "--data", "digits", "--split", "all", "--no-progress"]) == 2
    assert "named datasets keep their train, val, test splits" in capsys.readouterr().err
    assert main(["calibrate", str(bundle_copy), "--data", "digits-28", "--limit", "100", "--epsilon", "0.5",
                 "--no-progress"]) == 0
    assert "calibrating on 100 rows: the first 100 of the 'val' split of digits-28" in capsys.readouterr().out


@pytest.mark.parametrize("scheme", ["pareto", "shared"])
def test_rows_needed_is_the_exact_threshold(scheme):
    """With every exit agreeing (zero losses), calibration passes at rows_needed() rows and not one fewer."""
    opts = CalibrationOptions(epsilon=0.02, delta=0.05, scheme=scheme)
    need = opts.rows_needed()
    for n, passes in ((need, True), (need - 1, False)):
        logits = [np.random.default_rng(1).normal(size=(n, 10)).astype(np.float32)] * 3
        res = calibrate(logits, exit_manifest(3), opts)
        assert res.calibrated is passes, res.message
        assert (f"need at least {need} calibration rows" in res.message) is not passes


# ---- wire errors that fit the model ---------------------------------------------------------------------

def _fp64_error(target: str, model: str, name: str, shape: list[int]) -> tc.InferenceServerException:
    client = tc.InferenceServerClient(target)
    inp = tc.InferInput(name, shape, "FP64")
    inp.set_data_from_numpy(np.full(shape, 0.5, np.float64))
    with pytest.raises(tc.InferenceServerException) as e:
        client.infer(model, [inp])
    client.close()
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
    return e.value


def test_fp64_pixels_and_boundaries_get_messages_that_fit(serve, service_bundle, boundary_batch):
    server = serve()
    m = Bundle.load(service_bundle).manifest
    msg = _fp64_error(server.target, m.name, m.input.name, [2, 1, 28, 28]).message()
    assert "raw [0, 1] pixels as FP32, FP16 or UINT8" in msg and "not FP64" in msg and "boundary" not in msg
    b = boundary_batch(0, 2)
    msg = _fp64_error(server.target, f"{m.name}@0", m.split_points[0].tensor.name, list(b.shape)).message()
    assert "the boundary tensor as FP32, FP16 or INT8" in msg and "pixels" not in msg


def test_the_agents_fp64_message_fits_its_input(agent_bundle):
    agent = Agent(agent_bundle, AgentOptions(DeviceOptions(policy="never", split="device"),
                                             listen="127.0.0.1:0")).start()
    try:
        msg = _fp64_error(agent.target, agent.runtime.model_name, "input", [1, 1, 28, 28]).message()
        assert "input 'input' takes raw [0, 1] pixels as FP32 or FP16, not FP64" in msg
    finally:
        agent.stop()


# ---- ModelReady on an unknown model: ready=false, as Triton -------------------------------------------

def test_model_ready_on_an_unknown_model_or_version_is_false(serve, service_bundle):
    server = serve()
    tail = f"{Bundle.load(service_bundle).name}@0"
    client = tc.InferenceServerClient(server.target)
    try:
        assert client.is_model_ready(tail) and not client.is_model_ready("nope")
        assert not client.is_model_ready(tail, "7")  # a version not served: false too, not an error
    finally:
        client.close()
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert not stub.ModelReady(pb.ModelReadyRequest(name="nope"), timeout=10).ready
        assert not stub.ModelReady(pb.ModelReadyRequest(name=tail, version="7"), timeout=10).ready
        with pytest.raises(grpc.RpcError) as e:  # the other calls on an unknown model stay NOT_FOUND
            stub.ModelMetadata(pb.ModelMetadataRequest(name="nope"), timeout=10)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND and tail in e.value.details()
