"""Cut one traced FX graph (from ``torch.export``) into per-segment GraphModules at valid split points.

Vocabulary:
- *backbone*: tensor nodes that feed the final exit; *head*: tensor nodes that only feed earlier exits.
- *free* nodes are parameters/constants (``get_attr``) and symbolic sizes; they never count as tensors
  crossing a cut: each segment re-reads its parameters and recomputes the batch size from its own input.
- a cut after backbone node ``v`` is *valid* when every edge from the left side to the right side leaves
  from ``v`` (no open skip connection crosses it). A head node sits on the side of its deepest input.
- *side* nodes: the model's inputs after the first (``forward(input_ids, attention_mask)``) and every node
  computed from them alone (an additive mask). They are *carried*: a segment that needs one takes the input as a
  placeholder of its own and recomputes the side nodes it reads, so they never count as crossing a cut either.
  Symbolic sizes (a batch or sequence length) are re-read from whichever of the segment's inputs has that axis.
- a *bottleneck* is a module whose class is named ``SplitBottleneck`` (``edgeexit/bottleneck.py``) with an
  ``encoder`` child: its encoder's output is always a split point, and any other cut that would fall on the
  bottleneck's input or inside it moves there (the point of a bottleneck is to send its small code).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from edgeexit.errors import ExportError

GUARDS = "_guards_fn"  # call_module torch.export adds to check input shapes; segments don't need it
BOTTLENECK = "SplitBottleneck"  # class name (any package) of a learned bottleneck module


@dataclass
class Bottleneck:
    """One SplitBottleneck in the backbone: the node feeding it, its encoder's output, its last node."""

    path: str
    start: fx.Node
    code: fx.Node
    end: fx.Node


@dataclass
class CutPlan:
    """Which backbone nodes end segments and which exits each segment owns."""

    cuts: list[fx.Node]  # boundary node after segment k, for k < len(cuts)
    exits_per_segment: list[list[int]]
    mode: str
    bottlenecks: dict[int, Bottleneck] = field(default_factory=dict)  # cut index -> the bottleneck it is


@dataclass
class GraphSegment:
    index: int
    module: fx.GraphModule
    input_name: str
    output_names: list[str]
    exits: list[int]
    nodes: list[fx.Node] = field(default_factory=list)  # original nodes computed here (for FLOPs/params)
    carried: list[str] = field(default_factory=list)  # side inputs it reads, after input_name, in model order

    @property
    def input_names(self) -> list[str]:
        return [self.input_name, *self.carried]


def _is_tensor_node(n: fx.Node) -> bool:
    return isinstance(n.meta.get("val"), torch.Tensor)


def _is_free(n: fx.Node) -> bool:
    """Parameters, constants and non-tensor (symbolic size) nodes: cloned into each segment that needs them."""
    if n.op == "get_attr":
        return True
    if n.op == "call_module" and n.target == GUARDS:
        return True
    return n.op == "call_function" and not _is_tensor_node(n)


def _side_nodes(nodes: list[fx.Node], side_inputs: list[fx.Node]) -> set[fx.Node]:
    """The side inputs and every tensor node computed from side inputs (and free nodes) only."""
    side = set(side_inputs)
    for n in nodes:
        if n.op == "call_function" and not _is_free(n):
            ins = [a for a in n.all_input_nodes if not _is_free(a)]
            if ins and all(a in side for a in ins):
                side.add(n)
    return side


