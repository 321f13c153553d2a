"""Exit policies: given the logits of the exits seen so far, decide which rows of a batch exit now.

Torch-free (numpy only): the device runs these. Every policy reduces exit ``j`` to one *score* per row and
compares it with that exit's threshold, so the online decision (:meth:`ExitPolicy.decide`) and the offline
simulation used by calibration and evaluation (:meth:`ExitPolicy.score`) are the same code.

    kind         score at exit j                                        exits when
    confidence   max softmax (Shallow-Deep Networks)                    score >= tau_j
    entropy      entropy of softmax / log(C) (BranchyNet, DeeBERT)      score <= tau_j
    margin       top-1 minus top-2 probability                          score >= tau_j
    patience     max softmax, only if the last k exits agree (PABEE)    score >= tau_j (tau = 0: pure PABEE)
    ensemble     max of the weighted geometric mean of the softmaxes    score >= tau_j
                 of exits 0..j (Zero Time Waste); its probs/labels are the ensemble's
    never        -                                                      never (the final exit answers)

Thresholds are per early exit (``len(thresholds) == num_exits - 1``); the final exit always answers, with its
own softmax (also under ``ensemble``), so a policy that never exits early is exactly the full model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from edgeexit.errors import ConfigError, InvalidTensor

if TYPE_CHECKING:
    from edgeexit.bundle import Manifest

KINDS = ("confidence", "entropy", "margin", "patience", "ensemble", "never")
# Policies whose score must be at most the threshold (the others: at least).
LOWER_IS_BETTER = {"entropy"}


@dataclass
class ExitDecision:
    mask: np.ndarray  # bool[B]: rows that exit at exit j
    labels: np.ndarray  # int64[B]: predicted class at exit j (for every row)
    probs: np.ndarray  # float32[B, C]: the probabilities the policy used (for every row)


@dataclass
class ExitScore:
    """What a policy sees at exit j, before comparing with the threshold."""

    score: np.ndarray  # float64[B]
    labels: np.ndarray  # int64[B]
    probs: np.ndarray  # float32[B, C]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable log-softmax over the last axis (float64, so tiny probabilities keep their order)."""
    z = logits.astype(np.float64)  # a fresh array: the in-place steps below (same values) skip two copies
    z -= z.max(axis=-1, keepdims=True)
    z -= np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return z


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities over the last axis as float32, computed in float64 via ``log_softmax`` (the one softmax:
    the device runtime's cloud answers and fallbacks use it too)."""
    return np.exp(log_softmax(logits)).astype(np.float32)


def check_logits(logits: np.ndarray, j: int, batch: int | None = None) -> None:
    """Raise InvalidTensor unless ``logits`` is a finite [B, C] array."""
    if (isinstance(logits, np.ndarray) and logits.ndim == 2 and logits.shape[1] >= 1
            and (batch is None or logits.shape[0] == batch) and np.isfinite(logits.sum())):
        return  # the hot path: a finite sum means every element is finite (NaN and inf propagate)
    if not isinstance(logits, np.ndarray) or logits.ndim != 2 or logits.shape[1] < 1:
        shape = getattr(logits, "shape", type(logits).__name__)
        raise InvalidTensor(f"exit {j}: logits must be a [batch, classes] array, got {shape}")
    if batch is not None and logits.shape[0] != batch:
        raise InvalidTensor(f"exit {j}: logits have {logits.shape[0]} rows but exit 0 had {batch}; "
                            "pass the same rows for every exit")
    bad = ~np.isfinite(logits).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)[:5].tolist()
        raise InvalidTensor(f"exit {j}: logits contain NaN or inf (rows {rows}{'...' if bad.sum() > 5 else ''}); "
                            "the model or its input is broken: check the input normalisation and re-export")


