"""edgeexit.testbed.experiment: real serve + agent processes behind the relay, on the tiny bundle."""

import subprocess
import sys

import numpy as np
import pytest

from edgeexit.errors import ConfigError
from edgeexit.profiles import load_network
from edgeexit.runtime.runner import SegmentRunner
from edgeexit.testbed import experiment as ex
from edgeexit.testbed.experiment import Condition, Strategy, prepare_bundle, run_condition, subsample


def _edgeexit(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgeexit", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_static_strategies_through_real_processes_give_sane_rows(tiny_bundle, tmp_path):
    runner = SegmentRunner(tiny_bundle)
    x = np.random.default_rng(1).random((3, 1, 28, 28), dtype=np.float32)
    y = runner.run_all(runner.normalize(x))[-1].argmax(1)  # the local full model's answer is "the truth"
    cond = Condition("test-link", up_mbit=20, down_mbit=20, rtt_ms=40)
    strategies = [Strategy("cloud-only", "cloud", "never"), Strategy("device-only", "device", "never")]
    with ex.Testbed(ex.TestbedOptions(tiny_bundle, device_class=None, warmup=1, warmup_fresh=1,
                                      log_dir=tmp_path)) as bed:
        rows = run_condition(bed, strategies, cond, x, y)
    assert [r.strategy for r in rows] == ["cloud-only", "device-only"] * 3  # interleaved sample by sample
    cloud = [r for r in rows if r.strategy == "cloud-only"]
    device = [r for r in rows if r.strategy == "device-only"]
    assert all(r.label == r.truth for r in rows)  # same answers as the bundle run locally
    in_bytes = runner.manifest.input.sample_elements() * 4
    assert all(r.bytes_sent == in_bytes and r.decided == "cloud" and r.split == "cloud" for r in cloud)
    assert min(r.wall_ms for r in cloud) >= 40  # the relay's RTT is imposed
    assert np.mean([r.cloud_ms for r in cloud]) > 0
    assert all(r.cloud_ms == 0 and r.bytes_sent == 0 for r in device)
    assert np.mean([r.device_ms for r in device]) > 0
    assert all(r.split == "device" and not r.fallback for r in device)


def test_condition_maps_to_relay_and_a_loadable_prior(tmp_path):
    cond = Condition.from_network(load_network("4g"))
    link = cond.link()
    assert link.delay_ms == cond.rtt_ms / 2 and link.up_mbit == 8.0 and link.down_mbit == 30.0
    prior = load_network(str(cond.write_prior(tmp_path)))
    assert (prior.up_mbit, prior.down_mbit, prior.rtt_ms) == (8.0, 30.0, 50.0)


def test_subsample_spreads_over_the_split():
    idx = subsample(5, 10_000)
    assert len(idx) == 5 and idx[0] == 0 and idx[-1] == 9_999 and np.all(np.diff(idx) > 1000)
    assert len(subsample(50, 10)) == 10
    with pytest.raises(ConfigError):
        subsample(0, 10)


def test_prepare_says_what_to_do_without_a_model(tmp_path):
    with pytest.raises(ConfigError, match="edgeexit export"):
        prepare_bundle(tmp_path / "missing.edgeexit")
