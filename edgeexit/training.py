"""Joint training of a multi-exit model, with self-distillation from the final exit to the early exits.

Loss = sum_k w_k * [(1 - a) * CE(exit_k, y) + a * T^2 * KL(softmax(final / T) || softmax(exit_k / T))] for
the early exits (the final exit teaches, detached) and plain CE for the final exit. Distillation makes the
early exits' confidence track the final exit's answer, which is exactly what an exit policy relies on.

Deterministic with ``seed``: the shuffling comes from a seeded numpy generator and the training's own randomness
from ``torch.manual_seed``; CPU kernels are deterministic at a fixed thread count. The model's initial weights
are the caller's: ``models.build(arch, seed=...)`` makes them reproducible anywhere (without it they depend on
what ran before in the process: two trainings in one test session differed by 1.04 in a weight).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgeexit import datasets
from edgeexit.errors import ConfigError
from edgeexit.logs import ProgressBar


@dataclass
class TrainOptions:
    epochs: float = 4.0  # fractions allowed (e.g. 0.2 for smoke tests)
    batch_size: int = 128
    lr: float = 4e-3  # peak of the one-cycle schedule
    weight_decay: float = 5e-4
    seed: int = 0
    limit: int | None = None  # train on the first N training samples only
    distill: bool = True
    distill_alpha: float = 0.5
    distill_temperature: float = 3.0
    exit_weights: tuple[float, ...] | None = None  # None: 1.0 for every exit
    threads: int = 2  # 2 suits a quiet 2-core box; on a busy one use 1 (2 OpenMP threads then stall each other)
    progress: bool = True
    val_limit: int | None = None
    out: Path | None = None  # where to save the .pt2 (+ .state_dict.pt next to it)
    # Progressive resizing: (image size, epochs) per phase, e.g. ((48, 3), (96, 1)); replaces `epochs`.
    phases: tuple[tuple[int, float], ...] = ()


@dataclass
class TrainReport:
    exit_accuracy: list[float]  # on the val split, shallowest first
    exit_flops: list[int]  # cumulative FLOPs to reach each exit, batch 1
    seconds_per_epoch: float
    epochs: float
    train_samples: int
    val_samples: int
    out: Path | None = None
    extra: dict = field(default_factory=dict)

    def table(self) -> str:
        """Per-exit Markdown table: val accuracy and share of the full model's FLOPs."""
        from edgeexit.reports import markdown_table

        total = self.exit_flops[-1] or 1
        return markdown_table(["exit", "val accuracy", "MFLOPs", "share of full"],
                              [[str(k), f"{100 * acc:.2f}%", f"{fl / 1e6:.2f}", f"{fl / total:.3f}"]
                               for k, (acc, fl) in enumerate(zip(self.exit_accuracy, self.exit_flops, strict=True))])


