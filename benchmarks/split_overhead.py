"""Split overhead: a bundle's segments through SegmentRunner vs the monolithic ONNX of the same model.

Two reference models: resnet-exits (seeded random weights, exported here; the ratio does not depend on training)
and the camera model (``edgeexit/reference/camera_resnet.pt2``, its bundle ``artifacts/camera_resnet.edgeexit``).
Per model,
four variants run in onnxruntime with 1 thread, interleaved (a shuffled order each round) so machine noise hits
all alike; each timed call follows an untimed one of the same variant, so caches hold that variant's weights (the
segment variants share sessions: back to back, the second would otherwise find them warm and mono cold):

- ``merged``: ``runner.run_all`` -- one merged session for the whole range (runtime/merge.py): the path of
  ``run``/``run_all`` (the cloud's tails, evaluate, calibrate, a device finishing locally);
- ``per_segment``: ``runner.run_segment`` segment by segment -- the device's exit loop, which decides between
  segments and so cannot merge them;
- ``bare``: the segments' own onnxruntime sessions back to back without the runner (context: onnxruntime's
  per-call cost);
- ``mono``: the monolithic ONNX (the same traced graph, not cut).

Where the time went before merging (pyinstrument, resnet-exits, batch 1, 3 segments): 77% in onnxruntime's C++
``run`` itself, 15% in ``InferenceSession.run``'s Python wrapper (feed-name checks, the GPU-fallback try block;
now skipped on CPU-only sessions by calling the C++ session directly), 4% in ``check_tensor`` (now resolved once
per spec), 3% in the runner's own loop; the rest of the chained/monolithic gap is onnxruntime's fixed cost per
call and the boundary copies out to numpy and back, which only merging removes.

Figures are ratios of medians over ``mono`` with 95% bootstrap intervals (rounds resampled together).
Last stdout line: ``{"chained_over_monolithic": <resnet merged, batch 1>, "chained_over_monolithic_camera": ...,
"per_segment_over_monolithic": ..., "per_segment_over_monolithic_camera": ...}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results" / "split_overhead.json"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
CAMERA_PT2 = Path(__file__).resolve().parents[1] / "edgeexit" / "reference" / "camera_resnet.pt2"
CAMERA_BUNDLE = ARTIFACTS / "camera_resnet.edgeexit"


def _monolithic_onnx(source, shape, out: Path) -> None:
    """The same traced graph, not cut: torch.export once, then one ONNX file."""
    import torch

    from edgeexit.exporters.onnx_segment import quiet
    from edgeexit.exporters.options import ExportOptions
    from edgeexit.exporters.sources import load_traced

    traced = load_traced(source, ExportOptions(input_shape=shape))
    x = torch.rand((2, *traced.input_shape[1:]))
    dyn = ({0: torch.export.Dim("batch", min=1, max=1 << 16)},) if traced.dynamic_batch else None
    with quiet():
        torch.onnx.export(traced.module, (x,), str(out), input_names=["input"], dynamic_shapes=dyn,
                          opset_version=18, external_data=False, dynamo=True)


def _resnet(tmp: Path, split_points: str, pt2: str | None) -> tuple[Path, Path]:
    """resnet-exits from ``pt2`` (a trained .pt2, e.g. the Makefile's), else built with seeded weights."""
    import torch

    from edgeexit import models
    from edgeexit.exporters import ExportOptions, export_model

    torch.manual_seed(0)
    model, shape = (pt2, None) if pt2 else (models.build("resnet-exits").eval(), (1, 1, 28, 28))
    bundle = export_model(model, tmp / "resnet.edgeexit", options=ExportOptions(
        input_shape=shape, split_points=split_points, progress=False)).root
    _monolithic_onnx(model, shape, tmp / "resnet_whole.onnx")
    return bundle, tmp / "resnet_whole.onnx"


def _camera(tmp: Path) -> tuple[Path, Path]:
    if not (CAMERA_PT2.is_file() and CAMERA_BUNDLE.is_dir()):
        raise SystemExit(f"{CAMERA_PT2} or {CAMERA_BUNDLE} is missing: build the camera model first (README), "
                         "or run with --models resnet-exits")
    _monolithic_onnx(str(CAMERA_PT2), None, tmp / "camera_whole.onnx")
    return CAMERA_BUNDLE, tmp / "camera_whole.onnx"


def _variants(bundle: Path, whole: Path) -> tuple[dict[str, Callable[[np.ndarray], object]], int, tuple]:
    from edgeexit.runtime.backends import OrtSession
    from edgeexit.runtime.runner import SegmentRunner

    runner = SegmentRunner(bundle, threads=1)
    runner.prepare()  # the merged session, built now rather than inside the first timed call
    n = runner.num_segments
    sessions = [runner.session(k) for k in range(n)]
    names = [s.input_names[0] for s in sessions]
    mono = OrtSession(whole, threads=1)

    def per_segment(x):
        exits = {}
        for k in range(n):
            out = runner.run_segment(k, x)
            exits.update(out.exits)
            x = out.boundary
        return exits

    def bare(x):
        outs = []
        for sess, name in zip(sessions, names, strict=True):
            res = sess.run({name: x})
            x = res[0]
            outs.append(res)
        return outs

    variants = {"merged": runner.run_all, "per_segment": per_segment, "bare": bare,
                "mono": lambda v: mono.run({"input": v})}
    return variants, n, tuple(runner.manifest.input.shape[1:])


def _ci(times: dict[str, list[float]], key: str, rng: np.random.Generator, n_boot: int = 1000) -> list[float]:
    """95% bootstrap interval of median(key) / median(mono), resampling the interleaved groups together."""
    a, m = np.asarray(times[key]), np.asarray(times["mono"])
    idx = rng.integers(0, len(a), (n_boot, len(a)))
    ratios = np.median(a[idx], axis=1) / np.median(m[idx], axis=1)
    return [round(float(v), 4) for v in np.percentile(ratios, [2.5, 97.5])]


def _measure(name: str, bundle: Path, whole: Path, batches: tuple[int, ...], repeats: int) -> list[dict]:
    variants, n, in_shape = _variants(bundle, whole)
    rng = np.random.default_rng(0)
    rows = []
    for batch in batches:
        x = rng.random((batch, *in_shape), dtype=np.float32)
        for _ in range(10):  # warm-up: session creation, allocator arenas
            for fn in variants.values():
                fn(x)
        reps = repeats if batch == 1 else max(10, repeats // 8)
        times: dict[str, list[float]] = {k: [] for k in variants}
        order = list(variants)
        for _ in range(reps):  # interleaved so drift and neighbours' load hit every variant alike
            rng.shuffle(order)  # no variant always runs right after another
            for k in order:
                fn = variants[k]
                fn(x)  # untimed: caches hold this variant's weights, as when it serves alone
                t = time.perf_counter()
                fn(x)
                times[k].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {"model": name, "segments": n, "batch": batch, "repeats": reps}
        row.update({f"{k}_ms": round(v * 1e3, 4) for k, v in med.items()})
        for k in ("merged", "per_segment", "bare"):
            row[f"{k}_over_mono"] = round(med[k] / med["mono"], 4)
            row[f"{k}_over_mono_ci95"] = _ci(times, k, rng)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet-exits,camera", help="comma-separated: resnet-exits, camera (both)")
    ap.add_argument("--repeats", type=int, default=400, help="timed runs per variant at batch 1 (400; 1/8 at 32)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 30 repeats, batch 1 only")
    ap.add_argument("--split-points", default="exits", choices=["exits", "auto"], help="resnet-exits' cuts")
    ap.add_argument("--model", help="a resnet-exits .pt2 to measure (default: built here with seeded weights)")
    args = ap.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not set(models) <= {"resnet-exits", "camera"} or not models:
        ap.error(f"--models takes resnet-exits and/or camera, not {args.models!r}")
    repeats, batches = (30, (1,)) if args.quick else (args.repeats, (1, 32))

    tmpdir = tempfile.TemporaryDirectory(prefix="split_overhead_")
    tmp = Path(tmpdir.name)
    rows: list[dict] = []
    for name in models:
        bundle, whole = _resnet(tmp, args.split_points, args.model) if name == "resnet-exits" else _camera(tmp)
        rows += _measure(name, bundle, whole, batches, repeats)
    tmpdir.cleanup()

    def b1(model: str, key: str) -> float | None:
        return next((r[key] for r in rows if r["model"] == model and r["batch"] == 1), None)

    figures = {"chained_over_monolithic": b1("resnet-exits", "merged_over_mono"),
               "chained_over_monolithic_camera": b1("camera", "merged_over_mono"),
               "per_segment_over_monolithic": b1("resnet-exits", "per_segment_over_mono"),
               "per_segment_over_monolithic_camera": b1("camera", "per_segment_over_mono")}
    result = {"threads": 1, "split_points": args.split_points, "quick": args.quick, "rows": rows,
              "resnet_model": args.model or "seeded random weights",
              "note": "merged = runner.run_all (one merged session), "
                      "per_segment = the device's exit loop (run_segment k by k)", **figures}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print("Split overhead: SegmentRunner vs the monolithic ONNX, onnxruntime 1 thread, ratios of medians "
          "(95% bootstrap CI)\n")
    print("| model | segs | batch | mono ms | merged / mono | per-segment / mono | bare ORT chain / mono |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        cells = [f"{r[f'{k}_over_mono']:.3f} [{r[f'{k}_over_mono_ci95'][0]:.3f}, {r[f'{k}_over_mono_ci95'][1]:.3f}]"
                 for k in ("merged", "per_segment", "bare")]
        print(f"| {r['model']} | {r['segments']} | {r['batch']} | {r['mono_ms']:.3f} | " + " | ".join(cells) + " |")
    sys.stdout.flush()
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
