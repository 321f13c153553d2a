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
    DTYPE_BYTES,
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
    if traced.multi:
        _check_multi(traced, opts, log)
        real = calib.load_calibration_inputs(opts.calibration_data, traced, opts.calibration_samples)
    else:
        raw = calib.load_calibration(opts.calibration_data, traced.input_shape, opts.calibration_samples)
        real = (normalize(raw, opts.normalize),) if raw is not None else None
    tmp = out.parent / f".{out.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "segments").mkdir(parents=True)
    try:
        manifest = _write_segments(cut, tmp, opts, real, log)
        manifest.name = opts.name or out.name.removesuffix(".edgeexit")
        write_manifest(tmp, manifest)
        cases = validation_inputs(traced, real, opts.seed)
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


def _check_multi(traced: Traced, opts: ExportOptions, log: Progress) -> None:
    if opts.normalize:
        raise ConfigError("--normalize applies to one image input; a multi-input model normalises inside forward()")
    if "tflite" in opts.formats:
        log.warn("TFLite export of models with several inputs or named dynamic axes is not supported yet: "
                 "writing ONNX only")


def _axis_names(traced: Traced) -> dict[str, str]:
    """str(SymInt) -> axis name ("batch", "seq"...) for a multi-input model ({} for the classic one-input case)."""
    names: dict[str, str] = {}
    for node, inp in zip(_placeholders(traced.module), traced.inputs, strict=False):
        for d, axis in zip(node.meta["val"].shape, inp.axes, strict=True):
            if isinstance(axis, str):
                names[str(d)] = axis
    return names


def _placeholders(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def _spec(name: str, node_or_tensor: Any, axes: dict[str, str] | None = None) -> TensorSpec:
    """A tensor's manifest spec: batch first, named axes by ``axes`` (multi-input models), sizes elsewhere."""
    val = node_or_tensor.meta["val"] if hasattr(node_or_tensor, "meta") else node_or_tensor
    dtype = str(val.dtype).removeprefix("torch.")
    if not axes:
        return TensorSpec(name, [BATCH, *[int(d) for d in val.shape[1:]]], dtype)
    shape = [d if isinstance(d, int) else axes[str(d)] for d in val.shape]
    return TensorSpec(name, shape, dtype)


def _segment_inputs(segments: list[GraphSegment], xs: tuple[torch.Tensor, ...], names: list[str]
                    ) -> list[tuple[torch.Tensor, ...]]:
    """The inputs each segment sees when the chain runs on the model inputs ``xs`` (named ``names``)."""
    named = dict(zip(names, xs, strict=True))
    ins = []
    x = xs[0]
    with torch.no_grad():
        for seg in segments:
            feed = (x, *(named[c] for c in seg.carried))
            ins.append(feed)
            x = seg.module(*feed)[0]
    return ins


def _write_segments(cut: _Cut, root: Path, opts: ExportOptions, real: tuple[np.ndarray, ...] | None,
                    log: Progress) -> Manifest:
    traced, an, segments = cut.traced, cut.analysis, cut.segments
    batch = 2 if traced.dynamic_batch else traced.input_shape[0]
    if traced.multi:
        sample: tuple[torch.Tensor, ...] = traced.example
        names = [i.name for i in traced.inputs]
    else:
        sample = (torch.rand((batch, *traced.input_shape[1:]), generator=torch.Generator().manual_seed(opts.seed)),)
        names = ["input"]
    axes = _axis_names(traced) if traced.multi else {}
    samples = _segment_inputs(segments, sample, names)
    tflite = "tflite" in opts.formats and not traced.multi
    seg_real = _segment_inputs(segments, tuple(torch.from_numpy(r) for r in real), names) if real and tflite \
        else None  # what each TFLite segment calibrates on
    batch_kind = "dynamic" if traced.dynamic_batch else f"fixed:{batch}"
    # specs from the traced graph's symbols, before any ONNX export re-traces (and re-annotates) a segment
    in_specs = [[_spec(name, n, axes) for name, n in zip(seg.input_names, _placeholders(seg.module), strict=True)]
                if traced.multi else [_spec(seg.input_name, samples[seg.index][0])] for seg in segments]
    out_specs = [[_spec(name, n, axes) for name, n in zip(seg.output_names, seg.module.graph.output_node().args[0],
                                                          strict=True)] for seg in segments]
    manifest_segments = []
    for seg in segments:
        log(f"segment {seg.index}/{len(segments) - 1}: ONNX (opset {opts.opset})")
        rel = f"segments/seg{seg.index}.onnx"
        export_onnx_segment(seg, samples[seg.index], root / rel, opts.opset, traced.dynamic_batch,
                            [t.shape for t in in_specs[seg.index]] if traced.multi else None, traced.dims)
        files = {"onnx": file_entry(root, rel, batch=batch_kind)}
        if tflite:
            log(f"segment {seg.index}: TFLite {['fp32', *opts.quantize]}")
            files.update(_tflite(seg, samples[seg.index][0], root, opts,
                                 seg_real[seg.index][0] if seg_real else None))
        manifest_segments.append(Segment(
            index=seg.index, files=files, inputs=in_specs[seg.index], outputs=out_specs[seg.index],
            exits=seg.exits, flops=segment_flops(seg.nodes), param_bytes=segment_param_bytes(seg.module),
        ))
    exits = _exits(an, segments)
    if traced.multi:
        first, *extra = [TensorSpec(i.name, list(i.axes), i.dtype) for i in traced.inputs]
        inp = InputSpec(first.name, first.shape, first.dtype, None)
    else:
        inp, extra = InputSpec("input", [BATCH, *traced.input_shape[1:]], "float32", opts.normalize), []
    manifest = Manifest("model", inp, manifest_segments, [], exits, extra_inputs=extra, dims=dict(traced.dims))
    manifest.split_points = _split_points(cut, manifest, real, names)
    export_info = {
        "source": traced.kind, "opset": opts.opset, "torch": torch.__version__, "split_points": cut.mode,
        "atol": opts.atol, "rtol": opts.rtol, "formats": ["onnx"] if traced.multi else list(opts.formats),
        "quantize": list(opts.quantize),
        "calibration": _describe(opts.calibration_data), "batch": batch_kind,
    }
    manifest.export = export_info
    return manifest


def _split_points(cut: _Cut, m: Manifest, real: tuple[np.ndarray, ...] | None, names: list[str]
                  ) -> list[SplitPoint]:
    """One split point after each segment but the last: its boundary, bytes per encoding (at the named axes'
    example sizes, plus the extra inputs carried with it, as they are) and int8 parameters from real data."""
    ranges = calib.boundary_ranges(cut.segments, real, names) if real else None
    points = []
    for k, seg in enumerate(m.segments[:-1]):
        spec = seg.outputs[0]
        elements = spec.sample_elements(m.dims)
        extras = {t.name: t for t in m.extra_inputs}
        carried = sum(extras[c].sample_elements(m.dims) * DTYPE_BYTES[extras[c].dtype] for c in m.carried(k))
        points.append(SplitPoint(
            index=k, tensor=TensorSpec(spec.name, list(spec.shape), spec.dtype),
            bytes_per_sample={enc: encoded_bytes(elements, enc) + carried for enc in ENCODINGS},
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
