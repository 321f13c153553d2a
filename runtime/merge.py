"""Merge a contiguous range of a bundle's ONNX segments into one ONNX model, in memory.

A range that runs without a decision in between (the cloud's tail ``split+1..end``, ``run_all`` for evaluate and
calibrate, a device finishing locally) is cheaper as one onnxruntime session than as one call per segment: one
Python -> C++ crossing instead of several, no boundary tensor copied out to numpy and back in, and onnxruntime
may fuse across the cuts. The merged model reads ``segments[start]``'s input and writes ``boundary{stop-1}``
(unless ``stop`` is the end) then ``exit{j}`` for every exit of the range, shallowest first: the order the
runner's ``run`` gives them.

Needs the ``onnx`` package (the ``device``/``serve`` extras have it); without it the runner chains the
segments one session each, as LiteRT always does. ``exporters/triton_onnx.py`` writes Triton's tails with the
same helpers.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from edgeexit.bundle import Bundle
from edgeexit.errors import BundleError
from edgeexit.runtime.backends import PortFacts, SegmentIO, check_io

if TYPE_CHECKING:  # onnx is imported only when a merge is asked for: a LiteRT device may not have it
    import onnx


def load_prefixed(path: Path, k: int) -> onnx.ModelProto:
    """Segment k's model with every internal name prefixed ``s{k}_``; its input/output names stay, as they
    are unique across the bundle (``boundary{k}``, ``exit{j}``) and chain the segments."""
    import onnx
    from onnx import compose

    model = onnx.load_model(str(path))
    compose.add_prefix_graph(model.graph, f"s{k}_", rename_inputs=False, rename_outputs=False, inplace=True)
    # Local functions are called by name: prefix them as well and the call sites with them.
    renamed = {(f.domain, f.name): f"s{k}_{f.name}" for f in model.functions}
    for f in model.functions:
        f.name = renamed[(f.domain, f.name)]
    bodies = [n for f in model.functions for n in f.node]  # functions may call other local functions
    for node in all_nodes(model.graph) + bodies:
        if (node.domain, node.op_type) in renamed:
            node.op_type = renamed[(node.domain, node.op_type)]
    return model


def all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Every node of ``graph``, those inside subgraphs (If/Loop bodies) too."""
    out = []
    for node in graph.node:
        out.append(node)
        for a in node.attribute:
            for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                out += all_nodes(sub)
    return out


def opset_versions(models: list[onnx.ModelProto]) -> dict[str, int] | tuple[str, int, int]:
    """Domain -> version over ``models``; ``(domain, v1, v2)`` when two models disagree (the caller says so
    with its own error)."""
    seen: dict[str, int] = {}
    for model in models:
        for op in model.opset_import:
            if seen.setdefault(op.domain, op.version) != op.version:
                return op.domain, seen[op.domain], op.version
    return seen


def _facts(ports) -> list[PortFacts]:
    """(name, dims, dtype) of graph inputs/outputs, as backends.check_io takes them from a session."""
    from onnx import helper

    out: list[PortFacts] = []
    for p in ports:
        t = p.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in t.shape.dim]
        dtype = str(helper.tensor_dtype_to_np_dtype(t.elem_type)) if t.elem_type else None
        out.append((p.name, dims, dtype))
    return out


def merged_functions(models: list[onnx.ModelProto]) -> list[onnx.FunctionProto]:
    return [f for model in models for f in model.functions]


def merge_range(bundle: Bundle, start: int, stop: int, fmt: str = "onnx") -> bytes:
    """Segments ``start..stop-1`` of ``bundle`` as one serialised ONNX model (see the module docstring).

    Raises BundleError when the segment files cannot be merged (different opsets, a missing output); the
    runner then chains them one by one, and opening those says what is wrong with a file."""
    from onnx import helper

    m = bundle.manifest
    n = len(m.segments)
    if not 0 <= start < stop <= n:
        raise BundleError(f"segment range {start}..{stop} is outside 0..{n}")
    models = []
    for k in range(start, stop):
        path = bundle.segment_path(k, fmt)
        models.append(load_prefixed(path, k))
        # Each file is checked against the manifest as its own session would be: the merged session's check
        # sees only the range's ends, so a file lying about an inner boundary is refused here.
        seg, graph = m.segments[k], models[-1].graph
        io = SegmentIO([t.name for t in seg.inputs], [t.name for t in seg.outputs], {}, seg.inputs, seg.outputs)
        check_io(path, io, _facts(graph.input), _facts(graph.output))
    opsets = opset_versions(models)
    if isinstance(opsets, tuple):
        raise BundleError(f"segments use different versions of opset {opsets[0] or 'ai.onnx'!r} ({opsets[1]} and "
                          f"{opsets[2]}); re-export the bundle with one --opset")
    wanted = ([f"boundary{stop - 1}"] if stop < n else []) + [f"exit{j}" for seg in m.segments[start:stop]
                                                                for j in seg.exits]
    produced = {o.name: o for g in models for o in g.graph.output}
    missing = [w for w in wanted if w not in produced]
    first_in = [i for i in models[0].graph.input if i.name == m.segments[start].inputs[0].name]
    if missing or not first_in:
        raise BundleError(f"{m.name}: segment files {start}..{stop - 1} do not have "
                          f"{missing or m.segments[start].inputs[0].name}; re-export the bundle")
    graph = helper.make_graph(
        nodes=[node for g in models for node in g.graph.node],
        name=f"{m.name}_s{start}_{stop - 1}",
        inputs=first_in,
        outputs=[produced[w] for w in wanted],
        initializer=[i for g in models for i in g.graph.initializer],
        value_info=[v for g in models for v in g.graph.value_info],
    )
    graph.sparse_initializer.extend(s for g in models for s in g.graph.sparse_initializer)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
                              producer_name="edgeexit")
    model.ir_version = max(g.ir_version for g in models)
    model.functions.extend(merged_functions(models))
    return model.SerializeToString()
