"""Reference models: exit structure, batch sizes, normalisation inside, FLOPs per exit."""

from __future__ import annotations

import pytest
import torch

from edgeexit.errors import ConfigError
from edgeexit.models import ARCHS, BasicBlock, DenseBlock, MultiExitNet, build, flops_per_exit


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("batch", [1, 5])
def test_every_arch_returns_at_least_three_exit_logits(arch, batch):
    model = build(arch).eval()
    with torch.no_grad():
        exits = model(torch.rand(batch, 1, 28, 28))
    assert isinstance(exits, tuple) and len(exits) >= 3
    assert all(e.shape == (batch, 10) and torch.isfinite(e).all() for e in exits)


@pytest.mark.parametrize("arch", ARCHS)
def test_exit_flops_increase_with_depth(arch):
    flops = flops_per_exit(build(arch), (1, 1, 28, 28))
    assert len(flops) >= 3
    assert all(a < b for a, b in zip(flops, flops[1:], strict=False))


def test_resnet_exits_design_budget():
    # The early-exit benchmark needs a cheap first exit and a mid exit well below the full cost.
    flops = flops_per_exit(build("resnet-exits"))
    shares = [f / flops[-1] for f in flops]
    assert 0.05 <= shares[0] <= 0.2
    assert 0.2 <= shares[1] <= 0.45


def test_flops_count_matches_hand_computation():
    # Stage 0: conv 1->4 (3x3, 8x8 output), head linear 4->3; stage 1: conv 4->4 (1x1), same head shape.
    stages = [torch.nn.Conv2d(1, 4, 3, padding=1, bias=False), torch.nn.Conv2d(4, 4, 1, bias=False)]

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x.mean(dim=(2, 3)))

    heads = [Head(), Head()]
    model = MultiExitNet(stages, heads)
    conv1, fc, conv2 = 2 * 9 * 4 * 64, 2 * 4 * 3, 2 * 4 * 4 * 64
    assert flops_per_exit(model, (1, 1, 8, 8)) == [conv1 + fc, conv1 + fc + conv2 + fc]


def test_resnet_has_residual_blocks_and_densenet_concatenates():
    resnet, densenet = build("resnet-exits"), build("densenet-exits")
    assert any(isinstance(m, BasicBlock) for m in resnet.modules())
    assert any(isinstance(m, DenseBlock) for m in densenet.modules())
    block = next(m for m in densenet.modules() if isinstance(m, DenseBlock))
    out = block(torch.rand(2, block.layers[0][0].in_channels, 7, 7))
    assert out.shape[1] == block.out_channels  # input channels + layers x growth: the skips concatenate


def test_normalisation_is_inside_the_model_as_buffers():
    model = build("resnet-exits")
    buffers = dict(model.named_buffers())
    assert "normalize.mean" in buffers and "normalize.inv_std" in buffers
    assert "normalize.mean" in model.state_dict()
    x = torch.full((1, 1, 28, 28), 0.2860)
    assert torch.allclose(model.normalize(x), torch.zeros_like(x), atol=1e-6)


def test_heads_use_a_plain_mean_not_pool_and_flatten():
    # TFLite's dynamic batch breaks on pool+flatten; the heads must not contain them.
    for arch in ARCHS:
        for head in build(arch).heads:
            kinds = {type(m) for m in head.modules()}
            assert not kinds & {torch.nn.AdaptiveAvgPool2d, torch.nn.Flatten, torch.nn.AvgPool2d}


def test_other_channel_and_class_counts():
    model = build("branchynet", num_classes=4, in_channels=3).eval()
    with torch.no_grad():
        exits = model(torch.rand(2, 3, 8, 8))
    assert [e.shape for e in exits] == [(2, 4)] * 3


def test_unknown_arch_is_a_config_error():
    with pytest.raises(ConfigError, match="resnet-exits"):
        build("vgg")
    with pytest.raises(ConfigError, match="num_classes"):
        build("resnet-exits", num_classes=1)


def test_camera_resnet_is_a_camera_class_workload():
    # The split-computing reference: >= 20x the compute of resnet-exits, >= 4 exits, the first at <= 10%.
    camera = flops_per_exit(build("camera-resnet"), (1, 1, 96, 96))
    small = flops_per_exit(build("resnet-exits"), (1, 1, 28, 28))
    assert len(camera) >= 4
    assert camera[-1] >= 20 * small[-1]
    assert camera[0] <= 0.10 * camera[-1]
    params = sum(p.numel() for p in build("camera-resnet").parameters())
    assert params * 4 <= 10e6  # the trained .pt2 ships in the repository (<= 10 MB)


def test_build_with_a_seed_is_reproducible_and_leaves_the_global_rng_alone():
    import torch

    from edgeexit.models import build

    state = torch.random.get_rng_state()
    a, b = build("resnet-exits", seed=3), build("resnet-exits", seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    c = build("resnet-exits", seed=4)
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values(), strict=True))
