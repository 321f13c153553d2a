"""Evaluate a bundle: per-exit accuracy and compute, a policy's accuracy vs the final exit, measured wall time
relative to the full model (both measured in the same run), and sweeps of every policy's thresholds.

Relative compute counts the FLOPs of the segments actually executed (a row that exits at exit j has run every
segment up to the one owning j), divided by the FLOPs of the whole model. Torch-free.

``load_for_bundle`` is the one data path of calibrate and evaluate: an image set as arrays for an image model,
a text set as token ids plus the model's extra inputs (``ModelInputs``) for a model that takes token ids, and a
``ConfigError`` saying which data fits when they do not match.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeexit import datasets
from edgeexit.calibration import lambda_grid, thresholds_for
from edgeexit.early_exit import ExitTrace, ModelInputs, collect_logits, executed_flops, run_early_exit
from edgeexit.errors import ConfigError
from edgeexit.logs import ProgressBar
from edgeexit.policies import KINDS, ExitPolicy, make_policy
from edgeexit.reports import Curve, markdown_table, plot_curves, write_json

SWEEP_KINDS = tuple(k for k in KINDS if k != "never")
DEFAULT_SEQ_LEN = 128  # a text model whose manifest names no example sequence length
TEXT_EXTRAS = ("attention_mask",)  # the extra inputs a text set gives besides the token ids
Inputs = np.ndarray | ModelInputs  # images, or token ids with the model's extra inputs


@dataclass
class EvalOptions:
    dataset: str = "fashion-mnist"
    split: str = "test"
    limit: int | None = None
    batch_size: int = 256
    backend: str = "onnxruntime"
    threads: int = 1
    progress: bool = True
    params: dict[str, Any] = field(default_factory=dict)  # policy parameters for sweeps (patience k)
    seq_len: int | None = None  # text sets: tokens per row (None: load_for_bundle's default)


# ---------------------------------------------------------------- data for a bundle


def takes_tokens(manifest: Any) -> bool:
    """True for a model fed token ids (integer primary input, or extra inputs such as an attention mask)."""
    return bool(manifest.extra_inputs) or np.dtype(manifest.input.dtype).kind in "iu"


def _describe_inputs(manifest: Any) -> str:
    return ", ".join(f"{t.name} {t.dtype} {list(t.shape)}" for t in manifest.inputs)


def seq_len_for(manifest: Any, seq_len: int | None = None) -> int:
    """Tokens per row for a text model: ``seq_len``, else the manifest's example length of its sequence axis
    (else 128), capped at the axis' largest allowed size; a fixed sequence axis admits only its own size."""
    from edgeexit.text_data import MAX_SEQ_LEN

    axis = manifest.input.shape[1] if len(manifest.input.shape) == 2 else None
    if isinstance(axis, int):  # exported with a fixed length: that is the only one it takes
        if seq_len is not None and seq_len != axis:
            raise ConfigError(f"--seq-len {seq_len}: {manifest.name} takes exactly {axis} tokens per row")
        return axis
    dims = manifest.dims.get(axis, {}) if isinstance(axis, str) else {}
    top = min(int(dims.get("max", MAX_SEQ_LEN)), MAX_SEQ_LEN)
    if seq_len is None:
        return min(int(dims.get("example", DEFAULT_SEQ_LEN)), top)
    if not 2 <= seq_len <= top:
        raise ConfigError(f"--seq-len {seq_len}: {manifest.name} takes 2..{top} tokens per row")
    return seq_len


def load_for_bundle(manifest: Any, data: str, split: str, limit: int | None = None,
                    seq_len: int | None = None) -> tuple[Inputs, np.ndarray]:
    """``(inputs, labels)`` of ``split`` of ``data`` in the form the bundle's model takes: images (as
    ``datasets.load`` gives them) for an image model; for a model fed token ids, a text set tokenised to
    ``seq_len_for(manifest, seq_len)`` tokens as ``ModelInputs(input_ids, {"attention_mask": ...})``."""
    tokens = takes_tokens(manifest)
    if tokens and datasets.is_user_file(data):  # several inputs or token ids: one array per input, by name
        if seq_len is not None:
            raise ConfigError(f"--seq-len is for the built-in text sets; the rows of {data} are used as saved")
        arrays, y = datasets.load_named(data, [t.name for t in manifest.inputs], split, limit)
        first, *rest = _fit_inputs(manifest, data, arrays)
        return ModelInputs(first, dict(zip([t.name for t in manifest.extra_inputs], rest, strict=True))), y
    if datasets.is_text(data):
        if not tokens:
            sets = ", ".join(datasets.DATASETS)
            raise ConfigError(f"{data!r} is a text set (token ids and an attention mask) but {manifest.name} takes "
                              f"images ({_describe_inputs(manifest)}): give an image set ({sets}, a resized one such "
                              "as fashion-mnist-96, or a .npz of images)")
        unknown = [t.name for t in manifest.extra_inputs if t.name not in TEXT_EXTRAS]
        if unknown:
            raise ConfigError(f"{data!r} gives token ids and {', '.join(TEXT_EXTRAS)}; {manifest.name} also takes "
                              f"{unknown}: feed it from code (edgeexit.early_exit.ModelInputs)")
        from edgeexit.text_data import load_text

        ids, mask, y = load_text(split, seq_len_for(manifest, seq_len), limit)
        extras = {"attention_mask": mask} if manifest.extra_inputs else {}
        return ModelInputs(ids, extras), y
    if tokens:
        raise ConfigError(f"{manifest.name} takes token ids ({_describe_inputs(manifest)}), not images: give a "
                          f"text set (--data {' or '.join(datasets.TEXT_DATASETS)}); {data!r} is not one")
    if seq_len is not None:
        raise ConfigError(f"--seq-len is for text sets ({', '.join(datasets.TEXT_DATASETS)}); {data!r} is images")
    return datasets.load(data, split, limit)


