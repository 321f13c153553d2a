"""Side-by-side timing of early exit vs the full network (issue 14: ``early_exit_time_over_flops``), and the floor
that the network itself sets. Used by benchmarks/early_exit.py; runnable alone on a bundle for profiling:

    .venv/bin/python benchmarks/early_exit_timing.py BUNDLE --policy entropy --thresholds 0.2 0.225 [--limit N]

Per repeat, interleaved (A B C D, A B C D, ...), on the same images at the same batch size:
  A  full    the full network, every batch (``collect_logits``: the reference of relative time)
  B  early   ``run_early_exit`` (stages, policy, regrouping)
  C  floor   the same stage calls B makes, at the batch sizes that really reached each stage, no policy and
             no regrouping (the rows are a slice of a stored batch: a dense conv net's time does not depend
             on the values): what early exit costs if its own work were free
  D  share   every stage at the full batch, each stage's time weighted by the fraction of rows reaching it:
             what early exit would cost if a row cost the same at any batch size
  E  refill  ``run_early_exit(refill=True)``: continuing rows wait for the next batches' rows, so every stage
             runs at the full batch (offline evaluation; a device answering a batch now cannot do this)
Ratios are medians over repeats, with a 95% paired bootstrap interval (repeats resampled together).
``time_over_flops`` = (B / A) / relative FLOPs; ``floor_time_over_flops`` = (C / A) / relative FLOPs, the
part no exit-policy or regrouping work can remove; ``share_time_over_flops`` = (D / A) / relative FLOPs, the
part due to segments whose time share differs from their FLOPs share (small early convolutions cost more
per FLOP than the deep ones); ``refill_time_over_flops`` = (E / A) / relative FLOPs.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from edgeexit.early_exit import collect_logits, executed_flops, exit_stages, run_early_exit, run_stage
from edgeexit.policies import ExitPolicy


def _paired_ci(num: np.ndarray, den: np.ndarray, scale: float, rng: np.random.Generator,
               boots: int = 2000) -> tuple[float, float]:
    idx = rng.integers(0, len(num), size=(boots, len(num)))
    r = np.median(num[idx], axis=1) / np.median(den[idx], axis=1) / scale
    return float(np.quantile(r, 0.025)), float(np.quantile(r, 0.975))


def time_side_by_side(runner: Any, policy: ExitPolicy, x: np.ndarray, batch_size: int = 100, repeats: int = 7,
                      seed: int = 0) -> dict[str, Any]:
    """The figures described in the module docstring, for one policy."""
    m = runner.manifest
    stages = exit_stages(m)
    exe = executed_flops(m)
    res = run_early_exit(runner, policy, x, batch_size)  # warm-up, and who reaches which stage
    rel_flops = float(res.segment_flops.mean() / exe[-1])
    first_exit = [min(st.exits) if st.exits else len(exe) - 1 for st in stages]
    starts = list(range(0, len(x), batch_size))
    # rows of each batch that reached stage s: those that did not answer at an earlier stage's exits
    reach = [[int((res.exit_index[b:b + batch_size] >= first_exit[s]).sum()) for b in starts]
             for s in range(len(stages))]
    # one stored batch of every stage's input, sliced to each call's size
    cur = runner.normalize(np.ascontiguousarray(x[:batch_size], dtype=np.float32))
    inputs = []
    for st in stages:
        inputs.append(cur)
        cur = run_stage(runner, st, cur).boundary
    n_full = min(batch_size, len(x))

    def floor_pass() -> float:
        t0 = time.perf_counter()
        for s, st in enumerate(stages):
            for n in reach[s]:
                if n:
                    run_stage(runner, st, inputs[s][:n])
        return time.perf_counter() - t0

    def share_pass() -> float:
        total = 0.0
        for s, st in enumerate(stages):
            t0 = time.perf_counter()
            for _ in starts:
                run_stage(runner, st, inputs[s][:n_full])
            total += (time.perf_counter() - t0) * sum(reach[s]) / len(x)
        return total

    a, b, c, d, e = [], [], [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        collect_logits(runner, x, batch_size)
        a.append(time.perf_counter() - t0)
        b.append(run_early_exit(runner, policy, x, batch_size).seconds)
        c.append(floor_pass())
        d.append(share_pass())
        e.append(run_early_exit(runner, policy, x, batch_size, refill=True).seconds)
    a, b, c, d, e = (np.asarray(v) for v in (a, b, c, d, e))
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"batch_size": batch_size, "repeats": repeats, "relative_flops": rel_flops,
                           "full_seconds": float(np.median(a)), "early_exit_seconds": float(np.median(b)),
                           "rows_reaching_stage": [sum(r) / len(x) for r in reach],
                           "stages": [[st.start, st.stop] for st in stages]}
    for key, v in (("time_over_flops", b), ("floor_time_over_flops", c), ("share_time_over_flops", d),
                   ("refill_time_over_flops", e)):
        out[key] = float(np.median(v) / np.median(a) / rel_flops)
        out[f"{key}_ci95"] = _paired_ci(v, a, rel_flops, rng)
    out["relative_time"] = float(np.median(b) / np.median(a))
    return out


def main() -> None:
    import argparse
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from edgeexit import datasets
    from edgeexit.policies import make_policy
    from edgeexit.runtime.runner import SegmentRunner

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--policy", default="entropy")
    ap.add_argument("--thresholds", type=float, nargs="+", required=True)
    ap.add_argument("--limit", type=int)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    runner = SegmentRunner(args.bundle)
    x, _ = datasets.load("fashion-mnist", "test", args.limit)
    pol = make_policy(args.policy, args.thresholds, k=2)
    print(json.dumps(time_side_by_side(runner, pol, x, args.batch_size, args.repeats)))


if __name__ == "__main__":
    main()
