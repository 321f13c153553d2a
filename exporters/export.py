"""``export_model``: trace once, cut into segments, write ONNX (and TFLite) per segment, validate, and
publish the bundle atomically (written to a temporary directory and renamed at the end).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgeexit.bundle import (
    BATCH,
    Bundle,
    ExitInfo,
    InputSpec,
    Manifest,
    Segment,
    SplitPoint,
    TensorSpec,
    file_entry,
    write_manifest,
)
from edgeexit.errors import ConfigError
from edgeexit.exporters import calibration as calib
from edgeexit.exporters.costs import node_flops, segment_flops, segment_param_bytes
from edgeexit.exporters.graph_cut import (
    Bottleneck,
    GraphAnalysis,
    GraphSegment,
    build_segments,
    node_path,
    plan_cuts,
)
from edgeexit.exporters.onnx_segment import export_onnx_segment
from edgeexit.exporters.options import ExportOptions
from edgeexit.exporters.sources import Traced, load_traced
from edgeexit.exporters.validate import validate_bundle, validation_inputs
from edgeexit.runtime.codec import ENCODINGS, encoded_bytes
from edgeexit.runtime.runner import normalize

logger = logging.getLogger(__name__)


class Progress:
    """One log line per phase: INFO, or DEBUG when ``ExportOptions.progress`` is off (edgeexit.logs shows them
    on stderr, so stdout stays clean for scripts)."""

    def __init__(self, enabled: bool):
        self.level = logging.INFO if enabled else logging.DEBUG

    def __call__(self, msg: str) -> None:
        logger.log(self.level, msg)

    def warn(self, msg: str) -> None:
        """Warnings show even when progress is off: they change what the bundle can do."""
        logger.warning(msg)


@dataclass
class _Cut:
    traced: Traced
    analysis: GraphAnalysis
    segments: list[GraphSegment]
    mode: str
    bottlenecks: dict[int, Bottleneck]  # split index -> learned bottleneck cut there


def export_model(model_or_path: Any, out: str | Path, *, options: ExportOptions | None = None) -> Bundle:
    """Export a multi-exit model (nn.Module, .pt2, TorchScript, pickle, or options.factory) to a bundle."""
    opts = options or ExportOptions()
    opts.check()
    out = Path(out)
    if out.exists() and not opts.force:
        raise ConfigError(f"{out} already exists; pass --force to replace it or choose another --out")
    log = Progress(opts.progress)
    log("tracing the model with torch.export")
    traced = load_traced(model_or_path, opts)
    for w in traced.warnings:
        log.warn(w)
    cut = _cut(traced, opts.split_points, log)
    raw = calib.load_calibration(opts.calibration_data, traced.input_shape, opts.calibration_samples)
    real = normalize(raw, opts.normalize) if raw is not None else None
    tmp = out.parent / f".{out.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "segments").mkdir(parents=True)
    try:
        manifest = _write_segments(cut, tmp, opts, real, log)
        manifest.name = opts.name or out.name.removesuffix(".edgeexit")
        write_manifest(tmp, manifest)
        cases = validation_inputs(traced.input_shape, real, traced.dynamic_batch, opts.seed)
        log(f"validating every exit in onnxruntime against torch: {[label for label, _ in cases]}")
        worst = validate_bundle(tmp, traced.module, cases, opts.atol, opts.rtol)
        manifest.export["max_abs_error"] = worst
        write_manifest(tmp, manifest)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    log(f"wrote {out} ({len(manifest.segments)} segments, max |diff| vs torch {worst:.2g})")
    return Bundle.load(out)


def _cut(traced: Traced, mode: str, log: Progress) -> _Cut:
    analysis = GraphAnalysis(traced.module)
    plan, warnings = plan_cuts(analysis, mode)
    for w in warnings:
        log.warn(w)
    segments = build_segments(analysis, plan)
    log(f"split points ({mode}): {[c.name for c in plan.cuts]}; exits per segment {plan.exits_per_segment}")
    for k, b in plan.bottlenecks.items():
        log(f"split point {k} is the code of the learned bottleneck {b.path!r}")
    return _Cut(traced, analysis, segments, mode, plan.bottlenecks)


def _spec(name: str, node_or_tensor: Any) -> TensorSpec:
    val = node_or_tensor.meta["val"] if hasattr(node_or_tensor, "meta") else node_or_tensor
    return TensorSpec(name, [BATCH, *[int(d) for d in val.shape[1:]]], str(val.dtype).removeprefix("torch."))


def _segment_inputs(segments: list[GraphSegment], x: torch.Tensor) -> list[torch.Tensor]:
    """The input each segment sees when the chain runs on ``x``."""
    ins = []
    with torch.no_grad():
        for seg in segments:
            ins.append(x)
            outs = seg.module(x)
            x = outs[0]
    return ins


def _write_segments(cut: _Cut, root: Path, opts: ExportOptions, real: np.ndarray | None, log: Progress) -> Manifest:
    traced, an, segments = cut.traced, cut.analysis, cut.segments
    batch = 2 if traced.dynamic_batch else traced.input_shape[0]
    sample = torch.rand((batch, *traced.input_shape[1:]), generator=torch.Generator().manual_seed(opts.seed))
    samples = _segment_inputs(segments, sample)
    seg_real = _segment_inputs(segments, torch.from_numpy(real)) if real is not None else None
    batch_kind = "dynamic" if traced.dynamic_batch else f"fixed:{batch}"
    manifest_segments = []
    for seg in segments:
        log(f"segment {seg.index}/{len(segments) - 1}: ONNX (opset {opts.opset})")
        rel = f"segments/seg{seg.index}.onnx"
        export_onnx_segment(seg, samples[seg.index], root / rel, opts.opset, traced.dynamic_batch)
        files = {"onnx": file_entry(root, rel, batch=batch_kind)}
        if "tflite" in opts.formats:
            log(f"segment {seg.index}: TFLite {['fp32', *opts.quantize]}")
            files.update(_tflite(seg, samples[seg.index], root, opts, seg_real[seg.index] if seg_real else None))
        produced = seg.module.graph.output_node().args[0]
        outputs = [_spec(name, n) for name, n in zip(seg.output_names, produced, strict=True)]
        manifest_segments.append(Segment(
            index=seg.index, files=files, inputs=[_spec(seg.input_name, samples[seg.index])], outputs=outputs,
            exits=seg.exits, flops=segment_flops(seg.nodes), param_bytes=segment_param_bytes(seg.module),
        ))
    split_points = _split_points(cut, manifest_segments, seg_real)
    exits = _exits(an, segments)
    inp = InputSpec("input", [BATCH, *traced.input_shape[1:]], "float32", opts.normalize)
    export_info = {
        "source": traced.kind, "opset": opts.opset, "torch": torch.__version__, "split_points": cut.mode,
        "atol": opts.atol, "rtol": opts.rtol, "formats": list(opts.formats), "quantize": list(opts.quantize),
        "calibration": _describe(opts.calibration_data), "batch": batch_kind,
    }
    return Manifest("model", inp, manifest_segments, split_points, exits, export=export_info)


def _split_points(cut: _Cut, segs: list[Segment], seg_real: list[torch.Tensor] | None) -> list[SplitPoint]:
    ranges = calib.boundary_ranges([s.module for s in cut.segments], seg_real[0].numpy()) if seg_real else None
    points = []
    for k, seg in enumerate(segs[:-1]):
        spec = seg.outputs[0]
        elements = spec.sample_elements()
        points.append(SplitPoint(
            index=k, tensor=TensorSpec(spec.name, list(spec.shape), spec.dtype),
            bytes_per_sample={enc: encoded_bytes(elements, enc) for enc in ENCODINGS},
            quantization=calib.quant_params(*ranges[k]) if ranges else None,
            bottleneck=_bottleneck_info(cut.traced.module, cut.bottlenecks[k]) if k in cut.bottlenecks else None,
        ))
    return points


def _bottleneck_info(gm: torch.fx.GraphModule, b: Bottleneck) -> dict[str, Any]:
    """What the manifest says of a bottleneck split: the tensor it replaces and the encoder's parameter bytes."""
    shape = b.start.meta["val"].shape[1:]
    targets = {a.target for n in gm.graph.nodes if n.op == "call_function"
               and node_path(n).startswith(f"{b.path}.encoder") for a in n.all_input_nodes if a.op == "get_attr"}
    tensors = [_attr(gm, t) for t in targets]
    return {"module": b.path, "input_shape": [int(d) for d in shape],
            "encoder_param_bytes": sum(t.numel() * t.element_size() for t in tensors)}


