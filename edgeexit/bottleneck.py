"""Learned bottlenecks at a split point: model surgery and distillation training (torch; training side only).

A :class:`SplitBottleneck` (encoder on the device, decoder on the cloud) goes after stage ``s - 1`` of a
:class:`~edgeexit.models.MultiExitNet`, i.e. at split point ``s`` of the model exported with
``--split-points auto`` (split 0 is the normalised input, split ``s`` the output of stage ``s - 1``)::

    stage_{s-1} -> head_{s-1}                      (exits 0..s-1 read the original features: unchanged)
               \\-> encoder -> [wire] -> decoder -> stage_s -> head_s ...   (exits s.. read the decoded tensor)

The encoder is a 3x3 conv to ``channels`` (optionally stride 2) + batch norm + hardtanh: its output lies in
[-1, 1], so the exporter's calibrated int8 scale is tight (2/255 per step) whatever the data. The decoder
((transposed) conv back to the original shape, conv, ReLU like the stage output) runs in the cloud.
The exporter (``exporters/graph_cut.py``) recognises a module whose class is named ``SplitBottleneck`` and
cuts exactly at its encoder's output; the manifest marks that split point (``SplitPoint.bottleneck``).

Training is distillation from the frozen original: MSE of the decoded tensor to the original boundary tensor
(normalised by its mean square) + KL of every exit after the split to the original's same exit (KL joins after
the first ``kl_from`` share of the steps: MSE alone needs no backward through the tail, so it is cheap). The prefix
(stages and exits before the split) is frozen and shared; only the bottleneck trains (``train_tail`` also
fine-tunes the stages and heads after it, batch-norm statistics kept).
"""

from __future__ import annotations

import copy
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
from edgeexit.models import ARCHS, MultiExitNet, build


