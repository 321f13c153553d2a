"""Export one segment GraphModule to a single-file ONNX model with a dynamic batch axis."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

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


def export_onnx_segment(seg: GraphSegment, sample: torch.Tensor, out_path: Path, opset: int, dynamic: bool) -> None:
    dyn = ({0: torch.export.Dim("batch", min=1, max=1 << 16)},) if dynamic else None
    try:
        with quiet():
            torch.onnx.export(
                seg.module, (sample,), str(out_path), input_names=[seg.input_name], output_names=seg.output_names,
                dynamic_shapes=dyn, opset_version=opset, external_data=False, dynamo=True,
            )
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ExportError(f"segment {seg.index} failed to export to ONNX (opset {opset}): {first}") from e