def _attr(gm: torch.nn.Module, target: str) -> torch.Tensor:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _exits(an: GraphAnalysis, segments: list[GraphSegment]) -> list[ExitInfo]:
    owner = {j: s.index for s in segments for j in s.exits}
    infos = []
    for j, e in enumerate(an.exit_nodes):
        path = an._ancestors(e) | {e}
        infos.append(ExitInfo(
            index=j, segment=owner[j], output=f"exit{j}", num_classes=int(e.meta["val"].shape[-1]),
            cumulative_flops=sum(node_flops(n) for n in path if n.op == "call_function"),
        ))
    return infos


def _tflite(seg: GraphSegment, sample: torch.Tensor, root: Path, opts: ExportOptions,
            real: torch.Tensor | None) -> dict:
    try:
        from edgeexit.exporters.tflite import SegmentNames, export_tflite_segment
    except ImportError as e:
        raise ConfigError(f"TFLite export is not available here ({e}); install edgeexit[tflite-export]") from e
    variants = ["tflite", *[f"tflite-{q}" for q in opts.quantize]]
    names = SegmentNames(seg.input_name, tuple(seg.output_names))
    calibration = real.numpy() if real is not None else None
    info = export_tflite_segment(seg.module, sample, root / "segments", f"seg{seg.index}", variants,
                                 calibration=calibration, names=names)
    return {v: file_entry(root, f"segments/{d['file']}", batch=d.get("batch", "dynamic"), extra=d.get("extra", {}))
            for v, d in info.items()}


def _describe(source: Any) -> str | None:
    if source is None:
        return None
    if isinstance(source, (np.ndarray, torch.Tensor)):
        return f"array {list(source.shape)}"
    return str(source)
