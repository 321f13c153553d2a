"""Load a model from any accepted source and trace it ONCE with torch.export (dynamic batch axis).

Sources: a live ``nn.Module`` (Python API), a ``.pt2`` torch.export archive, a TorchScript archive,
``--model pkg.mod:factory --weights sd.pt`` (weights_only, strict), or a pickled whole module (only with
``--trust-pickle``: unpickling runs arbitrary code).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from edgeexit.errors import ConfigError, ExportError, ShapeError
from edgeexit.exporters.options import ExportOptions


@dataclass
class ModelInput:
    """One input of a multi-input (or integer-input, or variable-length) model, as the archive declares it."""

    name: str
    axes: list[int | str]  # "batch" first when dynamic, then sizes or named dynamic axes (dims)
    dtype: str


@dataclass
class Traced:
    module: fx.GraphModule  # flat graph: input tensor(s) -> tuple of exit logits
    kind: str  # "module" | "pt2" | "torchscript" | "factory" | "pickle"
    input_shape: tuple[int, ...]  # the (first) input's, batch axis first (named axes at their example size)
    dynamic_batch: bool
    warnings: list[str]
    # Set for a model that is not one float tensor of fixed shape (only from a .pt2, which declares them):
    inputs: list[ModelInput] = field(default_factory=list)  # every input, forward() order
    example: tuple[torch.Tensor, ...] = ()  # the archive's example inputs (sample and validation data)
    dims: dict[str, dict[str, int]] = field(default_factory=dict)  # named axis -> {"example", "max"}

    @property
    def multi(self) -> bool:
        return bool(self.inputs)


def _summary(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def _zip_names(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as z:
            return z.namelist()
    except zipfile.BadZipFile:
        return []


def check_outputs(out: Any, batch: int) -> None:
    """The model contract: a tuple/list of >= 2 logits tensors shaped [batch, classes]."""
    if isinstance(out, torch.Tensor) or not isinstance(out, (tuple, list)):
        raise ShapeError(
            f"forward(x) returned {type(out).__name__}, but edgeexit needs a tuple or list of exit logits "
            "(one [batch, classes] tensor per exit, shallowest first, the final classifier last, at least 2)"
        )
    if len(out) < 2 or not all(isinstance(t, torch.Tensor) for t in out):
        raise ShapeError(f"forward(x) must return >= 2 exit logits tensors; it returned {len(out)} items")
    for j, t in enumerate(out):
        if t.dim() != 2 or t.shape[0] != batch:
            raise ShapeError(f"exit {j} has shape {list(t.shape)}; every exit must be logits [batch={batch}, classes]")


def _check_shape(shape: tuple[int, ...] | None, kind: str) -> tuple[int, ...]:
    if shape is None:
        raise ConfigError(f"a {kind} model needs --input-shape (e.g. 1,1,28,28)")
    return tuple(shape)


def trace_module(model: torch.nn.Module, shape: tuple[int, ...], kind: str) -> Traced:
    """Run the model once (to check the contract with a clear error), then torch.export with a dynamic batch."""
    with contextlib.suppress(NotImplementedError):  # an ExportedProgram's module() has no eval(); it is already
        model = model.eval()
    sample = torch.rand((2, *shape[1:]), generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            out = model(sample)
    except Exception as e:  # the model's own complaint, summarised
        raise ShapeError(f"the model rejects input shape {list(shape)}: {_summary(e)}; check --input-shape") from e
    check_outputs(out, 2)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    try:
        ep = torch.export.export(model, (sample,), dynamic_shapes=({0: batch},), strict=False)
    except Exception as e:
        raise ExportError(
            f"torch.export could not trace the model with a dynamic batch axis: {_summary(e)}; "
            "make forward() free of data-dependent Python control flow and batch-size constants"
        ) from e
    return Traced(ep.module(), kind, tuple(shape), True, [])


def _from_pt2(path: Path, shape: tuple[int, ...] | None) -> Traced:
    try:
        ep = torch.export.load(str(path))
    except Exception as e:
        raise ExportError(f"{path} is not a loadable torch.export archive: {_summary(e)}") from e
    user = set(ep.graph_signature.user_inputs)
    inputs = [n for n in ep.graph.nodes if n.op == "placeholder" and n.name in user]
    if not inputs:
        raise ShapeError(f"{path}: the model takes no input tensor")
    val = inputs[0].meta["val"]
    if len(inputs) > 1 or val.dtype != torch.float32 or any(not isinstance(d, int) for d in val.shape[1:]):
        return _from_multi_pt2(path, ep, inputs)
    dynamic = not isinstance(val.shape[0], int)
    real = tuple(int(d) if isinstance(d, int) else 1 for d in val.shape)
    if shape is not None and tuple(shape[1:]) != real[1:]:
        raise ShapeError(f"--input-shape {list(shape)} does not match the archive's input {list(real)}; drop it")
    warnings = [] if dynamic else [
        f"{path.name} was saved with a static batch of {real[0]}: the segments will run batch-{real[0]} only; "
        "re-save it with torch.export dynamic_shapes={0: Dim('batch')} for batching"
    ]
    gm = ep.module()
    sample = torch.rand(real, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        check_outputs(gm(sample), real[0])
    return Traced(gm, "pt2", real, dynamic, warnings)


def _from_multi_pt2(path: Path, ep: Any, nodes: list[fx.Node]) -> Traced:
    """A .pt2 with several inputs, an integer input or named dynamic axes (a transformer's input_ids and
    attention_mask [batch, seq]): shapes, axis names and sizes come from the archive. Axis names are the
    archive's ``edgeexit.json`` ("axes": {input: [names]}, or "inputs": [{name, shape}]) when it has them, else
    ``dim1``, ``dim2``..."""
    example = (getattr(ep, "example_inputs", None) or ((), {}))[0]
    if len(example) != len(nodes) or not all(isinstance(t, torch.Tensor) for t in example):
        raise ShapeError(f"{path} keeps no example inputs for its {len(nodes)} inputs; re-save it with "
                         "torch.export.save from torch >= 2.6")
    meta = _archive_meta(path)
    declared = meta.get("axes") or {}  # {input: [axis names]}, or edgeexit's own [{name, shape}] under "inputs"
    if isinstance(meta.get("inputs"), list):
        declared = {i.get("name"): i.get("shape") for i in meta["inputs"] if isinstance(i, dict)}
    declared = {k: v for k, v in declared.items() if isinstance(v, list)} if isinstance(declared, dict) else {}
    ranges = {str(k): v for k, v in ep.range_constraints.items()}
    names: dict[str, str] = {}
    dims: dict[str, dict[str, int]] = {}
    inputs = []
    for node, ex in zip(nodes, example, strict=True):
        axes: list[int | str] = []
        for i, d in enumerate(node.meta["val"].shape):
            if isinstance(d, int):
                axes.append(d)
                continue
            key = str(d)
            if key not in names:
                given = declared.get(node.name, [])
                names[key] = "batch" if not names and i == 0 else (
                    given[i] if i < len(given) and isinstance(given[i], str) else f"dim{len(names)}")
                if names[key] != "batch":
                    upper = ranges[key].upper if key in ranges else 1 << 20
                    top = int(upper) if str(upper).lstrip("-").isdigit() else 1 << 20  # int_oo: unbounded
                    dims[names[key]] = {"example": int(ex.shape[i]), "max": min(top, 2**31 - 1)}
            axes.append(names[key])
        inputs.append(ModelInput(node.name, axes, str(ex.dtype).removeprefix("torch.")))
    dynamic = inputs[0].axes[0] == "batch"
    gm = ep.module()
    with torch.no_grad():
        check_outputs(gm(*example), int(example[0].shape[0]))
    shape = tuple(int(d) for d in example[0].shape)
    return Traced(gm, "pt2", shape, dynamic, [], inputs, tuple(example), dims)


def _archive_meta(path: Path) -> dict[str, Any]:
    """The ``edgeexit.json`` a .pt2 carries (edgeexit's own archives), {} without one or when unreadable."""
    try:
        with zipfile.ZipFile(path) as z:
            name = next((n for n in z.namelist() if n.endswith("edgeexit.json")), None)
            meta = json.loads(z.read(name)) if name else {}
    except (zipfile.BadZipFile, ValueError, OSError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _from_torchscript(path: Path, shape: tuple[int, ...] | None) -> Traced:
    shape = _check_shape(shape, "TorchScript")
    ts = torch.jit.load(str(path), map_location="cpu").eval()
    sample = torch.rand((2, *shape[1:]))
    try:
        with torch.no_grad():
            check_outputs(ts(sample), 2)
    except ShapeError:
        raise
    except Exception as e:
        raise ShapeError(f"the model rejects input shape {list(shape)}: {_summary(e)}; check --input-shape") from e
    try:
        from torch._export.converter import TS2EPConverter

        ep = TS2EPConverter(ts, (sample,)).convert()
    except Exception as e:
        raise ExportError(
            f"this TorchScript archive cannot be converted to torch.export ({_summary(e)}); "
            "export the model from Python with torch.export.save (.pt2) or use --model pkg.mod:factory --weights"
        ) from e
    # The converter traces with the sample's static batch; re-export its module to get a dynamic one.
    try:
        return trace_module(ep.module(), shape, "torchscript")
    except ExportError as e:
        gm = ep.module()
        warning = (f"the TorchScript model only traces with a static batch ({_summary(e)}); "
                   "segments will run batch-2 only: export from Python as .pt2 for a dynamic batch")
        return Traced(gm, "torchscript", (2, *shape[1:]), False, [warning])


def _from_factory(opts: ExportOptions) -> Traced:
    shape = _check_shape(opts.input_shape, "--model factory")
    mod_name, _, fn_name = (opts.factory or "").partition(":")
    if not mod_name or not fn_name:
        raise ConfigError(f"--model {opts.factory!r} must look like package.module:factory")
    try:
        if "" not in sys.path:
            sys.path.insert(0, "")
        factory = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"cannot import {opts.factory}: {e}; is the package on PYTHONPATH?") from e
    model = factory()
    wpath = Path(opts.weights or "")
    if not wpath.is_file():
        raise ConfigError(f"--weights {wpath} does not exist")
    try:
        state = torch.load(wpath, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ExportError(f"{wpath} is not a plain state_dict loadable with weights_only=True: {_summary(e)}") from e
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ExportError(f"--weights do not fit the factory's model (strict loading): {_summary(e)}") from e
    return trace_module(model, shape, "factory")


def _from_pickle(path: Path, opts: ExportOptions) -> Traced:
    if not opts.trust_pickle:
        raise ExportError(
            f"{path} is a pickled whole module; loading it runs arbitrary code from the file. "
            "Pass --trust-pickle if you trust its origin, or export it as .pt2 / --model pkg.mod:factory --weights"
        )
    shape = _check_shape(opts.input_shape, "pickled")
    model = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(model, torch.nn.Module):
        raise ExportError(f"{path} holds a {type(model).__name__}, not an nn.Module; for a state_dict use --model")
    return trace_module(model, shape, "pickle")


def load_traced(model_or_path: Any, opts: ExportOptions) -> Traced:
    if isinstance(model_or_path, torch.nn.Module):
        return trace_module(model_or_path, _check_shape(opts.input_shape, "Python"), "module")
    if opts.factory:
        return _from_factory(opts)
    path = Path(model_or_path)
    if not path.is_file():
        raise ConfigError(f"model file {path} does not exist")
    names = _zip_names(path)
    if path.suffix == ".pt2" or any(n.endswith("serialized_exported_program.json") or "/models/" in n for n in names):
        return _from_pt2(path, opts.input_shape)
    if any("/code/" in n for n in names):
        return _from_torchscript(path, opts.input_shape)
    if names and any(n.endswith("data.pkl") for n in names):
        return _from_pickle(path, opts)
    raise ExportError(f"{path} is neither a .pt2, a TorchScript archive, nor a torch.save file")
