"""Per-sample FLOPs (multiply-adds counted as 2) and parameter bytes of a segment, from FX node metadata."""

from __future__ import annotations

import math

import torch
import torch.fx as fx

aten = torch.ops.aten
CONV = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default}
MATMUL = {aten.matmul.default, aten.mm.default, aten.bmm.default}


def _shape(n: object) -> list[int] | None:
    val = n.meta.get("val") if isinstance(n, fx.Node) else None
    return list(val.shape) if isinstance(val, torch.Tensor) else None


def _per_sample(shape: list) -> int:
    """Elements of one sample: every axis but the (possibly symbolic) batch axis."""
    return math.prod(int(d) for d in shape[1:])


def node_flops(n: fx.Node) -> int:
    out = _shape(n)
    if out is None:
        return 0
    if n.target in CONV:
        w = _shape(n.args[1])
        return 2 * _per_sample(out) * math.prod(w[1:]) if w else 0
    if n.target == aten.linear.default:
        w = _shape(n.args[1])
        return 2 * _per_sample(out) * int(w[-1]) if w else 0
    if n.target in MATMUL or n.target == aten.addmm.default:
        a = _shape(n.args[1] if n.target == aten.addmm.default else n.args[0])
        return 2 * _per_sample(out) * int(a[-1]) if a else 0
    return 0


def segment_flops(nodes: list[fx.Node]) -> int:
    return sum(node_flops(n) for n in nodes)


def segment_param_bytes(module: fx.GraphModule) -> int:
    """Bytes of every parameter/constant the segment's graph reads (each counted once)."""
    seen: set[str] = set()
    total = 0
    for n in module.graph.nodes:
        if n.op == "get_attr" and n.target not in seen:
            seen.add(n.target)
            t = module.get_parameter(n.target) if _is_param(module, n.target) else _attr(module, n.target)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def _attr(module: torch.nn.Module, target: str) -> object:
    obj: object = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _is_param(module: torch.nn.Module, target: str) -> bool:
    try:
        module.get_parameter(target)
        return True
    except AttributeError:
        return False
