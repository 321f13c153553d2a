"""Calibration inputs (dataset, .npz or array) and int8 boundary quantisation parameters from real data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgeexit.errors import ConfigError, ShapeError
from edgeexit.runtime.codec import affine_params

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




def boundary_ranges(modules: list[torch.nn.Module], x: np.ndarray, batch: int = 100) -> list[tuple[float, float]]:
    """Robust [lo, hi] of every boundary tensor (after segments 0..n-2) over the calibration inputs."""
    chunks: list[list[np.ndarray]] = [[] for _ in modules[:-1]]
    with torch.no_grad():
        for i in range(0, len(x), batch):
            cur = torch.from_numpy(x[i:i + batch])
            for k, mod in enumerate(modules[:-1]):
                cur = mod(cur)[0]
                chunks[k].append(cur.numpy().ravel())
    ranges = []
    for parts in chunks:
        vals = np.concatenate(parts)
        ranges.append((float(np.percentile(vals, LOW_PCT)), float(np.percentile(vals, HIGH_PCT))))
    return ranges


def quant_params(lo: float, hi: float) -> dict[str, float]:
    return affine_params(lo, hi)
