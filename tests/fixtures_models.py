"""Models-area fixtures.

``trained_resnet_pt2`` (session scope): the reference resnet-exits model briefly trained on a Fashion-MNIST
subset, saved as a .pt2 with a dynamic batch (its state_dict next to it at ``<path>.state_dict.pt``). Cached
under ``/work/main/.cache`` (the checkout's .cache/) keyed by a hash of the model/training/dataset sources and
the options below, so repeated runs reuse it; an empty cache (CI) trains once (~30-60 s on 2 cores).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = ROOT / ".cache"
# Enough for accuracy-dependent tests (exits ~85-90% on the val split), short enough for a test session.
# One thread: on a shared 2-core machine two OpenMP threads wait on each other (measured 20x slower under load).
FIXTURE_TRAINING = {"arch": "resnet-exits", "limit": 20000, "epochs": 2.0, "seed": 0, "threads": 1}


def cached_model_key() -> str:
    digest = hashlib.sha256(repr(sorted(FIXTURE_TRAINING.items())).encode())
    for name in ("models.py", "training.py", "datasets.py"):
        digest.update((ROOT / "edgeexit" / name).read_bytes())
    return digest.hexdigest()[:16]


def train_cached_resnet() -> Path:
    """Return the cached trained model, training it first when missing (written atomically)."""
    from edgeexit.models import build
    from edgeexit.training import TrainOptions, state_dict_path, train

    out = CACHE_DIR / f"resnet_exits_{cached_model_key()}.pt2"
    if out.is_file() and state_dict_path(out).is_file():
        return out
    tmp = out.with_name(f"{out.stem}.tmp{os.getpid()}.pt2")
    opts = TrainOptions(epochs=FIXTURE_TRAINING["epochs"], limit=FIXTURE_TRAINING["limit"],
                        seed=FIXTURE_TRAINING["seed"], progress=False, threads=FIXTURE_TRAINING["threads"], out=tmp)
    train(build(FIXTURE_TRAINING["arch"], seed=FIXTURE_TRAINING["seed"]), "fashion-mnist", options=opts)
    # state_dict first: a visible .pt2 always has its state_dict (concurrent sessions may race; both are fine).
    os.replace(state_dict_path(tmp), state_dict_path(out))
    os.replace(tmp, out)
    return out


@pytest.fixture(scope="session")
def trained_resnet_pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_cached_resnet()
