"""The planner against a brute-force per-input simulation, and the properties a split choice must have."""

import numpy as np
import pytest

from edgeexit.bundle import ExitInfo, InputSpec, Manifest, Segment, SplitPoint, TensorSpec
from edgeexit.errors import ConfigError
from edgeexit.planner import ExitSetting, Planner
from edgeexit.profiles import LatencyProfile, NetworkProfile, list_profiles, load_device_class, load_network


def synthetic(n_seg: int, boundary_elems: list[int], quantized: bool = True) -> Manifest:
    segs, splits = [], []
    for k in range(n_seg):
        inp = TensorSpec("input" if k == 0 else f"boundary{k - 1}", ["batch", 4])
        outs = ([TensorSpec(f"boundary{k}", ["batch", boundary_elems[k]])] if k < n_seg - 1 else [])
        segs.append(Segment(k, {}, [inp], outs + [TensorSpec(f"exit{k}", ["batch", 10])], [k]))
        if k < n_seg - 1:
            n = boundary_elems[k]
            splits.append(SplitPoint(k, outs[0], {"fp32": 4 * n, "fp16": 2 * n, "int8": n},
                                     {"scale": 0.1, "zero_point": -128} if quantized else None))
    return Manifest("synthetic", InputSpec("input", ["batch", 1, 28, 28]), segs, splits,
                    [ExitInfo(k, k, f"exit{k}", 10) for k in range(n_seg)])


def profile(ms: list[float], enc: dict[str, list[float]] | None = None) -> LatencyProfile:
    return LatencyProfile("onnxruntime", 1, {1: ms}, encode_ms=enc or {}, decode_ms=enc or {})


def brute_force(manifest, dev_ms, cloud_ms, exit_at, net, split, enc, cascade=False):
    """Mean latency by walking every input: exit_at[i] is the exit input i leaves at if every exit is evaluated.
    A cascade sends an input no device exit took as its raw uint8 input (1 byte per element) to the whole model."""
    n = len(manifest.segments)
    raw = (net.rtt_ms + manifest.input.sample_elements() * 8 / (net.up_mbit * 1e3) + 40 * 8 / (net.down_mbit * 1e3)
           + sum(cloud_ms))
    total = 0.0
    for e in exit_at:
        if split is None:  # cloud-only
            total += raw
        elif e <= split or split == n - 1:
            total += sum(dev_ms[: min(e, split) + 1])
        elif cascade:
            total += sum(dev_ms[: split + 1]) + raw
        else:
            nbytes = manifest.split_points[split].bytes_per_sample[enc]
            total += (sum(dev_ms[: split + 1]) + net.rtt_ms + nbytes * 8 / (net.up_mbit * 1e3)
                      + 40 * 8 / (net.down_mbit * 1e3) + sum(cloud_ms[split + 1:]))
    return total / len(exit_at)


@pytest.mark.parametrize("seed", range(8))
def test_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 6))
    manifest = synthetic(n, [int(x) for x in rng.integers(100, 20000, n - 1)])
    dev_ms = list(rng.uniform(0.5, 20, n))
    cloud_ms = list(rng.uniform(0.05, 2, n))
    exit_at = rng.integers(0, n, 500)  # each input's exit under the setting
    rates = tuple(float(np.mean(exit_at == j)) for j in range(n - 1))
    setting = ExitSetting("s", (0.9,) * (n - 1), rates)
    planner = Planner(manifest, profile(dev_ms), profile(cloud_ms), settings=[setting])
    net = NetworkProfile("x", float(rng.uniform(0.5, 100)), 50.0, float(rng.uniform(1, 100)))
    plan = planner.plan(net)
    brute = {}
    for c in plan.candidates:
        split = {"split": c.split, "cascade": c.split, "device-only": n - 1, "cloud-only": None}[c.strategy]
        want = brute_force(manifest, dev_ms, cloud_ms, exit_at, net, split, c.encoding, c.strategy == "cascade")
        assert c.latency_ms == pytest.approx(want, rel=1e-9), c.label
        brute[c.label] = want
    assert plan.choice.latency_ms == pytest.approx(min(brute.values()))


