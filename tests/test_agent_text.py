"""The agent with a multi-input text model (MiniLM: INT64 input_ids + attention_mask), called by an unmodified
tritonclient the way an app would (its own `tokenizers` tokenizer): device-only with and without early exits,
split with a real in-process `edgeexit serve`, and bad inputs refused while the agent keeps serving."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as tc

from edgeexit import text_data
from edgeexit.policies import make_policy, softmax
from edgeexit.runtime.agent import Agent, AgentOptions
from edgeexit.runtime.decided import CLOUD, DECIDED_CODES, DEVICE
from edgeexit.runtime.device import DeviceOptions
from edgeexit.runtime.runner import SegmentRunner
from tests.fixtures_text import needs_minilm

pytestmark = needs_minilm
SEQ_LENS = (12, 40)  # two padded lengths: the first truncates most docstrings, the second pads many


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return text_data.load_texts("test", 5)[0]


def tokenize(texts: list[str], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """As an app does it: the model's tokenizer.json through the `tokenizers` package, padded to ``seq_len``."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(text_data.tokenizer_path()))
    tok.enable_truncation(max_length=seq_len)
    tok.enable_padding(length=seq_len)
    encs = tok.encode_batch(texts)
    return (np.array([e.ids for e in encs], np.int64), np.array([e.attention_mask for e in encs], np.int64))


@pytest.fixture(scope="module")
def runner(minilm_bundle) -> SegmentRunner:
    return SegmentRunner(minilm_bundle)


def local_exits(runner: SegmentRunner, ids: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
    return runner.run_all(ids, {"attention_mask": mask})


def start_agent(bundle, **device) -> tuple[Agent, tc.InferenceServerClient]:
    agent = Agent(bundle, AgentOptions(DeviceOptions(**device), listen="127.0.0.1:0")).start()
    return agent, tc.InferenceServerClient(agent.target)


def send(client: tc.InferenceServerClient, model: str, tensors: list[tuple[str, np.ndarray, str]]):
    inputs = []
    for name, a, datatype in tensors:
        inp = tc.InferInput(name, list(a.shape), datatype)
        inp.set_data_from_numpy(a)
        inputs.append(inp)
    return client.infer(model, inputs)


def text_inputs(ids: np.ndarray, mask: np.ndarray) -> list[tuple[str, np.ndarray, str]]:
    return [("input_ids", ids, "INT64"), ("attention_mask", mask, "INT64")]


@pytest.fixture(scope="module")
def device_agent(minilm_bundle):
    agent, client = start_agent(minilm_bundle, policy="never", split="device")
    yield agent, client
    client.close()
    agent.stop()


@pytest.fixture(scope="module")
def cloud(minilm_bundle):
    """A real in-process `edgeexit serve` of the MiniLM bundle on a free loopback port."""
    from edgeexit.runtime.oip_server import ServerOptions, build_server
    from edgeexit.runtime.service import build_handlers

    handle = build_server(build_handlers(minilm_bundle), ServerOptions()).start()
    yield handle
    handle.stop(1.0)


def test_metadata_lists_every_input_with_its_datatype(device_agent):
    agent, client = device_agent
    meta = client.get_model_metadata(agent.runtime.model_name)
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("input_ids", "INT64", [-1, -1]), ("attention_mask", "INT64", [-1, -1])]
    assert [o.name for o in meta.outputs] == ["label", "probabilities", "exit", "decided"]


@pytest.mark.parametrize("seq_len", SEQ_LENS)
@pytest.mark.parametrize("rows", [1, 5])
def test_tritonclient_gets_the_local_final_exit(device_agent, runner, texts, seq_len, rows):
    agent, client = device_agent
    ids, mask = tokenize(texts[:rows], seq_len)
    assert ids.shape == (rows, seq_len)
    res = send(client, agent.runtime.model_name, text_inputs(ids, mask))
    final = local_exits(runner, ids, mask)[-1]
    np.testing.assert_allclose(res.as_numpy("probabilities"), softmax(final), atol=1e-5)
    assert (res.as_numpy("label") == final.argmax(1)).all()
    assert (res.as_numpy("exit") == len(runner.manifest.exits) - 1).all()
    assert (res.as_numpy("decided") == DECIDED_CODES[DEVICE]).all()


def test_early_exits_answer_from_the_exit_that_decided(minilm_bundle, runner, texts):
    ids, mask = tokenize(texts, SEQ_LENS[1])
    exits = local_exits(runner, ids, mask)
    conf = [softmax(e).max(1) for e in exits[:-1]]
    # Thresholds between two rows' confidences (never on one): about half the rows leave at each early exit.
    thresholds = [float(np.sort(c)[2:4].mean()) for c in conf]
    want = np.array([next((j for j, c in enumerate(conf) if c[i] >= thresholds[j]), len(exits) - 1)
                     for i in range(len(ids))])
    assert (want < len(exits) - 1).any()
    agent, client = start_agent(minilm_bundle, policy=make_policy("confidence", thresholds), split="device")
    try:
        res = send(client, agent.runtime.model_name, text_inputs(ids, mask))
    finally:
        client.close()
        agent.stop()
    assert (res.as_numpy("exit") == want).all()
    expected = np.stack([softmax(exits[j])[i] for i, j in enumerate(want)])
    np.testing.assert_allclose(res.as_numpy("probabilities"), expected, atol=1e-5)


