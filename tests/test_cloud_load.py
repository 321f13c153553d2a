"""The cloud benchmark's load generator (edgeexit.testbed.cloud_load) against a real OIP server on loopback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgeexit.bundle import Bundle
from edgeexit.runtime import codec
from edgeexit.runtime.batching import BatchOptions
from edgeexit.runtime.oip_server import ServerOptions
from edgeexit.testbed.cloud_load import COUNTERS, LoadGenerator, mean_batch, ratio_ci, scrape


@pytest.fixture(scope="module")
def load():
    with LoadGenerator(processes=2) as gen:
        yield gen


def _wires(bundle: Path, boundary_batch) -> tuple[str, str, list[codec.WireTensor]]:
    b = Bundle.load(bundle)
    sp = b.manifest.split_points[0]
    x = boundary_batch(0, 4)
    return f"{b.name}@0", sp.tensor.name, [codec.encode(x[i:i + 1], "int8", sp.quantization) for i in range(4)]


def test_closed_loop_load_is_answered_and_batched(load, serve, service_bundle, boundary_batch):
    server = serve(ServerOptions(metrics_port=0), BatchOptions(max_batch_size=8, max_delay_ms=5))
    model, input_name, wires = _wires(service_bundle, boundary_batch)
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    before = scrape(url, model, *COUNTERS["serve"])
    r = load.run(server.target, model, input_name, wires, streams=6, seconds=1.0, warmup_s=0.3)
    after = scrape(url, model, *COUNTERS["serve"])
    assert r.errors == {} and r.answers > 0
    assert len(r.latencies_ms) == r.answers and (r.latencies_ms > 0).all()
    assert r.throughput == pytest.approx(r.answers / 1.0)
    # Every answer the server counted came from our streams: warm-up + measured + the last in-flight ones.
    assert after[0] - before[0] >= r.answers + r.warmup_answers
    batch = mean_batch(before, after)
    assert batch is not None and 1.0 <= batch <= 6.0  # at most one request per stream in a batch (closed loop)


def test_failures_are_counted_by_status_not_raised(load, serve, service_bundle, boundary_batch):
    server = serve()
    _, input_name, wires = _wires(service_bundle, boundary_batch)
    r = load.run(server.target, "no-such-model@0", input_name, wires, streams=2, seconds=0.4, warmup_s=0.1)
    assert r.answers == 0 and r.error_count > 0
    assert set(r.errors) == {"NOT_FOUND"}, r.errors


def test_ratio_interval_resamples_rounds_jointly():
    flat = ratio_ci([30.0, 30.0, 30.0], [10.0, 10.0, 10.0], seed=0)
    assert flat == {"value": 3.0, "ci95": [3.0, 3.0], "rounds": 3}
    noisy = ratio_ci([28.0, 30.0, 35.0, 31.0], [10.0, 9.0, 12.0, 10.0], seed=0)
    assert noisy["ci95"][0] <= noisy["value"] <= noisy["ci95"][1]
    assert noisy["ci95"][0] < noisy["ci95"][1]


def test_scrape_reads_nothing_from_a_closed_port():
    from edgeexit.testbed.harness import free_port

    assert scrape(f"http://127.0.0.1:{free_port()}/metrics", "m", *COUNTERS["triton"]) is None
    assert mean_batch(None, (1.0, 1.0)) is None
    assert np.isclose(mean_batch((0.0, 0.0), (32.0, 4.0)), 8.0)