def data_seq_len(manifest: Any, data: str, x: Inputs, seq_len: int | None = None) -> int | None:
    """Tokens per row of what ``load_for_bundle`` gave a text model (None for images): a user file's as saved."""
    if not takes_tokens(manifest):
        return None
    if datasets.is_user_file(data):
        return int(x.x.shape[1]) if x.x.ndim == 2 else None
    return seq_len_for(manifest, seq_len)


def _fit_inputs(manifest: Any, data: str, arrays: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Each model input's array from a user file in the model's dtype (a safe cast only), checked as the runtime
    checks what an app sends (shapes, shared and bounded axes): a ConfigError naming the file otherwise."""
    from edgeexit.errors import InvalidTensor
    from edgeexit.runtime.runner import check_axes

    feeds = {}
    for t in manifest.inputs:
        a, want = arrays[t.name], np.dtype(t.dtype)
        if want.kind in "iu" and a.dtype.kind not in "iu":
            raise ConfigError(f"{data}: {t.name} is {a.dtype}, {manifest.name} takes integer {want} (token ids)")
        if not np.can_cast(a.dtype, want, "same_kind" if want.kind == "f" else "safe"):
            raise ConfigError(f"{data}: {t.name} is {a.dtype}, which does not convert safely to {want}")
        feeds[t.name] = np.ascontiguousarray(a, dtype=want)
    try:
        check_axes(feeds, manifest.inputs, manifest.dims)
    except InvalidTensor as e:
        raise ConfigError(f"{data}: {e}") from None
    return [feeds[t.name] for t in manifest.inputs]


@dataclass
class ExitRow:
    exit: int
    exit_rate: float | None  # None without a policy
    accuracy: float | None  # of the rows answered here (without a policy: of this exit on every row)
    cumulative_flops: int
    relative_flops: float


@dataclass
class PolicyEval:
    policy: dict[str, Any]
    rows: list[ExitRow]
    accuracy: float
    final_accuracy: float
    relative_flops: float
    relative_time: float  # measured: early-exit run / full-model run, same data, same batch size
    seconds: float
    full_seconds: float

    @property
    def accuracy_drop_pp(self) -> float:
        return 100.0 * (self.final_accuracy - self.accuracy)


def per_exit_rows(manifest: Any, logits: list[np.ndarray], y: np.ndarray) -> list[ExitRow]:
    """Every exit alone on every row (the `--no-policy` table)."""
    exe = executed_flops(manifest)
    return [ExitRow(j, None, float((lg.argmax(1) == y).mean()), exe[j], exe[j] / exe[-1] if exe[-1] else float("nan"))
            for j, lg in enumerate(logits)]


def time_full_model(runner: Any, x: Inputs, batch_size: int, progress: bool = False
                    ) -> tuple[list[np.ndarray], float]:
    """Every exit's logits and the wall time of the full-model pass (the reference for relative time)."""
    with ProgressBar(len(x), progress, "full model") as bar:
        t0 = time.perf_counter()
        logits = collect_logits(runner, x, batch_size, progress=bar.update)
        return logits, time.perf_counter() - t0


def warm_up(runner: Any, x: Inputs) -> None:
    """Open every session and run once, so neither timed run pays for session creation."""
    collect_logits(runner, x[: min(len(x), 8)])


def evaluate_policy(runner: Any, policy: ExitPolicy, x: Inputs, y: np.ndarray, options: EvalOptions,
                    full: tuple[list[np.ndarray], float] | None = None, repeats: int = 1) -> PolicyEval:
    """Run the policy for real (regrouping runner) and the full model on the same data; compare.

    With ``repeats > 1`` the full and the early-exit passes are timed alternately and each keeps its fastest
    run: on a shared machine the minimum is the least disturbed estimate of both."""
    manifest = runner.manifest
    logits, full_s = full or time_full_model(runner, x, options.batch_size)
    ee_times = []
    for r in range(max(1, repeats)):
        if r > 0:
            full_s = min(full_s, time_full_model(runner, x, options.batch_size)[1])
        with ProgressBar(len(x), options.progress and r == 0, f"early exit ({policy.kind})") as bar:
            res = run_early_exit(runner, policy, x, options.batch_size, progress=bar.update)
        ee_times.append(res.seconds)
    res.seconds = min(ee_times)
    exe = executed_flops(manifest)
    rows = []
    for j in range(len(manifest.exits)):
        m = res.exit_index == j
        rows.append(ExitRow(j, float(m.mean()), float((res.labels[m] == y[m]).mean()) if m.any() else None,
                            exe[j], exe[j] / exe[-1] if exe[-1] else float("nan")))
    final_acc = float((logits[-1].argmax(1) == y).mean())
    return PolicyEval(
        policy=policy.to_dict(), rows=rows, accuracy=float((res.labels == y).mean()), final_accuracy=final_acc,
        relative_flops=float(res.segment_flops.mean() / exe[-1]) if exe[-1] else float("nan"),
        relative_time=res.seconds / full_s if full_s > 0 else float("nan"), seconds=res.seconds, full_seconds=full_s,
    )


# ---------------------------------------------------------------- sweeps (offline, from logits computed once)


def sweep_policy(kind: str, manifest: Any, logits: list[np.ndarray], y: np.ndarray,
                 params: dict[str, Any] | None = None) -> list[dict[str, float]]:
    """Accuracy and relative FLOPs of ``kind`` over its whole threshold grid (shared threshold)."""
    probe = make_policy(kind, [0.0] * (len(logits) - 1), **(params or {}))
    trace = ExitTrace.build(probe, logits)
    exe = np.asarray(executed_flops(manifest), np.float64)
    out = []
    for lam in lambda_grid(kind):
        labels, ex = trace.apply(thresholds_for(lam, len(logits) - 1))
        out.append({"lambda": float(lam), "accuracy": float((labels == y).mean()),
                    "relative_flops": float(exe[ex].mean() / exe[-1]) if exe[-1] else float("nan"),
                    "disagreement": float((labels != trace.labels[-1]).mean())})
    return out


def write_sweep(out_dir: Path, name: str, sweeps: dict[str, list[dict[str, float]]], final_accuracy: float,
                points: list[tuple[str, float, float]] = ()) -> dict[str, Path]:
    """JSON + Markdown + PNG (accuracy vs relative compute, one curve per policy)."""
    out_dir = Path(out_dir)
    js = write_json(out_dir / "sweep.json", {"final_accuracy": final_accuracy, "sweeps": sweeps})
    lines = [f"# {name}: accuracy vs relative compute", "", f"Final exit alone: {100 * final_accuracy:.2f}%", ""]
    for kind, rows in sweeps.items():
        lines += [f"## {kind}", "", best_under_drops_table(rows, final_accuracy), ""]
    md = out_dir / "sweep.md"
    md.write_text("\n".join(lines))
    curves = [Curve(k, [r["relative_flops"] for r in rows], [100 * r["accuracy"] for r in rows])
              for k, rows in sweeps.items()]
    png = plot_curves(out_dir / "sweep.png", curves, "relative compute (FLOPs / full model)", "accuracy (%)",
                      f"{name}: accuracy vs compute (final exit {100 * final_accuracy:.2f}%)",
                      points=[*points, ("final exit", 1.0, 100 * final_accuracy)])
    return {"json": js, "markdown": md, "png": png}


def best_under_drops_table(rows: list[dict[str, float]], final_accuracy: float,
                           drops_pp: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 2.0)) -> str:
    """For a few allowed accuracy drops: the cheapest grid point within it (on this data; not calibrated)."""
    table = []
    for d in drops_pp:
        ok = [r for r in rows if 100 * (final_accuracy - r["accuracy"]) <= d + 1e-9]
        best = min(ok, key=lambda r: r["relative_flops"]) if ok else None
        table.append([f"{d:g}", best and f"{best['lambda']:.6g}", best and f"{best['relative_flops']:.3f}",
                      best and f"{100 * best['accuracy']:.2f}"])
    return markdown_table(["max drop (pp)", "threshold", "relative FLOPs", "accuracy %"], table)


# ---------------------------------------------------------------- text


def exits_table(rows: list[ExitRow]) -> str:
    return markdown_table(
        ["exit", "exit rate", "accuracy", "cumulative MFLOPs", "relative compute"],
        [[str(r.exit), "-" if r.exit_rate is None else f"{100 * r.exit_rate:.1f}%",
          "-" if r.accuracy is None else f"{100 * r.accuracy:.2f}%", f"{r.cumulative_flops / 1e6:.3f}",
          f"{r.relative_flops:.3f}"] for r in rows])


def summary(ev: PolicyEval) -> str:
    return "\n".join([
        f"accuracy {100 * ev.accuracy:.2f}% vs final exit alone {100 * ev.final_accuracy:.2f}% "
        f"(drop {ev.accuracy_drop_pp:+.2f} pp)",
        f"relative compute (FLOPs) {ev.relative_flops:.3f}; measured time relative to the full model "
        f"{ev.relative_time:.3f} ({ev.seconds:.2f} s vs {ev.full_seconds:.2f} s, same run)",
    ])
