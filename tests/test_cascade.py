"""Cascades (`--split cascade@N`) against a REAL cloud service on loopback: rows the device's exits leave are
answered exactly as the cloud's whole model answers them, from their raw uint8 input; fallbacks when the
service is down; the agent CLI; and the planner's exit setting applied by the runtime (`--split auto`)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edgeexit.bundle import Bundle
from edgeexit.errors import ConfigError
from edgeexit.planner import NO_EXIT
from edgeexit.policies import make_policy, softmax
from edgeexit.runtime.client import InferenceClient
from edgeexit.runtime.codec import encode_input
from edgeexit.runtime.decided import CLOUD, DEVICE, FALLBACK
from edgeexit.runtime.device import DeviceOptions, DeviceRuntime
from edgeexit.runtime.runner import SegmentRunner
from edgeexit.runtime.splits import parse_split, resolve_split
from edgeexit.testbed.harness import free_port
from tests.fixtures_agent import input_shape


@pytest.fixture(scope="module")
def pixels(agent_bundle):
    """32 rows of 8-bit pixels (k/255), so the raw input travels as UINT8."""
    levels = np.random.default_rng(3).integers(0, 256, (32, *input_shape(agent_bundle)))
    return (levels / 255.0).astype(np.float32)


@pytest.fixture(scope="module")
def exits(agent_bundle, pixels):
    r = SegmentRunner(agent_bundle)
    return r.run_all(r.normalize(pixels))


def half_at_exit0(exits):
    """Exit 0 takes the rows above its median confidence; no other early exit takes anything."""
    taus = [float(np.median(softmax(exits[0]).max(1)))] + [2.0] * (len(exits) - 2)
    return make_policy("confidence", taus)


def test_cascade_offloaded_rows_equal_the_clouds_whole_model(agent_bundle, cloud, pixels, exits):
    name = Bundle.load(agent_bundle).manifest.name
    rt = DeviceRuntime(agent_bundle, DeviceOptions(cloud=cloud.target, split="cascade@0",
                                                   policy=half_at_exit0(exits)))
    res = rt.infer(pixels)
    decided = np.array(res.decided)
    early, sent = decided == DEVICE, decided == CLOUD
    assert early.sum() == 16 and sent.sum() == 16 and res.split == "cascade@0"
    # early rows: exit 0 on the device
    assert (res.exits[early] == 0).all() and (res.labels[early] == exits[0][early].argmax(1)).all()
    # offloaded rows: what <model> itself answers for their raw input, 1 byte per pixel on the wire
    with InferenceClient(cloud.target) as c:
        out = c.infer(name, "input", encode_input(pixels[sent]), timeout=5)
    final = f"exit{len(exits) - 1}"
    np.testing.assert_array_equal(res.probabilities[sent], softmax(np.asarray(out[final])))
    assert (res.labels[sent] == np.asarray(out[final]).argmax(1)).all()
    assert (res.exits[sent] == len(exits) - 1).all()
    assert res.bytes_sent == 16 * int(np.prod(input_shape(agent_bundle)))  # uint8, not the boundary
    np.testing.assert_allclose(res.probabilities[sent], softmax(exits[-1][sent]), atol=1e-5)  # = local model
    rt.close()


@pytest.mark.parametrize("on_failure", ["best-exit", "finish-local"])
def test_cascade_falls_back_when_the_service_is_down(agent_bundle, pixels, exits, on_failure):
    rt = DeviceRuntime(agent_bundle, DeviceOptions(cloud=f"127.0.0.1:{free_port()}", split="cascade@0",
                                                   policy=half_at_exit0(exits), deadline_ms=300,
                                                   on_failure=on_failure))
    res = rt.infer(pixels)
    decided = np.array(res.decided)
    left = decided == FALLBACK
    assert left.sum() == 16 and (decided[~left] == DEVICE).all() and res.bytes_sent == 0
    assert "PeerUnavailable" in res.fallback_reason or "LinkTimeout" in res.fallback_reason
    if on_failure == "finish-local":  # resumed from the boundary kept on the device: the whole model's answer
        np.testing.assert_allclose(res.probabilities[left], softmax(exits[-1][left]), atol=1e-5)
        assert (res.exits[left] == len(exits) - 1).all()
    else:
        assert (res.exits[left] == 0).all()  # the only exit computed so far
    rt.close()


def test_split_values_parse_and_out_of_range_cascades_are_refused(agent_bundle):
    m = Bundle.load(agent_bundle).manifest
    assert parse_split("cascade@0") == "cascade@0" and parse_split("cascade@01") == "cascade@1"
    assert resolve_split(m, "cascade@1", has_cloud=True) == "cascade@1"
    assert resolve_split(m, "cascade@0", has_cloud=False) == "device"
    last = len(m.segments) - 1
    for bad, match in [(f"cascade@{last}", "cascade"), ("cascade@99", "0..1"), ("cascade@x", "cascade@N"),
                       ("cascade@-1", "cascade@N")]:
        with pytest.raises(ConfigError, match=match):
            resolve_split(m, bad, has_cloud=True)


def test_agent_cli_accepts_cascade_and_rejects_a_point_past_the_bundle(agent_bundle, cloud, monkeypatch, capsys):
    from edgeexit.cli import main
    from edgeexit.runtime.agent import Agent

    seen = {}

    def serve_once(self):  # built as `edgeexit agent` builds it; stopped instead of serving
        seen["split"] = self.runtime.split
        self.stop()

    monkeypatch.setattr(Agent, "serve_forever", serve_once)
    argv = ["agent", str(agent_bundle), "--cloud", cloud.target, "--listen", "127.0.0.1:0", "--policy", "never"]
    assert main([*argv, "--split", "cascade@0"]) == 0 and seen["split"] == "cascade@0"
    assert main([*argv, "--split", "cascade@99"]) == 2
    err = capsys.readouterr().err
    assert "cascade@99" in err and "device" in err and "Traceback" not in err


# ---- the planner's exit setting, applied ------------------------------------------------------------------------
def planned_bundle(src, dst, exits, settings, stored_thresholds, device_ms):
    """A copy of the bundle whose calibration lists ``settings`` ({name: exit-0 rate}) and whose stored
    calibrated policy has ``stored_thresholds``; profiles stored so nothing is measured."""
    shutil.copytree(src, dst)
    data = json.loads((dst / "manifest.json").read_text())
    n = len(exits)
    cands = [{"name": name, "thresholds": [0.0] * (n - 1) if rate else [2.0] * (n - 1),
              "exit_rates": [rate] + [0.0] * (n - 2) + [1 - rate], "valid": True} for name, rate in settings.items()]
    data["policy"] = {"kind": "confidence", "thresholds": stored_thresholds, "params": {}, "candidates": cands}
    prof = {"backend": "onnxruntime", "threads": 1}
    data["profiles"] = {"device": {**prof, "segment_ms": {"1": device_ms}},
                        "cloud": {**prof, "segment_ms": {"1": [0.1] * n}}}
    (dst / "manifest.json").write_text(json.dumps(data))
    return dst


def test_the_planners_no_exit_choice_means_no_row_exits_early(agent_bundle, cloud, pixels, exits, tmp_path):
    # The stored calibrated policy would send every row out at exit 0 (threshold 0); the planner's only setting
    # is no-exit (the calibration listed none valid), and device-only wins on a congested link.
    n = len(exits)
    b = planned_bundle(agent_bundle, tmp_path / "b.edgeexit", exits, {}, [0.0] * (n - 1), [1.0] * n)
    rt = DeviceRuntime(b, DeviceOptions(cloud=cloud.target, split="auto", network="congested"))
    assert rt.adapter.plan().label == f"device-only/{NO_EXIT}"
    res = rt.infer(pixels)
    assert (res.exits == n - 1).all() and set(res.decided) == {DEVICE}
    np.testing.assert_allclose(res.probabilities, softmax(exits[-1]), atol=1e-5)
    # ... and an explicit --policy still wins over the plan
    fixed = DeviceRuntime(b, DeviceOptions(cloud=cloud.target, split="auto", network="congested",
                                           policy=make_policy("confidence", [0.0] * (n - 1))))
    assert (fixed.infer(pixels).exits == 0).all()
    rt.close()
    fixed.close()


def test_the_planners_thresholds_replace_the_stored_ones(agent_bundle, cloud, pixels, exits, tmp_path):
    # The stored policy never exits (threshold 2 > any confidence); the planner's setting "all" exits every row
    # at exit 0, which the device must then do.
    n = len(exits)
    b = planned_bundle(agent_bundle, tmp_path / "b.edgeexit", exits, {"all": 1.0}, [2.0] * (n - 1), [1.0] * n)
    rt = DeviceRuntime(b, DeviceOptions(cloud=cloud.target, split="auto", network="congested"))
    assert rt.adapter.plan().setting == "all"
    res = rt.infer(pixels)
    assert (res.exits == 0).all() and set(res.decided) == {DEVICE}
    rt.close()
    # --policy never: the planner is told, so it plans for no early exit too
    never = DeviceRuntime(b, DeviceOptions(cloud=cloud.target, split="auto", network="congested", policy="never"))
    assert never.adapter.plan().setting == NO_EXIT and (never.infer(pixels).exits == n - 1).all()
    never.close()


def test_auto_picks_a_cascade_when_the_boundary_outweighs_the_input(agent_bundle, cloud, pixels, exits, tmp_path):
    # A very slow device tail and a 3g prior: exit 0 on the device, the rest to the cloud as 1-byte pixels
    # (smaller than boundary 0 in fp32). The first request runs on the prior (no link samples yet).
    m = Bundle.load(agent_bundle).manifest
    assert m.split_points[0].bytes_per_sample["fp32"] > m.input.sample_elements()
    n = len(exits)
    b = planned_bundle(agent_bundle, tmp_path / "b.edgeexit", exits, {"half": 0.5}, [2.0] * (n - 1),
                       [1.0] + [500.0] * (n - 1))
    data = json.loads((b / "manifest.json").read_text())
    data["policy"]["candidates"][0]["thresholds"] = [float(t) for t in half_at_exit0(exits).thresholds]
    (b / "manifest.json").write_text(json.dumps(data))
    rt = DeviceRuntime(b, DeviceOptions(cloud=cloud.target, split="auto", network="3g"))
    assert rt.adapter.plan().label == "cascade@0/half"
    res = rt.infer(pixels)
    decided = np.array(res.decided)
    assert res.split == "cascade@0" and (decided == DEVICE).sum() == 16 and (decided == CLOUD).sum() == 16
    np.testing.assert_allclose(res.probabilities[decided == CLOUD], softmax(exits[-1][decided == CLOUD]), atol=1e-5)
    rt.close()


def test_adapter_picks_carry_the_setting_except_for_cloud_only():
    from edgeexit.planner import ExitSetting, Planner
    from edgeexit.profiles import NetworkProfile
    from edgeexit.runtime.adaptation import Choice, PlannerAdapter
    from edgeexit.runtime.link_stats import LinkStats
    from tests.test_planner import profile, synthetic

    planner = Planner(synthetic(3, [4000, 2000]), profile([2.0, 30.0, 30.0]), profile([0.5] * 3),
                      settings=[ExitSetting(NO_EXIT, (), (0.0, 0.0)), ExitSetting("s", (0.8, 0.9), (0.6, 0.1))])
    mid = PlannerAdapter(planner, NetworkProfile("mid", 4.0, 40.0, 20.0), LinkStats())
    assert mid.pick() == Choice("cascade@0", "s", (0.8, 0.9)) and mid.choose() == "cascade@0"
    fast = PlannerAdapter(planner, NetworkProfile("fast", 1000.0, 1000.0, 1.0), LinkStats())
    assert fast.plan().strategy == "cloud-only"
    # the device runs nothing under cloud-only: a fallback keeps the calibrated policy rather than "no-exit"
    assert fast.pick().split == "cloud" and fast.pick().setting is None
