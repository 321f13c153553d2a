"""Online adaptation: the planner adapter follows the measured bandwidth with hysteresis; the bandit learns."""

import time
from types import SimpleNamespace

import numpy as np
import pytest

from edgeexit.planner import ExitSetting, Planner
from edgeexit.profiles import NetworkProfile
from edgeexit.runtime.adaptation import Adapter, AdaptOptions, BanditAdapter, PlannerAdapter, candidate_split
from edgeexit.runtime.link_stats import LinkStats
from tests.test_planner import profile, synthetic


def _adapter(clock=None):
    # boundaries shrink with depth; a heavy last segment makes offloading worth it on a good link
    manifest = synthetic(3, [20000, 5000])
    planner = Planner(manifest, profile([2, 2, 40]), profile([0.1, 0.1, 0.5]),
                      settings=[ExitSetting("s", (), (0.3, 0.2))])
    link = LinkStats(window=8, smoothing=1.0)
    kw = {"clock": clock} if clock else {}
    return PlannerAdapter(planner, NetworkProfile("x", 50, 50, 5), link, AdaptOptions(), **kw), link, manifest


def _feed(link, manifest, split, mbit, n, rtt_s=0.005):
    for i in range(n):
        nbytes = manifest.split_points[split].bytes_per_sample["int8"] * (1 + i % 3)  # varied sizes: separable
        link.record(nbytes, rtt_s + nbytes * 8 / (mbit * 1e6))


def test_split_follows_bandwidth_down_and_back():
    adapter, link, manifest = _adapter()
    good = adapter.plan()
    assert good.strategy in ("split", "cloud-only")
    _feed(link, manifest, 1, 1.0, 8)
    bad = adapter.plan()
    assert bad.label != good.label and bad.latency_ms > good.latency_ms
    depth = {"cloud-only": -1, "device-only": 99}
    assert depth.get(bad.strategy, bad.split) >= depth.get(good.strategy, good.split)  # no deeper cloud use
    _feed(link, manifest, 1, 50.0, 8)
    assert adapter.plan().label == good.label
    assert adapter.replans == 2


def test_hysteresis_ignores_small_changes():
    adapter, link, manifest = _adapter()
    first = adapter.plan()
    _feed(link, manifest, 1, 42.0, 8)  # within 35% of 50
    assert adapter.plan() is first and adapter.replans == 0


def test_probe_only_while_nothing_is_offloaded():
    now = [0.0]
    adapter, link, manifest = _adapter(clock=lambda: now[0])
    assert not adapter.probe_due()  # offloading: real requests are the samples
    _feed(link, manifest, 1, 0.05, 8)  # terrible link -> device-only
    assert adapter.plan().strategy == "device-only"
    now[0] += 2.0
    assert adapter.probe_due() and not adapter.probe_due()  # once per interval
    gaps, last = [], now[0]
    for _ in range(400):  # probes that change nothing back off to the cap
        now[0] += 0.25
        if adapter.probe_due():
            gaps.append(now[0] - last)
            last = now[0]
    assert gaps[:3] == [1.0, 2.0, 4.0] and set(gaps[3:]) == {4.0}
    assert adapter.probe_split() == "cloud"  # the raw input: a probe costs the device no compute
    assert candidate_split(adapter.choice) == "device"


def test_both_adapters_implement_the_adapter_protocol():
    adapter, _, _ = _adapter()
    bandit = BanditAdapter(2, device_ms=[1, 1, 1])
    assert isinstance(adapter, Adapter) and isinstance(bandit, Adapter)
    assert adapter.choose() == candidate_split(adapter.choice)  # a split value, not a planner candidate
    cloud_ms = adapter.planner.cloud_ms
    assert adapter.expected_cloud_s(0, 3) == pytest.approx(3 * sum(cloud_ms[1:]) / 1000)
    assert adapter.expected_cloud_s("cloud", 2) == pytest.approx(2 * sum(cloud_ms) / 1000)
    assert adapter.expected_cloud_s("device", 5) == 0.0
    assert bandit.arms == [0, 1, "device"] and not bandit.probe_due() and bandit.expected_cloud_s(0, 4) == 0.0


