"""Where a row was answered, as the device runtime says it and as the agent sends it (output ``decided``, INT32).

One table and its inverse, so the agent, its clients and the testbed cannot disagree about the codes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from edgeexit.errors import InvalidTensor

DEVICE, CLOUD, FALLBACK = "device", "cloud", "device-fallback"
DECIDED_CODES = {DEVICE: 0, CLOUD: 1, FALLBACK: 2}
DECIDED_NAMES = {code: name for name, code in DECIDED_CODES.items()}


def to_codes(decided: Sequence[str]) -> np.ndarray:
    """Per-row names -> the INT32 codes the agent sends."""
    return np.array([DECIDED_CODES[d] for d in decided], np.int32)


def to_names(codes: Iterable[int]) -> list[str]:
    """The agent's INT32 codes -> per-row names (InvalidTensor for a code this version does not know)."""
    try:
        return [DECIDED_NAMES[int(c)] for c in codes]
    except KeyError as e:
        raise InvalidTensor(f"decided code {e.args[0]} is unknown; known: {DECIDED_NAMES}") from None
