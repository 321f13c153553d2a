"""The wire fuzzer: seeded mutated OIP ModelInferRequests against real `edgeexit serve` and `edgeexit agent`
processes, from several client threads, counting the status every case gets.

Cases come from ``fuzz_cases`` (protobuf- and byte-level mutations of valid requests). Every payload goes out
as raw bytes (``channel.unary_unary(..., request_serializer=None)``), so the server parses what a broken or
hostile client really sends. What must hold: no INTERNAL or UNKNOWN (a client's mistake is never the server's
error), no OK answer with NaN/inf in it, the processes alive, their RSS flat after a warm-up (``/proc``), and
a valid request answered correctly afterwards. ``tests/test_fuzz.py`` asserts it; ``benchmarks/robustness.py``
reports it.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from edgeexit.bundle import Bundle
from edgeexit.runtime.oip_messages import outputs_from_pb
from edgeexit.runtime.proto import grpc_service_pb2 as pb
from edgeexit.testbed.fuzz_cases import Bombs, Case, base_requests, make_case
from edgeexit.testbed.harness import AgentClient, Proc, launch

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
BAD_CODES = ("INTERNAL", "UNKNOWN")
VALID_EVERY = 25  # every 25th case is an unmutated request: the servers must keep answering those
CHANNEL_OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]


@dataclass
class Finding:
    """One case that broke a rule, enough to rebuild it (``make_case(seed, index, ...)``) and read why."""

    index: int
    target: str
    code: str
    label: str
    details: str

    def __str__(self) -> str:
        return f"#{self.index} {self.target} {self.code} [{self.label}] {self.details}"


@dataclass
class FuzzReport:
    seed: int
    requests: int = 0  # mutated requests answered (any status)
    valid_probes: int = 0  # unmutated requests sent in between
    seconds: float = 0.0
    codes: dict[str, Counter] = field(default_factory=dict)  # target -> status code name -> count
    bad: Counter = field(default_factory=Counter)  # (target, code, mutation label) -> count, INTERNAL/UNKNOWN
    by_mutation: Counter = field(default_factory=Counter)  # (target, one mutation, code) -> count
    findings: list[Finding] = field(default_factory=list)  # the first few of each kind, with details
    ok_nonfinite: int = 0  # OK answers carrying NaN/inf
    valid_failed: int = 0  # unmutated probes that were not answered OK
    rss_kb: dict[str, tuple[int, int]] = field(default_factory=dict)  # target -> (after warm-up, at the end)

    @property
    def internal_errors(self) -> int:
        return sum(n for (_, code, _), n in self.bad.items())

    @property
    def rss_growth_mb(self) -> float:
        """The largest growth of any target's RSS from after the warm-up to the end, MiB."""
        return max((end - start) / 1024 for start, end in self.rss_kb.values()) if self.rss_kb else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "seed": self.seed, "fuzz_requests": self.requests, "valid_probes": self.valid_probes,
            "seconds": round(self.seconds, 1), "internal_errors": self.internal_errors,
            "ok_nonfinite": self.ok_nonfinite, "valid_failed": self.valid_failed,
            "rss_growth_mb": round(self.rss_growth_mb, 1),
            "rss_mb": {t: [round(a / 1024, 1), round(b / 1024, 1)] for t, (a, b) in self.rss_kb.items()},
            "codes": {t: dict(sorted(c.items())) for t, c in self.codes.items()},
            "bad": [{"target": t, "code": c, "mutations": lab, "count": n}
                    for (t, c, lab), n in self.bad.most_common()],
            "findings": [str(f) for f in self.findings],
            "by_mutation": {f"{t} {m}": dict(sorted((c, n) for (t2, m2, c), n in self.by_mutation.items()
                                                     if (t2, m2) == (t, m)))
                            for t, m in sorted({(t, m) for t, m, _ in self.by_mutation})},
        }

    def describe(self) -> str:
        """What failed, one line per (target, code, mutations), most frequent first."""
        lines = [f"{n:6d} x {t} {c} [{lab}]" for (t, c, lab), n in self.bad.most_common()]
        return "\n".join(lines + [str(f) for f in self.findings])