def final_answer(logits: np.ndarray) -> ExitScore:
    """The final exit answers with its own softmax under every policy, so "never exit" == the full model."""
    probs = np.exp(log_softmax(logits))
    return ExitScore(probs.max(axis=1), probs.argmax(axis=1).astype(np.int64), probs.astype(np.float32))


@dataclass
class ExitPolicy:
    """Per-early-exit thresholds plus the rule that turns logits into a score; see the module docstring."""

    kind: str
    thresholds: list[float]
    params: dict[str, Any] = field(default_factory=dict)
    # Whether score() reads exits before the last one (the runner keeps and regroups them only then).
    uses_history: ClassVar[bool] = False

    @property
    def num_exits(self) -> int:
        return len(self.thresholds) + 1

    def score(self, history: list[np.ndarray]) -> ExitScore:
        """The score, labels and probabilities at exit ``j = len(history) - 1`` (no threshold applied)."""
        return final_answer(history[-1])

    def compare(self, score: np.ndarray, tau: float) -> np.ndarray:
        """bool[B]: rows whose score passes threshold ``tau``."""
        return score <= tau if self.kind in LOWER_IS_BETTER else score >= tau

    def passes(self, score: np.ndarray, j: int) -> np.ndarray:
        """bool[B]: rows whose score at early exit ``j`` passes its threshold."""
        return self.compare(score, self.thresholds[j])

    def decide(self, history: list[np.ndarray]) -> ExitDecision:
        """Decide at exit ``j = len(history) - 1``; history holds the logits of exits 0..j for the same rows."""
        if not history:
            raise ConfigError("decide() needs the logits of at least one exit")
        j = len(history) - 1
        if j >= self.num_exits:
            raise ConfigError(f"the policy has thresholds for {self.num_exits} exits but got logits of {j + 1}; "
                              "calibrate the policy for this bundle")
        batch = history[0].shape[0] if isinstance(history[0], np.ndarray) else None
        for i, h in enumerate(history):
            check_logits(h, i, batch)
        if j == self.num_exits - 1:
            s = final_answer(history[-1])
            return ExitDecision(mask=np.ones(len(s.labels), dtype=bool), labels=s.labels, probs=s.probs)
        s = self.score(history)
        return ExitDecision(mask=self.passes(s.score, j), labels=s.labels, probs=s.probs)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "thresholds": [float(t) for t in self.thresholds], "params": dict(self.params)}


class EntropyPolicy(ExitPolicy):
    def score(self, history: list[np.ndarray]) -> ExitScore:
        logp = log_softmax(history[-1])
        probs = np.exp(logp)
        c = probs.shape[1]
        ent = -(probs * logp).sum(axis=1)
        norm = ent / math.log(c) if c > 1 else np.zeros_like(ent)
        return ExitScore(norm, probs.argmax(axis=1).astype(np.int64), probs.astype(np.float32))


class MarginPolicy(ExitPolicy):
    def score(self, history: list[np.ndarray]) -> ExitScore:
        probs = np.exp(log_softmax(history[-1]))
        if probs.shape[1] == 1:
            margin = probs[:, 0]
        else:
            top2 = np.partition(probs, -2, axis=1)[:, -2:]
            margin = top2[:, 1] - top2[:, 0]
        return ExitScore(margin, probs.argmax(axis=1).astype(np.int64), probs.astype(np.float32))


class PatiencePolicy(ExitPolicy):
    """Exit when the last ``k`` exits (this one included) predict the same class and confidence >= tau."""

    uses_history = True

    def score(self, history: list[np.ndarray]) -> ExitScore:
        k = int(self.params.get("k", 2))
        base = super().score(history)
        if len(history) < k:
            return ExitScore(np.full(len(base.labels), -np.inf), base.labels, base.probs)
        agree = np.ones(len(base.labels), dtype=bool)
        for h in history[-k:-1]:
            agree &= np.asarray(h).argmax(axis=1) == base.labels
        return ExitScore(np.where(agree, base.score, -np.inf), base.labels, base.probs)


