"""A user's .npz of several named inputs (issue 15): `edgeexit calibrate/evaluate --data FILE.npz` on a model with
several inputs takes one array per model input, by the input's name, plus the labels ``y``; anything that does
not fit the bundle is a clear ConfigError that names the arrays it wanted.

Uses the cached MiniLM fixtures (tests/fixtures_text.py); skips, saying how to install them, without the weights.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edgeexit.cli import main
from edgeexit.early_exit import ModelInputs
from edgeexit.errors import ConfigError
from edgeexit.evaluation import load_for_bundle
from tests.fixtures_text import minilm_bundle, minilm_pt2, needs_minilm  # noqa: F401 (fixtures)

pytestmark = needs_minilm
SEQ = 24


@pytest.fixture(scope="module")
def manifest(minilm_bundle):  # noqa: F811 (the fixture)
    from edgeexit.bundle import Bundle

    return Bundle.load(minilm_bundle).manifest


@pytest.fixture(scope="module")
def text_set(manifest):
    """Tokenised docstrings (the built-in set) as the arrays a user would save."""
    x, y = load_for_bundle(manifest, "stdlib-docstrings", "val", 200, SEQ)
    return {"input_ids": x.x, "attention_mask": x.extras["attention_mask"], "y": y}


def _save(tmp_path, arrays, name="texts.npz"):
    path = tmp_path / name
    np.savez(path, **arrays)
    return str(path)


def test_named_arrays_load_as_the_models_inputs(manifest, text_set, tmp_path):
    path = _save(tmp_path, text_set)
    x, y = load_for_bundle(manifest, path, "all")
    assert isinstance(x, ModelInputs) and x.x.dtype == np.int64
    np.testing.assert_array_equal(x.x, text_set["input_ids"])
    np.testing.assert_array_equal(x.extras["attention_mask"], text_set["attention_mask"])
    np.testing.assert_array_equal(y, text_set["y"])
    # Carved like any user file (20% test, 10% val): disjoint rows, and a limit takes the first ones.
    test, _ = load_for_bundle(manifest, path, "test")
    val, _ = load_for_bundle(manifest, path, "val", limit=5)
    assert len(test.x) == 40 and len(val.x) == 5
    rows = {r.tobytes() for r in test.x}
    assert not any(r.tobytes() in rows for r in load_for_bundle(manifest, path, "val")[0].x)
    # int32 token ids (what many tokenizers give) are widened safely to the model's int64.
    narrow = _save(tmp_path, {**text_set, "input_ids": text_set["input_ids"].astype(np.int32)}, "narrow.npz")
    np.testing.assert_array_equal(load_for_bundle(manifest, narrow, "all")[0].x, text_set["input_ids"])


@pytest.mark.parametrize("case,match", [
    ("missing", r"attention_mask.*np\.savez"),
    ("float_ids", r"input_ids.*float.*integer"),
    ("rows", r"rows"),
    ("rank", r"attention_mask.*shape"),
    ("seq", r"seq.*at most \d+"),
    ("labels", r"y.*integer class"),
])
def test_what_does_not_fit_the_bundle_is_a_clear_error(manifest, text_set, tmp_path, case, match):
    ids, mask, y = text_set["input_ids"], text_set["attention_mask"], text_set["y"]
    arrays = {
        "missing": {"input_ids": ids, "y": y},
        "float_ids": {"input_ids": ids.astype(np.float32) + 0.5, "attention_mask": mask, "y": y},
        "rows": {"input_ids": ids, "attention_mask": mask[:-3], "y": y},
        "rank": {"input_ids": ids, "attention_mask": mask[:, :, None], "y": y},
        "seq": {"input_ids": np.zeros((12, 10_000), np.int64), "attention_mask": np.ones((12, 10_000), np.int64),
                "y": y[:12]},
        "labels": {"input_ids": ids, "attention_mask": mask, "y": y.astype(np.float32) + 0.5},
    }[case]
    with pytest.raises(ConfigError, match=match):
        load_for_bundle(manifest, _save(tmp_path, arrays, f"{case}.npz"), "all")


def test_calibrate_and_evaluate_cli_on_a_named_npz(minilm_bundle, text_set, tmp_path):  # noqa: F811 (the fixture)
    bundle = tmp_path / "minilm.edgeexit"
    shutil.copytree(minilm_bundle, bundle)
    path = _save(tmp_path, text_set)
    assert main(["calibrate", str(bundle), "--data", path, "--epsilon", "0.05", "--no-progress"]) == 0
    pol = json.loads((bundle / "manifest.json").read_text())["policy"]
    assert pol["calibration"]["n"] == len(text_set["y"])  # the whole file, as for an image .npz
    out = tmp_path / "eval"
    assert main(["evaluate", str(bundle), "--data", path, "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "evaluate.json").read_text())
    assert report["n"] == 40  # a user file's test carve
    assert 0 < report["policy"]["relative_flops"] <= 1.0