class GraphAnalysis:
    """Backbone/head classification, exit branch points and valid cut candidates of one graph."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        nodes = list(gm.graph.nodes)
        placeholders = [n for n in nodes if n.op == "placeholder"]
        if not placeholders:
            raise ExportError("the model takes no input tensor")
        self.input = placeholders[0]
        self.side_inputs = placeholders[1:]
        self.side = _side_nodes(nodes, self.side_inputs)
        out = next(n for n in nodes if n.op == "output")
        flat = out.args[0]
        self.exit_nodes: list[fx.Node] = list(flat) if isinstance(flat, (tuple, list)) else [flat]
        self.compute = [n for n in nodes if n.op == "call_function" and not _is_free(n) and n not in self.side]
        self.order = {n: i for i, n in enumerate(nodes)}
        final = self.exit_nodes[-1]
        self.backbone = self._ancestors(final) | {final}
        self.backbone.discard(self.input)
        self.backbone_list = [n for n in self.compute if n in self.backbone]
        self.position = {n: i for i, n in enumerate(self.backbone_list)}
        self.position[self.input] = -1

    def tensor_inputs(self, n: fx.Node) -> list[fx.Node]:
        """The tensors ``n`` reads that can cross a cut (not free, not side)."""
        return [a for a in n.all_input_nodes if not _is_free(a) and a not in self.side]

    def _ancestors(self, node: fx.Node) -> set[fx.Node]:
        seen: set[fx.Node] = set()
        stack = [node]
        while stack:
            for a in self.tensor_inputs(stack.pop()):
                if a not in seen:
                    seen.add(a)
                    stack.append(a)
        return seen

    def depth(self, n: fx.Node, memo: dict[fx.Node, int]) -> int:
        """Backbone position a node is computed at: its own, or its deepest input's for head nodes."""
        if n in self.position:
            return self.position[n]
        if n not in memo:
            memo[n] = max((self.depth(a, memo) for a in self.tensor_inputs(n)), default=-1)
        return memo[n]

    def is_valid_cut(self, v: fx.Node) -> bool:
        if v not in self.position or v is self.backbone_list[-1] or not _is_tensor_node(v):
            return False
        p = self.position[v]
        memo: dict[fx.Node, int] = {}
        for w in self.compute:
            if self.depth(w, memo) <= p:
                continue
            for u in self.tensor_inputs(w):
                if self.depth(u, memo) <= p and u is not v:
                    return False
        return True

    def branch_points(self) -> list[fx.Node]:
        """For each early exit, the deepest backbone node its head reads (where the head branches off)."""
        memo: dict[fx.Node, int] = {}
        points = []
        for j, e in enumerate(self.exit_nodes[:-1]):
            p = self.depth(e, memo)
            if p < 0:
                raise ExportError(f"exit {j} does not depend on any computation of the model")
            points.append(self.backbone_list[p])
        return points

    def stage_ends(self) -> list[fx.Node]:
        """Last backbone node of each run of nodes from the same top-level child module. When one child wraps
        everything (e.g. a wrapper module), look one level deeper, so wrapped models get their stages too."""
        paths = [_module_path(n) for n in self.backbone_list]
        for depth in range(1, 4):
            names = [".".join(p.split(".")[:depth]) if p else "" for p in paths]
            if len({n for n in names if n}) > 1:
                return [self.backbone_list[i] for i, name in enumerate(names[:-1]) if name and name != names[i + 1]]
        return []

    def bottlenecks(self) -> list[Bottleneck]:
        """Every SplitBottleneck the backbone runs through, in order."""
        groups: dict[str, list[fx.Node]] = {}
        for n in self.backbone_list:
            for path, kind in (n.meta.get("nn_module_stack") or {}).values():
                if str(kind).rstrip("'>").rsplit(".", 1)[-1] == BOTTLENECK:  # "pkg.Cls" or "<class 'pkg.Cls'>"
                    groups.setdefault(path, []).append(n)
                    break
        found = []
        for path, nodes in groups.items():
            enc = [n for n in nodes if _module_path(n).startswith(f"{path}.encoder")]
            if not enc:
                raise ExportError(f"{BOTTLENECK} {path!r} has no 'encoder' child; name its device half 'encoder'")
            first = self.position[nodes[0]]
            start = self.backbone_list[first - 1] if first > 0 else self.input
            found.append(Bottleneck(path, start, enc[-1], nodes[-1]))
        return found


def node_path(n: fx.Node) -> str:
    """Dotted path of the innermost module that produced ``n`` ("" for the root's own forward)."""
    return _module_path(n)


def _module_path(n: fx.Node) -> str:
    """Dotted path of the innermost module that produced ``n`` ("" for the root's own forward)."""
    stack = n.meta.get("nn_module_stack") or {}
    paths = [path for path, _ in stack.values() if path]
    return paths[-1] if paths else ""


def plan_cuts(an: GraphAnalysis, mode: str) -> tuple[CutPlan, list[str]]:
    """Choose cuts for ``mode`` ("exits" or "auto"); returns the plan and human-readable warnings."""
    if mode not in ("exits", "auto"):
        raise ExportError(f"unknown --split-points {mode!r}; use 'auto' or 'exits'")
    warnings: list[str] = []
    valid = [n for n in an.backbone_list if an.is_valid_cut(n)]
    chosen: list[fx.Node] = []
    for j, b in enumerate(an.branch_points()):
        later = [n for n in valid if an.position[n] >= an.position[b]]
        if not later:
            warnings.append(f"exit {j} branches where no valid split point follows; it joins the last segment")
            continue
        if later[0] is not b:
            warnings.append(f"exit {j} branches inside a skip connection at {b.name}; cutting at {later[0].name}")
        chosen.append(later[0])
    if mode == "auto":
        chosen += [n for n in an.stage_ends() if n in valid]
    spans = an.bottlenecks()
    for b in spans:
        if not an.is_valid_cut(b.code):
            raise ExportError(f"the encoder output of {BOTTLENECK} {b.path!r} is not a valid split point (a skip "
                              "connection crosses it); put the bottleneck where one tensor carries everything")
        inside = [c for c in chosen if an.position[b.start] <= an.position[c] <= an.position[b.end]]
        chosen = [c for c in chosen if c not in inside] + [b.code]
    cuts = sorted(set(chosen), key=lambda n: an.position[n])
    exits_per_segment = _assign_exits(an, cuts)
    marked = {cuts.index(b.code): b for b in spans}
    return CutPlan(cuts, exits_per_segment, mode, marked), warnings


