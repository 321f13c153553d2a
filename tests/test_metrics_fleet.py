"""Metrics a fleet can watch: a real in-process serve and agent, scraped over HTTP after a few requests (some
answered by an early exit on the device, some offloaded, one falling back), must show every metric the README
lists, with values that agree with what the app and the servers saw."""

from __future__ import annotations

import math
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as tc
from prometheus_client.parser import text_string_to_metric_families

from edgeexit.policies import make_policy, softmax
from edgeexit.runtime.agent import Agent, AgentOptions
from edgeexit.runtime.device import DeviceOptions
from edgeexit.runtime.metrics import ServerMetrics
from edgeexit.runtime.oip_server import ServerOptions, build_server
from edgeexit.runtime.runner import SegmentRunner
from edgeexit.runtime.service import build_handlers
from edgeexit.testbed.harness import free_port

PROCESS = ("process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds",
           "process_start_time_seconds", "python_info")


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics page: (name, sorted labels) -> value."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(body) for s in fam.samples}


def total(samples: dict, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


def labelled(samples: dict, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {ls: v for (n, ls), v in samples.items() if n == name}


@pytest.fixture
def serve(agent_bundle):
    metrics = ServerMetrics()
    handle = build_server(build_handlers(agent_bundle, metrics=metrics), ServerOptions(metrics_port=0), metrics)
    yield handle.start()
    handle.stop(1.0)


def half_exit_policy(bundle, rows: np.ndarray):
    """A confidence policy under which about half the rows leave at exit 0 and none at exit 1."""
    r = SegmentRunner(bundle)
    conf = softmax(r.run_all(r.normalize(rows))[0]).max(1)
    return make_policy("confidence", [float(np.median(conf)), math.inf])


def infer(client: tc.InferenceServerClient, model: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    inp = tc.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    res = client.infer(model, [inp])
    return res.as_numpy("exit"), res.as_numpy("decided"), res.get_response().parameters["edgeexit.split"].string_param


def test_serve_and_agent_metrics_show_what_happened(agent_bundle, serve):
    rng = np.random.default_rng(7)
    shape = tuple(int(d) for d in SegmentRunner(agent_bundle).manifest.input.shape[1:])
    batches = [rng.random((n, *shape), dtype=np.float32) for n in (2, 4, 8, 16, 6)]
    policy = half_exit_policy(agent_bundle, np.concatenate(batches))
    agent = Agent(agent_bundle, AgentOptions(DeviceOptions(policy=policy, split=1, cloud=serve.target),
                                             listen="127.0.0.1:0", metrics_port=0)).start()
    try:
        client = tc.InferenceServerClient(agent.target)
        seen: dict[tuple[str, str], int] = {}
        offloads, splits = 0, set()
        for x in batches:
            exits, decided, split = infer(client, agent.runtime.model_name, x)
            splits.add(split)
            offloads += int((decided == 1).any())
            for j, d in zip(exits, decided, strict=True):
                key = (str(int(j)), ("device", "cloud", "device-fallback")[int(d)])
                seen[key] = seen.get(key, 0) + 1
        client.close()
        a = scrape(agent.handle.metrics_port)
        s = scrape(serve.metrics_port)
    finally:
        agent.stop()

    assert ("0", "device") in seen and ("2", "cloud") in seen, f"want early exits and offloads, got {seen}"
    # Rows per exit and decided: exactly what the app was told.
    rows = {(dict(ls)["exit"], dict(ls)["decided"]): v for ls, v in labelled(a, "edgeexit_agent_rows_total").items()}
    assert rows == seen
    # Split: a state set whose one 1 is the split the agent ran with.
    assert splits == {"1"}
    assert {dict(ls)["split"]: v for ls, v in labelled(a, "edgeexit_agent_split").items()} == {"1": 1.0}
    # Offloads: bytes counted, link estimated from them, round trips timed.
    assert a[("edgeexit_agent_offload_seconds_count", ())] == offloads >= 2
    assert a[("edgeexit_agent_sent_bytes_total", ())] > 0
    assert a[("edgeexit_agent_link_bandwidth_bytes_per_second", ())] > 0
    assert a[("edgeexit_agent_link_rtt_seconds", ())] >= 0
    assert a[("edgeexit_agent_circuit_state", ())] == 0 and a[("edgeexit_agent_cloud_status", ())] == 1
    assert total(a, "edgeexit_agent_fallbacks_total") == 0
    # The service: one queue and one compute observation per offload, as many as its OK requests and batches.
    model = f"{agent.runtime.model_name}@1"
    for name in ("edgeexit_server_queue_seconds_count", "edgeexit_server_compute_seconds_count",
                 "edgeexit_requests_total"):
        assert total(s, name, model=model) == offloads, name
    assert total(s, "edgeexit_batch_size_sum", model=model) == offloads  # one request per batch here
    assert 0 < total(s, "edgeexit_server_compute_seconds_sum", model=model) < 10
    assert 0 <= total(s, "edgeexit_server_queue_seconds_sum", model=model) < 10
    # The process, on both registries.
    for page in (a, s):
        for name in PROCESS:
            assert total(page, name) > 0, name


def test_fallbacks_are_counted_by_a_bounded_reason(agent_bundle):
    dev = DeviceOptions(policy="never", split=0, cloud=f"127.0.0.1:{free_port()}", deadline_ms=200)
    dev.breaker.failure_threshold = 1
    agent = Agent(agent_bundle, AgentOptions(dev, listen="127.0.0.1:0")).start()
    try:
        x = np.random.default_rng(2).random((3, *agent.runtime.manifest.input.shape[1:]), dtype=np.float32)
        client = tc.InferenceServerClient(agent.target)
        _, decided, _ = infer(client, agent.runtime.model_name, x)
        client.close()
        m = agent.handle.metrics
        assert (decided == 2).all()
        assert m.value("edgeexit_agent_fallbacks_total", {"reason": "unavailable"}) == 1
        assert m.value("edgeexit_agent_fallbacks_total") == 1  # no other reason label
        assert m.value("edgeexit_agent_rows_total", {"decided": "device-fallback"}) == 3
        assert m.value("edgeexit_agent_sent_bytes_total") == 0
        assert math.isnan(m.value("edgeexit_agent_link_bandwidth_bytes_per_second"))  # nothing measured
        assert m.value("edgeexit_agent_split", {"split": "0"}) == 1
    finally:
        agent.stop()
