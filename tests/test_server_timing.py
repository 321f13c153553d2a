"""The cloud service reports its own queue and compute time in every response (int64 microsecond parameters
``edgeexit.queue_us`` / ``edgeexit.compute_us``), on a real loopback server, read by our client and by an
unmodified tritonclient; and the dynamic batcher's timing under load."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from edgeexit.bundle import Bundle
from edgeexit.runtime import codec
from edgeexit.runtime.batching import BatchOptions, DynamicBatcher
from edgeexit.runtime.client import InferenceClient, Offload
from edgeexit.runtime.oip_messages import P_COMPUTE_US, P_QUEUE_US, ServerTiming
from edgeexit.runtime.oip_server import build_server
from tests.fixtures_service import SlowHandler


@pytest.fixture
def name(service_bundle) -> str:
    return Bundle.load(service_bundle).name


def test_every_response_carries_queue_and_compute_as_int64(serve, name, boundary_batch):
    server = serve()
    with InferenceClient(server.target) as client:
        reply = client.infer(f"{name}@0", "boundary0", codec.encode(boundary_batch(0, 2)), timeout=10)
    assert isinstance(reply, Offload) and reply.server is not None
    assert reply.server.compute_us > 0 and reply.server.queue_us >= 0
    # Both travel as int64 (KServe's InferParameter has no double): the client saw Python ints, not floats.
    assert type(reply.params[P_QUEUE_US]) is int and type(reply.params[P_COMPUTE_US]) is int
    # The server's time fits inside what the caller waited (a generous bound: a shared 2-core machine).
    assert reply.server.total_s < 5.0
    assert sorted(reply) == sorted(reply.outputs) and len(reply) == len(reply.outputs)


def test_tritonclient_reads_the_timing_parameters(serve, name, boundary_batch):
    tc = pytest.importorskip("tritonclient.grpc")
    server = serve()
    client = tc.InferenceServerClient(server.target)
    try:
        x = boundary_batch(0, 1)
        inp = tc.InferInput("boundary0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        params = client.infer(f"{name}@0", [inp]).get_response().parameters
        assert params[P_COMPUTE_US].WhichOneof("parameter_choice") == "int64_param"
        assert params[P_QUEUE_US].WhichOneof("parameter_choice") == "int64_param"
        assert params[P_COMPUTE_US].int64_param > 0 and params[P_QUEUE_US].int64_param >= 0
    finally:
        client.close()


def test_a_batch_delay_shows_up_as_queue_time_not_compute(serve, name, boundary_batch):
    """A lone request waits max_delay_ms for company before its batch runs: that is queue, not compute."""
    delay_ms = 150
    batched = serve(batching=BatchOptions(max_batch_size=16, max_delay_ms=delay_ms))
    plain = serve()
    wire = codec.encode(boundary_batch(0, 1))
    with InferenceClient(batched.target) as a, InferenceClient(plain.target) as b:
        waited = a.infer(f"{name}@0", "boundary0", wire, timeout=10).server
        direct = b.infer(f"{name}@0", "boundary0", wire, timeout=10).server
    assert waited.queue_us >= 0.9 * delay_ms * 1000
    assert direct.queue_us < waited.queue_us - 50_000
    assert waited.compute_us < 100_000 and direct.compute_us > 0


def test_the_batcher_reports_queue_growing_behind_a_slow_batch():
    """Batches of 2 that take 0.2 s each: later requests wait for earlier batches (queue grows), and the
    requests of one batch share its start and run time (batch compute is shared, not split)."""

    def slow(x: np.ndarray) -> dict[str, np.ndarray]:
        time.sleep(0.2)
        return {"y": x + 1}

    batcher = DynamicBatcher(slow, BatchOptions(max_batch_size=2, max_delay_ms=30))
    results: dict[int, tuple[float, object]] = {}

    def call(i: int) -> None:
        arrived = time.perf_counter()
        results[i] = (arrived, batcher.submit(np.full((1, 2), i, np.float32), timeout=10))

    threads = []
    try:
        for i in range(4):
            threads.append(threading.Thread(target=call, args=(i,)))
            threads[-1].start()
            time.sleep(0.01)  # arrival order 0, 1, 2, 3
        for t in threads:
            t.join(10)
    finally:
        batcher.close()
    queue = {i: done.started - arrived for i, (arrived, done) in results.items()}
    for i, (_, done) in results.items():
        np.testing.assert_array_equal(done.outputs["y"], np.full((1, 2), i + 1, np.float32))
        assert done.run_s >= 0.19
    first, second = results[0][1], results[2][1]
    assert second.started - first.started >= 0.19  # the second batch ran after the first
    assert queue[2] >= 0.15 and queue[3] >= 0.15 and queue[0] < 0.15
    assert results[1][1].started == first.started and results[1][1].run_s == first.run_s


def test_an_older_server_without_timing_gives_none():
    server = build_server([SlowHandler(0.0)]).start()  # a handler that reports nothing
    try:
        with InferenceClient(server.target) as client:
            reply = client.infer("slow", "x", codec.encode(np.zeros(3, np.float32)), timeout=5)
        assert reply.server is None
        np.testing.assert_array_equal(reply["y"], np.ones(3, np.float32))
    finally:
        server.stop(1)


@pytest.mark.parametrize("params,want", [
    ({P_QUEUE_US: 5, P_COMPUTE_US: 7}, ServerTiming(5, 7)),
    ({P_QUEUE_US: 5}, None),
    ({P_QUEUE_US: 5.0, P_COMPUTE_US: 7}, None),  # a double: not what the wire contract says
    ({P_QUEUE_US: True, P_COMPUTE_US: 7}, None),
    ({P_QUEUE_US: -1, P_COMPUTE_US: 7}, None),
])
def test_timing_from_params(params, want):
    assert ServerTiming.from_params(params) == want
