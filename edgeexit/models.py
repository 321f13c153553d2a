"""Reference multi-exit models (torch).

Every model here is a :class:`MultiExitNet`: normalisation (a buffer, so the runtime feeds raw [0, 1]
pixels), then a list of stages; after each stage an exit head branches from the stage output. So every
stage boundary is a clean cut for the exporter: one tensor carries everything later layers need, and no
skip connection crosses it. ``forward`` returns a tuple of logits, shallowest first, the last one final.

Heads are ``x.mean(dim=(2, 3))`` + Linear (optionally after a 1x1 conv): pool+flatten breaks TFLite's
dynamic batch, a plain mean does not.

    >>> model = build("resnet-exits")
    >>> exits = model(torch.rand(5, 1, 28, 28))   # tuple of 3 tensors [5, 10]

``camera-resnet`` is the camera-class reference (Fashion-MNIST resized to 96x96: ``fashion-mnist-96``).
``vit-exits`` is the transformer reference (ViT-style; see :class:`VisionTransformerExits`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

ARCHS = ("branchynet", "resnet-exits", "densenet-exits", "camera-resnet", "vit-exits")
# Fashion-MNIST pixel statistics (train split); the models bake them in as their first op.
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530


def build(arch: str, num_classes: int = 10, in_channels: int = 1, seed: int | None = None) -> nn.Module:
    """Build a reference early-exit model by name (one of :data:`ARCHS`). ``seed``: initialise its weights from
    that seed (the global RNG is left as it was); None draws them from the global RNG, whose state depends on
    everything that ran before in the process (a test session, a benchmark)."""
    from edgeexit.errors import ConfigError

    if arch not in _BUILDERS:
        raise ConfigError(f"unknown architecture {arch!r}: use one of {', '.join(ARCHS)}")
    if num_classes < 2 or in_channels < 1:
        raise ConfigError(f"need num_classes >= 2 and in_channels >= 1, got {num_classes} and {in_channels}")
    if seed is None:
        return _BUILDERS[arch](num_classes, in_channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _BUILDERS[arch](num_classes, in_channels)


class Normalize(nn.Module):
    """(x - mean) / std with the statistics as buffers, so they travel with the weights and the export."""

    def __init__(self, mean: float = FASHION_MNIST_MEAN, std: float = FASHION_MNIST_STD) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean))
        self.register_buffer("inv_std", torch.tensor(1.0 / std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) * self.inv_std


class ExitHead(nn.Module):
    """Optional 1x1 conv (more features for a shallow exit), then global mean and a linear classifier."""

    def __init__(self, in_channels: int, num_classes: int, hidden: int = 0) -> None:
        super().__init__()
        self.expand = conv_bn(in_channels, hidden, kernel=1) if hidden else nn.Identity()
        self.fc = nn.Linear(hidden or in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.expand(x).mean(dim=(2, 3)))


class MultiExitNet(nn.Module):
    """normalize -> stage_0 -> head_0, stage_1 -> head_1, ...; returns every head's logits as a tuple."""

    def __init__(self, stages: list[nn.Module], heads: list[nn.Module], in_channels: int = 1) -> None:
        super().__init__()
        if len(stages) != len(heads):
            raise ValueError("one head per stage")
        self.normalize = Normalize()
        self.stages = nn.ModuleList(stages)
        self.heads = nn.ModuleList(heads)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.normalize(x)
        exits = []
        for stage, head in zip(self.stages, self.heads, strict=True):
            x = stage(x)
            exits.append(head(x))
        return tuple(exits)


def conv_bn(c_in: int, c_out: int, kernel: int = 3, stride: int = 1, relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(c_out)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs plus a skip (1x1 projection when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(c_in, c_out, 3, stride), conv_bn(c_out, c_out, 3, 1, relu=False))
        self.skip = nn.Identity() if (c_in == c_out and stride == 1) else conv_bn(c_in, c_out, 1, stride, relu=False)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.skip(x))


class DenseBlock(nn.Module):
    """DenseNet-style: each layer sees the concatenation of the block input and all earlier layer outputs."""

    def __init__(self, c_in: int, growth: int, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(conv_bn(c_in + i * growth, growth) for i in range(layers))
        self.out_channels = c_in + layers * growth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(torch.cat(features, dim=1)))
        return torch.cat(features, dim=1)


