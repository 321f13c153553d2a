"""DeviceRuntime on its own: local early exits, split resolution, fallback rules (cloud faked here only to
isolate the fallback logic; tests/test_device_cloud.py does the same against a real service)."""

from __future__ import annotations

import numpy as np
import pytest

from edgeexit.bundle import Bundle
from edgeexit.errors import ConfigError, InvalidTensor, LinkTimeout, PeerUnavailable
from edgeexit.policies import make_policy, softmax
from edgeexit.runtime.breaker import BreakerOptions, RetryOptions
from edgeexit.runtime.decided import CLOUD, DEVICE, FALLBACK, to_codes, to_names
from edgeexit.runtime.device import DeviceOptions, DeviceRuntime
from edgeexit.runtime.runner import SegmentRunner
from edgeexit.runtime.splits import auto_split
from tests.fixtures_agent import input_shape


def reference(bundle, x):
    r = SegmentRunner(bundle)
    return r.run_all(r.normalize(x))


def half_exit_policy(bundle, x):
    """Confidence thresholds at the median of each early exit's confidence: about half the rows exit at 0."""
    exits = reference(bundle, x)
    taus = [float(np.median(softmax(e).max(1))) for e in exits[:-1]]
    return make_policy("confidence", taus)


class FakeClient:
    """Scripted cloud: raises the given errors in turn, then answers with the reference tail."""

    def __init__(self, bundle, errors=()):
        self.runner = SegmentRunner(bundle)
        self.errors = list(errors)
        self.calls = 0

    def infer(self, model, input_name, tensor, *, timeout, request_id=""):
        from edgeexit.runtime.codec import decode

        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        x = decode(tensor.data, tensor.datatype, tensor.shape, tensor.params)
        start = 0 if input_name == "input" else int(input_name[len("boundary"):]) + 1
        out = self.runner.run(x, start=start)
        return {f"exit{j}": v for j, v in out.exits.items()}

    def ready(self, timeout=1.0):
        return True

    def close(self):
        pass


def test_device_only_never_exit_equals_the_whole_bundle(agent_bundle, raw_batch):
    rt = DeviceRuntime(agent_bundle, DeviceOptions(policy="never"))
    res = rt.infer(raw_batch)
    ref = reference(agent_bundle, raw_batch)[-1]
    assert rt.split == "device"
    np.testing.assert_allclose(res.probabilities, softmax(ref), atol=1e-6)
    assert (res.labels == ref.argmax(1)).all()
    assert set(res.decided) == {DEVICE} and (res.exits == len(rt.manifest.exits) - 1).all()
    assert res.bytes_sent == 0 and res.latency.device_ms > 0 and res.latency.total_ms >= res.latency.device_ms


def test_rows_exit_early_where_the_policy_says(agent_bundle, raw_batch):
    policy = half_exit_policy(agent_bundle, raw_batch)
    res = DeviceRuntime(agent_bundle, DeviceOptions(policy=policy)).infer(raw_batch)
    exit0 = reference(agent_bundle, raw_batch)[0]
    early = softmax(exit0).max(1) >= policy.thresholds[0]
    assert 0 < early.sum() < len(raw_batch)
    assert (res.exits[early] == 0).all() and (res.exits[~early] > 0).all()
    assert (res.labels[early] == exit0[early].argmax(1)).all()