def test_extremes_pick_the_obvious():
    manifest = synthetic(3, [5000, 500])
    # cheap head, heavy last segment: at mid bandwidth the 500-byte int8 boundary beats the 784-byte uint8 input
    planner = Planner(manifest, profile([1, 1, 30]), profile([0.1, 0.1, 0.1]),
                      settings=[ExitSetting("none", (), (0.0, 0.0))])
    assert planner.plan(NetworkProfile("fast", 1000, 1000, 0.5)).choice.strategy == "cloud-only"
    assert planner.plan(NetworkProfile("slow", 0.01, 0.01, 500)).choice.strategy == "device-only"
    mid = planner.plan(NetworkProfile("mid", 0.5, 10, 5)).choice
    assert (mid.strategy, mid.split, mid.encoding) == ("split", 1, "int8")  # the heavy last segment is worth skipping


def test_int8_needs_calibrated_quantization():
    planner = Planner(synthetic(3, [100, 100], quantized=False), profile([1, 1, 1]), profile([1, 1, 1]))
    assert "int8" not in {c.encoding for c in planner.candidates(NetworkProfile("x", 10, 10, 10))}


@pytest.mark.parametrize("seed", range(5))
def test_latency_never_rises_with_bandwidth_and_split_never_moves_deeper(seed):
    rng = np.random.default_rng(100 + seed)
    n = 5
    elems = sorted((int(x) for x in rng.integers(50, 50000, n - 1)), reverse=True)  # boundaries shrink with depth
    manifest = synthetic(n, elems)
    rates = tuple(float(x) for x in rng.dirichlet(np.ones(n))[: n - 1])
    planner = Planner(manifest, profile(list(rng.uniform(1, 10, n))), profile(list(rng.uniform(0.1, 1, n))),
                      settings=[ExitSetting("s", (), rates)])
    prev_lat, prev_depth = float("inf"), n
    for bw in np.geomspace(0.1, 1000, 40):
        choice = planner.plan(NetworkProfile("x", float(bw), float(bw), 20)).choice
        depth = {"cloud-only": -1, "device-only": n - 1}.get(choice.strategy, choice.split)
        assert choice.latency_ms <= prev_lat + 1e-9
        assert depth <= prev_depth, f"split moved deeper at {bw:.2f} Mbit/s"
        prev_lat, prev_depth = choice.latency_ms, depth


def test_profile_mismatch_is_a_clear_error():
    with pytest.raises(ConfigError, match="edgeexit profile"):
        Planner(synthetic(3, [1, 1]), profile([1, 1]), profile([1, 1, 1]))


def test_shipped_profiles_load_and_say_where_numbers_come_from():
    assert {"raspberry-pi-4", "raspberry-pi-5", "mid-range-phone", "jetson-nano"} <= set(list_profiles("classes"))
    assert {"3g", "4g", "5g", "wifi", "congested"} <= set(list_profiles("networks"))
    for name in list_profiles("classes"):
        assert load_device_class(name).source
    for name in list_profiles("networks"):
        assert load_network(name).source
    pi = load_device_class("raspberry-pi-4")
    scaled = profile([1.0, 2.0]).scaled(pi)
    assert scaled.per_sample_ms() == [pi.slowdown, 2 * pi.slowdown] and scaled.device_class == "raspberry-pi-4"


def test_profile_toml_never_executes_and_rejects_unknown_keys(tmp_path):
    bad = tmp_path / "evil.toml"
    bad.write_text('name = "x"\nslowdown = 2.0\nexec = "__import__(\'os\').system(\'false\')"\n')
    with pytest.raises(ConfigError, match="unknown keys"):
        load_device_class(str(bad))
    with pytest.raises(ConfigError, match="unknown network profile"):
        load_network("6g")
