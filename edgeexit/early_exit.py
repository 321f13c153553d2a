"""Run a bundle with early exits, batched, with regrouping; and simulate policies on precomputed exit logits.

Regrouping: rows that exit at exit ``j`` leave the batch, and only the continuing rows go through the next
segment (DeeBERT/PABEE research code breaks at batch > 1; this does not). Several exits may live in one
segment: they are decided in order, rows leaving after each. The segments between two exits run as one
*stage* (one runner call, merged when the runner merges ranges). The loop's own work is small next to the
network's (profiled on resnet-exits, batch 100: ~5-8% of the early-exit time): per exit one policy score on the
current rows, nothing more when nobody leaves, one ``compress`` of the boundary when some do, the history only
for policies that read it. What remains of (relative time) / (relative FLOPs) above 1 is the network's: early
convolutions cost more time per FLOP than deep ones, and a conv costs more per row at the smaller batches that
reach deep stages (``refill`` removes the latter offline; benchmarks/early_exit_timing.py measures both).

``ExitTrace`` is the offline twin: the logits of every exit are computed once (``collect_logits``), each
policy's per-exit scores once, and then any threshold vector is applied with a few vectorised comparisons.
Calibration and evaluation sweeps rely on it; a test proves it equals ``run_early_exit`` exactly.

Models with several inputs (a transformer's ``input_ids`` and ``attention_mask``) take a ``ModelInputs``
wherever an input array goes: the primary input and the extra inputs, row-aligned. Every regrouping (rows
leaving, refill queues splitting and joining) moves a row's extra inputs with it, so a continuing row always
runs with its own mask. Torch-free (numpy only).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from edgeexit.errors import ConfigError
from edgeexit.policies import ExitPolicy, check_logits, final_answer

if TYPE_CHECKING:  # keeps onnxruntime out of import time
    from edgeexit.bundle import Manifest
    from edgeexit.runtime.runner import SegmentOutput, SegmentRunner


@dataclass(frozen=True)
class ModelInputs:
    """A batch of model inputs: the primary input ``x`` and the extra inputs by name (``Manifest.extra_inputs``),
    every array with the same rows. Indexing (a slice, an index array) takes the same rows of each."""

    x: np.ndarray
    extras: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, v in self.extras.items():
            if len(v) != len(self.x):
                raise ConfigError(f"input {name!r} has {len(v)} rows but the primary input has {len(self.x)}; "
                                  "every input needs one row per sample")

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, idx: slice | np.ndarray) -> ModelInputs:
        return ModelInputs(self.x[idx], {k: v[idx] for k, v in self.extras.items()})


def split_inputs(x: np.ndarray | ModelInputs) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(primary input, extra inputs) of either form."""
    return (x.x, x.extras) if isinstance(x, ModelInputs) else (x, {})


def prepare_input(runner: SegmentRunner, x: np.ndarray, normalized: bool = False) -> np.ndarray:
    """The primary input as the first segment takes it: float inputs normalised (unless ``normalized``) and
    float32 as before; other dtypes (token ids) as they are, contiguous (the runner checks their dtype)."""
    spec = runner.manifest.input
    if np.dtype(getattr(spec, "dtype", "float32")) != np.float32:
        return np.ascontiguousarray(x)
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x if normalized else runner.normalize(x)


@dataclass
class EarlyExitResult:
    labels: np.ndarray  # int64[N]: the answer
    exit_index: np.ndarray  # int64[N]: the exit that answered
    probs: np.ndarray  # float32[N, C]: the probabilities the policy used for the answer
    segment_flops: np.ndarray  # int64[N]: FLOPs of the segments actually run for each row
    seconds: float = 0.0  # wall time of the whole run

    def exit_rates(self, num_exits: int) -> np.ndarray:
        return np.bincount(self.exit_index, minlength=num_exits) / max(len(self.exit_index), 1)


def executed_flops(manifest: Manifest) -> list[int]:
    """Per exit: FLOPs of the segments run to reach it (segments 0..segment(j), whole segments)."""
    seg_cum = np.cumsum([s.flops for s in manifest.segments])
    return [int(seg_cum[e.segment]) for e in manifest.exits]


def _batches(n: int, batch_size: int) -> range:
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    return range(0, n, batch_size)


@dataclass(frozen=True)
class Stage:
    """Segments ``start..stop-1`` run as one call (one merged session when the runner has it), ending at the
    segment that owns ``exits``: no decision is due before its end, so nothing is regrouped in between."""

    start: int
    stop: int
    exits: tuple[int, ...]


def exit_stages(manifest: Manifest) -> list[Stage]:
    """The bundle's segments cut after every segment that owns an exit (and after the last one)."""
    stages, start = [], 0
    for k, seg in enumerate(manifest.segments):
        if seg.exits or k == len(manifest.segments) - 1:
            stages.append(Stage(start, k + 1, tuple(seg.exits)))
            start = k + 1
    return stages