def train(model: nn.Module, dataset: str = "fashion-mnist", *, options: TrainOptions | None = None) -> TrainReport:
    """Train ``model`` (forward returns a tuple of exit logits) on ``dataset``; save it if ``options.out``."""
    from edgeexit.models import flops_per_exit

    opts = options or TrainOptions()
    _check_options(opts)
    torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    # A resized dataset ("fashion-mnist-96") trains from the originals, resized batch by batch to each phase's
    # size: progressive resizing (small images first, the full size last) costs a fraction of the compute.
    base, final_size = datasets.resized_name(dataset) or (dataset, None)
    x_train, y_np = datasets.load(base, "train", opts.limit)
    y_train = torch.from_numpy(y_np)
    x_val, y_val = datasets.load(dataset, "val", opts.val_limit)
    if len(x_train) < 2:
        raise ConfigError(f"need at least 2 training samples (batch norm), got {len(x_train)}: raise --limit")
    phases = list(opts.phases) or [(final_size or x_train.shape[-1], opts.epochs)]
    if final_size is None and any(size != x_train.shape[-1] for size, _ in phases):
        raise ConfigError(f"--phases resize the images: train on a resized dataset (e.g. {dataset}-96)")
    n_exits = _count_exits(model, torch.from_numpy(x_val[:2]))
    weights = _exit_weights(opts, n_exits)

    steps_per_epoch = max(1, len(x_train) // opts.batch_size)  # drop the ragged last batch: BN dislikes size 1
    phase_steps = [max(1, round(epochs * steps_per_epoch)) for _, epochs in phases]
    total_steps = sum(phase_steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=opts.lr, total_steps=total_steps)
    rng = np.random.default_rng(opts.seed)

    started = time.perf_counter()
    model.to(memory_format=torch.channels_last)  # oneDNN's convolutions are ~3x faster in NHWC on CPU
    model.train()
    bar = ProgressBar(total_steps, opts.progress, "train", unit="step")
    step = 0
    for (size, _), steps in zip(phases, phase_steps, strict=True):
        done = 0
        while done < steps:
            order = rng.permutation(len(x_train))
            for b in range(steps_per_epoch):
                if done >= steps:
                    break
                idx = order[b * opts.batch_size:(b + 1) * opts.batch_size]
                xb = torch.from_numpy(datasets.resize(x_train[idx], size)).contiguous(memory_format=torch.channels_last)
                loss = _joint_loss(model(xb), y_train[idx], weights, opts)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                step, done = step + 1, done + 1
                bar.update(1)
                if step % 20 == 0:
                    bar.set_postfix(epoch=f"{step / steps_per_epoch:.2f}", size=size, loss=f"{loss.item():.3f}")
    bar.close()
    elapsed = time.perf_counter() - started

    model.to(memory_format=torch.contiguous_format)
    model.eval()
    report = TrainReport(
        exit_accuracy=exit_accuracy(model, x_val, y_val),
        exit_flops=flops_per_exit(model, (1, *x_val.shape[1:])),
        seconds_per_epoch=elapsed / (total_steps / steps_per_epoch),
        epochs=total_steps / steps_per_epoch,
        train_samples=len(x_train),
        val_samples=len(x_val),
    )
    if opts.out is not None:
        report.out = save_model(model, Path(opts.out), tuple(x_val.shape[1:]), metadata=_metadata(report, opts))
    return report


def _joint_loss(exits: tuple[torch.Tensor, ...], y: torch.Tensor, weights: list[float],
                opts: TrainOptions) -> torch.Tensor:
    final = exits[-1]
    loss = weights[-1] * F.cross_entropy(final, y)
    if opts.distill:
        t = opts.distill_temperature
        teacher = F.log_softmax(final.detach() / t, dim=1)
    for w, logits in zip(weights[:-1], exits[:-1], strict=True):
        ce = F.cross_entropy(logits, y)
        if opts.distill:
            kd = F.kl_div(F.log_softmax(logits / t, dim=1), teacher, reduction="batchmean", log_target=True) * t * t
            ce = (1 - opts.distill_alpha) * ce + opts.distill_alpha * kd
        loss = loss + w * ce
    return loss


@torch.no_grad()
def exit_logits(model: nn.Module, x: np.ndarray, batch_size: int = 1000) -> list[np.ndarray]:
    """Every exit's logits for ``x`` (model in eval mode), as numpy arrays [N, classes]."""
    model.eval()
    chunks: list[list[np.ndarray]] = []
    for i in range(0, len(x), batch_size):
        outs = model(torch.from_numpy(x[i:i + batch_size]))
        chunks.append([o.numpy() for o in outs])
    return [np.concatenate(parts) for parts in zip(*chunks, strict=True)]


def exit_accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> list[float]:
    """Accuracy of each exit on (x, y)."""
    return [float((logits.argmax(1) == y).mean()) for logits in exit_logits(model, x)]


def save_model(model: nn.Module, out: Path, input_shape: tuple[int, ...], metadata: dict | None = None) -> Path:
    """Save a torch.export archive with a dynamic batch dimension, and the state_dict at ``<out>.state_dict.pt``.

    The example input has batch 2 on purpose: an example of batch 1 makes torch.export specialise the batch
    to the constant 1 (0/1 specialisation), while ``Dim(min=1)`` with a batch-2 example still accepts batch 1.
    """
    from torch.export import Dim

    out.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    example = torch.rand(2, *input_shape)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: Dim("batch", min=1, max=65536)},))
    extra = {"edgeexit.json": json.dumps(metadata or {})}
    torch.export.save(program, str(out), extra_files=extra)
    torch.save(model.state_dict(), state_dict_path(out))
    return out


def state_dict_path(out: Path) -> Path:
    return Path(f"{out}.state_dict.pt")


def _metadata(report: TrainReport, opts: TrainOptions) -> dict:
    return {"exit_accuracy_val": report.exit_accuracy, "exit_flops": report.exit_flops, "epochs": report.epochs,
            "seed": opts.seed, "distill": opts.distill, "train_samples": report.train_samples,
            "phases": [list(p) for p in opts.phases]}


def _count_exits(model: nn.Module, sample: torch.Tensor) -> int:
    model.eval()
    with torch.no_grad():
        out = model(sample)
    model.train()
    if not isinstance(out, (tuple, list)) or len(out) < 2:
        raise ConfigError("the model's forward must return a tuple or list of exit logits (at least 2 exits), "
                          f"got {type(out).__name__}")
    return len(out)


def _exit_weights(opts: TrainOptions, n_exits: int) -> list[float]:
    if opts.exit_weights is None:
        return [1.0] * n_exits
    if len(opts.exit_weights) != n_exits:
        raise ConfigError(f"exit_weights has {len(opts.exit_weights)} entries but the model has {n_exits} exits")
    return list(opts.exit_weights)


def _check_options(opts: TrainOptions) -> None:
    if opts.epochs <= 0:
        raise ConfigError(f"epochs must be > 0, got {opts.epochs}")
    for size, epochs in opts.phases:
        if not 8 <= size <= datasets.MAX_SIZE or epochs <= 0:
            raise ConfigError(f"phase {size}:{epochs}: need an image size in 8..{datasets.MAX_SIZE} and epochs > 0")
    if opts.batch_size < 2:
        raise ConfigError(f"batch size must be >= 2 (batch norm needs it), got {opts.batch_size}")
    if opts.lr <= 0:
        raise ConfigError(f"learning rate must be > 0, got {opts.lr}")
    if not 0.0 <= opts.distill_alpha <= 1.0:
        raise ConfigError(f"distill_alpha must be in [0, 1], got {opts.distill_alpha}")