@pytest.mark.parametrize("split", ["cloud", 2])
def test_split_through_a_real_service_equals_the_local_run(minilm_bundle, cloud, runner, texts, split):
    agent, client = start_agent(minilm_bundle, policy="never", split=split, cloud=cloud.target)
    try:
        for seq_len in SEQ_LENS:
            ids, mask = tokenize(texts, seq_len)
            assert seq_len == SEQ_LENS[0] or (mask == 0).any()  # padded rows: the mask matters on both sides
            res = send(client, agent.runtime.model_name, text_inputs(ids, mask))
            final = local_exits(runner, ids, mask)[-1]
            np.testing.assert_allclose(res.as_numpy("probabilities"), softmax(final), atol=1e-4)
            assert (res.as_numpy("label") == final.argmax(1)).all()
            assert (res.as_numpy("decided") == DECIDED_CODES[CLOUD]).all()
            params = res.get_response().parameters
            assert params["edgeexit.split"].string_param == str(split)
            # the offload carried the mask too: at least ids/boundary + the INT64 mask's bytes
            assert params["edgeexit.bytes_sent"].int64_param > mask.nbytes
    finally:
        client.close()
        agent.stop()


def _bad_inputs(ids: np.ndarray, mask: np.ndarray) -> dict[str, tuple[list, str]]:
    long = np.ones((1, text_data.MAX_SEQ_LEN + 1), np.int64)
    return {
        "ids as FP32": ([("input_ids", ids.astype(np.float32), "FP32"), ("attention_mask", mask, "INT64")],
                        "FP32 but this input takes INT64"),
        "mask shape": (text_inputs(ids, np.ascontiguousarray(mask[:, :-3])), "'seq' axis is .* must match"),
        "mask rows": (text_inputs(ids, np.ascontiguousarray(mask[:2])), "same number of rows"),
        "too long": (text_inputs(long, long), "at most 512"),
        "missing mask": ([("input_ids", ids, "INT64")], r"takes the inputs \['input_ids', 'attention_mask'\]"),
        "unknown input": ([*text_inputs(ids, mask), ("token_type_ids", np.zeros_like(ids), "INT64")],
                          "token_type_ids"),
        "id past the vocabulary": (text_inputs(ids + 40000, mask), "past the vocabulary"),
        "negative id": (text_inputs(ids - 40000, mask), "negative values"),
    }


@pytest.mark.parametrize("case", ["ids as FP32", "mask shape", "mask rows", "too long", "missing mask",
                                  "unknown input", "id past the vocabulary", "negative id"])
def test_bad_input_is_invalid_argument_and_the_agent_keeps_serving(device_agent, runner, texts, case):
    agent, client = device_agent
    ids, mask = tokenize(texts, SEQ_LENS[0])
    tensors, message = _bad_inputs(ids, mask)[case]
    with pytest.raises(tc.InferenceServerException, match=message) as err:
        send(client, agent.runtime.model_name, tensors)
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    res = send(client, agent.runtime.model_name, text_inputs(ids, mask))
    assert (res.as_numpy("label") == local_exits(runner, ids, mask)[-1].argmax(1)).all()


def test_edgeexit_client_sends_named_inputs(device_agent, runner, texts):
    from edgeexit.client import EdgeExitClient
    from edgeexit.errors import ConfigError, InvalidTensor

    agent, _ = device_agent
    ids, mask = tokenize(texts, SEQ_LENS[1])
    final = local_exits(runner, ids, mask)[-1]
    with EdgeExitClient(agent.target) as app:
        # int32 ids widen to the INT64 the agent lists
        res = app.infer({"input_ids": ids.astype(np.int32), "attention_mask": mask})
        np.testing.assert_allclose(res.probabilities, softmax(final), atol=1e-5)
        assert (res.label == final.argmax(1)).all() and res.decided == [DEVICE] * len(ids)
        with pytest.raises(ConfigError, match="pass them by name"):
            app.infer(ids)
        with pytest.raises(InvalidTensor, match="float32 but the agent takes INT64"):
            app.infer({"input_ids": ids.astype(np.float32), "attention_mask": mask})
        with pytest.raises(InvalidTensor, match=r"takes the inputs \['input_ids', 'attention_mask'\]"):
            app.infer({"input_ids": ids})
        long = np.ones((1, text_data.MAX_SEQ_LEN + 1), np.int64)
        with pytest.raises(InvalidTensor, match="at most 512"):  # the agent's refusal, typed
            app.infer({"input_ids": long, "attention_mask": long})


def test_micro_batching_leaves_text_requests_of_other_lengths_apart(minilm_bundle, runner, texts):
    from concurrent.futures import ThreadPoolExecutor

    opts = AgentOptions(DeviceOptions(policy="never", split="device"), listen="127.0.0.1:0", micro_batch_rows=8)
    agent = Agent(minilm_bundle, opts).start()
    client = tc.InferenceServerClient(agent.target)
    batches = [tokenize(texts[i % 4:i % 4 + 2], seq) for i, seq in enumerate((8, 12, 20, 12, 33, 40))]
    try:
        with ThreadPoolExecutor(len(batches)) as pool:
            answers = list(pool.map(lambda b: send(client, agent.runtime.model_name, text_inputs(*b)), batches))
    finally:
        client.close()
        agent.stop()
    for (ids, mask), res in zip(batches, answers, strict=True):
        np.testing.assert_allclose(res.as_numpy("probabilities"), softmax(local_exits(runner, ids, mask)[-1]),
                                   atol=1e-5)