def _segment_of(an: GraphAnalysis, n: fx.Node, cuts: list[fx.Node], memo: dict[fx.Node, int]) -> int:
    d = an.depth(n, memo)
    return sum(1 for c in cuts if an.position[c] < d)


def _assign_exits(an: GraphAnalysis, cuts: list[fx.Node]) -> list[list[int]]:
    memo: dict[fx.Node, int] = {}
    per: list[list[int]] = [[] for _ in range(len(cuts) + 1)]
    for j, e in enumerate(an.exit_nodes):
        per[_segment_of(an, e, cuts, memo)].append(j)
    owned = [j for seg in per for j in seg]
    if owned != list(range(len(an.exit_nodes))):
        raise ExportError(
            f"exit heads branch off in the order {owned}; return the exits from forward() shallowest first"
        )
    return per


def build_segments(an: GraphAnalysis, plan: CutPlan) -> list[GraphSegment]:
    """One GraphModule per segment: input -> (boundary, exits...) with parameters and sizes recomputed."""
    memo: dict[fx.Node, int] = {}
    seg_of = {n: _segment_of(an, n, plan.cuts, memo) for n in an.compute}
    segments = []
    for k in range(len(plan.cuts) + 1):
        src = an.input if k == 0 else plan.cuts[k - 1]
        first = an.input.name if an.side_inputs else "input"  # a multi-input model keeps its inputs' names
        in_name = first if k == 0 else f"boundary{k - 1}"
        outs = ([plan.cuts[k]] if k < len(plan.cuts) else []) + [an.exit_nodes[j] for j in plan.exits_per_segment[k]]
        out_names = ([f"boundary{k}"] if k < len(plan.cuts) else []) + [f"exit{j}" for j in plan.exits_per_segment[k]]
        mine = [n for n in an.compute if seg_of[n] == k]
        carried = _side_inputs_read(an, mine + outs)
        module = _segment_module(an, [src, *carried], [in_name, *(c.name for c in carried)], mine, outs)
        segments.append(GraphSegment(k, module, in_name, out_names, plan.exits_per_segment[k], mine,
                                     [c.name for c in carried]))
    return segments


def _side_inputs_read(an: GraphAnalysis, nodes: list[fx.Node]) -> list[fx.Node]:
    """The side inputs ``nodes`` read, directly or through side nodes, in model order."""
    found: set[fx.Node] = set()
    stack = [a for n in nodes for a in n.all_input_nodes if a in an.side]
    while stack:
        a = stack.pop()
        if a not in found:
            found.add(a)
            stack.extend(b for b in a.all_input_nodes if b in an.side)
    return [p for p in an.side_inputs if p in found]


def _segment_module(an: GraphAnalysis, srcs: list[fx.Node], names: list[str], mine: list[fx.Node],
                    outs: list[fx.Node]) -> fx.GraphModule:
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for src, name in zip(srcs, names, strict=True):
        env[src] = g.placeholder(name)
        env[src].meta = dict(src.meta)
    sizes: dict[str, fx.Node] = {}  # symbolic size (str of its SymInt) -> this segment's node reading it

    def size_of(a: fx.Node) -> fx.Node | None:
        """A symbolic size re-read from one of this segment's inputs that has it as an axis (None: none has)."""
        key = str(a.meta.get("val"))
        if key not in sizes:
            for src in srcs:
                shape = getattr(src.meta.get("val"), "shape", ())
                axis = next((i for i, d in enumerate(shape) if not isinstance(d, int) and str(d) == key), None)
                if axis is not None:
                    sizes[key] = g.call_function(torch.ops.aten.sym_size.int, (env[src], axis))
                    break
        return sizes.get(key)

    def lookup(a: fx.Node) -> fx.Node:
        if a in env:
            return env[a]
        if a.op == "get_attr":
            env[a] = g.node_copy(a, lookup)
        elif a.op == "call_function" and not _is_tensor_node(a):
            sym = size_of(a) if a.target == torch.ops.aten.sym_size.int else None
            env[a] = sym if sym is not None else g.node_copy(a, lookup)
        elif a in an.side and a.op == "call_function":  # recomputed from the side inputs this segment takes
            env[a] = g.node_copy(a, lookup)
        else:
            raise ExportError(f"internal: tensor {a.name} crosses into segment {names[0]} without being its input")
        return env[a]

    for n in mine:
        env[n] = g.node_copy(n, lookup)
    g.output(tuple(lookup(o) for o in outs))
    g.lint()
    gm = fx.GraphModule(an.gm, g)
    gm.recompile()
    return gm