def _result(conf, device_ms, network_ms):
    probs = np.array([[conf, 1 - conf]], np.float32)
    lat = SimpleNamespace(device_ms=device_ms, encode_ms=0.0, network_ms=network_ms, cloud_ms=0.0)
    return SimpleNamespace(probabilities=probs, latency=lat)


def test_bandit_converges_to_the_best_arm():
    rng = np.random.default_rng(0)
    bandit = BanditAdapter(3, device_ms=[5, 5, 5, 5], options=AdaptOptions(mode="bandit", mu=0.5))
    # arm outcomes (confidence, device ms, network ms): split 1 is cheap and confident
    env = {0: (0.9, 5, 30), 1: (0.95, 10, 3), 2: (0.96, 15, 25), "device": (0.97, 20, 0)}
    for _ in range(400):
        arm = bandit.choose()
        conf, dev, net = env[arm]
        bandit.observe(arm, _result(min(conf + rng.normal(0, 0.02), 1), dev, net * rng.uniform(0.8, 1.2)))
    assert bandit.best() == 1
    assert bandit.counts[1] > 0.6 * bandit.counts.sum()  # UCB1 keeps exploring, so not all


def test_link_change_shows_within_a_few_samples_even_after_a_long_stable_phase():
    link = LinkStats()  # the runtime's defaults: 32-sample window, EWMA 0.3
    nbytes = 3136  # one size only, as when every offload sends the same input
    link.record_rtt(0.005)
    for _ in range(40):
        link.record(nbytes, 0.005 + nbytes * 8 / 50e6)
    assert abs(link.estimate().bandwidth_bps / 50e6 - 1) < 0.1
    link.record(nbytes, 0.5)  # one outlier: no reset
    assert link.shifts == 0

    def samples_until(mbit: float, crossed) -> int:
        for n in range(1, 7):
            link.record(nbytes, 0.005 + nbytes * 8 / (mbit * 1e6))
            if crossed(link.estimate().bandwidth_bps):
                return n
        return 99

    assert samples_until(1.0, lambda bw: bw < 2e6) <= 4 and link.shifts == 1
    assert samples_until(50.0, lambda bw: bw > 25e6) <= 4 and link.shifts == 2


def test_a_stale_rtt_above_the_samples_still_shows_a_recovered_link():
    # Seen in the planner scenario: the warm-up timed the RTT at 8 ms while the agent was busy loading; after the
    # link fell to 1 Mbit/s and recovered, probes of one size took 6.5 ms, below that RTT. They must read as a
    # fast link, not leave the agent with no estimate (stuck on the device).
    link = LinkStats()
    nbytes = 3136
    link.record_rtt(0.008)
    for _ in range(10):
        link.record(nbytes, 0.0065 + nbytes * 8 / 1e6)
    assert link.estimate().bandwidth_bps < 1.5e6
    for _ in range(3):
        link.record(nbytes, 0.0065)
    est = link.estimate()
    assert link.shifts == 1 and est.bandwidth_bps is not None and est.bandwidth_bps > 25e6
    assert est.transfer_s(nbytes) < 0.0065 * 1.5  # the planner's prediction stays near what was measured


def test_the_rtt_is_the_fastest_probe_and_no_slower_than_the_offloads():
    # Seen in `edgeexit bench --logs` on an emulated Raspberry Pi (a CPU quota): RTT probes timed while the agent
    # loaded or after a probe had spent its CPU budget read 35-66 ms on an 8 ms link, every offload was priced
    # 30-50 ms too high and the agent went device-only where offloading was twice as fast.
    link = LinkStats()
    for rtt in (0.050, 0.008, 0.040):
        link.record_rtt(rtt)
    assert link.estimate().rtt_s == pytest.approx(0.008)  # waiting for a CPU only adds: the fastest probe
    slow = LinkStats()
    slow.record_rtt(0.035)
    for i in range(12):
        slow.record(9216, 0.012 + 0.0005 * (i % 3))  # the offloads themselves cross in 12-13 ms
    est = slow.estimate()
    assert est.rtt_s <= 0.0125
    assert est.transfer_s(9216) == pytest.approx(0.0125, rel=0.2)  # priced as measured, not 35 ms + transfer


