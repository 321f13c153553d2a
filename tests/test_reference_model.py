"""The shipped camera-class reference model: the file the model card describes, and as accurate as it says."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest

REFERENCE = Path(__file__).resolve().parents[1] / "edgeexit" / "reference"
PT2 = REFERENCE / "camera_resnet.pt2"


def test_the_shipped_file_is_the_one_the_card_names():
    digest = hashlib.sha256(PT2.read_bytes()).hexdigest()
    listed = (REFERENCE / "camera_resnet.sha256").read_text().split()
    assert listed == [digest, "camera_resnet.pt2"]  # `sha256sum -c` format, checked by `make demo` too
    card = (REFERENCE / "camera_resnet.md").read_text()
    assert digest in card and "--seed 0" in card and "edgeexit train --arch camera-resnet" in card
    assert PT2.stat().st_size <= 10 * 1024 * 1024


@pytest.mark.slow
def test_the_shipped_model_meets_the_card_on_test_images():
    import torch

    from edgeexit import datasets
    from edgeexit.testbed.experiment import subsample

    card = (REFERENCE / "camera_resnet.md").read_text()
    claimed = float(re.search(r"final exit: ([\d.]+)% on the 10,000 test images", card).group(1)) / 100
    x, y = datasets.load("fashion-mnist-96", "test")
    idx = subsample(1000, len(x))
    torch.set_num_threads(1)
    program = torch.export.load(str(PT2)).module()
    with torch.no_grad():
        exits = [program(torch.from_numpy(x[idx[i:i + 100]])) for i in range(0, len(idx), 100)]
    logits = [np.concatenate([e[k].numpy() for e in exits]) for k in range(len(exits[0]))]
    accuracy = [float((lg.argmax(1) == y[idx]).mean()) for lg in logits]
    assert len(accuracy) >= 4
    # 1,000 of the 10,000 images: within ~3 binomial standard deviations of the card's figure, and >= 90% there.
    assert claimed >= 0.90
    assert abs(accuracy[-1] - claimed) <= 3 * np.sqrt(claimed * (1 - claimed) / 1000) + 1e-9