class SplitBottleneck(nn.Module):
    """encoder (device side) -> decoder (cloud side); the exporter cuts at the encoder's output."""

    def __init__(self, in_channels: int, channels: int, stride: int, spatial: tuple[int, int]) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False), nn.BatchNorm2d(channels), nn.Hardtanh())
        if stride == 1:
            up: nn.Module = nn.Conv2d(channels, in_channels, 3, 1, 1, bias=False)
        else:  # output_padding restores even sizes (24 -> 12 -> 24) and odd ones (7 -> 4 -> 7)
            pad = (1 - spatial[0] % 2, 1 - spatial[1] % 2)
            up = nn.ConvTranspose2d(channels, in_channels, 3, 2, 1, output_padding=pad, bias=False)
        self.decoder = nn.Sequential(up, nn.BatchNorm2d(in_channels), nn.ReLU(),
                                     nn.Conv2d(in_channels, in_channels, 3, 1, 1, bias=False),
                                     nn.BatchNorm2d(in_channels), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class BottleneckNet(nn.Module):
    """A MultiExitNet with a SplitBottleneck after stage ``split - 1``; same contract (tuple of exit logits)."""

    def __init__(self, base: MultiExitNet, split: int, bottleneck: SplitBottleneck) -> None:
        super().__init__()
        self.normalize, self.stages, self.heads = base.normalize, base.stages, base.heads
        self.split = split
        self.bottleneck = bottleneck

    def prefix(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Original boundary tensor at the split and the exits before it."""
        x, exits = self.normalize(x), []
        for stage, head in zip(self.stages[:self.split], self.heads[:self.split], strict=True):
            x = stage(x)
            exits.append(head(x))
        return x, exits

    def tail(self, x: torch.Tensor) -> list[torch.Tensor]:
        exits = []
        for stage, head in zip(self.stages[self.split:], self.heads[self.split:], strict=True):
            x = stage(x)
            exits.append(head(x))
        return exits

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h, exits = self.prefix(x)
        return tuple(exits + self.tail(self.bottleneck(h)))


@dataclass
class BottleneckOptions:
    split: int  # split point of the auto-exported model: after stage split-1 (1..stages-1)
    channels: int
    stride: int = 1
    epochs: float = 2.0
    batch_size: int = 64
    lr: float = 3e-3
    limit: int | None = None  # first N training samples
    val_limit: int | None = 2000
    train_tail: bool = False
    kl_weight: float = 1.0
    kl_from: float = 0.3  # share of the steps that are MSE only (cheap: no tail backward) before KL joins
    seed: int = 0
    threads: int = 2
    progress: bool = True
    out: Path | None = None


@dataclass
class BottleneckReport:
    accuracy_before: list[float]  # per exit on the val split: original model
    accuracy_after: list[float]  # bottlenecked model
    encoder_param_bytes: int  # parameters added on the device (fp32)
    boundary_shape: list[int]  # per sample: what crosses the wire
    original_shape: list[int]
    seconds: float
    train_samples: int
    val_samples: int
    out: Path | None = None
    extra: dict = field(default_factory=dict)

    def table(self) -> str:
        from edgeexit.reports import markdown_table

        return markdown_table(["exit", "original", "bottleneck", "change (pp)"], [
            [str(k), f"{100 * a:.2f}%", f"{100 * b:.2f}%", f"{100 * (b - a):+.2f}"]
            for k, (a, b) in enumerate(zip(self.accuracy_before, self.accuracy_after, strict=True))])


def check_options(model: nn.Module, opts: BottleneckOptions) -> None:
    """Clear errors for what the user asked: a split point the bottleneck can sit at, C > 0, stride 1 or 2."""
    if not isinstance(model, MultiExitNet):
        raise ConfigError(f"a bottleneck goes into an edgeexit MultiExitNet ({', '.join(ARCHS)}), "
                          f"not a {type(model).__name__}")
    n = len(model.stages)
    if not 1 <= opts.split <= n - 1:
        raise ConfigError(f"--split {opts.split} is not a split point a bottleneck can sit at: this model's are "
                          f"1..{n - 1} (split k is the output of stage k-1; 0 is the input, which the agent "
                          "sends as uint8 already)")
    if opts.channels <= 0:
        raise ConfigError(f"--channels must be a positive number of channels, got {opts.channels}")
    if opts.stride not in (1, 2):
        raise ConfigError(f"--stride must be 1 or 2, got {opts.stride}")
    if opts.epochs <= 0 or opts.batch_size < 2 or opts.lr <= 0 or not 0.0 <= opts.kl_from <= 1.0:
        raise ConfigError("need --epochs > 0, --batch-size >= 2 (batch norm), --lr > 0 and --kl-from in [0, 1]")


def insert_bottleneck(model: MultiExitNet, opts: BottleneckOptions, input_shape: tuple[int, ...]) -> BottleneckNet:
    """A copy of ``model`` with a fresh SplitBottleneck at ``opts.split`` (the original is left untouched)."""
    check_options(model, opts)
    base = copy.deepcopy(model).eval()
    with torch.no_grad():
        h, _ = BottleneckNet(base, opts.split, SplitBottleneck(1, 1, 1, (1, 1))).prefix(torch.zeros(2, *input_shape))
    torch.manual_seed(opts.seed)
    bn = SplitBottleneck(h.shape[1], opts.channels, opts.stride, (h.shape[2], h.shape[3]))
    return BottleneckNet(base, opts.split, bn)


def load_multi_exit(pt2: Path, arch: str | None, num_classes: int, in_channels: int) -> MultiExitNet:
    """The MultiExitNet behind ``pt2`` from its state_dict (``<pt2>.state_dict.pt``, weights_only, strict).
    Without ``arch``, the reference architecture whose state_dict fits exactly."""
    from edgeexit.training import state_dict_path

    sd_path = state_dict_path(Path(pt2))
    if not sd_path.is_file():
        raise ConfigError(f"{sd_path} not found: the bottleneck needs the model's state_dict next to the .pt2 "
                          "(edgeexit train writes it)")
    state = torch.load(sd_path, map_location="cpu", weights_only=True)
    for name in [arch] if arch else list(ARCHS):
        model = build(name, num_classes=num_classes, in_channels=in_channels)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            if arch:
                raise ConfigError(f"{sd_path} does not fit --arch {arch}: {str(e).splitlines()[0]}") from e
            continue
        return model.eval()
    raise ConfigError(f"{sd_path} fits none of the reference architectures {ARCHS}; pass --arch")


def train_bottleneck(model: MultiExitNet, dataset: str,
                     opts: BottleneckOptions) -> tuple[BottleneckNet, BottleneckReport]:
    """Insert a bottleneck into a copy of ``model`` and train it by distillation from ``model`` (frozen)."""
    from edgeexit.training import exit_accuracy, save_model

    torch.set_num_threads(opts.threads)
    base, size = datasets.resized_name(dataset) or (dataset, None)
    x_val, y_val = datasets.load(dataset, "val", opts.val_limit)
    x_train, _ = datasets.load(base, "train", opts.limit)
    if len(x_train) < 2:
        raise ConfigError(f"need at least 2 training samples (batch norm), got {len(x_train)}: raise --limit")
    teacher = model.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = insert_bottleneck(teacher, opts, tuple(x_val.shape[1:]))
    trainable = list(student.bottleneck.parameters())
    if opts.train_tail:
        trainable += [p for m in (student.stages[opts.split:], student.heads[opts.split:]) for p in m.parameters()]
    for p in trainable:
        p.requires_grad_(True)
    steps_per_epoch = max(1, len(x_train) // opts.batch_size)
    total = max(1, round(opts.epochs * steps_per_epoch))
    optimizer = torch.optim.AdamW(trainable, lr=opts.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=opts.lr, total_steps=total)
    rng = np.random.default_rng(opts.seed)
    bar = ProgressBar(total, opts.progress, "bottleneck", unit="step")
    started, step = time.perf_counter(), 0
    student.eval()
    student.bottleneck.train()  # only the new layers update batch-norm statistics
    for m in (teacher, student):
        m.to(memory_format=torch.channels_last)  # oneDNN's convolutions are ~3x faster in NHWC on CPU
    kl_step = round(opts.kl_from * total)
    while step < total:
        order = rng.permutation(len(x_train))
        for b in range(steps_per_epoch):
            if step >= total:
                break
            idx = order[b * opts.batch_size:(b + 1) * opts.batch_size]
            xb = x_train[idx] if size is None else datasets.resize(x_train[idx], size)
            xb = torch.from_numpy(xb).contiguous(memory_format=torch.channels_last)
            loss = _distill_loss(teacher, student, xb, opts.kl_weight if step >= kl_step else 0.0)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    seconds = time.perf_counter() - started
    for m in (teacher, student):
        m.to(memory_format=torch.contiguous_format)
    student.eval()
    for p in student.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        h, _ = student.prefix(torch.from_numpy(x_val[:2]))
        code = student.bottleneck.encoder(h)
    report = BottleneckReport(
        accuracy_before=exit_accuracy(teacher, x_val, y_val), accuracy_after=exit_accuracy(student, x_val, y_val),
        encoder_param_bytes=encoder_param_bytes(student), boundary_shape=list(code.shape[1:]),
        original_shape=list(h.shape[1:]), seconds=seconds, train_samples=len(x_train), val_samples=len(x_val))
    if opts.out is not None:
        meta = {"bottleneck": {"split": opts.split, "channels": opts.channels, "stride": opts.stride,
                               "epochs": opts.epochs, "seed": opts.seed, "train_tail": opts.train_tail,
                               "train_samples": len(x_train)},
                "exit_accuracy_val": report.accuracy_after, "original_exit_accuracy_val": report.accuracy_before}
        report.out = save_model(student, Path(opts.out), tuple(x_val.shape[1:]), metadata=meta)
    return student, report


def _distill_loss(teacher: MultiExitNet, student: BottleneckNet, x: torch.Tensor, kl_weight: float) -> torch.Tensor:
    with torch.no_grad():  # the frozen prefix is shared by teacher and student: run it once
        h, _ = student.prefix(x)
    decoded = student.bottleneck(h)
    mse = F.mse_loss(decoded, h) / h.pow(2).mean().clamp_min(1e-8)
    if kl_weight == 0:
        return mse
    with torch.no_grad():
        teacher_tail = [F.log_softmax(t, dim=1) for t in student_tail_of(teacher, h, student.split)]
    kl = sum(F.kl_div(F.log_softmax(o, dim=1), t, log_target=True, reduction="batchmean")
             for o, t in zip(student.tail(decoded), teacher_tail, strict=True))
    return mse + kl_weight * kl / len(teacher_tail)


def student_tail_of(model: MultiExitNet, h: torch.Tensor, split: int) -> list[torch.Tensor]:
    """The exits of ``model`` after split ``split``, computed from the boundary tensor ``h``."""
    exits = []
    for stage, head in zip(model.stages[split:], model.heads[split:], strict=True):
        h = stage(h)
        exits.append(head(h))
    return exits


def encoder_param_bytes(model: BottleneckNet) -> int:
    """fp32 bytes the bottleneck adds on the device, counted as the exporter does (manifest
    ``split_points[k].bottleneck.encoder_param_bytes``): the encoder conv's weights and its batch norm's
    weight, bias, mean and variance."""
    conv, norm = model.bottleneck.encoder[0], model.bottleneck.encoder[1]
    return 4 * (conv.weight.numel() + 4 * norm.num_features)
