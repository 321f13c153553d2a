"""Early-exit benchmark: the reference ResNet-exits model on Fashion-MNIST, every exit policy calibrated on the
validation split (accuracy mode: drop <= epsilon with probability >= 1 - delta), evaluated on the 10k test
images. Per policy: accuracy drop (pp) vs the final exit, relative FLOPs, and relative measured onnxruntime
wall time (early-exit runner with regrouping vs the full model, same data, same batch size, same run).

    .venv/bin/python benchmarks/early_exit.py [--model artifacts/resnet_exits.pt2] [--epsilon 0.005] [--quick]

Trains the model with edgeexit.training if no --model is given and artifacts/resnet_exits.pt2 is absent.
Writes benchmarks/results/early_exit.json (+ .md and .png), prints Markdown, and as the last stdout line one
JSON object: relative_compute and accuracy_drop_pp of the cheapest calibrated policy whose test drop is
<= 0.5 pp, and for that policy ``early_exit_time_over_flops`` = (relative wall time) / (relative FLOPs) at
``--timing-batch`` (100), measured side by side with the full network, interleaved, medians of
``--timing-repeats``, with its 95% bootstrap interval and the floors that explain it
(benchmarks/early_exit_timing.py: ``floor`` = the network's own calls at the batch sizes that reach each stage,
``share`` = each stage's time share at the full batch vs its FLOPs share).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.early_exit_timing import time_side_by_side  # noqa: E402
from edgeexit import datasets  # noqa: E402
from edgeexit.bundle import Bundle  # noqa: E402
from edgeexit.calibration import CalibrationOptions, calibrate  # noqa: E402
from edgeexit.evaluation import (  # noqa: E402
    SWEEP_KINDS,
    EvalOptions,
    evaluate_policy,
    sweep_policy,
    time_full_model,
    warm_up,
)
from edgeexit.reports import Curve, markdown_table, plot_curves, write_json  # noqa: E402

DEFAULT_MODEL = ROOT / "artifacts" / "resnet_exits.pt2"
WORK = ROOT / "artifacts" / "bench_early_exit"
RESULTS = ROOT / "benchmarks" / "results"
MAX_DROP_PP = 0.5


def ensure_model(path: Path | None, arch: str = "resnet-exits", default: Path = DEFAULT_MODEL,
                 cached: tuple[Path, ...] = (), **recipe: Any) -> Path:
    """The given model, a cached one (``cached``, then ``default``), or ``arch`` freshly trained with ``recipe``
    (TrainOptions fields) and cached at ``default`` for next time."""
    if path is not None:
        if not path.is_file():
            sys.exit(f"--model {path} does not exist")
        return path
    for found in (*cached, default):
        if found.is_file():
            return found
    from edgeexit.models import build
    from edgeexit.training import TrainOptions, train

    print(f"no cached model: training {arch} {recipe} -> {default}", file=sys.stderr)
    tmp = default.with_name(f"{default.stem}.training.pt2")
    train(build(arch), "fashion-mnist", options=TrainOptions(**recipe, progress=False, out=tmp))
    Path(f"{tmp}.state_dict.pt").replace(f"{default}.state_dict.pt")
    tmp.replace(default)  # only a finished model is ever cached
    return default


def ensure_bundle(model: Path, work: Path = WORK, split_points: str = "auto") -> Path:
    """Export once per model file (re-export when the model is newer than the cached bundle; int8 boundary
    scales calibrated on Fashion-MNIST)."""
    from edgeexit.exporters import ExportOptions, export_model

    out = work / f"{model.stem}.edgeexit"
    manifest = out / "manifest.json"
    if manifest.is_file() and manifest.stat().st_mtime >= model.stat().st_mtime:
        return out
    opts = ExportOptions(split_points=split_points, calibration_data="fashion-mnist", force=True, progress=False)
    export_model(model, out, options=opts)
    return out


def _ci(tf: dict, key: str) -> str:
    lo, hi = tf[f"{key}_ci95"]
    return f"{tf[key]:.3f} [{lo:.2f}, {hi:.2f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="a .pt2 of the reference model (default: cached or trained)")
    ap.add_argument("--epochs", type=float, default=4.0, help="epochs if the model has to be trained")
    ap.add_argument("--epsilon", type=float, default=0.005, help="accuracy-loss bound for calibration")
    ap.add_argument("--delta", type=float, default=0.05)
    ap.add_argument("--limit", type=int, help="first N test images only (smoke runs)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per policy (alternating; fastest kept)")
    ap.add_argument("--timing-batch", type=int, default=100, help="batch of the side-by-side time/FLOPs figures")
    ap.add_argument("--timing-repeats", type=int, default=7, help="interleaved repeats of the side-by-side timing")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2000 test images, few repeats")
    args = ap.parse_args()
    if args.quick:
        args.limit, args.repeats, args.timing_repeats = args.limit or 2000, 1, 3

    bundle = Bundle.load(ensure_bundle(ensure_model(args.model, epochs=args.epochs, seed=0)))
    manifest = bundle.manifest
    from edgeexit.early_exit import collect_logits
    from edgeexit.runtime.runner import SegmentRunner

    runner = SegmentRunner(bundle)
    x_val, y_val = datasets.load("fashion-mnist", "val")
    x_test, y_test = datasets.load("fashion-mnist", "test", args.limit)
    val_logits = collect_logits(runner, x_val, args.batch_size)
    warm_up(runner, x_test)
    full = time_full_model(runner, x_test, args.batch_size)
    test_logits = full[0]
    final_acc = float((test_logits[-1].argmax(1) == y_test).mean())
    opts = EvalOptions(batch_size=args.batch_size, progress=False)

    rows, results, curves, points = [], {}, [], []
    for kind in SWEEP_KINDS:
        params = {"k": 2} if kind == "patience" else {}
        cal = calibrate(val_logits, manifest, CalibrationOptions(kind, args.epsilon, args.delta, "accuracy", params),
                        labels=y_val)
        ev = evaluate_policy(runner, cal.policy, x_test, y_test, opts, full=full, repeats=args.repeats)
        tf = time_side_by_side(runner, cal.policy, x_test, args.timing_batch, args.timing_repeats)
        sweep = sweep_policy(kind, manifest, test_logits, y_test, params)
        within = [s for s in sweep if 100 * (final_acc - s["accuracy"]) <= MAX_DROP_PP + 1e-9]
        oracle = min(within, key=lambda s: s["relative_flops"]) if within else None
        results[kind] = {
            "calibrated": cal.calibrated, "thresholds": cal.policy.to_dict()["thresholds"], "note": cal.message,
            "accuracy": ev.accuracy, "accuracy_drop_pp": ev.accuracy_drop_pp, "relative_flops": ev.relative_flops,
            "relative_time": ev.relative_time, "exit_rates": [r.exit_rate for r in ev.rows],
            "oracle_relative_flops_at_0.5pp": oracle and oracle["relative_flops"], "sweep": sweep,
            "side_by_side": tf,
        }
        rows.append([kind, "yes" if cal.calibrated else "no (never exits)", f"{ev.accuracy_drop_pp:+.2f}",
                     f"{ev.relative_flops:.3f}", f"{ev.relative_time:.3f}",
                     " / ".join(f"{100 * r.exit_rate:.0f}%" for r in ev.rows),
                     "-" if oracle is None else f"{oracle['relative_flops']:.3f}",
                     f"{tf['relative_time']:.3f}", _ci(tf, "time_over_flops"), _ci(tf, "floor_time_over_flops"),
                     f"{tf['share_time_over_flops']:.3f}", f"{tf['refill_time_over_flops']:.3f}"])
        curves.append(Curve(kind, [s["relative_flops"] for s in sweep], [100 * s["accuracy"] for s in sweep]))
        points.append((f"{kind} (calibrated)", ev.relative_flops, 100 * ev.accuracy))

    cum = [e.cumulative_flops for e in manifest.exits]
    per_exit = [float((lg.argmax(1) == y_test).mean()) for lg in test_logits]
    header = (f"# Early exit on Fashion-MNIST test ({len(y_test)} images), {bundle.name}\n\n"
              f"Per-exit accuracy alone: {', '.join(f'{100 * a:.2f}%' for a in per_exit)}; "
              f"cumulative FLOPs share: {', '.join(f'{f / cum[-1]:.3f}' for f in cum)}.\n"
              f"Calibrated on val (n={len(y_val)}), accuracy mode, epsilon={args.epsilon}, delta={args.delta}. "
              f"Final exit alone: {100 * final_acc:.2f}%; full model {full[1]:.2f} s.\n")
    table = markdown_table(["policy", "calibrated", "drop (pp)", "relative FLOPs", "relative time",
                            "exit rates",
                            "best FLOPs at <=0.5 pp on test (shared-threshold oracle, uncalibrated)",
                            f"relative time @{args.timing_batch}", f"time/FLOPs @{args.timing_batch} [95% CI]",
                            "floor: network alone at the batch sizes reached", "share: time vs FLOPs share",
                            "time/FLOPs with refill (full-batch stages, offline)"], rows)
    print(header)
    print(table)
    ok = [(k, r) for k, r in results.items() if r["accuracy_drop_pp"] <= MAX_DROP_PP]
    best_kind, best = min(ok, key=lambda kr: kr[1]["relative_flops"]) if ok else (None, None)
    summary = {"relative_compute": best and round(best["relative_flops"], 4),
               "accuracy_drop_pp": best and round(best["accuracy_drop_pp"], 3),
               "policy": best_kind, "relative_time": best and round(best["relative_time"], 4)}
    if best:
        tf = best["side_by_side"]
        summary.update({"early_exit_time_over_flops": round(tf["time_over_flops"], 4),
                        "early_exit_time_over_flops_ci95": [round(v, 4) for v in tf["time_over_flops_ci95"]],
                        "floor_time_over_flops": round(tf["floor_time_over_flops"], 4),
                        "share_time_over_flops": round(tf["share_time_over_flops"], 4),
                        "refill_time_over_flops": round(tf["refill_time_over_flops"], 4),
                        "timing_batch": args.timing_batch, "timing_repeats": args.timing_repeats,
                        f"relative_time_at_{args.timing_batch}": round(tf["relative_time"], 4)})
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / "early_exit.json", {
        "model": bundle.name, "model_path": str(args.model or DEFAULT_MODEL), "n_test": len(y_test),
        "n_val": len(y_val), "final_accuracy": final_acc,
        "per_exit_accuracy": per_exit, "epsilon": args.epsilon, "delta": args.delta, "full_seconds": full[1],
        "policies": results, "best": summary})
    (RESULTS / "early_exit.md").write_text(header + "\n" + table + "\n")
    plot_curves(RESULTS / "early_exit.png", curves, "relative compute (FLOPs / full model)", "test accuracy (%)",
                f"{bundle.name}: accuracy vs compute", points=[*points, ("final exit", 1.0, 100 * final_acc)])
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