def _branchynet(num_classes: int, in_channels: int) -> MultiExitNet:
    # Plain sequential CNN (BranchyNet-style): conv stages, each halving the resolution.
    stages = [
        nn.Sequential(conv_bn(in_channels, 16, stride=2), conv_bn(16, 16)),  # 14x14
        nn.Sequential(conv_bn(16, 32, stride=2), conv_bn(32, 32)),  # 7x7
        nn.Sequential(conv_bn(32, 64, stride=2), conv_bn(64, 64)),  # 4x4
    ]
    heads = [ExitHead(16, num_classes, hidden=32), ExitHead(32, num_classes), ExitHead(64, num_classes)]
    return MultiExitNet(stages, heads, in_channels)


def _resnet_exits(num_classes: int, in_channels: int) -> MultiExitNet:
    # Shaped for early exit (see flops_per_exit): exit 0 ~12% of the full FLOPs, exit 1 ~30%, and most of the
    # compute in the last stage at 4x4 where it is cheap per FLOP. Exit heads of the shallow stages get a 1x1
    # expansion so the global mean sees non-linear features. 4 epochs: ~87% / 91% / 92% on the val split.
    c0, c1, c2 = 16, 48, 112
    stages = [
        nn.Sequential(conv_bn(in_channels, c0, stride=2), BasicBlock(c0, c0)),  # 14x14
        nn.Sequential(BasicBlock(c0, c1, stride=2)),  # 7x7
        nn.Sequential(BasicBlock(c1, c2, stride=2), BasicBlock(c2, c2)),  # 4x4
    ]
    heads = [ExitHead(c0, num_classes, hidden=64), ExitHead(c1, num_classes, hidden=96), ExitHead(c2, num_classes)]
    return MultiExitNet(stages, heads, in_channels)


def _densenet_exits(num_classes: int, in_channels: int) -> MultiExitNet:
    # Concatenating skips inside each stage; a 1x1 transition (+ stride) closes every block, so the stage
    # output is one tensor again.
    b0, b1, b2 = DenseBlock(16, 8, 3), DenseBlock(24, 12, 3), DenseBlock(48, 16, 3)
    stages = [
        nn.Sequential(conv_bn(in_channels, 16, stride=2), b0, conv_bn(b0.out_channels, 24, kernel=1)),  # 14x14
        nn.Sequential(b1, conv_bn(b1.out_channels, 48, kernel=1, stride=2)),  # 7x7
        nn.Sequential(b2, conv_bn(b2.out_channels, 64, kernel=1, stride=2)),  # 4x4
    ]
    heads = [ExitHead(24, num_classes), ExitHead(48, num_classes), ExitHead(64, num_classes)]
    return MultiExitNet(stages, heads, in_channels)


def _camera_resnet(num_classes: int, in_channels: int) -> MultiExitNet:
    # The camera-class reference (inputs of 96x96 and up): a ResNet-18-like trunk at half width with four exits.
    # At 96x96: 416 MFLOPs in all (23x resnet-exits at 28x28), exit 0 at 6% of it, exits 1/2 at 42%/78%. Every
    # stage boundary is bigger than the uint8 input (16x48x48, 64x24x24, 128x12x12 vs 96x96), as in most real
    # CNNs, so sending the raw input (cascade) competes with sending a boundary tensor.
    c0, c1, c2, c3 = 16, 64, 128, 192
    stages = [
        nn.Sequential(conv_bn(in_channels, c0, stride=2), BasicBlock(c0, c0)),  # 48x48
        nn.Sequential(BasicBlock(c0, c1, stride=2), BasicBlock(c1, c1)),  # 24x24
        nn.Sequential(BasicBlock(c1, c2, stride=2), BasicBlock(c2, c2)),  # 12x12
        nn.Sequential(BasicBlock(c2, c3, stride=2), BasicBlock(c3, c3)),  # 6x6
    ]
    heads = [ExitHead(c0, num_classes, hidden=64), ExitHead(c1, num_classes, hidden=128),
             ExitHead(c2, num_classes), ExitHead(c3, num_classes)]
    return MultiExitNet(stages, heads, in_channels)


