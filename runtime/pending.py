"""The rows of one device request not yet answered, with the exit logits computed for them so far (torch-free).

The device runtime's exit loop answers rows from here as exits, the cloud or a fallback decide them. Answers are
written with one fancy-indexed assignment per exit (no per-row Python); where each row was decided is kept as
the agent's INT32 codes (runtime/decided.py), turned into names once per request.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from edgeexit.policies import ExitPolicy, NeverExitPolicy, check_logits, final_answer
from edgeexit.runtime.decided import DECIDED_CODES, DECIDED_NAMES


class Pending:
    """The rows not yet answered, with the exit logits computed for them so far."""

    def __init__(self, raw: np.ndarray, classes: int, policy: ExitPolicy,
                 extras: Mapping[str, np.ndarray] | None = None):
        self.raw, batch = raw, len(raw)  # every row before normalisation (what the whole cloud model takes)
        self.extras = extras  # a multi-input model's other inputs (name -> every row), None for one input
        self.policy = policy  # this request's exit policy (the planner's setting may change between requests)
        self.labels = np.zeros(batch, np.int64)
        self.probs = np.zeros((batch, classes), np.float32)
        self.exits = np.full(batch, -1, np.int32)
        self.codes = np.full(batch, -1, np.int32)  # DECIDED_CODES; -1 until answered
        self.rows = np.arange(batch)
        self.history: list[np.ndarray] = []
        self.exit_ids: list[int] = []

    def answer(self, mask: np.ndarray, labels: np.ndarray, probs: np.ndarray, exit_id: int, where: str) -> None:
        """Answer the pending rows selected by ``mask`` (bool over the pending rows) and drop them."""
        if mask.all():  # the common case at the last exit, and every batch-1 answer: no copies of the rest
            rows = self.rows
            self.labels[rows], self.probs[rows] = labels, probs
            self.exits[rows], self.codes[rows] = exit_id, DECIDED_CODES[where]
            self.rows = rows[:0]
            self.history = [h[:0] for h in self.history]
            return
        rows = self.rows[mask]
        self.labels[rows], self.probs[rows] = labels[mask], probs[mask]
        self.exits[rows], self.codes[rows] = exit_id, DECIDED_CODES[where]
        keep = ~mask
        self.rows = self.rows[keep]
        self.history = [h[keep] for h in self.history]

    def pending_extras(self) -> dict[str, np.ndarray] | None:
        """The extra inputs' pending rows (None for a one-input model)."""
        if self.extras is None:
            return None
        if len(self.rows) == len(self.raw):
            return dict(self.extras)
        return {n: a[self.rows] for n, a in self.extras.items()}

    @property
    def decided(self) -> list[str]:
        """Per row: where it was answered (names; "" for a row not answered yet)."""
        return [DECIDED_NAMES.get(int(c), "") for c in self.codes]

    @property
    def empty(self) -> bool:
        return len(self.rows) == 0


def decide(policy: Any, history: list[np.ndarray], final: bool
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(mask, labels, probs) of ``policy.decide(history)``, the mask all True at the bundle's final exit; None when
    no row can exit here. The same answers as ``decide``, for less: the earlier exits' logits were checked when
    they came (decide re-checks the whole history at every exit), the final exit's answer is its own softmax
    under every policy (``policies.final_answer``), and "never" scores nothing before it. A policy that
    overrides ``decide`` (or has more exits than the bundle) always gets ``decide`` itself."""
    j = len(history) - 1
    standard = isinstance(policy, ExitPolicy) and type(policy).decide is ExitPolicy.decide and j < policy.num_exits
    if not standard or (final and j != policy.num_exits - 1):
        dec = policy.decide(history)
        mask = np.ones(len(dec.labels), bool) if final else np.asarray(dec.mask, bool)
        return mask, np.asarray(dec.labels), np.asarray(dec.probs)
    check_logits(history[j], j, len(history[0]))
    if final:
        s = final_answer(history[j])
        return np.ones(len(s.labels), bool), s.labels, s.probs
    if type(policy) is NeverExitPolicy:
        return None
    s = policy.score(history)
    return policy.passes(s.score, j), s.labels, s.probs
