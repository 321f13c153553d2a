"""One ONNX model per tail, for Triton's ``onnxruntime_onnx`` platform (a full Triton, e.g. with GPUs).

``write_onnx_tail`` merges a bundle's ONNX segments ``start..`` into one model with the names ``edgeexit serve``
uses: input ``input`` (start 0, the whole model) or ``boundary{start-1}`` (the tail ``<model>@<start-1>``),
outputs ``exit{j}`` for every exit of those segments, FP32, with the dynamic batch axis kept. What serve does
to a request before the first segment becomes a prologue inside the graph, so the answers are the same:

- tails: ``fp32`` nothing; ``fp16`` a Cast (FP16 input); ``int8`` a DequantizeLinear with the split point's
  calibrated scale/zero_point from the manifest (INT8 input). Triton hands the tensor straight to the graph,
  so the ``edgeexit.scale``/``edgeexit.zero_point`` request parameters are NOT read: the baked-in values are
  the ones an agent running the same bundle sends.
- the whole model: raw pixels, ``fp32`` (FP32 in [0, 1]), ``fp16`` or ``uint8`` (k means k/255), then the
  bundle's normalisation ``(x - mean) / std`` if it has one.

zstd cannot work in this flavour: Triton gives an ONNX model the raw tensor bytes and nothing in the graph can
decompress them. Devices must send uncompressed tensors to it (so must they to the python flavour: Triton checks a
tensor's byte count against its shape before any model runs).
A Triton model has one datatype per input, so a repository serves each tail in one encoding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, shape_inference

from edgeexit.bundle import BATCH, Bundle
from edgeexit.errors import ExportError
from edgeexit.runtime.merge import all_nodes, load_prefixed, merged_functions

# Encoding -> (OIP datatype, ONNX element type) of the model's input.
TAIL_ENCODINGS = {"fp32": ("FP32", TensorProto.FLOAT), "fp16": ("FP16", TensorProto.FLOAT16),
                  "int8": ("INT8", TensorProto.INT8)}
PIXEL_ENCODINGS = {"fp32": ("FP32", TensorProto.FLOAT), "fp16": ("FP16", TensorProto.FLOAT16),
                   "uint8": ("UINT8", TensorProto.UINT8)}
_FLOAT_IN = "edgeexit_prologue_in"  # the prologue's float32 output, which the first segment reads instead


@dataclass(frozen=True)
class TensorDims:
    name: str
    datatype: str  # OIP datatype (FP32, FP16, INT8, UINT8)
    dims: tuple[int, ...]  # without the batch axis, as config.pbtxt wants them with max_batch_size > 0

    @property
    def triton_type(self) -> str:
        """The config.pbtxt ``data_type`` (TYPE_FP32, ...)."""
        return f"TYPE_{self.datatype}"


@dataclass(frozen=True)
class TailSpec:
    """What config.pbtxt needs about a written tail model."""

    model: str  # served name: ``<model>`` or ``<model>@<split>``
    input: TensorDims
    outputs: tuple[TensorDims, ...]
    encoding: str


def write_onnx_tail(bundle: Bundle, start: int, encoding: str, out: Path) -> TailSpec:
    """Write segments ``start..`` of ``bundle`` as one ONNX model at ``out``; see the module docstring.

    Raises ExportError for an encoding the model cannot take (int8 without calibration, int8 for raw
    pixels, uint8 for a boundary) or segments that cannot be merged.
    """
    m = bundle.manifest
    n = len(m.segments)
    if not 0 <= start < n:
        raise ExportError(f"segment {start} does not exist: {m.name} has segments 0..{n - 1}")
    name = m.name if start == 0 else f"{m.name}@{start - 1}"
    in_spec = m.input if start == 0 else m.split_points[start - 1].tensor
    datatype, elem = _input_type(m.name, name, start, encoding)
    prologue, inits = _prologue(bundle, start, encoding, len(in_spec.shape))

    graphs = [_load_segment(bundle, k) for k in range(start, n)]
    opsets = _merged_opsets([g for g, _ in graphs])
    first = graphs[0][0].graph
    if prologue:  # the first segment reads the prologue's float32 output instead of the model input
        _rename_input(first, in_spec.name, _FLOAT_IN)

    exit_names = [f"exit{j}" for seg in m.segments[start:] for j in seg.exits]
    produced = {o.name: o for g, _ in graphs for o in g.graph.output}
    missing = [e for e in exit_names if e not in produced]
    if missing:
        raise ExportError(f"{m.name}: segment files do not output {missing}; re-export the bundle")

    graph = helper.make_graph(
        nodes=prologue + [node for g, _ in graphs for node in g.graph.node],
        name=name.replace("@", "_at_"),
        inputs=[helper.make_tensor_value_info(in_spec.name, elem, [_dim(d) for d in in_spec.shape])],
        outputs=[produced[e] for e in exit_names],
        initializer=inits + [i for g, _ in graphs for i in g.graph.initializer],
        value_info=[v for g, _ in graphs for v in g.graph.value_info],
    )
    graph.sparse_initializer.extend(s for g, _ in graphs for s in g.graph.sparse_initializer)
    model = helper.make_model(graph, opset_imports=opsets, producer_name="edgeexit",
                              doc_string=f"{name}: segments {start}..{n - 1} of {m.name}, input {encoding}")
    model.ir_version = max(g.ir_version for g, _ in graphs)
    model.functions.extend(merged_functions([g for g, _ in graphs]))
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, shape_inference.InferenceError) as e:
        raise ExportError(f"merging segments {start}..{n - 1} of {m.name} gave an invalid ONNX model: "
                          f"{str(e).splitlines()[0][:300]}") from e
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(out))

    specs = {t.name: t for seg in m.segments for t in seg.outputs}
    outputs = tuple(TensorDims(e, "FP32", _dims(specs[e].shape)) for e in exit_names)
    return TailSpec(name, TensorDims(in_spec.name, datatype, _dims(in_spec.shape)), outputs, encoding)


def _input_type(model: str, name: str, start: int, encoding: str) -> tuple[str, int]:
    if start == 0 and encoding not in PIXEL_ENCODINGS:
        raise ExportError(f"{name} (the whole model) takes raw pixels: use encoding fp32, fp16 or uint8, not "
                          f"{encoding!r} (int8 is for the tails {model}@<split>)")
    if start > 0 and encoding not in TAIL_ENCODINGS:
        raise ExportError(f"{name} takes a boundary tensor: use encoding fp32, fp16 or int8, not {encoding!r}"
                          + (" (zstd cannot work in the onnxruntime_onnx flavour)" if "zstd" in encoding else ""))
    return (PIXEL_ENCODINGS if start == 0 else TAIL_ENCODINGS)[encoding]


def _prologue(bundle: Bundle, start: int, encoding: str, rank: int,
              ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes (reading the model input, writing ``_FLOAT_IN``) and their constants; empty for plain fp32 tails."""
    m = bundle.manifest
    src = m.input.name if start == 0 else m.split_points[start - 1].tensor.name
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    if encoding == "int8":
        q = _quantization(bundle, start - 1)
        inits += [numpy_helper.from_array(np.array(q[0], np.float32), "edgeexit_scale"),
                  numpy_helper.from_array(np.array(q[1], np.int8), "edgeexit_zero_point")]
        return [helper.make_node("DequantizeLinear", [src, "edgeexit_scale", "edgeexit_zero_point"], [_FLOAT_IN],
                                 name="edgeexit_dequantize")], inits
    cur = src
    if encoding in ("fp16", "uint8"):
        cur = "edgeexit_cast" if start == 0 else _FLOAT_IN
        nodes.append(helper.make_node("Cast", [src], [cur], to=TensorProto.FLOAT, name="edgeexit_cast"))
    if start == 0 and encoding == "uint8":  # k means k/255, float32 division as serve's decoder does
        inits.append(numpy_helper.from_array(np.array(255.0, np.float32), "edgeexit_levels"))
        nodes.append(helper.make_node("Div", [cur, "edgeexit_levels"], ["edgeexit_pixels"], name="edgeexit_levels"))
        cur = "edgeexit_pixels"
    norm = m.input.normalization if start == 0 else None
    if norm:  # runtime.runner.normalize: per-channel (x - mean) / std in float32
        shape = (1, -1) + (1,) * (rank - 2)
        inits += [numpy_helper.from_array(np.asarray(norm["mean"], np.float32).reshape(shape), "edgeexit_mean"),
                  numpy_helper.from_array(np.asarray(norm["std"], np.float32).reshape(shape), "edgeexit_std")]
        nodes += [helper.make_node("Sub", [cur, "edgeexit_mean"], ["edgeexit_centred"], name="edgeexit_sub_mean"),
                  helper.make_node("Div", ["edgeexit_centred", "edgeexit_std"], [_FLOAT_IN], name="edgeexit_div_std")]
    elif nodes:
        if start == 0:  # end the chain on _FLOAT_IN
            nodes.append(helper.make_node("Identity", [cur], [_FLOAT_IN], name="edgeexit_float_in"))
    return nodes, inits