def test_static_auto_split_picks_fewest_fp32_bytes_in_the_first_half(agent_bundle):
    m = Bundle.load(agent_bundle).manifest
    half = m.split_points[: max(1, len(m.segments) // 2)]
    best = min(half, key=lambda p: p.bytes_per_sample["fp32"])
    assert auto_split(m) == best.index
    opts = DeviceOptions(policy="never", split="auto", adapt="off")
    rt = DeviceRuntime(agent_bundle, opts, client=FakeClient(agent_bundle))
    assert rt.split == best.index and rt.cloud_model == f"{m.name}@{best.index}" and rt.adapter is None


@pytest.mark.parametrize("network, slowdown, expect", [("congested", 1.0, "device"), ("wifi", 400.0, "cloud")])
def test_auto_split_is_the_planners_choice(agent_bundle, raw_batch, network, slowdown, expect):
    """A tiny model on a bad link stays on the device; an (emulated) very slow device ships the input."""
    opts = DeviceOptions(policy="never", split="auto", network=network, slowdown=slowdown)
    rt = DeviceRuntime(agent_bundle, opts, client=FakeClient(agent_bundle))
    assert rt.adapter is not None and rt.split == expect
    res = rt.infer(raw_batch[:2])
    assert res.split == expect and len(res.labels) == 2


@pytest.mark.parametrize("opts, match", [
    (dict(split="7"), "outside"),
    (dict(split="middle"), "not a number"),
    (dict(on_failure="panic"), "on_failure"),
    (dict(encoding="bf16"), "encoding"),
    (dict(split="cloud", encoding="int8"), "int8"),
    (dict(deadline_ms=0), "deadline"),
])
def test_bad_options_are_config_errors(agent_bundle, opts, match):
    with pytest.raises(ConfigError, match=match):
        DeviceRuntime(agent_bundle, DeviceOptions(policy="never", **opts), client=FakeClient(agent_bundle))


def test_split_cloud_without_a_cloud_is_refused(agent_bundle):
    with pytest.raises(ConfigError, match="--cloud"):
        DeviceRuntime(agent_bundle, DeviceOptions(policy="never", split="cloud"))


def test_bad_input_is_invalid_tensor(agent_bundle):
    rt = DeviceRuntime(agent_bundle, DeviceOptions(policy="never"))
    with pytest.raises(InvalidTensor):
        rt.infer(np.zeros((2, 3), np.float32))
    with pytest.raises(InvalidTensor):
        rt.infer(np.full((2, *input_shape(agent_bundle)), np.nan, np.float32))


def test_offloaded_rows_are_answered_by_the_cloud(agent_bundle, raw_batch):
    policy = half_exit_policy(agent_bundle, raw_batch)
    fake = FakeClient(agent_bundle)
    rt = DeviceRuntime(agent_bundle, DeviceOptions(policy=policy, split=0), client=fake)
    res = rt.infer(raw_batch)
    final = reference(agent_bundle, raw_batch)[-1]
    cloud = np.array([d == CLOUD for d in res.decided])
    assert cloud.any() and not cloud.all() and fake.calls == 1
    assert (res.labels[cloud] == final[cloud].argmax(1)).all()
    assert res.bytes_sent == cloud.sum() * rt.manifest.split_points[0].bytes_per_sample["fp32"]
    assert rt.link.estimate().samples == 1


@pytest.mark.parametrize("on_failure", ["best-exit", "finish-local"])
def test_fallback_answers_every_row(agent_bundle, raw_batch, on_failure):
    fake = FakeClient(agent_bundle, errors=[LinkTimeout("late")])
    rt = DeviceRuntime(agent_bundle, DeviceOptions(policy="never", split=1, on_failure=on_failure), client=fake)
    res = rt.infer(raw_batch)
    exits = reference(agent_bundle, raw_batch)
    assert set(res.decided) == {FALLBACK} and res.bytes_sent == 0 and "LinkTimeout" in res.fallback_reason
    if on_failure == "finish-local":
        assert (res.exits == len(exits) - 1).all()
        np.testing.assert_allclose(res.probabilities, softmax(exits[-1]), atol=1e-6)
    else:
        conf = np.stack([softmax(e).max(1) for e in exits[:2]])
        assert (res.exits == conf.argmax(0)).all()
        assert np.allclose(res.probabilities.max(1), conf.max(0), atol=1e-6)


def test_breaker_opens_and_skips_the_cloud_then_probes_back(agent_bundle, raw_batch):
    clock = [0.0]
    fake = FakeClient(agent_bundle, errors=[PeerUnavailable("down")] * 2)
    events = []
    opts = DeviceOptions(policy="never", split=0, retry=RetryOptions(retries=0),
                         breaker=BreakerOptions(failure_threshold=2, cooldown_s=10))
    rt = DeviceRuntime(agent_bundle, opts, client=fake, clock=lambda: clock[0],
                       on_event=lambda e, f: events.append((e, f)))
    rt.infer(raw_batch)
    rt.infer(raw_batch)
    assert rt.breaker.state == "open" and fake.calls == 2
    res = rt.infer(raw_batch)
    assert fake.calls == 2 and set(res.decided) == {FALLBACK} and "circuit open" in res.fallback_reason
    clock[0] += 10
    res = rt.infer(raw_batch)
    assert fake.calls == 3 and set(res.decided) == {CLOUD} and rt.breaker.state == "closed"
    circuit = [f["new"] for e, f in events if e == "circuit"]
    assert circuit == ["open", "half-open", "closed"]
    assert sum(e == "fallback" for e, _ in events) == 3


def test_decided_codes_and_their_inverse_round_trip():
    names = [DEVICE, CLOUD, FALLBACK, DEVICE]
    codes = to_codes(names)
    assert codes.dtype == np.int32 and codes.tolist() == [0, 1, 2, 0]  # the agent's documented wire codes
    assert to_names(codes) == names
    with pytest.raises(InvalidTensor, match="unknown"):
        to_names([7])
