"""The rows of one device request not yet answered, with the exit logits computed for them so far (torch-free).

The device runtime's exit loop answers rows from here as exits, the cloud or a fallback decide them.
"""

from __future__ import annotations

import numpy as np

from edgeexit.policies import ExitPolicy


class Pending:
    """The rows not yet answered, with the exit logits computed for them so far."""

    def __init__(self, raw: np.ndarray, classes: int, policy: ExitPolicy):
        self.raw, batch = raw, len(raw)  # every row before normalisation (what the whole cloud model takes)
        self.policy = policy  # this request's exit policy (the planner's setting may change between requests)
        self.labels = np.zeros(batch, np.int64)
        self.probs = np.zeros((batch, classes), np.float32)
        self.exits = np.full(batch, -1, np.int32)
        self.decided = [""] * batch
        self.rows = np.arange(batch)
        self.history: list[np.ndarray] = []
        self.exit_ids: list[int] = []

    def answer(self, mask: np.ndarray, labels: np.ndarray, probs: np.ndarray, exit_id: int, where: str) -> None:
        for r, lab, p in zip(self.rows[mask], labels[mask], probs[mask], strict=True):
            self.labels[r], self.probs[r], self.exits[r], self.decided[r] = lab, p, exit_id, where
        keep = ~mask
        self.rows = self.rows[keep]
        self.history = [h[keep] for h in self.history]

    @property
    def empty(self) -> bool:
        return len(self.rows) == 0
