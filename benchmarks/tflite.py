"""TFLite variants vs onnxruntime: per-segment latency (1 thread, batch 1), size and accuracy per variant.

One bundle of the trained reference model (resnet-exits on Fashion-MNIST; the test suite's cached model, or
--model a .pt2) exported with ONNX and every TFLite variant (fp32, fp16 weights, dynamic-range int8, static
int8 calibrated on the val split). Latency: every segment of every variant called in turn on the same real
input, round-robin over the repeats (so machine noise hits all alike), medians per segment; a variant's total
is the sum of its segment medians. Accuracy: top-1 of every exit on the first --limit test images.
Last stdout line: {"litert_fp32_over_ort", "int8_size_ratio", "int8_accuracy_drop_pp"} where int8 means the
full-integer static variant, the size ratio is int8/fp32 TFLite bytes, and the drop is fp32 TFLite minus
int8 final-exit accuracy in percentage points.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
VARIANTS = ("onnx", "tflite", "tflite-fp16", "tflite-int8-dynamic", "tflite-int8-static")
BACKEND = {v: ("onnxruntime" if v == "onnx" else "litert") for v in VARIANTS}


def _trained_model(path: str | None) -> Path:
    if path:
        return Path(path)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.fixtures_models import train_cached_resnet  # cached .pt2; trains once (~1 min) if missing

    return train_cached_resnet()


def _export(model: Path, out: Path, calibration_samples: int):
    from edgeexit.exporters import ExportOptions, export_model

    return export_model(model, out, options=ExportOptions(
        formats=("onnx", "tflite"), quantize=("fp16", "int8-dynamic", "int8-static"),
        calibration_data="fashion-mnist", calibration_samples=calibration_samples, progress=False))


def _segment_inputs(runner, x: np.ndarray) -> list[np.ndarray]:
    """The real input each segment sees for ``x`` (boundaries from the ONNX chain)."""
    ins, cur = [], x
    for k in range(runner.num_segments):
        ins.append(cur)
        cur = runner.run_segment(k, cur).boundary
    return ins


def _latency(runners: dict, inputs: list[np.ndarray], repeats: int) -> dict[str, list[float]]:
    """Median ms per segment per variant, measured round-robin."""
    calls = [(v, k, runners[v].session(k), runners[v].manifest.segments[k].inputs[0].name)
             for k in range(len(inputs)) for v in runners]
    for _ in range(5):  # warm-up: arenas, XNNPACK packing
        for _, k, sess, name in calls:
            sess.run({name: inputs[k]})
    times: dict[tuple[str, int], list[float]] = {(v, k): [] for v, k, _, _ in calls}
    for _ in range(repeats):
        for v, k, sess, name in calls:
            t = time.perf_counter()
            sess.run({name: inputs[k]})
            times[(v, k)].append(time.perf_counter() - t)
    return {v: [statistics.median(times[(v, k)]) * 1e3 for k in range(len(inputs))] for v in runners}


def _accuracy(runner, x: np.ndarray, y: np.ndarray, batch: int = 250) -> list[float]:
    logits = [runner.run_all(runner.normalize(x[i:i + batch])) for i in range(0, len(x), batch)]
    return [float((np.concatenate([b[j] for b in logits]).argmax(1) == y).mean())
            for j in range(len(logits[0]))]


def _size(bundle, fmt: str) -> int:
    return sum(seg.files[fmt].bytes for seg in bundle.manifest.segments)


def _markdown(result: dict) -> str:
    segs = len(result["rows"][0]["segment_ms"])
    head = " | ".join(f"seg{k} ms" for k in range(segs))
    lines = [f"TFLite variants vs onnxruntime: {result['model']}, 1 thread, batch 1, "
             f"{result['repeats']} interleaved repeats, accuracy on {result['accuracy_images']} test images\n",
             f"| variant | backend | {head} | total ms | vs ORT | size KB | exit accuracies % |",
             "|---|---|" + "---:|" * (segs + 4)]
    for r in result["rows"]:
        seg_ms = " | ".join(f"{m:.3f}" for m in r["segment_ms"])
        accs = " / ".join(f"{100 * a:.1f}" for a in r["accuracy"])
        lines.append(f"| {r['variant']} | {r['backend']} | {seg_ms} | {r['total_ms']:.3f} | "
                     f"{r['over_ort']:.2f} | {r['bytes'] / 1024:.1f} | {accs} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a trained multi-exit .pt2 (default: the tests' cached resnet-exits)")
    ap.add_argument("--repeats", type=int, default=200, help="timed calls per segment and variant (200)")
    ap.add_argument("--limit", type=int, default=2000, help="test images for accuracy (2000)")
    ap.add_argument("--calibration-samples", type=int, default=500, help="val images for static int8 (500)")
    args = ap.parse_args()

    from edgeexit import datasets
    from edgeexit.runtime.runner import SegmentRunner

    model = _trained_model(args.model)
    tmpdir = tempfile.TemporaryDirectory(prefix="bench_tflite_")
    bundle = _export(model, Path(tmpdir.name) / "m.edgeexit", args.calibration_samples)
    runners = {v: SegmentRunner(bundle, backend=BACKEND[v], threads=1, fmt=v) for v in VARIANTS}
    x, y = datasets.load("fashion-mnist", "test", limit=args.limit)
    inputs = _segment_inputs(runners["onnx"], runners["onnx"].normalize(x[:1]))
    latency = _latency(runners, inputs, args.repeats)
    ort_total = sum(latency["onnx"])
    rows = []
    for v in VARIANTS:
        rows.append({"variant": v, "backend": BACKEND[v], "segment_ms": latency[v], "total_ms": sum(latency[v]),
                     "over_ort": sum(latency[v]) / ort_total, "bytes": _size(bundle, v),
                     "accuracy": _accuracy(runners[v], x, y)})
    by = {r["variant"]: r for r in rows}
    summary = {
        "litert_fp32_over_ort": round(by["tflite"]["over_ort"], 4),
        "int8_size_ratio": round(by["tflite-int8-static"]["bytes"] / by["tflite"]["bytes"], 4),
        "int8_accuracy_drop_pp": round(100 * (by["tflite"]["accuracy"][-1] - by["tflite-int8-static"]["accuracy"][-1]),
                                       2),
    }
    result = {"model": args.model or "resnet-exits (trained, tests' cached fixture)", "threads": 1, "batch": 1,
              "repeats": args.repeats, "accuracy_images": int(len(x)),
              "calibration_samples": args.calibration_samples, "rows": rows, **summary}
    tmpdir.cleanup()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "tflite.json").write_text(json.dumps(result, indent=2) + "\n")
    table = _markdown(result)
    (RESULTS / "tflite.md").write_text(table + "\n")
    print(table)
    sys.stdout.flush()
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