def run_stage(runner: SegmentRunner, st: Stage, x: np.ndarray, extras: dict[str, np.ndarray] | None = None
              ) -> SegmentOutput:
    """One call of the runner for the stage (a range runs merged when the runner can merge it); ``extras``: the
    model's extra inputs for these rows (the segments that read them take them by name)."""
    # run_segment for one segment: stand-in runners (tests) need not implement ranges, nor extras.
    if extras:
        if st.stop - st.start == 1:
            return runner.run_segment(st.start, x, extras)
        return runner.run(x, st.start, st.stop, extras=extras)
    return runner.run_segment(st.start, x) if st.stop - st.start == 1 else runner.run(x, st.start, st.stop)


@dataclass
class _Rows:
    """Rows on their way through the stages: their global indices, the next stage's input, the exits seen
    (kept only for policies that read history), the model's extra inputs of these rows (row-aligned)."""

    rows: np.ndarray  # int64[B]
    x: np.ndarray  # [B, ...] the next stage's input
    history: list[np.ndarray]
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # name -> [B, ...], e.g. the attention mask

    def take(self, sl: slice) -> _Rows:
        return _Rows(self.rows[sl], self.x[sl], [h[sl] for h in self.history],
                     {k: v[sl] for k, v in self.extras.items()})


def _run_stage_rows(runner: SegmentRunner, policy: ExitPolicy, st: Stage, flops: list[int], p: _Rows,
                    out: EarlyExitResult) -> _Rows | None:
    """Run one stage on ``p``, decide its exits in order, write the rows that leave to ``out``; the rows that
    go on (None: nobody). Per exit: the policy's score on the current rows, and nothing else when nobody
    leaves; when some leave, one ``compress`` of the boundary (and of the history, only if the policy reads
    it)."""
    final = len(flops) - 1
    keep_history = policy.uses_history
    rows, history, extras = p.rows, p.history, p.extras
    seg_out = run_stage(runner, st, p.x, extras)
    boundary = seg_out.boundary
    for j in st.exits:
        logits = seg_out.exits[j]
        check_logits(logits, j, len(rows))  # only the new exit: earlier ones were checked when they came
        if keep_history:
            history = [*history, logits]
        if j == final:
            s = final_answer(logits)
            mask = None
        else:
            s = policy.score(history if keep_history else [logits])
            mask = policy.passes(s.score, j)
            if not mask.any():
                continue  # nobody leaves: no copies at all
            if mask.all():
                mask = None
        if mask is None:  # everybody left
            out.labels[rows] = s.labels
            out.exit_index[rows] = j
            out.probs[rows] = s.probs
            out.segment_flops[rows] = flops[j]
            return None
        gone = np.flatnonzero(mask)
        dst = rows[gone]
        out.labels[dst] = s.labels[gone]
        out.exit_index[dst] = j
        out.probs[dst] = s.probs[gone]
        out.segment_flops[dst] = flops[j]
        # Regroup: the per-row arrays of the continuing batch drop the rows that left.
        stay = ~mask
        rows = rows.compress(stay)
        if keep_history:
            history = [h.compress(stay, axis=0) for h in history]
        seg_out.exits = {i: v.compress(stay, axis=0) for i, v in seg_out.exits.items() if i > j}
        if boundary is not None:
            boundary = boundary.compress(stay, axis=0)
        if extras:  # each continuing row keeps its own mask row: nothing mixes across rows
            extras = {k: v.compress(stay, axis=0) for k, v in extras.items()}
    return _Rows(rows, boundary, history, extras)


def _run_batch(runner: SegmentRunner, policy: ExitPolicy, stages: list[Stage], flops: list[int], p: _Rows,
               out: EarlyExitResult) -> None:
    for st in stages:
        p = _run_stage_rows(runner, policy, st, flops, p, out)
        if p is None:
            return


class _Refill:
    """Stage queues for ``refill``: the rows that go on wait at their next stage until ``batch_size`` of them
    are there, so every stage runs at the full batch (a conv net costs more per row at a small batch), except
    the last call of each stage at the end. A row's answer does not depend on which rows share its batch."""

    def __init__(self, runner: SegmentRunner, policy: ExitPolicy, stages: list[Stage], flops: list[int],
                 out: EarlyExitResult, batch_size: int):
        self.args = runner, policy, flops
        self.stages, self.out, self.batch_size = stages, out, batch_size
        self.queues: list[list[_Rows]] = [[] for _ in stages]

    def _pending(self, s: int) -> int:
        return sum(len(q.rows) for q in self.queues[s])

    def _take(self, s: int, n: int) -> _Rows:
        q, parts, got = self.queues[s], [], 0
        while got < n:
            head = q[0]
            k = min(n - got, len(head.rows))
            if k == len(head.rows):
                parts.append(q.pop(0))
            else:  # split the chunk: its first k rows now, the rest stay queued
                parts.append(head.take(slice(None, k)))
                q[0] = head.take(slice(k, None))
            got += k
        if len(parts) == 1:
            return parts[0]
        return _Rows(np.concatenate([p.rows for p in parts]), np.concatenate([p.x for p in parts]),
                     [np.concatenate(hs) for hs in zip(*(p.history for p in parts), strict=True)],
                     {k: np.concatenate([p.extras[k] for p in parts]) for k in parts[0].extras})

    def _run(self, s: int, p: _Rows) -> None:
        runner, policy, flops = self.args
        p.x = np.ascontiguousarray(p.x)
        nxt = _run_stage_rows(runner, policy, self.stages[s], flops, p, self.out)
        if nxt is not None:
            self.queues[s + 1].append(nxt)

    def push(self, p: _Rows) -> None:
        self.queues[0].append(p)
        for s in range(len(self.stages)):
            while self._pending(s) >= self.batch_size:
                self._run(s, self._take(s, self.batch_size))

    def flush(self) -> None:
        for s in range(len(self.stages)):
            while self.queues[s]:
                self._run(s, self._take(s, min(self.batch_size, self._pending(s))))