def rss_kb(pid: int) -> int:
    """VmRSS of a process, KiB (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _nonfinite(resp_bytes: bytes) -> str | None:
    """Why an OK answer is unusable (NaN/inf outputs, unreadable), or None."""
    try:
        outputs = outputs_from_pb(pb.ModelInferResponse.FromString(resp_bytes))
    except Exception as e:  # noqa: BLE001 - any unreadable OK answer is a finding, whatever broke
        return f"unreadable OK answer: {type(e).__name__}: {e}"
    bad = [k for k, v in outputs.items() if v.dtype.kind == "f" and not np.isfinite(v).all()]
    return f"OK answer with NaN/inf in {bad}" if bad else None


class Fuzzer:
    """Sends cases ``0, 1, ...`` of a seeded run to the targets (name -> Proc) from ``threads`` threads."""

    MAX_FINDINGS = 40

    def __init__(self, bundle: str | Path, targets: dict[str, Proc], seed: int = 0, threads: int = 4,
                 timeout_s: float = 20.0, bomb_mb: int = 16):
        manifest = Bundle.load(bundle, verify=False).manifest
        self.bases = [b for b in base_requests(manifest) if b.target in targets]
        self.models = [manifest.name, *(f"{manifest.name}@{sp.index}" for sp in manifest.split_points)]
        self.bombs = Bombs(bomb_mb)
        self.targets, self.seed, self.threads, self.timeout_s = targets, seed, threads, timeout_s
        self.report = FuzzReport(seed, codes={t: Counter() for t in targets})
        self._channels = {t: grpc.insecure_channel(p.target, options=CHANNEL_OPTIONS) for t, p in targets.items()}
        # No serializers: the payload bytes go out exactly as built, broken or not.
        self._calls = {t: ch.unary_unary(MODEL_INFER, request_serializer=None, response_deserializer=None)
                       for t, ch in self._channels.items()}
        self._lock = threading.Lock()
        self._next = self._claimed = 0

    def run(self, requests: int, warmup: int = 500, time_limit_s: float = 120.0) -> FuzzReport:
        """``warmup`` mutated requests, RSS read, the rest up to ``requests``, RSS read again."""
        t0 = time.monotonic()
        deadline = t0 + time_limit_s
        self._phase(min(warmup, requests), deadline)
        start = {t: rss_kb(p.popen.pid) for t, p in self.targets.items()}
        self._phase(requests, deadline)
        time.sleep(0.5)  # let in-flight work on the servers finish before reading their RSS
        self.report.rss_kb = {t: (start[t], rss_kb(p.popen.pid)) for t, p in self.targets.items()}
        self.report.seconds = time.monotonic() - t0
        return self.report

    def close(self) -> None:
        for ch in self._channels.values():
            ch.close()

    def __enter__(self) -> Fuzzer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _phase(self, until: int, deadline: float) -> None:
        workers = [threading.Thread(target=self._worker, args=(until, deadline), daemon=True)
                   for _ in range(self.threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    def _take(self, until: int, deadline: float) -> int | None:
        with self._lock:
            if self.report.requests + self._claimed >= until or time.monotonic() > deadline:
                return None
            i = self._next
            self._next += 1
            self._claimed += 0 if i % VALID_EVERY == 0 else 1  # mutated cases taken, not yet answered
            return i

    def _worker(self, until: int, deadline: float) -> None:
        while (i := self._take(until, deadline)) is not None:
            case = make_case(self.seed, i, self.bases, self.bombs, self.models, VALID_EVERY)
            self._record(case, *self._send(case))

    def _send(self, case: Case) -> tuple[str, str, bytes | None]:
        try:
            resp = self._calls[case.target](case.payload, timeout=self.timeout_s)
            return "OK", "", resp
        except grpc.RpcError as e:
            return e.code().name, (e.details() or "")[:300], None

    def _record(self, case: Case, code: str, details: str, resp: bytes | None) -> None:
        problem = _nonfinite(resp) if resp is not None else None
        with self._lock:
            r = self.report
            r.codes[case.target][code] += 1
            for m in case.label.split("+"):
                r.by_mutation[(case.target, m, code)] += 1
            if case.valid:
                r.valid_probes += 1
            else:
                r.requests += 1
                self._claimed -= 1
            finding = None
            if code in BAD_CODES:
                r.bad[(case.target, code, case.label)] += 1
                finding = Finding(case.index, case.target, code, case.label, details)
            elif problem is not None:
                r.ok_nonfinite += 1
                finding = Finding(case.index, case.target, "OK", case.label, problem)
            if case.valid and code != "OK":
                r.valid_failed += 1
                finding = Finding(case.index, case.target, code, "valid", details)
            if finding is not None and len(r.findings) < self.MAX_FINDINGS:
                r.findings.append(finding)


def fuzz(bundle: str | Path, targets: dict[str, Proc], requests: int = 10_000, seed: int = 0, threads: int = 4,
         warmup: int = 500, time_limit_s: float = 120.0, bomb_mb: int = 16) -> FuzzReport:
    """One seeded fuzz run against running targets ("serve" and/or "agent"); see module docstring."""
    with Fuzzer(bundle, targets, seed, threads, bomb_mb=bomb_mb) as f:
        return f.run(requests, warmup, time_limit_s)


@contextmanager
def fuzz_targets(bundle: str | Path, log_dir: Path, max_message_mb: int = 8) -> Iterator[dict[str, Proc]]:
    """A real `edgeexit serve` and a real `edgeexit agent` offloading every row to it at split 0."""
    with ExitStack() as stack:
        serve = stack.enter_context(launch("serve", ["serve", str(bundle), "--port", "0", "--max-message-mb",
                                                     str(max_message_mb)], log_dir))
        agent = stack.enter_context(launch("agent", ["agent", str(bundle), "--cloud", serve.target, "--split", "0",
                                                     "--policy", "never", "--listen", "127.0.0.1:0"], log_dir))
        yield {"serve": serve, "agent": agent}


def answer_problems(bundle: str | Path, targets: dict[str, Proc], rows: int = 4, seed: int = 7) -> list[str]:
    """Valid requests to each target, checked against the bundle run locally; what was wrong (empty: all good)."""
    from edgeexit.runtime.client import InferenceClient
    from edgeexit.runtime.codec import encode
    from edgeexit.runtime.runner import SegmentRunner

    runner = SegmentRunner(bundle)
    m = runner.manifest
    x = np.random.default_rng(seed).random((rows, *(int(d) for d in m.input.shape[1:])), dtype=np.float32)
    logits = runner.run_all(runner.normalize(x))
    want = logits[-1].argmax(1)
    problems: list[str] = []
    try:
        if "serve" in targets:
            with InferenceClient(targets["serve"].target) as client:
                got = client.infer(m.name, m.input.name, encode(x), timeout=20)
            final = got[f"exit{m.exits[-1].index}"]
            if not np.allclose(final, logits[-1], atol=1e-3):
                problems.append(f"serve: final exit differs from the local run by {np.abs(final - logits[-1]).max()}")
        if "agent" in targets:
            with AgentClient(targets["agent"].target, m.name, timeout=20) as app:
                ans = app.infer(x)
            if not np.array_equal(ans.labels, want):
                problems.append(f"agent: labels {ans.labels.tolist()} but the local run says {want.tolist()}")
    except Exception as e:  # noqa: BLE001 - reported as a problem: the caller asserts there are none
        problems.append(f"valid request failed: {type(e).__name__}: {e}")
    return problems
