"""Calibration inputs (dataset, .npz or array) and int8 boundary quantisation parameters from real data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgeexit.errors import ConfigError, ShapeError
from edgeexit.runtime.codec import affine_params

TEXT_SET = "stdlib-docstrings"  # edgeexit.text_data
LOW_PCT, HIGH_PCT = 0.01, 99.99  # robust range: a handful of outliers must not stretch the int8 scale


def load_calibration(source: Any, input_shape: tuple[int, ...], limit: int) -> np.ndarray | None:
    """Raw (un-normalised) float32 inputs [N, *input_shape[1:]], or None when no source is given."""
    if source is None:
        return None
    if isinstance(source, torch.Tensor):
        x = source.detach().cpu().numpy()
    elif isinstance(source, np.ndarray):
        x = source
    elif str(source).endswith(".npz"):
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"--calibration-data {path} does not exist")
        with np.load(path) as z:
            if "x" not in z:
                raise ConfigError(f"{path} has arrays {list(z.keys())}; it needs the inputs as array 'x'")
            x = z["x"]
    else:
        from edgeexit import datasets  # written alongside; imported lazily so export works without it

        data = datasets.load(str(source), "val")
        x = data[0] if isinstance(data, (tuple, list)) else data.x
    x = np.asarray(x, dtype=np.float32)[:limit]
    if x.ndim != len(input_shape) or tuple(x.shape[1:]) != tuple(input_shape[1:]):
        raise ShapeError(f"calibration inputs have shape {list(x.shape)}; the model takes [N, {list(input_shape[1:])}]")
    return x




def boundary_ranges(segments: list[Any], xs: tuple[np.ndarray, ...], names: list[str], batch: int = 100
                    ) -> list[tuple[float, float]]:
    """Robust [lo, hi] of every boundary tensor (after segments 0..n-2) over the calibration inputs ``xs``
    (one array per model input, named ``names``; segments are graph_cut.GraphSegment)."""
    chunks: list[list[np.ndarray]] = [[] for _ in segments[:-1]]
    with torch.no_grad():
        for i in range(0, len(xs[0]), batch):
            named = {n: torch.from_numpy(np.ascontiguousarray(a[i:i + batch])) for n, a in zip(names, xs, strict=True)}
            cur = named[names[0]]
            for k, seg in enumerate(segments[:-1]):
                cur = seg.module(cur, *(named[c] for c in seg.carried))[0]
                chunks[k].append(cur.numpy().ravel())
    ranges = []
    for parts in chunks:
        vals = np.concatenate(parts)
        ranges.append((float(np.percentile(vals, LOW_PCT)), float(np.percentile(vals, HIGH_PCT))))
    return ranges


def load_calibration_inputs(source: Any, traced: Any, limit: int) -> tuple[np.ndarray, ...] | None:
    """Calibration inputs of a multi-input model (``sources.Traced.inputs``), one array per input in forward()
    order, or None without a source: a .npz holding an array per input name, or a text dataset name
    (``edgeexit.text_data``: input_ids and attention_mask at the example's sequence length)."""
    if source is None:
        return None
    names = [i.name for i in traced.inputs]
    if str(source).endswith(".npz"):
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"--calibration-data {path} does not exist")
        with np.load(path) as z:
            missing = [n for n in names if n not in z]
            if missing:
                raise ConfigError(f"{path} has arrays {list(z.keys())}; a model with inputs {names} needs one "
                                  f"array per input name (missing {missing})")
            xs = tuple(np.asarray(z[n])[:limit] for n in names)
    elif isinstance(source, (tuple, list)):
        xs = tuple(np.asarray(a)[:limit] for a in source)
    else:
        if str(source) != TEXT_SET or len(names) != 2:
            raise ConfigError(f"--calibration-data {source!r}: a model with inputs {names} calibrates on a .npz "
                              f"with one array per input, or on {TEXT_SET!r} (input_ids, attention_mask)")
        from edgeexit import text_data  # imported lazily: it needs the tokenizers package

        ids, mask, _ = text_data.load_text("val", seq_len=int(traced.example[0].shape[1]), limit=limit)
        xs = (ids, mask)
    for x, inp in zip(xs, traced.inputs, strict=True):
        if str(x.dtype) != inp.dtype or x.ndim != len(inp.axes):
            raise ShapeError(f"calibration input {inp.name!r} is {x.dtype} {list(x.shape)}; the model takes "
                             f"{inp.dtype} {inp.axes}")
    if len(xs) != len(names) or len({len(x) for x in xs}) != 1:
        raise ShapeError(f"calibration data must give the {len(names)} inputs {names} with the same number of rows")
    return xs


def quant_params(lo: float, hi: float) -> dict[str, float]:
    return affine_params(lo, hi)