def run_early_exit(runner: SegmentRunner, policy: ExitPolicy, x: np.ndarray | ModelInputs, batch_size: int = 256,
                   normalized: bool = False, progress: Callable[[int], None] | None = None,
                   refill: bool = False) -> EarlyExitResult:
    """Classify ``x`` with early exits. ``x`` is raw (as ``edgeexit.datasets.load`` returns it) unless
    ``normalized``; a model with extra inputs takes a ``ModelInputs`` (token ids are never normalised);
    ``progress(n)`` is called after each batch with the number of rows done.

    ``refill``: the rows that go on after an exit wait for the next batches' rows, so every stage runs at
    ``batch_size`` (offline evaluation of a whole set; same answers, rows answered later). Without it each
    batch goes through the stages alone and shrinks at every exit, as on a device."""
    n_exits = len(runner.manifest.exits)
    if policy.num_exits != n_exits:
        raise ConfigError(f"policy has thresholds for {policy.num_exits} exits, bundle has {n_exits}; "
                          "calibrate the policy for this bundle")
    n = len(x)
    c = runner.manifest.num_classes
    out = EarlyExitResult(np.full(n, -1, np.int64), np.full(n, -1, np.int64), np.zeros((n, c), np.float32),
                          np.zeros(n, np.int64))
    stages, flops = exit_stages(runner.manifest), executed_flops(runner.manifest)
    queues = _Refill(runner, policy, stages, flops, out, batch_size) if refill else None
    t0 = time.perf_counter()
    for s in _batches(n, batch_size):
        xb, eb = split_inputs(x[s:s + batch_size])
        xb = prepare_input(runner, xb, normalized)
        p = _Rows(np.arange(s, s + len(xb)), xb, [], {k: np.ascontiguousarray(v) for k, v in eb.items()})
        if queues is not None:
            queues.push(p)
        else:
            _run_batch(runner, policy, stages, flops, p, out)
        if progress:
            progress(len(xb))
    if queues is not None:
        queues.flush()
    out.seconds = time.perf_counter() - t0
    return out


def collect_logits(runner: SegmentRunner, x: np.ndarray | ModelInputs, batch_size: int = 256,
                   progress: Callable[[int], None] | None = None) -> list[np.ndarray]:
    """Every exit's logits for raw inputs ``x`` (no early exit), shallowest first: [num_exits] x [N, C]."""
    parts: list[list[np.ndarray]] = [[] for _ in runner.manifest.exits]
    for s in _batches(len(x), batch_size):
        xb, eb = split_inputs(x[s:s + batch_size])
        xb = prepare_input(runner, xb)
        out = runner.run_all(xb, extras={k: np.ascontiguousarray(v) for k, v in eb.items()}) if eb \
            else runner.run_all(xb)
        for j, logits in enumerate(out):
            parts[j].append(logits)
        if progress:
            progress(len(xb))
    return [np.concatenate(p) for p in parts]


@dataclass
class ExitTrace:
    """One policy's scores and labels at every exit for a fixed set of rows (thresholds not applied yet)."""

    policy: ExitPolicy
    scores: np.ndarray  # float64[E-1, N], early exits only
    labels: np.ndarray  # int64[E, N], the last row is the final exit's answer

    @classmethod
    def build(cls, policy: ExitPolicy, logits: Sequence[np.ndarray]) -> ExitTrace:
        if len(logits) != policy.num_exits:
            raise ConfigError(f"policy has {policy.num_exits} exits, logits of {len(logits)} were given")
        history = list(logits)
        scores, labels = [], []
        for j in range(len(history) - 1):
            s = policy.score(history[: j + 1])
            scores.append(s.score)
            labels.append(s.labels)
        labels.append(final_answer(history[-1]).labels)
        n = len(history[0])
        return cls(policy, np.asarray(scores, np.float64).reshape(len(history) - 1, n), np.asarray(labels))

    def subset(self, idx: np.ndarray) -> ExitTrace:
        return ExitTrace(self.policy, self.scores[:, idx], self.labels[:, idx])

    def apply(self, thresholds: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
        """(labels, exit_index) for every row under ``thresholds`` (one per early exit)."""
        n = self.labels.shape[1]
        exits = np.ones((self.labels.shape[0], n), dtype=bool)
        for j in range(len(thresholds)):
            exits[j] = self.policy.compare(self.scores[j], thresholds[j])
        exit_index = exits.argmax(axis=0)  # the first exit that passes; the final one always does
        return self.labels[exit_index, np.arange(n)], exit_index
