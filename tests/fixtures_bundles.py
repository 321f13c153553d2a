"""Bundles for every area's tests: tiny seeded random-weight multi-exit models exported for real.

``tiny_bundle`` (session scope): a 3-exit residual CNN on 1x28x28 inputs, 10 classes, cut at the exits
(3 segments, 2 split points), int8 boundary parameters calibrated on seeded sklearn digits upsampled to 28x28.
``make_bundle(tmp_dir, model, input_shape, **opts)`` exports any model with ExportOptions fields as keywords.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn


class ExitHead(nn.Module):
    """Global mean pool + linear: converts to TFLite with a dynamic batch (see DESIGN.md)."""

    def __init__(self, channels: int, classes: int = 10):
        super().__init__()
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1)
        self.bn = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.skip = nn.Conv2d(cin, cout, 1, stride) if (cin != cout or stride != 1) else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.skip(x) + self.c2(torch.relu(self.bn(self.c1(x)))))


class TinyResNet(nn.Module):
    """3 exits; skip connections inside every block, so only block ends are valid cuts."""

    def __init__(self, classes: int = 10, as_list: bool = False):
        super().__init__()
        self.as_list = as_list
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, 1, 1), nn.ReLU())
        self.stage1 = ResBlock(8, 8)
        self.exit1 = ExitHead(8, classes)
        self.stage2 = ResBlock(8, 16, 2)
        self.exit2 = ExitHead(16, classes)
        self.stage3 = nn.Sequential(ResBlock(16, 16, 2), ResBlock(16, 16))
        self.final = ExitHead(16, classes)

    def forward(self, x: torch.Tensor):
        x = self.stage1(self.stem(x))
        e1 = self.exit1(x)
        x = self.stage2(x)
        e2 = self.exit2(x)
        out = (e1, e2, self.final(self.stage3(x)))
        return list(out) if self.as_list else out


class TinySequential(nn.Module):
    """BranchyNet-style: plain conv stack with 3 exits (every layer end is a valid cut)."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.exit1 = ExitHead(4, classes)
        self.block2 = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.exit2 = ExitHead(8, classes)
        self.block3 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.classifier = nn.Linear(8 * 7 * 7, classes)

    def forward(self, x: torch.Tensor):
        x = self.block1(x)
        e1 = self.exit1(x)
        x = self.block2(x)
        e2 = self.exit2(x)
        x = self.block3(x)
        return e1, e2, self.classifier(x.flatten(1))


class DenseBlock(nn.Module):
    """Concatenating skips: each layer sees the concatenation of all earlier feature maps."""

    def __init__(self, cin: int, growth: int = 4, layers: int = 2):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(cin + i * growth, growth, 3, padding=1) for i in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for conv in self.convs:
            feats.append(torch.relu(conv(torch.cat(feats, dim=1))))
        return torch.cat(feats, dim=1)


class TinyDenseNet(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.dense1 = DenseBlock(4)
        self.exit1 = ExitHead(12, classes)
        self.trans = nn.Sequential(nn.Conv2d(12, 8, 1), nn.AvgPool2d(2))
        self.dense2 = DenseBlock(8)
        self.exit2 = ExitHead(16, classes)
        self.dense3 = DenseBlock(16)
        self.final = ExitHead(24, classes)

    def forward(self, x: torch.Tensor):
        x = self.dense1(self.stem(x))
        e1 = self.exit1(x)
        x = self.dense2(self.trans(x))
        e2 = self.exit2(x)
        return e1, e2, self.final(self.dense3(x))


def seeded(model: nn.Module, seed: int = 0) -> nn.Module:
    """Re-initialise every parameter and BN statistic from ``seed`` so bundles are reproducible."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / max(1, p[0].numel()) ** 0.5 if p.dim() > 1 else 0.1))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return model.eval()


def digits_28(n: int = 300, seed: int = 0) -> np.ndarray:
    """sklearn digits (8x8, 0..16) upsampled to 1x28x28 in [0, 1]: real-ish inputs in well under a second."""
    from sklearn.datasets import load_digits

    x = load_digits().images.astype(np.float32) / 16.0
    idx = np.random.default_rng(seed).permutation(len(x))[:n]
    t = torch.from_numpy(x[idx]).unsqueeze(1)
    return torch.nn.functional.interpolate(t, size=(28, 28), mode="bilinear", align_corners=False).numpy()


def make_bundle(tmp_dir: Path, model: nn.Module, input_shape: tuple[int, ...] = (1, 1, 28, 28),
                name: str = "tiny", **opts) -> Path:
    """Export ``model`` to ``tmp_dir/<name>.edgeexit``; ``opts`` are ExportOptions fields."""
    from edgeexit.exporters import ExportOptions, export_model

    out = Path(tmp_dir) / f"{name}.edgeexit"
    opts.setdefault("progress", False)
    options = ExportOptions(input_shape=tuple(input_shape), **opts)
    export_model(model, out, options=options)
    return out


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """3-exit residual CNN, split at the exits (3 segments, 2 split points), int8 params calibrated."""
    tmp = tmp_path_factory.mktemp("tiny_bundle")
    return make_bundle(tmp, seeded(TinyResNet()), split_points="exits", calibration_data=digits_28(300))