def test_an_rtt_change_at_the_same_bandwidth_re_plans():
    adapter, link, manifest = _adapter()
    assert adapter.network.rtt_ms == 5
    _feed(link, manifest, 1, 50.0, 8, rtt_s=0.2)  # bandwidth within the band, the round trip 40x longer
    adapter.plan()
    assert adapter.replans == 1 and adapter.network.rtt_ms == pytest.approx(200, rel=0.05)


def _cloud_result(rows: int, bytes_sent: int, cloud_ms: float | None):
    return SimpleNamespace(decided=["cloud"] * rows, bytes_sent=bytes_sent,
                           latency=SimpleNamespace(cloud_ms=cloud_ms))


def test_a_raw_input_bigger_than_planned_re_plans_without_a_bandwidth_change():
    # The planner assumes 1 byte per pixel for the raw input; pixels off the 8-bit grid travel as fp32 (4 bytes).
    manifest = synthetic(3, [20000, 5000])
    planner = Planner(manifest, profile([2, 2, 40]), profile([0.1, 0.1, 0.5]))
    net = NetworkProfile("x", 0.5, 50, 5)
    adapter = PlannerAdapter(planner, net, LinkStats(window=8, smoothing=1.0), AdaptOptions())
    planned = planner.input_bytes
    assert adapter.plan().strategy == "cloud-only"  # 1 byte/pixel: 18 ms on 0.5 Mbit/s, vs 44 ms on the device
    adapter.observe("cloud", _cloud_result(2, 2 * 4 * planned, None))
    assert planner.input_bytes == 4 * planned
    assert adapter.plan().strategy != "cloud-only" and adapter.replans == 1
    adapter.observe("cloud", _cloud_result(1, 4 * planned, None))  # as planned now: no re-plan
    adapter.plan()
    assert adapter.replans == 1


def test_a_slower_cloud_than_profiled_re_plans():
    adapter, link, manifest = _adapter()
    first = adapter.plan()
    assert first.strategy in ("split", "cloud-only")
    for _ in range(20):  # the server reports 100x its profile: offloading stops paying
        adapter.observe(first_split := candidate_split(first), _cloud_result(1, 100, 50.0 * 100))
    assert adapter.planner.cloud_scale > 10
    again = adapter.plan()
    assert adapter.replans >= 1 and again.label != first.label, first_split


def test_one_slow_cloud_answer_does_not_move_the_plan_but_probes_bring_the_cloud_back():
    adapter, link, manifest = _adapter()
    first = adapter.plan()
    split, size = candidate_split(first), int(adapter.planner.input_bytes)  # the raw input travels as planned
    adapter.observe(split, _cloud_result(1, size, 500.0))  # one cold request: 1000x the profile
    assert adapter.plan() is first and adapter.replans == 0
    for _ in range(5):  # the server really is slow now: the plan leaves the cloud
        adapter.observe(split, _cloud_result(1, size, 500.0))
    away = adapter.plan()
    assert away.label != first.label
    for _ in range(15):  # probes report the server fast again (while nothing is offloaded)
        adapter.observe_cloud(0, 0.1, 1)
    assert adapter.plan().label == first.label


def test_a_probe_waits_out_the_request_that_asked_and_times_the_rtt_first():
    # A fake client isolates the ordering; tests/test_bandit_runtime.py probes a real service.
    from edgeexit.runtime.link_monitor import PROBE_DELAY_S, LinkMonitor

    calls = []

    class Client:
        def ready(self, timeout):
            calls.append(("ready", time.monotonic()))
            return True

        def infer(self, model, input_name, wire, *, timeout, **kw):
            calls.append(("infer", time.monotonic()))
            return SimpleNamespace(server=None)

    monitor = LinkMonitor(Client(), "m")
    t0 = time.monotonic()
    monitor.probe("cloud", "x", lambda: SimpleNamespace(data=b"\0" * 9216), 1.0).join(5)
    assert [name for name, _ in calls] == ["ready", "infer"]
    assert calls[0][1] - t0 >= PROBE_DELAY_S * 0.9  # not on the CPU tail of the request that triggered it
    est = monitor.stats.estimate()
    assert est.samples == 1 and est.rtt_s is not None
