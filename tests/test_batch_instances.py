"""Several batcher instances compute batches at the same time; one instance runs them one after another."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from edgeexit.errors import ConfigError
from edgeexit.runtime.batching import BatchOptions, DynamicBatcher


def _run_four_requests(instances: int) -> tuple[list[float], dict[int, np.ndarray]]:
    """Four single-row requests, batches of two, a run that sleeps 0.3 s; the batches' start times."""
    starts: list[float] = []
    lock = threading.Lock()

    def slow(x: np.ndarray) -> dict[str, np.ndarray]:
        with lock:
            starts.append(time.perf_counter())
        time.sleep(0.3)  # sleeping releases the GIL, as onnxruntime's run does
        return {"y": x * 2}

    batcher = DynamicBatcher(slow, BatchOptions(max_batch_size=2, max_delay_ms=50, instances=instances))
    answers: dict[int, np.ndarray] = {}

    def call(i: int) -> None:
        answers[i] = batcher.submit(np.full((1, 3), i, np.float32), timeout=10).outputs["y"]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
    finally:
        batcher.close()
    return sorted(starts), answers


@pytest.mark.parametrize("instances", [1, 2])
def test_batches_overlap_only_with_several_instances(instances):
    starts, answers = _run_four_requests(instances)
    assert len(starts) == 2  # two batches of two rows either way
    for i, y in answers.items():  # every caller got exactly its own row back
        np.testing.assert_array_equal(y, np.full((1, 3), 2 * i, np.float32))
    gap = starts[1] - starts[0]
    if instances == 1:
        assert gap >= 0.28  # the second batch waited for the first
    else:
        assert gap < 0.2  # the second instance started while the first still ran


def test_close_drains_queued_work_with_several_instances():
    done = []
    batcher = DynamicBatcher(lambda x: {"y": x}, BatchOptions(max_batch_size=4, max_delay_ms=1, instances=3))
    for i in range(5):
        done.append(batcher.submit(np.full((1, 1), i, np.float32), timeout=5).outputs["y"][0, 0])
    batcher.close()
    assert done == [0, 1, 2, 3, 4]
    assert not any(t.is_alive() for t in batcher._threads)


def test_instances_must_be_positive():
    with pytest.raises(ConfigError, match="--instances"):
        BatchOptions(instances=0)