def _quantization(bundle: Bundle, split: int) -> tuple[float, int]:
    m = bundle.manifest
    q = m.split_points[split].quantization
    if not q or "scale" not in q or "zero_point" not in q:
        raise ExportError(
            f"split point {split} of {m.name} has no calibrated int8 scale/zero_point, so its tail cannot take "
            f"INT8: re-export with `edgeexit export ... --calibration-data DATA` (e.g. fashion-mnist or a .npz), "
            f"or serve this tail as fp16/fp32"
        )
    scale, zero = float(q["scale"]), q["zero_point"]
    if not (math.isfinite(scale) and scale > 0) or int(zero) != zero or not -128 <= int(zero) <= 127:
        raise ExportError(f"split point {split} of {m.name} has invalid int8 parameters {q} (scale must be > 0, "
                          f"zero_point an integer in -128..127); re-export with --calibration-data")
    return scale, int(zero)


def _load_segment(bundle: Bundle, k: int) -> tuple[onnx.ModelProto, int]:
    """Segment k with internal names prefixed ``s{k}_`` (runtime/merge.py merges the runner's ranges alike)."""
    return load_prefixed(bundle.segment_path(k, "onnx"), k), k


def _rename_input(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Point every reader of ``old`` (in subgraphs too, which see the outer scope) at ``new``."""
    for node in all_nodes(graph):
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new


def _merged_opsets(models: list[onnx.ModelProto]) -> list[onnx.OperatorSetIdProto]:
    seen: dict[str, int] = {}
    for model in models:
        for op in model.opset_import:
            if seen.setdefault(op.domain, op.version) != op.version:
                raise ExportError(f"segments use different versions of opset {op.domain or 'ai.onnx'!r} "
                                  f"({seen[op.domain]} and {op.version}); re-export the bundle with one --opset")
    seen.setdefault("", 13)  # DequantizeLinear/Cast/Sub/Div of the prologue need the default domain
    return [helper.make_opsetid(d, v) for d, v in seen.items()]


def _dim(d: int | str) -> int | str:
    return BATCH if d == BATCH else int(d)


def _dims(shape: list[int | str]) -> tuple[int, ...]:
    return tuple(int(d) for d in shape if d != BATCH)
