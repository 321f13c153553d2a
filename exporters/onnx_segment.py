"""Export one segment GraphModule to a single-file ONNX model with a dynamic batch axis."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from edgeexit.errors import ExportError
from edgeexit.exporters.graph_cut import GraphSegment


@contextlib.contextmanager
def quiet():
    """torch.onnx is chatty (stdout banners, torchvision warnings); keep our progress lines readable."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels, strict=True):
            lg.setLevel(lv)


def export_onnx_segment(seg: GraphSegment, sample: tuple[torch.Tensor, ...], out_path: Path, opset: int,
                        dynamic: bool, shapes: list[list[int | str]] | None = None,
                        dims: dict[str, dict[str, int]] | None = None) -> None:
    """``sample``: one tensor per segment input (``seg.input_names``). The batch axis is dynamic when
    ``dynamic``; with ``shapes`` (each input's manifest shape) so is every named axis, one Dim per name shared
    by all inputs, up to its ``dims`` max."""
    dyn = _dynamic_shapes(seg, shapes, dims or {}) if dynamic else None
    try:
        with quiet():
            torch.onnx.export(
                seg.module, tuple(sample), str(out_path), input_names=seg.input_names,
                output_names=seg.output_names, dynamic_shapes=dyn, opset_version=opset, external_data=False,
                dynamo=True,
            )
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ExportError(f"segment {seg.index} failed to export to ONNX (opset {opset}): {first}") from e


def _dynamic_shapes(seg: GraphSegment, shapes: list[list[int | str]] | None, dims: dict[str, dict[str, int]]
                    ) -> tuple[dict[int, Any], ...]:
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    if shapes is None:
        return tuple({0: batch} for _ in seg.input_names)
    named = {name: torch.export.Dim(name, min=1, max=d["max"]) for name, d in dims.items()}
    named["batch"] = batch
    return tuple({i: named[a] for i, a in enumerate(shape) if isinstance(a, str)} for shape in shapes)