class EnsemblePolicy(ExitPolicy):
    """Weighted geometric mean of the softmaxes of exits 0..j (weights ``params['weights']``, default j+1)."""

    uses_history = True

    def score(self, history: list[np.ndarray]) -> ExitScore:
        weights = self.params.get("weights") or [i + 1.0 for i in range(len(history))]
        if len(weights) < len(history):
            raise ConfigError(f"ensemble weights {weights} cover {len(weights)} exits but {len(history)} were seen; "
                              "give one weight per exit")
        w = np.asarray(weights[: len(history)], dtype=np.float64)
        acc = sum(wi * log_softmax(h) for wi, h in zip(w, history, strict=True)) / w.sum()
        logp = log_softmax(acc)  # renormalise the geometric mean
        probs = np.exp(logp)
        return ExitScore(probs.max(axis=1), probs.argmax(axis=1).astype(np.int64), probs.astype(np.float32))


class NeverExitPolicy(ExitPolicy):
    """The explicit "never exit early" policy: what an uncalibrated bundle (or a failed calibration) gets."""

    def compare(self, score: np.ndarray, tau: float) -> np.ndarray:
        return np.zeros(len(score), dtype=bool)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "never", "thresholds": [None] * len(self.thresholds), "params": dict(self.params)}


_CLASSES: dict[str, type[ExitPolicy]] = {
    "confidence": ExitPolicy, "entropy": EntropyPolicy, "margin": MarginPolicy,
    "patience": PatiencePolicy, "ensemble": EnsemblePolicy, "never": NeverExitPolicy,
}


def make_policy(kind: str, thresholds: Sequence[float | None], **params: Any) -> ExitPolicy:
    """Build a policy; ``thresholds`` has one entry per early exit (ignored values for ``never``)."""
    if kind not in _CLASSES:
        raise ConfigError(f"unknown exit policy {kind!r}; choose one of {', '.join(KINDS)}")
    if kind == "never":
        return NeverExitPolicy("never", [math.inf] * len(thresholds), dict(params))
    taus = []
    for t in thresholds:
        if t is None or isinstance(t, bool) or not isinstance(t, int | float) or math.isnan(t):
            raise ConfigError(f"{kind} thresholds must be numbers, got {list(thresholds)}")
        taus.append(float(t))
    if kind == "patience" and int(params.get("k", 2)) < 1:
        raise ConfigError(f"patience k must be >= 1 (exits that must agree), got {params.get('k')}")
    return _CLASSES[kind](kind, taus, dict(params))


def never_exit(num_exits: int) -> ExitPolicy:
    return make_policy("never", [None] * (num_exits - 1))


def policy_from_manifest(manifest: Manifest, kind: str | None = None) -> ExitPolicy:
    """The calibrated policy stored in ``manifest.policy``; "never exit early" (explicitly) if uncalibrated.

    ``kind`` asks for a specific policy: if the manifest holds a different one, that is a ConfigError.
    """
    n = len(manifest.exits)
    if kind == "never":
        return never_exit(n)  # needs no calibration, so it is always available
    stored = manifest.policy
    if not stored or stored.get("kind") in (None, "never"):
        if kind not in (None, "never"):
            raise ConfigError(f"the bundle has no calibrated {kind!r} policy; run "
                              f"`edgeexit calibrate BUNDLE --policy {kind}` first")
        return never_exit(n)
    if kind is not None and stored["kind"] != kind:
        raise ConfigError(f"the bundle is calibrated for {stored['kind']!r}, not {kind!r}; "
                          f"run `edgeexit calibrate BUNDLE --policy {kind}`")
    policy = make_policy(stored["kind"], stored.get("thresholds") or [], **(stored.get("params") or {}))
    if policy.num_exits != n:
        raise ConfigError(f"the stored policy has {len(policy.thresholds)} thresholds but the bundle has "
                          f"{n - 1} early exits; re-run `edgeexit calibrate`")
    return policy
