"""Split overhead: the reference ResNet-exits model as chained bundle segments vs its monolithic ONNX.

Both run in onnxruntime with 1 thread, batch 1 and 32, interleaved (ABAB...) so machine noise hits both
alike; the figure is the ratio of medians measured side by side in one run. Weights are seeded random:
the ratio does not depend on training. Last stdout line: {"chained_over_monolithic": <batch-1 ratio>}.
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

RESULTS = Path(__file__).parent / "results" / "split_overhead.json"


def _model_and_shape(path: str | None):
    import torch

    if path:
        return path, None
    from edgeexit import models

    torch.manual_seed(0)
    return models.build("resnet-exits").eval(), (1, 1, 28, 28)


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


def _raw_chain(runner):
    """The segments' onnxruntime sessions called back to back, without the runner's Python checks."""
    sessions = [runner.session(k) for k in range(runner.num_segments)]
    names = [s.input_names[0] for s in sessions]

    def run(x):
        outs = []
        for sess, name in zip(sessions, names, strict=True):
            res = sess.run({name: x})
            x = res[0]
            outs.append(res)
        return outs

    return run


def _time(fn, x) -> float:
    t = time.perf_counter()
    fn(x)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a .pt2 to measure (default: edgeexit.models resnet-exits, seeded weights)")
    ap.add_argument("--repeats", type=int, default=200, help="timed runs per variant and batch size (200)")
    ap.add_argument("--split-points", default="exits", choices=["exits", "auto"])
    args = ap.parse_args()

    from edgeexit.exporters import ExportOptions, export_model
    from edgeexit.runtime.backends import OrtSession
    from edgeexit.runtime.runner import SegmentRunner

    source, shape = _model_and_shape(args.model)
    tmpdir = tempfile.TemporaryDirectory(prefix="split_overhead_")
    tmp = Path(tmpdir.name)
    bundle = export_model(source, tmp / "m.edgeexit", options=ExportOptions(
        input_shape=shape, split_points=args.split_points, progress=False))
    _monolithic_onnx(source, shape, tmp / "whole.onnx")
    runner = SegmentRunner(bundle, threads=1)
    whole = OrtSession(tmp / "whole.onnx", threads=1)
    in_shape = bundle.manifest.input.shape[1:]
    rows = []
    for batch in (1, 32):
        x = np.random.default_rng(0).random((batch, *in_shape), dtype=np.float32)
        variants = {"chained": runner.run_all, "raw": _raw_chain(runner),
                    "mono": lambda v: whole.run({"input": v})}
        for _ in range(10):  # warm-up: session creation, allocator arenas
            for fn in variants.values():
                fn(x)
        reps = args.repeats if batch == 1 else max(20, args.repeats // 8)
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(reps):  # interleaved so drift and neighbours' load hit every variant alike
            for k, fn in variants.items():
                times[k].append(_time(fn, x))
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({"batch": batch, "chained_ms": med["chained"] * 1e3, "raw_chained_ms": med["raw"] * 1e3,
                     "monolithic_ms": med["mono"] * 1e3, "ratio": med["chained"] / med["mono"],
                     "raw_ratio": med["raw"] / med["mono"], "repeats": reps})
    result = {
        "model": args.model or "resnet-exits (seeded random weights)",
        "segments": len(bundle.manifest.segments), "split_points": args.split_points, "threads": 1,
        "rows": rows, "chained_over_monolithic": rows[0]["ratio"],
    }
    tmpdir.cleanup()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"Split overhead, {result['segments']} segments ({args.split_points}), onnxruntime 1 thread\n")
    print("| batch | chained (runner) ms | chained (bare ORT) ms | monolithic ms | runner / mono | bare / mono |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch']} | {r['chained_ms']:.3f} | {r['raw_chained_ms']:.3f} | {r['monolithic_ms']:.3f} "
              f"| {r['ratio']:.3f} | {r['raw_ratio']:.3f} |")
    sys.stdout.flush()
    print(json.dumps({"chained_over_monolithic": round(rows[0]["ratio"], 4)}))


if __name__ == "__main__":
    main()
