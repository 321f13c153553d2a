"""Helpers for the simulated-network scenarios: reference answers from the local bundle, an app that records
every request, and the mode a scenario ran in."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from edgeexit.testbed.harness import AgentAnswer, AgentClient


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@dataclass
class Reference:
    """Every exit's logits for a fixed set of inputs, computed with SegmentRunner on this machine."""

    x: np.ndarray  # raw [0, 1] pixels [N, C, H, W]
    exits: list[np.ndarray]  # per exit: logits [N, classes]

    def final(self, rows: np.ndarray) -> np.ndarray:
        return self.exits[-1][rows].argmax(1)

    def best_exit(self, rows: np.ndarray, upto: int) -> tuple[np.ndarray, np.ndarray]:
        """(labels, exit ids) of the most confident exit among exits 0..upto: what `best-exit` answers."""
        probs = [softmax(self.exits[j][rows]) for j in range(upto + 1)]
        conf = np.stack([p.max(1) for p in probs])  # [exits, rows]
        best = conf.argmax(0)
        labels = np.array([probs[j][i].argmax() for i, j in enumerate(best)])
        return labels, best


def make_reference(bundle: Path, n: int = 32, seed: int = 7) -> Reference:
    from edgeexit.runtime.runner import SegmentRunner
    from tests.fixtures_bundles import digits_28

    x = digits_28(n, seed=seed)
    runner = SegmentRunner(bundle)
    return Reference(x, [np.asarray(e) for e in runner.run_all(runner.normalize(x))])


@pytest.fixture(scope="session")
def scenario_reference(tiny_bundle) -> Reference:
    return make_reference(tiny_bundle)


@dataclass
class Sent:
    rows: np.ndarray  # indices into the Reference inputs
    started: float  # monotonic
    answer: AgentAnswer | None = None
    error: str | None = None

    @property
    def ended(self) -> float:
        return self.started + (self.answer.seconds if self.answer else 0.0)


@dataclass
class App:
    """What an app does: send requests to its agent one after another, recording every answer or error."""

    client: AgentClient
    ref: Reference
    batch: int = 1
    pace_s: float = 0.05
    sent: list[Sent] = field(default_factory=list)

    def send(self) -> Sent:
        k = len(self.sent)
        rows = (np.arange(self.batch) + k * self.batch) % len(self.ref.x)
        s = Sent(rows, time.monotonic())
        try:
            s.answer = self.client.infer(self.ref.x[rows])
        except Exception as e:  # noqa: BLE001  a lost request is what the scenarios count
            s.error = f"{type(e).__name__}: {e}"
        self.sent.append(s)
        time.sleep(self.pace_s)
        return s

    def until(self, stop_at: float) -> list[Sent]:
        """Send until the monotonic time ``stop_at``."""
        out = []
        while time.monotonic() < stop_at:
            out.append(self.send())
        return out

    def until_decided(self, where: str, limit: int) -> list[Sent]:
        """Send until an answer is decided entirely ``where`` (e.g. "cloud"), at most ``limit`` requests."""
        out = []
        for _ in range(limit):
            s = self.send()
            out.append(s)
            if s.answer is not None and set(s.answer.decided) == {where}:
                break
        return out

    @property
    def lost(self) -> list[Sent]:
        return [s for s in self.sent if s.answer is None]

    def decided(self, where: str) -> list[Sent]:
        return [s for s in self.sent if s.answer is not None and where in s.answer.decided]


def record_mode(record_property, scenario) -> str:
    """Put the mode that ran into the test report (junit property and -s output) and return it."""
    record_property("scenario_mode", scenario.mode)
    record_property("scenario_setup", scenario.describe())
    print(f"[scenario mode] {scenario.describe()}")
    return scenario.mode