class Attention(nn.Module):
    """Multi-head self-attention from plain ops (explicit q/k/v, softmax(q k^T / sqrt(d)) v): every piece exports
    through torch.export -> ONNX and litert-torch. ``unflatten`` keeps the batch axis symbolic (no reshape to B)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError("dim must be a multiple of heads")
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.scale = self.head_dim ** -0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D]
        def split(t: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, H, T, Dh]
            return t.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        attn = torch.softmax(torch.matmul(q * self.scale, k.transpose(-2, -1)), dim=-1)
        return self.proj(torch.matmul(attn, v).transpose(1, 2).flatten(2))


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x)) with GELU. Both skips close inside the
    block, so the residual stream between blocks is one tensor [B, T, D]: a clean cut."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * mlp_ratio), nn.GELU(), nn.Linear(dim * mlp_ratio, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """Non-overlapping patches (conv, kernel = stride = patch) -> tokens, a class token first, learned positions."""

    def __init__(self, in_channels: int, dim: int, patch: int, image: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, dim, patch, patch)
        tokens = (image // patch) ** 2
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x).flatten(2).transpose(1, 2)  # [B, T, D]
        cls = self.cls.expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1) + self.pos


class TokenHead(nn.Module):
    """LayerNorm + linear on the class token (token 0)."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(dim), nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x[:, 0]))


def vit_exits(num_classes: int = 10, in_channels: int = 1, image: int = 28, patch: int = 7, dim: int = 96,
               heads: int = 4, depth: int = 6, exit_after: tuple[int, ...] = (2, 3, 4, 6)) -> MultiExitNet:
    """The ``vit-exits`` reference (defaults); smaller settings make quick test models of the same structure."""
    # ViT-style for 28x28: 4x4 patches of 7x7 pixels + a class token (17 tokens of 96), 6 pre-norm blocks, exits
    # on the class token after blocks 2, 3, 4 and 6 (the last is the final classifier). A stage = the blocks
    # between two exits (the patch embedding joins the first), so every exit branches at a stage boundary.
    blocks: list[nn.Module] = [EncoderBlock(dim, heads) for _ in range(depth)]
    stages, start = [], 0
    for end in exit_after:
        first = [PatchEmbed(in_channels, dim, patch, image)] if start == 0 else []
        stages.append(nn.Sequential(*first, *blocks[start:end]))
        start = end
    if start != depth:
        raise ValueError("the last exit must follow the last block")
    model = MultiExitNet(stages, [TokenHead(dim, num_classes) for _ in exit_after], in_channels)
    for m in model.modules():  # ViT init: small normal linear weights, zero biases
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
    return model


_BUILDERS: dict[str, Callable[[int, int], MultiExitNet]] = {
    "branchynet": _branchynet,
    "resnet-exits": _resnet_exits,
    "densenet-exits": _densenet_exits,
    "camera-resnet": _camera_resnet,
    "vit-exits": vit_exits,
}


def flops_per_exit(model: nn.Module, input_shape: tuple[int, ...] = (1, 1, 28, 28)) -> list[int]:
    """Cumulative FLOPs (2 x MACs of conv and linear layers and attention's matmuls) to reach each exit, batch 1.

    Exit k costs everything executed before its logits exist: all stages up to k and the heads 0..k
    (an input that leaves at exit k has also paid for the earlier heads it did not leave at).
    """
    events: list[tuple[str, int]] = []

    def count(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            events.append(("op", 2 * k * output[0].numel()))
        elif isinstance(module, nn.Linear):  # per row: a token-wise linear on [1, T, D] costs T times
            events.append(("op", 2 * module.in_features * output.numel()))
        elif isinstance(module, Attention):  # q k^T and attn v: 2 x T x T x D MACs over all heads
            tokens, dim = output.shape[1], output.shape[2]
            events.append(("op", 4 * tokens * tokens * dim))

    def mark_exit(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        events.append(("exit", 0))

    handles = [m.register_forward_hook(count) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear, Attention))]
    heads = getattr(model, "heads", None)
    if heads is not None:
        handles += [h.register_forward_hook(mark_exit) for h in heads]
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            outputs = model(torch.zeros(1, *input_shape[1:]))
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    cumulative, total = [], 0
    for kind, flops in events:
        total += flops
        if kind == "exit":
            cumulative.append(total)
    if not cumulative:  # a model without `heads`: only the whole cost is known
        cumulative = [total] * len(outputs)
    return cumulative
