"""Training: deterministic with a seed, saves a .pt2 with a dynamic batch + a state_dict, CLI and errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from edgeexit.errors import ConfigError
from edgeexit.models import build
from edgeexit.training import TrainOptions, state_dict_path, train

# A fraction of an epoch on a real Fashion-MNIST subset: 600 samples, batch 64 -> 9 steps per epoch.
SMALL = {"limit": 600, "val_limit": 300, "batch_size": 64, "epochs": 0.5, "progress": False, "threads": 1}


def _train(tmp_path, name, arch="resnet-exits", save=True, dataset="fashion-mnist", **overrides):
    torch.manual_seed(123)  # a different global seed than the option: proves train() seeds itself
    opts = TrainOptions(**{**SMALL, **overrides, "out": tmp_path / f"{name}.pt2" if save else None})
    model = build(arch)
    return model, train(model, dataset, options=opts)


def test_training_is_deterministic_with_a_seed(tmp_path):
    a, _ = _train(tmp_path, "a", arch="branchynet", save=False, seed=7)
    b, _ = _train(tmp_path, "b", arch="branchynet", save=False, seed=7)
    c, _ = _train(tmp_path, "c", arch="branchynet", save=False, seed=8, epochs=0.2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())


def test_saved_pt2_reloads_with_dynamic_batch_and_matches_the_model(tmp_path):
    model, report = _train(tmp_path, "m", arch="branchynet", distill=False)
    assert report.out == tmp_path / "m.pt2" and report.out.is_file()
    program = torch.export.load(str(report.out))
    x = torch.rand(7, 1, 28, 28)
    with torch.no_grad():
        expected = model.eval()(x)
        for batch in (1, 7):
            got = program.module()(x[:batch])
            assert len(got) == 3
            for g, e in zip(got, expected, strict=True):
                torch.testing.assert_close(g, e[:batch], atol=1e-5, rtol=1e-5)
    # The state_dict next to it loads strictly with weights_only into a fresh model of the same arch.
    fresh = build("branchynet")
    fresh.load_state_dict(torch.load(state_dict_path(report.out), weights_only=True), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x)[-1], expected[-1])


def test_report_has_per_exit_accuracy_and_flops(tmp_path):
    # digits (8x8) is cheap enough for 60 real steps: enough to learn, unlike a fraction of an epoch.
    _, report = _train(tmp_path, "r", arch="branchynet", save=False, dataset="digits", epochs=3.0,
                       limit=None, val_limit=None, lr=1e-2)
    assert len(report.exit_accuracy) == len(report.exit_flops) == 3
    assert all(0.0 <= a <= 1.0 for a in report.exit_accuracy)
    assert max(report.exit_accuracy) > 0.5  # chance is 0.1
    assert report.val_samples == 180 and report.train_samples == 1797 - 180 - 360
    assert report.seconds_per_epoch > 0
    table = report.table()
    assert table.count("\n") == 4 and "| 2 |" in table


def test_bad_options_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="epochs"):
        train(build("branchynet"), "digits", options=TrainOptions(epochs=0))
    with pytest.raises(ConfigError, match="exit_weights"):
        train(build("branchynet"), "digits", options=TrainOptions(epochs=0.1, exit_weights=(1.0,), progress=False))

    class Single(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(64, 10)

        def forward(self, x):
            return self.fc(x.flatten(1))

    with pytest.raises(ConfigError, match="tuple or list"):
        train(Single(), "digits", options=TrainOptions(epochs=0.1, progress=False))


def test_cli_trains_on_digits_and_prints_the_table(tmp_path):
    out = tmp_path / "d.pt2"
    cmd = [sys.executable, "-m", "edgeexit", "train", "--arch", "branchynet", "--dataset", "digits",
           "--epochs", "1", "--batch-size", "64", "--threads", "1", "--quiet", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "val accuracy" in proc.stdout and "| 2 |" in proc.stdout
    assert out.is_file() and state_dict_path(out).is_file()
    program = torch.export.load(str(out))
    logits = program.module()(torch.rand(3, 1, 8, 8))
    assert [tuple(t.shape) for t in logits] == [(3, 10)] * 3


def test_cli_user_error_has_no_traceback(tmp_path):
    cmd = [sys.executable, "-m", "edgeexit", "train", "--arch", "nope", "--dataset", "digits",
           "--out", str(tmp_path / "x.pt2")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown architecture" in proc.stderr and "Traceback" not in proc.stderr


def test_trained_fixture_is_usable(trained_resnet_pt2):
    # The shared fixture other areas use: reloads, and its exits are clearly trained on real test images.
    from edgeexit import datasets

    x, y = datasets.load("fashion-mnist", "test", limit=500)
    program = torch.export.load(str(trained_resnet_pt2))
    with torch.no_grad():
        exits = program.module()(torch.from_numpy(x))
    accuracy = [float((e.argmax(1).numpy() == y).mean()) for e in exits]
    # Brief training: the shallow exit lags, so only ask for clearly-better-than-chance (0.1) everywhere.
    assert len(accuracy) == 3 and min(accuracy) > 0.5 and accuracy[-1] > 0.8
    assert np.isfinite(accuracy).all()


def test_progressive_resizing_trains_through_each_phase(tmp_path):
    # Phases at 16x16 then 24x24 on digits resized: the model ends at the dataset's size and its val split.
    _, report = _train(tmp_path, "p", arch="branchynet", save=True, dataset="digits-24", limit=None,
                       val_limit=None, phases=((16, 1.0), (24, 1.0)), batch_size=64)
    assert report.epochs == pytest.approx(2.0, abs=0.1)
    program = torch.export.load(str(tmp_path / "p.pt2"))
    assert [tuple(t.shape) for t in program.module()(torch.rand(2, 1, 24, 24))] == [(2, 10)] * 3
    with pytest.raises(ConfigError, match="resized dataset"):
        train(build("branchynet"), "digits", options=TrainOptions(phases=((16, 1.0),), progress=False))
    with pytest.raises(ConfigError, match="image size"):
        train(build("branchynet"), "digits-24", options=TrainOptions(phases=((4, 1.0),), progress=False))
