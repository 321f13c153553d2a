"""The device uses the time the cloud reports: ``Latency.cloud_ms`` is the server's queue + compute, the network
share is the rest of the call, and the link sample excludes the server's time (so a slow server does not look
like a slow link); without a report it falls back to the estimate. Cloud-only sends raw pixels as UINT8.

A scripted client with a scripted clock isolates the arithmetic; a real service whose compute is slowed shows
the same on loopback, and the agent forwards the figures as int64 microseconds."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from edgeexit.runtime.client import Offload
from edgeexit.runtime.decided import CLOUD
from edgeexit.runtime.device import DeviceOptions, DeviceRuntime
from edgeexit.runtime.link_monitor import network_seconds
from edgeexit.runtime.oip_messages import ServerTiming
from edgeexit.runtime.oip_server import build_server
from edgeexit.runtime.runner import SegmentRunner
from edgeexit.runtime.service import build_handlers
from tests.fixtures_agent import input_shape

SLOW_S = 0.25  # the slowed cloud compute
LOADED_DEADLINE_MS = 20_000  # generous: these tests are about timing figures, not deadlines


class ScriptedCloud:
    """Answers with the reference tail; each call moves the clock by ``call_s`` and reports ``server``."""

    def __init__(self, bundle, clock: list[float], call_s: float, server: ServerTiming | None):
        self.runner, self.clock, self.call_s, self.server = SegmentRunner(bundle), clock, call_s, server

    def infer(self, model, input_name, tensor, *, timeout, request_id=""):
        from edgeexit.runtime.codec import decode

        x = decode(tensor.data, tensor.datatype, tensor.shape, tensor.params)
        out = self.runner.run(x, start=int(input_name[len("boundary"):]) + 1)
        self.clock[0] += self.call_s
        outputs = {f"exit{j}": v for j, v in out.exits.items()}
        return outputs if self.server is None else Offload(outputs, self.server)

    def ready(self, timeout=1.0):
        return True

    def close(self):
        pass


def _scripted_runtime(bundle, call_s, server):
    clock = [0.0]
    rt = DeviceRuntime(bundle, DeviceOptions(policy="never", split=0), client=ScriptedCloud(bundle, clock, call_s,
                       server), clock=lambda: clock[0])
    samples: list[tuple[int, float]] = []
    record = rt.monitor.record_offload
    rt.monitor.record_offload = lambda n, s: (samples.append((n, s)), record(n, s))
    return rt, samples


def test_reported_time_is_cloud_ms_and_is_left_out_of_the_link_sample(agent_bundle, raw_batch):
    rt, samples = _scripted_runtime(agent_bundle, 0.300, ServerTiming(queue_us=40_000, compute_us=210_000))
    res = rt.infer(raw_batch)
    assert set(res.decided) == {CLOUD}
    assert res.latency.cloud_ms == pytest.approx(250.0)
    assert res.latency.network_ms == pytest.approx(50.0)
    assert samples == [(res.bytes_sent, pytest.approx(0.050))]


def test_without_a_report_cloud_ms_is_none_and_the_call_counts_as_network(agent_bundle, raw_batch):
    rt, samples = _scripted_runtime(agent_bundle, 0.300, None)
    res = rt.infer(raw_batch)
    assert res.latency.cloud_ms is None and res.latency.network_ms == pytest.approx(300.0)
    assert samples == [(res.bytes_sent, pytest.approx(0.300))]  # no adapter: no estimate to subtract


def test_network_seconds_uses_the_report_else_the_estimate():
    assert network_seconds(0.3, ServerTiming(100_000, 150_000), expected_cloud_s=0.01) == pytest.approx(0.05)
    assert network_seconds(0.3, None, expected_cloud_s=0.1) == pytest.approx(0.2)
    assert network_seconds(0.3, None, expected_cloud_s=5.0) == pytest.approx(0.03)  # an estimate above the call


@pytest.fixture(scope="module")
def slow_cloud(agent_bundle):
    """The real service, its tails slowed by SLOW_S per batch (a loaded or slow server)."""
    handlers = build_handlers(agent_bundle)
    for h in handlers:
        fast = h.runner.run

        def slowed(*args, _fast=fast, **kwargs):
            time.sleep(SLOW_S)
            return _fast(*args, **kwargs)

        h.runner.run = slowed
    server = build_server(handlers).start()
    yield server
    server.stop(1)


def test_a_slow_server_is_not_a_slow_link(agent_bundle, slow_cloud, raw_batch, monkeypatch):
    rt = DeviceRuntime(agent_bundle, DeviceOptions(policy="never", split=0, cloud=slow_cloud.target,
                                                   deadline_ms=LOADED_DEADLINE_MS))
    samples: list[float] = []
    record = rt.monitor.record_offload
    monkeypatch.setattr(rt.monitor, "record_offload", lambda n, s: (samples.append(s), record(n, s)))
    try:
        res = rt.infer(raw_batch)
    finally:
        rt.close()
    lat = res.latency
    assert set(res.decided) == {CLOUD}, res.fallback_reason
    assert lat.cloud_ms >= SLOW_S * 1000
    # What the device waited for the call is at least the slowed compute; the link sample is that call minus
    # the server's own time, which is network_ms (no absolute bound: the machine may be loaded).
    call_s = (lat.total_ms - lat.device_ms - lat.encode_ms) / 1000
    assert samples == [pytest.approx(lat.network_ms / 1000, abs=1e-6)]
    assert samples[0] == pytest.approx(call_s - lat.cloud_ms / 1000, abs=0.02) and samples[0] < call_s - SLOW_S


def test_an_unreporting_server_leaves_its_time_in_the_link_sample(agent_bundle, slow_cloud, raw_batch):
    """The same slow server behind a client that drops the timing (as an older server would): the link sample
    then holds the slow compute, which is what reporting fixes."""
    from edgeexit.runtime.client import InferenceClient

    class Unreported(InferenceClient):
        def infer(self, *args, **kwargs):
            return dict(super().infer(*args, **kwargs))

    rt = DeviceRuntime(agent_bundle, DeviceOptions(policy="never", split=0, deadline_ms=LOADED_DEADLINE_MS),
                       client=Unreported(slow_cloud.target))
    samples: list[float] = []
    record = rt.monitor.record_offload
    rt.monitor.record_offload = lambda n, s: (samples.append(s), record(n, s))
    try:
        res = rt.infer(raw_batch)
    finally:
        rt.close()
    assert set(res.decided) == {CLOUD}, res.fallback_reason
    assert res.latency.cloud_ms is None and samples[0] >= SLOW_S


def test_agent_forwards_the_timing_as_int64_microseconds(agent_bundle, slow_cloud, raw_batch):
    tc = pytest.importorskip("tritonclient.grpc")
    from edgeexit.runtime.agent import Agent, AgentOptions

    dev = DeviceOptions(policy="never", split=0, cloud=slow_cloud.target, deadline_ms=LOADED_DEADLINE_MS)
    opts = AgentOptions(dev, listen="127.0.0.1:0")
    agent = Agent(agent_bundle, opts).start()
    client = tc.InferenceServerClient(agent.target)
    try:
        inp = tc.InferInput("input", list(raw_batch.shape), "FP32")
        inp.set_data_from_numpy(raw_batch)
        params = client.infer(agent.runtime.model_name, [inp]).get_response().parameters
    finally:
        client.close()
        agent.stop()
    names = ("device_us", "encode_us", "network_us", "cloud_us", "total_us")
    for n in names:
        assert params[f"edgeexit.{n}"].WhichOneof("parameter_choice") == "int64_param", n
    assert params["edgeexit.cloud_us"].int64_param >= SLOW_S * 1e6
    assert params["edgeexit.total_us"].int64_param >= params["edgeexit.cloud_us"].int64_param
    assert not any(k.endswith("_ms") for k in params)


def _pixels(bundle, rows=6, seed=2) -> np.ndarray:
    levels = np.random.default_rng(seed).integers(0, 256, (rows, *input_shape(bundle)))
    return levels.astype(np.float32) / np.float32(255)


def test_cloud_only_sends_one_byte_per_pixel(agent_bundle, cloud):
    x = _pixels(agent_bundle)
    rt = DeviceRuntime(agent_bundle, DeviceOptions(policy="never", split="cloud", cloud=cloud.target,
                                                   deadline_ms=LOADED_DEADLINE_MS))
    try:
        on_grid = rt.infer(x)
        off_grid = rt.infer(x * np.float32(0.999) + np.float32(0.0004))  # between levels: never rounded
    finally:
        rt.close()
    assert on_grid.bytes_sent == x.size and off_grid.bytes_sent == 4 * x.size
    r = SegmentRunner(agent_bundle)
    want = r.run_all(r.normalize(x))[-1]
    assert set(on_grid.decided) == {CLOUD} and (on_grid.labels == want.argmax(1)).all()
    assert on_grid.latency.cloud_ms is not None and on_grid.latency.cloud_ms > 0


def test_cloud_only_sends_raw_pixels_that_the_server_normalises_once(agent_bundle, tmp_path: Path):
    """With input normalisation in the bundle, the whole cloud model must get raw pixels (it normalises them);
    normalised ones would be normalised twice."""
    view = tmp_path / "normalised.edgeexit"
    view.mkdir()
    manifest = json.loads((agent_bundle / "manifest.json").read_text())
    channels = input_shape(agent_bundle)[0]
    manifest["input"]["normalization"] = {"mean": [0.4] * channels, "std": [0.2] * channels}
    (view / "manifest.json").write_text(json.dumps(manifest))
    shutil.copytree(agent_bundle / "segments", view / "segments")  # a symlink out of the bundle is refused
    server = build_server(build_handlers(view)).start()
    x = _pixels(agent_bundle)
    rt = DeviceRuntime(view, DeviceOptions(policy="never", split="cloud", cloud=server.target,
                                           deadline_ms=LOADED_DEADLINE_MS))
    try:
        res = rt.infer(x)
    finally:
        rt.close()
        server.stop(1)
    r = SegmentRunner(view)
    want = r.run_all(r.normalize(x))[-1]
    e = np.exp(want - want.max(1, keepdims=True))
    np.testing.assert_allclose(res.probabilities, e / e.sum(1, keepdims=True), atol=1e-5)
    assert res.bytes_sent == x.size
