"""Validation after export: chain every segment in onnxruntime and compare every exit to torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from edgeexit.bundle import Bundle
from edgeexit.errors import ToleranceError
from edgeexit.runtime.runner import SegmentRunner


def validation_inputs(input_shape: tuple[int, ...], real: np.ndarray | None, dynamic: bool, seed: int
                      ) -> list[tuple[str, np.ndarray]]:
    """Random (and real, when given) inputs at batch 1 and 5 (only the fixed batch for a static model)."""
    rng = np.random.default_rng(seed)
    sizes = (1, 5) if dynamic else (input_shape[0],)
    cases = []
    for b in sizes:
        cases.append((f"random batch {b}", rng.random((b, *input_shape[1:]), dtype=np.float32)))
        if real is not None and len(real) >= b:
            cases.append((f"real batch {b}", np.ascontiguousarray(real[:b])))
    return cases


def validate_bundle(root: Path, reference: torch.nn.Module, cases: list[tuple[str, np.ndarray]],
                    atol: float, rtol: float) -> float:
    """Raise ToleranceError naming segment and exit on disagreement; return the worst absolute error."""
    runner = SegmentRunner(Bundle.load(root), threads=1)
    owner = {j: s.index for s in runner.manifest.segments for j in s.exits}
    worst = 0.0
    for label, x in cases:
        got = runner.run_all(x)
        with torch.no_grad():
            want = [t.numpy() for t in reference(torch.from_numpy(x))]
        for j, (g, w) in enumerate(zip(got, want, strict=True)):
            err = float(np.max(np.abs(g - w))) if g.size else 0.0
            worst = max(worst, err)
            if g.shape != w.shape or not np.allclose(g, w, atol=atol, rtol=rtol):
                raise ToleranceError(
                    f"segment {owner[j]} exit {j} differs from torch on {label}: max |diff| {err:.3g} "
                    f"(atol {atol}, rtol {rtol}); try another --opset or report the model's unusual ops"
                )
    return worst
