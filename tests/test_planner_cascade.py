"""Cascade candidates (device exits, then the raw uint8 input to the whole cloud model), costs worked by hand,
the thresholds a candidate carries, and the cloud cost learning from server-reported time."""

import pytest

from edgeexit.errors import ConfigError
from edgeexit.planner import NO_EXIT, ExitSetting, Planner
from edgeexit.profiles import NetworkProfile
from tests.test_planner import profile, synthetic

# 3 segments; boundary 0 is 4000 elements (int8: 4000 bytes), boundary 1 is 2000; the input is 1x28x28 = 784
# bytes as uint8, so sending the input is cheaper than any boundary.
EXITS = ExitSetting("s", (0.8, 0.9), (0.6, 0.1))  # 60% leave at exit 0, 10% at exit 1, 30% reach the final
SETTINGS = [ExitSetting(NO_EXIT, (), (0.0, 0.0)), EXITS]
DEVICE = [2.0, 30.0, 30.0]
CLOUD = [0.5, 0.5, 0.5]
MID = NetworkProfile("mid", 4.0, 40.0, 20.0)  # 4 Mbit/s up: 1 byte = 0.002 ms
REPLY_MS = 40 * 8 / 40e3  # 10 classes x 4 bytes down at 40 Mbit/s


def planner() -> Planner:
    return Planner(synthetic(3, [4000, 2000]), profile(DEVICE), profile(CLOUD), settings=SETTINGS)


def by_label(plan_or_cands) -> dict:
    cands = getattr(plan_or_cands, "candidates", plan_or_cands)
    return {c.label: c for c in cands}


def test_cascade_costs_by_hand_and_wins_at_mid_bandwidth():
    plan = planner().plan(MID)
    c = by_label(plan)
    # reach = [1, 0.4, 0.3]; rows leaving at exit 0 cost 2 ms, at exit 1 cost 32 ms
    raw_net = 20 + 784 * 8 / 4e3 + REPLY_MS
    cascade0 = 0.6 * 2 + 0.4 * (2 + raw_net + 1.5)
    split0_int8 = 0.6 * 2 + 0.4 * (2 + 20 + 4000 * 8 / 4e3 + REPLY_MS + 1.0)
    cascade1 = 0.6 * 2 + 0.1 * 32 + 0.3 * (32 + raw_net + 1.5)
    device_only = 0.6 * 2 + 0.1 * 32 + 0.3 * 62
    cloud_only = raw_net + 1.5
    assert c["cascade@0/s"].latency_ms == pytest.approx(cascade0)
    assert c["split@0/int8/s"].latency_ms == pytest.approx(split0_int8)
    assert c["cascade@1/s"].latency_ms == pytest.approx(cascade1)
    assert c["device-only/s"].latency_ms == pytest.approx(device_only)
    assert c["cloud-only/no-exit"].latency_ms == pytest.approx(cloud_only)
    assert c["cloud-only/no-exit"].bytes == 784 and c["cloud-only/no-exit"].encoding == "uint8"

    choice = plan.choice
    assert choice.label == "cascade@0/s" and choice.latency_ms < min(split0_int8, device_only, cloud_only)
    assert (choice.strategy, choice.split, choice.encoding) == ("cascade", 0, "uint8")
    assert choice.thresholds == (0.8, 0.9)  # what the runtime must apply
    assert choice.offload_fraction == pytest.approx(0.4)
    assert choice.bytes == pytest.approx(0.4 * 784)
    assert choice.device_ms == pytest.approx(2.0)  # every input runs segment 0, nothing is encoded
    assert choice.cloud_ms == pytest.approx(0.4 * 1.5)  # the whole model, for the offloaded rows only


