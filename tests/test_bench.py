"""`edgeexit bench`: its statistics on rows made by hand, then the whole command on the tiny bundle."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from edgeexit.testbed.bench_stats import condition_stats, cost_model_error, headline, paired_ratio
from edgeexit.testbed.experiment import Sample


def _rows(strategy: str, walls: list[float], condition: str = "c") -> list[Sample]:
    return [Sample(strategy, condition, i, 1, 1, 0, "device", "device", 0, w, w, 0.0, 0.0, False)
            for i, w in enumerate(walls)]


def test_oracles_winner_and_paired_ratio_on_known_rows():
    rng = np.random.default_rng(0)
    a = list(10 + rng.random(200))  # ~10.5 ms
    b = list(20 + rng.random(200))  # ~20.5 ms
    fast_on_even = [5.0 if i % 2 == 0 else 30.0 for i in range(200)]  # 17.5 on average, best on half the requests
    rows = _rows("a", a) + _rows("b", b) + _rows("mixed", fast_on_even) + _rows("edgeexit", a)
    c = condition_stats("c", rows, static=["a", "b", "mixed"], adaptive=["edgeexit"])
    assert c.best_static == "a" and not c.winner_is_tie
    # per request: 5 on even requests, min(a, ...) on odd ones: a true lower bound below the best static mean
    expected = np.mean([5.0 if i % 2 == 0 else a[i] for i in range(200)])
    assert c.hindsight_ms == pytest.approx(expected)
    assert c.hindsight_ms < c.strategies["a"].mean_ms
    ratio, lo, hi = c.adaptive_over_best_static["edgeexit"]
    assert ratio == pytest.approx(1.0) and lo == pytest.approx(1.0) and hi == pytest.approx(1.0)  # identical rows
    st = c.strategies["b"]
    assert st.mean_ci[0] < st.mean_ms < st.mean_ci[1] and 20 <= st.mean_ci[0] and st.mean_ci[1] <= 21
    assert st.p95_ms == pytest.approx(np.percentile(b, 95)) and st.n == 200


def test_a_close_runner_up_is_a_tie_and_the_paired_interval_sees_noise():
    rng = np.random.default_rng(1)
    noise = list(10 + rng.normal(0, 3, 200))
    other = [v + rng.normal(0, 0.5) for v in noise]
    c = condition_stats("c", _rows("x", noise) + _rows("y", other) + _rows("edgeexit", other), ["x", "y"],
                        ["edgeexit"])
    assert c.winner_is_tie
    _, lo, hi = c.adaptive_over_best_static["edgeexit"]
    assert lo < 1.0 < hi or c.best_static == "y"  # indistinguishable from the winner
    ratio, lo, hi = paired_ratio(np.array(noise) * 1.2, np.array(noise), rng)
    assert ratio == pytest.approx(1.2) and lo == pytest.approx(1.2) and hi == pytest.approx(1.2)


def test_headline_figures_and_cost_model_error():
    c1 = condition_stats("fast", _rows("device-only", [40.0] * 10, "fast") + _rows("cloud-only", [10.0] * 10, "fast")
                         + _rows("edgeexit", [12.0] * 10, "fast"), ["device-only", "cloud-only"], ["edgeexit"])
    c2 = condition_stats("slow", _rows("device-only", [40.0] * 10, "slow") + _rows("cloud-only", [90.0] * 10, "slow")
                         + _rows("edgeexit", [40.0] * 10, "slow"), ["device-only", "cloud-only"], ["edgeexit"])
    c1.strategies["device-only"].predicted_ms = 44.0  # 10% off
    c1.strategies["cloud-only"].predicted_ms = 15.0  # 50% off
    c2.strategies["device-only"].predicted_ms = 40.0  # exact
    h = headline([c1, c2], "edgeexit")
    assert h["worst_over_oracle"] == pytest.approx(1.2) and h["mean_over_oracle"] == pytest.approx(1.1)
    assert h["distinct_winners"] == 2
    assert h["best_speedup_over_baselines"] == pytest.approx(1.0)  # max(10 / 12, 40 / 40)
    assert h["mean_speedup_over_baselines"] == pytest.approx((10 / 12 + 1.0) / 2, rel=1e-3)
    assert cost_model_error([c1, c2]) == pytest.approx(0.1)


def _edgeexit(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgeexit", *args], capture_output=True, text=True, timeout=timeout)


def test_bench_help_and_user_errors():
    done = _edgeexit("bench", "--help")
    assert done.returncode == 0 and "--networks" in done.stdout and "worst_over_oracle" in done.stdout
    bad = _edgeexit("bench", "--bundle", "nowhere.edgeexit", "--networks", "no-such-net")
    assert bad.returncode == 2 and "unknown network profile" in bad.stderr and "Traceback" not in bad.stderr
    bad = _edgeexit("bench", "--bundle", "nowhere.edgeexit", "--networks", "wifi")
    assert bad.returncode == 2 and "edgeexit export" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_bench_end_to_end_on_the_tiny_bundle(tiny_bundle, tmp_path):
    bundle = tmp_path / "tiny.edgeexit"
    shutil.copytree(tiny_bundle, bundle)  # bench calibrates and profiles it in place
    out = tmp_path / "results"
    done = _edgeexit("bench", "--bundle", str(bundle), "--devices", "raspberry-pi-4", "--networks", "wifi",
                     "--samples", "3", "--warmup", "1", "--out", str(out), "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    last = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(last) == {"worst_over_oracle", "mean_over_oracle", "distinct_winners", "best_speedup_over_baselines",
                         "mean_speedup_over_baselines", "cost_model_error", "samples_per_condition", "emulation"}
    assert last["samples_per_condition"] == 3 and last["distinct_winners"] == 1
    assert "EMULATED raspberry-pi-4" in last["emulation"]
    result = json.loads((out / "bench.json").read_text())
    assert len(result["notes"]) == 3  # calibrated, device and cloud profiles: said, not silent
    (cond,) = result["conditions"]
    names = set(cond["strategies"])
    assert {"device-only", "cloud-only", "neurosurgeon", "branchynet", "edgeexit", "bandit"} <= names
    assert any(n.startswith("split@") for n in names) and any(n.startswith("cascade@") for n in names)
    static = {k: v for k, v in cond["strategies"].items() if k not in ("edgeexit", "bandit", "neurosurgeon")}
    assert cond["best_static"] == min(static, key=lambda k: static[k]["mean_ms"])
    assert cond["hindsight_bound_ms"] <= min(v["mean_ms"] for v in cond["strategies"].values())
    assert all(v["predicted_ms"] is not None for k, v in cond["strategies"].items() if k != "bandit")
    assert "EMULATED raspberry-pi-4" in (out / "bench.md").read_text()
    assert (out / "bench.png").stat().st_size > 1000
