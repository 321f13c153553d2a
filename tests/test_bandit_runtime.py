"""`--split auto --adapt bandit` and the planner's link probes through the real device runtime: in-process
against a real cloud service on loopback, and as real `edgeexit serve` + `edgeexit agent` processes over a
shaped link (the netsim relay). Before the Adapter protocol, every bandit request died with INTERNAL
(AttributeError: 'BanditAdapter' object has no attribute 'probe_due')."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from edgeexit.errors import EdgeExitError, PeerUnavailable
from edgeexit.runtime.adaptation import Adapter, BanditAdapter, PlannerAdapter
from edgeexit.runtime.codec import encode
from edgeexit.runtime.decided import CLOUD, DEVICE
from edgeexit.runtime.device import DeviceOptions, DeviceRuntime
from edgeexit.runtime.link_monitor import LinkMonitor
from edgeexit.runtime.runner import SegmentRunner
from edgeexit.testbed.harness import AgentClient, free_port, launch
from edgeexit.testbed.netsim import LinkConditions, Relay
from tests.fixtures_agent import input_shape


@pytest.fixture(scope="module")
def batch(agent_bundle):
    return np.random.default_rng(3).random((48, *input_shape(agent_bundle)), dtype=np.float32)


@pytest.fixture(scope="module")
def final_labels(agent_bundle, batch):
    r = SegmentRunner(agent_bundle)
    return r.run_all(r.normalize(batch))[-1].argmax(1)


@pytest.mark.parametrize("encoding", ["fp32", "int8"])
def test_the_bandit_runs_every_arm_through_the_device_runtime(agent_bundle, cloud, batch, final_labels, encoding):
    opts = DeviceOptions(policy="never", split="auto", adapt="bandit", cloud=cloud.target, encoding=encoding)
    rt = DeviceRuntime(agent_bundle, opts)
    try:
        bandit = rt.adapter
        assert isinstance(bandit, BanditAdapter) and isinstance(bandit, Adapter)
        arms = list(bandit.arms)
        assert DEVICE in arms and len(arms) == len(rt.manifest.split_points) + 1
        splits, offloads = [], 0
        for i in range(0, len(batch), 2):
            res = rt.infer(batch[i:i + 2])
            splits.append(res.split)
            where = DEVICE if res.split == DEVICE else CLOUD
            assert res.decided == [where, where], (res.split, res.decided, res.fallback_reason)
            offloads += where == CLOUD
            if encoding == "fp32":  # --policy never: device and cloud both answer with the final exit
                np.testing.assert_array_equal(res.labels, final_labels[i:i + 2])
        assert splits[:len(arms)] == arms  # UCB1 tries every arm once first, "device" included
        assert bandit.counts.sum() == len(splits) and (bandit.counts > 0).all()
        assert not bandit.probe_due()  # it explores by itself
        assert rt.link.estimate().samples == offloads
    finally:
        rt.close()


def test_the_planner_probes_the_link_in_the_background_while_device_only(agent_bundle, cloud, batch):
    offset = [0.0]
    probes: list[dict] = []
    probed = threading.Event()

    def on_event(event: str, fields: dict) -> None:
        if event == "probe":
            probes.append(fields)
            probed.set()

    opts = DeviceOptions(policy="never", split="auto", network="congested", cloud=cloud.target)
    rt = DeviceRuntime(agent_bundle, opts, clock=lambda: time.monotonic() + offset[0], on_event=on_event)
    try:
        assert isinstance(rt.adapter, PlannerAdapter) and rt.split == DEVICE  # a bad link: stay on the device
        rt.infer(batch[:2])
        assert not probed.wait(0.3)  # within the first probe interval: no probe
        offset[0] += 1.0
        res = rt.infer(batch[:2])
        assert res.decided == [DEVICE, DEVICE]
        assert probed.wait(10), "no probe after the interval passed"
        assert rt.adapter.probe_split() == "cloud"  # the raw input: no device compute for a probe
        assert probes[0]["split"] == "cloud" and "error" not in probes[0]
        assert probes[0]["bytes"] == rt.manifest.input.sample_elements() * 4  # one row, off the 8-bit grid: fp32
        assert rt.link.estimate().samples == 1
    finally:
        rt.close()


def test_link_monitor_warm_up_measures_the_rtt_and_probes_report_failures(agent_bundle, cloud, batch):
    from edgeexit.runtime.client import InferenceClient

    r = SegmentRunner(agent_bundle)
    boundary = r.run(r.normalize(batch[:1]), 0, 1).boundary
    with InferenceClient(cloud.target) as client:
        monitor = LinkMonitor(client, r.manifest.name)
        monitor.warm_up().join(10)
        assert monitor.stats.estimate().rtt_s > 0
        monitor.probe(0, "boundary0", lambda: encode(boundary), 5.0).join(10)
        assert monitor.stats.estimate().samples == 1
    events: list[tuple[str, dict]] = []
    with InferenceClient(f"127.0.0.1:{free_port()}") as dead:
        monitor = LinkMonitor(dead, r.manifest.name, on_event=lambda e, **f: events.append((e, f)))
        monitor.probe(0, "boundary0", lambda: encode(boundary), 1.0).join(10)
    assert events == [("probe", {"split": 0, "error": PeerUnavailable.__name__})]
    assert monitor.stats.estimate().samples == 0
    assert LinkMonitor(None, "m").warm_up() is None  # device-only: nothing to measure


@pytest.mark.slow
def test_agent_adapt_bandit_end_to_end_over_a_shaped_link(agent_bundle, batch, final_labels, tmp_path):
    """Real `edgeexit serve` and `edgeexit agent --split auto --adapt bandit`, the link shaped by the relay."""
    model = SegmentRunner(agent_bundle).manifest.name
    link = LinkConditions(delay_ms=5, up_mbit=20, down_mbit=50)
    with launch("serve", ["serve", str(agent_bundle), "--port", "0"], tmp_path) as serve, \
            Relay(serve.address, link) as relay:
        cloud = "{}:{}".format(*relay.address)
        agent = launch("agent", ["agent", str(agent_bundle), "--cloud", cloud, "--split", "auto", "--adapt", "bandit",
                                 "--policy", "never", "--listen", "127.0.0.1:0"], tmp_path)
        answers, errors = [], []
        with agent, AgentClient(agent.target, model) as app:
            for i in range(40):
                rows = slice(i % 24 * 2, i % 24 * 2 + 2)
                try:
                    answers.append((rows, app.infer(batch[rows])))
                except EdgeExitError as e:  # the app's client raises edgeexit errors, never grpc's
                    errors.append(f"{type(e).__name__}: {e}")
        assert not errors, errors[:3]
        assert relay.stats.bytes_up > 0  # offloads went through the shaped link
    log = agent.log()
    assert "AttributeError" not in log and "INTERNAL" not in log
    assert len(answers) == 40
    for rows, a in answers:
        assert a.decided and set(a.decided) <= {DEVICE, CLOUD}, (a.decided, a.params.get("edgeexit.fallback"))
        np.testing.assert_array_equal(a.labels, final_labels[rows])  # --policy never: the final exit's answer
    splits = [a.params["edgeexit.split"] for _, a in answers]
    assert len(set(splits)) > 1 and DEVICE in splits, splits  # the bandit tried several arms, device included
    assert any(s.isdigit() for s in splits)
