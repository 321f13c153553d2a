"""The agent's hot path (issue 14): micro-batched concurrent device-only requests each get exactly their own answer
(equal to a single request), a failed batch fails only the request that broke it, and the cheaper exit loop
(``pending.decide``, vectorised ``Pending.answer``) answers what ``ExitPolicy.decide`` answers."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from edgeexit.errors import InvalidTensor
from edgeexit.policies import make_policy
from edgeexit.runtime.micro_batch import MicroBatcher
from edgeexit.runtime.pending import Pending, decide
from tests.fixtures_agent import input_shape


def _concurrently(fn, args: list) -> list:
    """fn(arg) for every arg on its own thread, all released at once; results (or exceptions) in order."""
    out: list = [None] * len(args)
    gate = threading.Barrier(len(args))

    def call(i: int) -> None:
        gate.wait()
        try:
            out[i] = fn(args[i])
        except Exception as e:  # noqa: BLE001 - returned for the test to check
            out[i] = e

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(args))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out


def test_micro_batcher_gives_each_caller_its_rows_and_really_batches():
    sizes: list[int] = []

    def run(x: np.ndarray) -> np.ndarray:
        sizes.append(len(x))
        time.sleep(0.02)  # long enough for the other callers to queue behind the running batch
        return x * 2.0

    mb = MicroBatcher(run, max_rows=8, lanes=1)
    inputs = [np.full((1 + i % 3, 2), float(i)) for i in range(12)]
    shares = _concurrently(mb.submit, inputs)
    for x, share in zip(inputs, shares, strict=True):
        np.testing.assert_array_equal(share.result[share.start:share.stop], x * 2.0)
    assert sum(sizes) == sum(len(x) for x in inputs)
    assert max(sizes) > 3 and len(sizes) < len(inputs)  # requests ran together
    assert max(sizes) <= 8  # never past max_rows


def test_micro_batcher_lanes_bound_the_batches_running_at_once():
    running, peak, lock = [0], [0], threading.Lock()

    def run(x: np.ndarray) -> np.ndarray:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.02)
        with lock:
            running[0] -= 1
        return x

    mb = MicroBatcher(run, max_rows=4, lanes=2)
    _concurrently(mb.submit, [np.zeros((1, 1)) for _ in range(16)])
    assert peak[0] == 2
    # and a lone request after the burst runs at once on the caller's thread (no leader left behind)
    assert mb.submit(np.ones((1, 1))).result[0, 0] == 1.0


def test_a_failed_batch_fails_only_the_request_that_broke_it():
    def run(x: np.ndarray) -> np.ndarray:
        time.sleep(0.01)
        if (x < 0).any():
            raise InvalidTensor("negative row")
        return x + 1

    mb = MicroBatcher(run, max_rows=16, lanes=1)
    inputs = [np.full((1, 1), -1.0 if i == 3 else float(i)) for i in range(8)]
    out = _concurrently(mb.submit, inputs)
    assert isinstance(out[3], InvalidTensor)
    for i, share in enumerate(out):
        if i != 3:
            assert share.result[share.start, 0] == i + 1


@pytest.mark.parametrize("kind", ["confidence", "entropy", "margin", "patience", "ensemble", "never"])
def test_decide_answers_what_the_policy_decides(kind):
    rng = np.random.default_rng(0)
    policy = make_policy(kind, [0.6, 0.5] if kind not in ("entropy",) else [0.3, 0.4])
    history = [rng.normal(0, 3, (64, 10)).astype(np.float32) for _ in range(3)]
    for j in range(3):
        final = j == 2
        want = policy.decide(history[: j + 1])
        got = decide(policy, history[: j + 1], final)
        want_mask = np.ones(64, bool) if final else np.asarray(want.mask, bool)
        if got is None:  # "never" before the final exit: no row can exit
            assert kind == "never" and not want_mask.any()
            continue
        mask, labels, probs = got
        np.testing.assert_array_equal(mask, want_mask)
        np.testing.assert_array_equal(labels[mask], np.asarray(want.labels)[mask])
        np.testing.assert_array_equal(probs[mask], np.asarray(want.probs)[mask])


def test_decide_still_refuses_non_finite_logits_and_too_many_exits():
    policy = make_policy("confidence", [0.5])
    bad = np.array([[0.0, np.nan]], np.float32)
    with pytest.raises(InvalidTensor, match="NaN"):
        decide(policy, [np.zeros((1, 2), np.float32), bad], True)
    with pytest.raises(Exception, match="calibrate the policy"):
        decide(policy, [np.zeros((1, 2), np.float32)] * 3, True)


def test_pending_answers_rows_where_they_are():
    pend = Pending(np.zeros((4, 1)), 3, make_policy("never", [None]))
    probs = np.eye(4, 3, dtype=np.float32)
    pend.history = [np.arange(12, dtype=np.float32).reshape(4, 3)]
    pend.answer(np.array([False, True, False, True]), np.array([0, 1, 2, 3]), probs, 0, "device")
    assert pend.rows.tolist() == [0, 2] and pend.history[0][:, 0].tolist() == [0.0, 6.0]
    pend.answer(np.array([True, True]), np.array([7, 8]), probs[:2], 1, "device-fallback")
    assert pend.empty
    assert pend.labels.tolist() == [7, 1, 8, 3] and pend.exits.tolist() == [1, 0, 1, 0]
    assert pend.decided == ["device-fallback", "device", "device-fallback", "device"]
    np.testing.assert_array_equal(pend.probs[[1, 3]], probs[[1, 3]])


def test_agent_micro_batched_requests_each_get_their_single_request_answer(agent_bundle):
    """A real agent (gRPC on loopback, split device): 16 apps at once, each answered exactly as when alone."""
    import grpc

    from edgeexit.runtime.agent import Agent, AgentOptions
    from edgeexit.runtime.device import DeviceOptions
    from edgeexit.runtime.oip_messages import outputs_from_pb, params_from_pb
    from edgeexit.runtime.proto import grpc_service_pb2 as pb
    from edgeexit.runtime.proto import grpc_service_pb2_grpc as pb_grpc

    shape = input_shape(agent_bundle)
    xs = [np.random.default_rng(i).random((1 + i % 2, *shape), dtype=np.float32) for i in range(16)]
    opts = AgentOptions(DeviceOptions(split="device"), listen="127.0.0.1:0", workers=16, micro_batch_rows=32)
    agent = Agent(agent_bundle, opts).start()
    sizes: list[int] = []
    infer = agent.runtime.infer

    def counted(x):
        sizes.append(len(x))
        time.sleep(0.01)  # let the other apps queue behind a running batch
        return infer(x)

    try:
        with grpc.insecure_channel(agent.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)

            def call(x):
                req = pb.ModelInferRequest(model_name=agent.runtime.model_name)
                req.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
                req.raw_input_contents.append(x.tobytes())
                resp = stub.ModelInfer(req, timeout=30)
                return outputs_from_pb(resp), params_from_pb(resp.parameters)

            alone = [call(x) for x in xs]
            agent.runtime.infer = counted
            together = _concurrently(call, xs)
    finally:
        agent.stop()
    assert max(sizes) > 2  # some requests really ran together
    for x, (a, _), got in zip(xs, alone, together, strict=True):
        assert not isinstance(got, Exception), got
        b, params = got
        for name in ("label", "exit", "decided"):
            np.testing.assert_array_equal(b[name], a[name])
        assert len(b["label"]) == len(x)
        np.testing.assert_allclose(b["probabilities"], a["probabilities"], rtol=1e-5, atol=1e-6)
        assert params["edgeexit.total_us"] >= params["edgeexit.device_us"] > 0
