"""The fixed per-request cost (LatencyProfile.request_ms): stored and scaled with the profile, measured on real
servers on loopback, and added by the planner to every candidate (device) and to the offloaded share (cloud)."""

import json
import shutil
import subprocess
import sys
import time

import pytest

from edgeexit.bundle import Bundle
from edgeexit.errors import ConfigError
from edgeexit.planner import Planner
from edgeexit.profiles import DeviceClass, LatencyProfile
from edgeexit.runtime.request_cost import measure_request_ms
from edgeexit.runtime.runner import SegmentRunner
from tests.test_planner import profile, synthetic
from tests.test_planner_cascade import CLOUD, DEVICE, MID, REPLY_MS, SETTINGS

R_DEV, R_CLOUD = 3.0, 5.0


def test_request_ms_round_trips_and_old_profiles_load_as_zero(tmp_path):
    prof = LatencyProfile("onnxruntime", 1, {1: [1.0, 2.0]}, request_ms=1.25)
    again = LatencyProfile.from_dict(json.loads(json.dumps(prof.to_dict())))
    assert again == prof and again.request_ms == 1.25
    prof.save(tmp_path / "p.json")
    assert LatencyProfile.load(tmp_path / "p.json").request_ms == 1.25

    old = prof.to_dict()
    del old["request_ms"]  # a profile stored before the field existed
    assert LatencyProfile.from_dict(old).request_ms == 0.0
    with pytest.raises(ConfigError, match="edgeexit profile"):
        LatencyProfile.from_dict({**prof.to_dict(), "request_ms": "fast"})


def test_scaled_multiplies_request_ms_like_the_segments():
    prof = LatencyProfile("onnxruntime", 1, {1: [1.0, 2.0]}, request_ms=2.0)
    pi = prof.scaled(DeviceClass("pi4", 13.4))
    assert pi.request_ms == pytest.approx(26.8)
    assert pi.per_sample_ms() == pytest.approx([13.4, 26.8])
    assert prof.request_ms == 2.0  # the host measurement is untouched


def _planners() -> tuple[Planner, Planner]:
    m = synthetic(3, [4000, 2000])
    dev, cloud = profile(DEVICE), profile(CLOUD)
    dev.request_ms, cloud.request_ms = R_DEV, R_CLOUD
    return Planner(m, profile(DEVICE), profile(CLOUD), settings=SETTINGS), Planner(m, dev, cloud, settings=SETTINGS)


def test_planner_adds_device_request_to_every_candidate_and_cloud_request_to_the_offloaded_share():
    base, withreq = (({c.label: c for c in p.candidates(MID)}) for p in _planners())
    assert base.keys() == withreq.keys() and len(base) > 5
    strategies = set()
    for label, b in base.items():
        c = withreq[label]
        p = b.offload_fraction
        strategies.add(b.strategy)
        assert c.latency_ms == pytest.approx(b.latency_ms + R_DEV + p * R_CLOUD), label
        assert c.device_ms == pytest.approx(b.device_ms + R_DEV), label
        assert c.cloud_ms == pytest.approx(b.cloud_ms + p * R_CLOUD), label
    assert strategies == {"device-only", "split", "cascade", "cloud-only"}

    # by hand (reach = [1, 0.4, 0.3] under setting "s"; see test_planner_cascade)
    raw_net = 20 + 784 * 8 / 4e3 + REPLY_MS
    assert withreq["cloud-only/no-exit"].latency_ms == pytest.approx(R_DEV + raw_net + 1.5 + R_CLOUD)
    assert withreq["cloud-only/no-exit"].device_ms == pytest.approx(R_DEV)
    assert withreq["cascade@0/s"].latency_ms == pytest.approx(R_DEV + 0.6 * 2 + 0.4 * (2 + raw_net + 1.5 + R_CLOUD))
    assert withreq["split@1/int8/s"].latency_ms == pytest.approx(
        R_DEV + 0.6 * 2 + 0.1 * 32 + 0.3 * (32 + 20 + 2000 * 8 / 4e3 + REPLY_MS + 0.5 + R_CLOUD))
    assert withreq["device-only/s"].latency_ms == pytest.approx(R_DEV + 0.6 * 2 + 0.1 * 32 + 0.3 * 62)


def test_a_costly_cloud_request_path_moves_the_plan_to_the_device():
    m = synthetic(3, [4000, 2000])
    plain = Planner(m, profile(DEVICE), profile(CLOUD), settings=SETTINGS).plan(MID).choice
    cloud = profile(CLOUD)
    cloud.request_ms = 100.0
    costly = Planner(m, profile(DEVICE), cloud, settings=SETTINGS).plan(MID).choice
    assert plain.offload_fraction > 0 and costly.strategy == "device-only"


@pytest.mark.parametrize("role", ["device", "cloud"])
def test_request_ms_is_measured_on_real_servers(tiny_bundle, role):
    runner = SegmentRunner(tiny_bundle)
    t = time.perf_counter()
    overhead = measure_request_ms(runner, role)
    assert time.perf_counter() - t < 5.0  # profiling stays quick
    assert 0 < overhead < 50


def test_request_ms_refuses_unknown_roles(tiny_bundle):
    with pytest.raises(ConfigError, match="device"):
        measure_request_ms(SegmentRunner(tiny_bundle), "phone")


def test_cli_profile_store_keeps_request_ms(tiny_bundle, tmp_path):
    bundle = tmp_path / "tiny.edgeexit"
    shutil.copytree(tiny_bundle, bundle)
    out = subprocess.run([sys.executable, "-m", "edgeexit", "profile", str(bundle), "--role", "cloud", "--store",
                          "--repeats", "5"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "per-request overhead (cloud" in out.stdout
    stored = LatencyProfile.from_dict(Bundle.load(bundle).manifest.profiles["cloud"])
    assert 0 < stored.request_ms < 50
    assert f"{stored.request_ms:.3f} ms" in out.stdout
