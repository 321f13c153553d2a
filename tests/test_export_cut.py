"""Graph cutting without ONNX: valid split points never cross a skip connection, and the chained torch
segments reproduce the whole model exactly, for sequential, residual and concatenating models."""

from __future__ import annotations

import pytest
import torch

from edgeexit.errors import ExportError, ShapeError
from edgeexit.exporters.graph_cut import GraphAnalysis, build_segments, plan_cuts
from edgeexit.exporters.sources import trace_module
from tests.fixtures_bundles import TinyDenseNet, TinyResNet, TinySequential, seeded

SHAPE = (1, 1, 28, 28)


def _chain(segments, x):
    exits = {}
    with torch.no_grad():
        for seg in segments:
            outs = seg.module(x)
            if seg.index < len(segments) - 1:
                x, outs = outs[0], outs[1:]
            exits.update(zip(seg.exits, outs, strict=True))
    return [exits[j] for j in sorted(exits)]


@pytest.fixture(scope="module")
def traced():
    return {name: trace_module(seeded(cls()), SHAPE, "module").module
            for name, cls in [("seq", TinySequential), ("res", TinyResNet), ("dense", TinyDenseNet)]}


@pytest.mark.parametrize("name", ["seq", "res", "dense"])
@pytest.mark.parametrize("mode", ["exits", "auto"])
def test_chained_segments_equal_whole_model(traced, name, mode):
    gm = traced[name]
    an = GraphAnalysis(gm)
    plan, _ = plan_cuts(an, mode)
    segments = build_segments(an, plan)
    assert [s.exits for s in segments if s.exits] == [[0], [1], [2]]
    x = torch.rand(3, *SHAPE[1:])
    with torch.no_grad():
        want = gm(x)
    for g, w in zip(_chain(segments, x), want, strict=True):
        torch.testing.assert_close(g, w, atol=0, rtol=0)
    if mode == "exits":
        assert len(segments) == 3
    else:
        assert len(segments) >= 3


def test_auto_adds_stage_boundaries(traced):
    an = GraphAnalysis(traced["res"])
    exits_plan, _ = plan_cuts(an, "exits")
    auto_plan, _ = plan_cuts(an, "auto")
    assert set(exits_plan.cuts) < set(auto_plan.cuts)
    positions = [an.position[c] for c in auto_plan.cuts]
    assert positions == sorted(set(positions))  # in order, deduplicated


@pytest.mark.parametrize("name", ["res", "dense"])
def test_no_valid_cut_inside_a_skip_connection(traced, name):
    """Every node strictly inside a residual/dense block (its input still needed later) is not a cut."""
    an = GraphAnalysis(traced[name])
    valid = [n for n in an.backbone_list if an.is_valid_cut(n)]
    invalid = [n for n in an.backbone_list[:-1] if n not in valid]
    assert invalid, "a model with skip connections must have positions where a cut is invalid"
    for n in invalid:
        p = an.position[n]
        crossing = {u for w in an.backbone_list[p + 1:] for u in w.all_input_nodes
                    if u in an.position and an.position[u] <= p}
        assert crossing - {n}, f"{n.name} was rejected although only it crosses"
    for n in valid:
        p = an.position[n]
        crossing = {u for w in an.backbone_list[p + 1:] for u in w.all_input_nodes
                    if u in an.position and an.position[u] <= p}
        assert crossing <= {n}


def test_exits_out_of_order_rejected():
    class Backwards(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = TinySequential()

        def forward(self, x):
            e1, e2, e3 = self.net(x)
            return e2, e1, e3

    gm = trace_module(seeded(Backwards()), SHAPE, "module").module
    with pytest.raises(ExportError, match="shallowest first"):
        plan_cuts(GraphAnalysis(gm), "exits")


def test_single_tensor_model_is_a_shape_error():
    with pytest.raises(ShapeError, match="tuple or list of exit logits"):
        trace_module(torch.nn.Conv2d(1, 2, 3), SHAPE, "module")


def test_wrong_input_shape_is_a_shape_error():
    with pytest.raises(ShapeError, match=r"rejects input shape \[1, 3, 28, 28\].*--input-shape"):
        trace_module(seeded(TinyResNet()), (1, 3, 28, 28), "module")