def test_cascade_loses_at_high_rtt_and_at_high_bandwidth():
    far = planner().plan(NetworkProfile("far", 4.0, 40.0, 300.0))
    assert far.choice.label == "device-only/s"
    assert by_label(far)["cascade@0/s"].latency_ms == pytest.approx(
        0.6 * 2 + 0.4 * (2 + 300 + 784 * 8 / 4e3 + REPLY_MS + 1.5))
    fast = planner().plan(NetworkProfile("fast", 1000.0, 1000.0, 1.0))
    assert fast.choice.strategy == "cloud-only"


def test_no_cascade_when_no_device_exit_can_take_anything():
    labels = by_label(planner().candidates(MID))
    assert not [k for k in labels if k.startswith("cascade") and k.endswith(NO_EXIT)]
    # cascade@last would be device-only
    assert not [k for k in labels if k.startswith("cascade@2")]


def test_candidates_carry_the_calibrated_thresholds():
    m = synthetic(3, [4000, 2000])
    m.policy = {"kind": "confidence", "thresholds": [0.7, 0.8], "final_accuracy": 0.9, "candidates": [
        {"name": "a", "thresholds": [0.7, 0.8], "exit_rates": [0.5, 0.2, 0.3], "valid": True},
        {"name": "b", "thresholds": [0.1, 0.1], "exit_rates": [0.9, 0.05, 0.05], "valid": False},
    ]}
    cands = Planner(m, profile(DEVICE), profile(CLOUD)).candidates(MID)
    assert {c.setting: c.thresholds for c in cands} == {NO_EXIT: (), "a": (0.7, 0.8)}


def test_observe_cloud_takes_the_median_server_time_into_the_cloud_cost():
    p = planner()
    base = by_label(p.candidates(MID))["cloud-only/no-exit"].latency_ms
    p.observe_cloud(3.0, first_segment=0, rows=1)  # whole model took 3 ms, the profile says 1.5 ...
    p.observe_cloud(3.0, first_segment=0, rows=1)
    assert p.cloud_scale == 1.0  # ... but two samples are not enough to move the plan
    p.observe_cloud(3.0, first_segment=0, rows=1)
    assert p.cloud_scale == pytest.approx(2.0) and p.cloud_ms == pytest.approx([1.0, 1.0, 1.0])
    assert by_label(p.candidates(MID))["cloud-only/no-exit"].latency_ms == pytest.approx(base + 1.5)
    p.observe_cloud(1.0, first_segment=2, rows=2)  # tail: 0.5 ms per row, as profiled (ratio 1)
    p.observe_cloud(60.0, first_segment=0, rows=1)  # one cold request, 40x: an outlier the median ignores
    assert p.cloud_scale == pytest.approx(2.0)


def test_a_busy_server_moves_the_plan_off_the_cloud():
    p = planner()
    fast = NetworkProfile("fast", 1000.0, 1000.0, 1.0)
    assert p.plan(fast).choice.strategy == "cloud-only"
    for _ in range(30):
        p.observe_cloud(60.0, rows=1)  # 40x the profile, as a loaded server reports
    assert p.cloud_scale > 30
    busy = p.plan(fast).choice
    assert busy.strategy != "cloud-only" and busy.offload_fraction < 1  # the device's exits now pay off


@pytest.mark.parametrize("args", [(1.0, 3, 1), (1.0, -1, 1), (-1.0, 0, 1), (float("nan"), 0, 1), (1.0, 0, 0)])
def test_observe_cloud_rejects_nonsense(args):
    with pytest.raises(ConfigError):
        planner().observe_cloud(*args)


def test_sweep_names_cascade_series_and_table_shows_them():
    p = planner()
    sweep = p.sweep(MID, [1, 4, 100])
    assert {"cascade@0", "cascade@1", "split@0", "split@1", "device-only", "cloud-only", "planner"} <= set(
        sweep["series"])
    assert all(len(v) == 3 for v in sweep["series"].values())
    assert sweep["chosen"][1] == "cascade@0/s"
    assert "cascade@0/s **(chosen)**" in p.plan(MID).table()
