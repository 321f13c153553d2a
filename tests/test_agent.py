"""The agent: served over OIP v2 and called with an unmodified tritonclient, in-process and as real processes
(`edgeexit serve` + `edgeexit agent`), logs, metrics, unix socket, SIGTERM clean stop."""

from __future__ import annotations

import io
import json
import logging
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as tc
from prometheus_client.parser import text_string_to_metric_families

from edgeexit.errors import ConfigError
from edgeexit.logs import JsonFormatter
from edgeexit.policies import softmax
from edgeexit.runtime.agent import Agent, AgentOptions, parse_listen
from edgeexit.runtime.client import InferenceClient
from edgeexit.runtime.decided import CLOUD, DECIDED_CODES
from edgeexit.runtime.device import DeviceOptions
from edgeexit.runtime.runner import SegmentRunner
from edgeexit.testbed.harness import free_port, launch


def triton_infer(target: str, model: str, x: np.ndarray):
    client = tc.InferenceServerClient(target)
    inp = tc.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    res = client.infer(model, [inp])
    return client, res


def local_final(bundle, x):
    r = SegmentRunner(bundle)
    return r.run_all(r.normalize(x))[-1]


@pytest.fixture
def agent_log():
    """The agent's event lines, formatted as `edgeexit agent` writes them (one JSON object per line)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("edgeexit.runtime.agent")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield stream
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_agent_in_process_via_tritonclient(agent_bundle, cloud, raw_batch, agent_log):
    log = agent_log
    opts = AgentOptions(DeviceOptions(policy="never", split=0, cloud=cloud.target), listen="127.0.0.1:0")
    agent = Agent(agent_bundle, opts).start()
    try:
        client, res = triton_infer(agent.target, agent.runtime.model_name, raw_batch)
        meta = client.get_model_metadata(agent.runtime.model_name)
        assert [o.name for o in meta.outputs] == ["label", "probabilities", "exit", "decided"]
        assert client.is_server_ready() and client.is_model_ready(agent.runtime.model_name)
        final = local_final(agent_bundle, raw_batch)
        np.testing.assert_allclose(res.as_numpy("probabilities"), softmax(final), atol=1e-5)
        assert (res.as_numpy("label") == final.argmax(1)).all()
        assert res.as_numpy("label").dtype == np.int64 and res.as_numpy("exit").dtype == np.int32
        assert (res.as_numpy("decided") == DECIDED_CODES[CLOUD]).all()
        params = res.get_response().parameters
        assert params["edgeexit.split"].string_param == "0" and params["edgeexit.bytes_sent"].int64_param > 0
        m = agent.handle.metrics
        assert m.value("edgeexit_agent_rows_total", {"decided": "cloud"}) == len(raw_batch)
        assert m.value("edgeexit_agent_offload_seconds_count") == 1
        with pytest.raises(tc.InferenceServerException, match="input"):
            client.infer(agent.runtime.model_name, [tc.InferInput("x", [1], "FP32")])
        client.close()
    finally:
        agent.stop()
    events = [json.loads(line)["event"] for line in log.getvalue().splitlines()]
    assert events == ["start", "ready", "stop"]


def test_agent_logs_and_counts_fallbacks_when_the_cloud_is_down(agent_bundle, raw_batch, agent_log):
    log = agent_log
    dev = DeviceOptions(policy="never", split=0, cloud=f"127.0.0.1:{free_port()}", deadline_ms=200)
    dev.breaker.failure_threshold = 1
    agent = Agent(agent_bundle, AgentOptions(dev, listen="127.0.0.1:0")).start()
    try:
        client, res = triton_infer(agent.target, agent.runtime.model_name, raw_batch)
        assert (res.as_numpy("decided") == DECIDED_CODES["device-fallback"]).all()
        assert "edgeexit.fallback" in res.get_response().parameters
        assert agent.handle.metrics.value("edgeexit_agent_circuit_state") == 2
        assert agent.handle.metrics.value("edgeexit_agent_rows_total", {"decided": "device-fallback"}) == 8
        client.close()
    finally:
        agent.stop()
    events = [json.loads(line) for line in log.getvalue().splitlines()]
    assert any(e["event"] == "fallback" for e in events)
    assert any(e["event"] == "circuit" and e["new"] == "open" for e in events)


def test_agent_listens_on_a_unix_socket(agent_bundle, tmp_path, raw_batch):
    path = tmp_path / "agent.sock"
    agent = Agent(agent_bundle, AgentOptions(DeviceOptions(policy="never"), listen=f"unix:{path}")).start()
    try:
        assert agent.target == f"unix:{path}" and path.exists()
        with InferenceClient(agent.target) as c:
            assert c.ready()
    finally:
        agent.stop()
    assert not path.exists()


@pytest.mark.parametrize("bad", ["8001", "host:", "unix:", ":80x"])
def test_bad_listen_addresses_say_what_to_use(bad):
    with pytest.raises(ConfigError, match="HOST:PORT|unix:PATH"):
        parse_listen(bad)


@pytest.mark.slow
def test_serve_and_agent_as_real_processes(agent_bundle, raw_batch, tmp_path):
    with launch("serve", ["serve", str(agent_bundle), "--port", "0"], tmp_path) as serve:
        metrics_port = free_port()
        agent = launch("agent", ["agent", str(agent_bundle), "--cloud", serve.target, "--split", "1", "--policy",
                                 "never", "--listen", "127.0.0.1:0", "--metrics-port", str(metrics_port)], tmp_path)
        with agent:
            client, res = triton_infer(agent.target, SegmentRunner(agent_bundle).manifest.name, raw_batch)
            client.close()
            final = local_final(agent_bundle, raw_batch)
            np.testing.assert_allclose(res.as_numpy("probabilities"), softmax(final), atol=1e-5)
            assert (res.as_numpy("decided") == DECIDED_CODES[CLOUD]).all()
            body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
            deepest = len(SegmentRunner(agent_bundle).manifest.exits) - 1  # the cloud answers from the last exit
            rows = {tuple(sorted(s.labels.items())): s.value for fam in text_string_to_metric_families(body)
                    for s in fam.samples if s.name == "edgeexit_agent_rows_total"}
            assert rows == {(("decided", "cloud"), ("exit", str(deepest))): 8.0}
            assert agent.stop() == 0  # SIGTERM: a clean stop
        events = [json.loads(line)["event"] for line in agent.log().splitlines() if line.startswith("{")]
        assert events[0] == "start" and events[-1] == "stop" and "ready" in events
    assert serve.popen.returncode == 0
