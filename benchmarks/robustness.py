"""Robustness benchmark (issue 13): fuzz, recovery after a link cut, and a bounded soak, on real processes.

    .venv/bin/python benchmarks/robustness.py [--quick] [--bundle B.edgeexit] [--fuzz-requests 10000]
                                               [--soak-seconds 60] [--agents 4] [--streams-per-agent 16]

The default run takes about 3 minutes; --quick (1,000 fuzz requests, a 5 s soak) about 1 minute. Run it with
nothing else on the machine: the soak's latencies are contention-bound.

- fuzz: edgeexit.testbed.fuzz, seeded protobuf- and byte-level mutations of OIP ModelInferRequests from 4 client
  threads against a real `edgeexit serve` (--max-message-mb 8) and a real `edgeexit agent` offloading to it.
  ``fuzz_requests``, ``internal_errors`` (INTERNAL/UNKNOWN answers; goal 0), ``rss_growth_mb`` (the largest
  VmRSS growth of either process from after a warm-up to the end; goal <= 20), OK answers with NaN/inf, and
  whether valid requests are still answered correctly afterwards.
- recovery: serve behind the netsim relay (edgeexit.testbed.netsim.Relay), an agent at split 0 (every row
  offloads, --deadline-ms 300) paced by an app at one row per 20 ms. The link is cut for 3 s (``reset``: open
  connections dropped and new ones refused; ``blackhole``: everything stalls), long enough for the circuit to
  open; ``recovery_s_after_link`` is the worst, over both modes, of the time from the link's return to the first
  answer decided in the cloud (goal <= 2). Requests that got no answer count as ``lost``.
- soak: ``--agents`` agent processes x ``--streams-per-agent`` app threads (64 device streams by default), each
  stream one row every 1/``--rate`` s, for ``--soak-seconds`` after a 3 s warm-up, all offloading at split 0 to
  one serve. ``soak_errors`` (calls that failed), ``lost`` (calls without a complete answer), fallback rows,
  p50/p99 ms as the apps saw them, and the RSS of serve and agents at the start and the end.

Uses a tiny seeded bundle (the test suite's, exported once into a temporary folder) unless --bundle.
Writes benchmarks/results/robustness.{json,md}; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgeexit.runtime.decided import CLOUD, FALLBACK  # noqa: E402
from edgeexit.runtime.runner import SegmentRunner  # noqa: E402
from edgeexit.testbed.fuzz import answer_problems, fuzz, fuzz_targets, rss_kb  # noqa: E402
from edgeexit.testbed.harness import AgentClient, Pacer, Proc, launch  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def _tiny_bundle(tmp: Path) -> Path:
    from tests.fixtures_bundles import TinyResNet, digits_28, make_bundle, seeded

    return make_bundle(tmp, seeded(TinyResNet()), split_points="exits", calibration_data=digits_28(300))


def _inputs(bundle: Path, rows: int, seed: int = 0) -> np.ndarray:
    m = SegmentRunner(bundle).manifest
    return np.random.default_rng(seed).random((rows, *(int(d) for d in m.input.shape[1:])), dtype=np.float32)


def _mb(kb: int) -> float:
    return round(kb / 1024, 1)


# ---------------------------------------------------------------- fuzz
def run_fuzz(bundle: Path, logs: Path, requests: int, seed: int) -> dict[str, Any]:
    with fuzz_targets(bundle, logs / "fuzz", max_message_mb=8) as targets:
        report = fuzz(bundle, targets, requests=requests, seed=seed, threads=4, warmup=min(1000, requests // 5),
                      time_limit_s=max(120.0, requests / 50))
        out = report.summary()
        out["alive"] = {name: p.alive() for name, p in targets.items()}
        out["answer_problems"] = answer_problems(bundle, targets)
    return out


# ---------------------------------------------------------------- recovery
def _wait(what: str, check, timeout: float) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if (got := check()) is not None:
            return got
        time.sleep(0.02)
    raise TimeoutError(f"{what} did not happen within {timeout} s")


def _circuit_opened(agent: Proc, after: float) -> float | None:
    for line in agent.log().splitlines():
        if line.startswith("{"):
            e = json.loads(line)
            if e.get("event") == "circuit" and e.get("new") == "open" and e["ts"] > after:
                return e["ts"]
    return None


def run_recovery(bundle: Path, logs: Path, outage_s: float = 3.0) -> dict[str, Any]:
    from edgeexit.testbed.netsim import Relay

    model = SegmentRunner(bundle).manifest.name
    out: dict[str, Any] = {"outage_s": outage_s}
    with launch("serve", ["serve", str(bundle), "--port", "0"], logs / "recovery") as serve, \
            Relay(serve.address) as relay:
        for mode in ("reset", "blackhole"):
            args = ["agent", str(bundle), "--cloud", "{}:{}".format(*relay.address), "--split", "0", "--policy",
                    "never", "--listen", "127.0.0.1:0", "--deadline-ms", "300"]
            with launch(f"agent-{mode}", args, logs / "recovery") as agent, \
                    AgentClient(agent.target, model) as app, Pacer(app, _inputs(bundle, 1)) as pacer:
                _wait("offloading before the cut", lambda: pacer.first_cloud_after(0), 10)
                cut_at = time.time()
                relay.outage(outage_s, mode)
                restored_at = cut_at + outage_s
                opened = _wait("the circuit opens", lambda t=cut_at: _circuit_opened(agent, t), outage_s)
                time.sleep(max(0.0, restored_at - time.time()))
                resumed = _wait("offloading resumes", lambda t=restored_at: pacer.first_cloud_after(t), 15)
            inside = [d for when, d in pacer.answers if cut_at + 0.5 < when < restored_at - 0.05]
            out[mode] = {"circuit_open_after_s": round(opened - cut_at, 2),
                         "recovery_s": round(resumed - restored_at, 3), "answers": len(pacer.answers),
                         "lost": len(pacer.failures), "failures": pacer.failures[:5],
                         "answered_on_device_during_cut": bool(inside) and set(inside) == {FALLBACK}}
    out["recovery_s_after_link"] = max(out[m]["recovery_s"] for m in ("reset", "blackhole"))
    out["lost"] = sum(out[m]["lost"] for m in ("reset", "blackhole"))
    return out


# ---------------------------------------------------------------- soak
def run_soak(bundle: Path, logs: Path, agents: int, per_agent: int, seconds: float, rate: float,
             warmup_s: float = 3.0) -> dict[str, Any]:
    model = SegmentRunner(bundle).manifest.name
    x = _inputs(bundle, 1, seed=3)
    lock = threading.Lock()
    lat_ms: list[float] = []
    errors: list[str] = []
    tally = {"calls": 0, "lost": 0, "fallback_rows": 0, "cloud_rows": 0}
    measuring, stop = threading.Event(), threading.Event()

    def stream(target: str, k: int) -> None:
        with AgentClient(target, model, timeout=30) as app:
            next_at = time.monotonic() + (k % 97) / 97 / rate  # spread the streams' phases
            while not stop.is_set():
                time.sleep(max(0.0, next_at - time.monotonic()))
                next_at += 1.0 / rate
                counted = measuring.is_set()
                try:
                    ans = app.infer(x)
                except Exception as e:  # noqa: BLE001 - counted: an error and a lost request
                    if counted:
                        with lock:
                            tally["calls"] += 1
                            tally["lost"] += 1
                            errors.append(f"{type(e).__name__}: {e}"[:200])
                    continue
                if counted:
                    with lock:
                        tally["calls"] += 1
                        lat_ms.append(ans.seconds * 1000)
                        tally["lost"] += len(ans.decided) != len(x)
                        tally["fallback_rows"] += ans.decided.count(FALLBACK)
                        tally["cloud_rows"] += ans.decided.count(CLOUD)

    with launch("serve", ["serve", str(bundle), "--port", "0"], logs / "soak") as serve:
        procs: dict[str, Proc] = {"serve": serve}
        try:
            for a in range(agents):
                procs[f"agent{a}"] = launch(f"agent{a}", ["agent", str(bundle), "--cloud", serve.target, "--split",
                                                          "0", "--policy", "never", "--listen", "127.0.0.1:0"],
                                            logs / "soak")
            threads = [threading.Thread(target=stream, args=(procs[f"agent{a}"].target, a * per_agent + s),
                                        daemon=True) for a in range(agents) for s in range(per_agent)]
            for t in threads:
                t.start()
            time.sleep(warmup_s)
            rss_start = {n: rss_kb(p.popen.pid) for n, p in procs.items()}
            measuring.set()
            t0 = time.monotonic()
            time.sleep(seconds)
            measuring.clear()
            elapsed = time.monotonic() - t0
            rss_end = {n: rss_kb(p.popen.pid) for n, p in procs.items()}
            stop.set()
            for t in threads:
                t.join(60)
            alive = {n: p.alive() for n, p in procs.items()}
            tracebacks = [n for n, p in procs.items() if "Traceback" in p.log()]
        finally:
            for name, p in procs.items():
                if name != "serve":
                    p.stop()
    lat = np.asarray(lat_ms) if lat_ms else np.asarray([np.nan])
    rss = {n: [_mb(rss_start[n]), _mb(rss_end[n])] for n in procs}
    return {
        "streams": agents * per_agent, "agents": agents, "rate_per_stream": rate, "seconds": round(elapsed, 1),
        "calls": tally["calls"], "answers_per_s": round(tally["calls"] / elapsed, 1),
        "soak_errors": len(errors), "lost": tally["lost"], "errors": errors[:10],
        "fallback_rows": tally["fallback_rows"], "cloud_rows": tally["cloud_rows"],
        "p50_ms": round(float(np.percentile(lat, 50)), 2), "p99_ms": round(float(np.percentile(lat, 99)), 2),
        "rss_mb": rss, "rss_growth_mb": round(max(end - start for start, end in rss.values()), 1),
        "alive": alive, "tracebacks": tracebacks,
    }


# ---------------------------------------------------------------- report
def _markdown(summary: dict[str, Any], result: dict[str, Any]) -> str:
    s, f, r = result["soak"], result["fuzz"], result["recovery"]
    rows = [
        ("fuzz_requests", f"{summary['fuzz_requests']} in {f['seconds']} s (seed {f['seed']})", ">= 10000"),
        ("internal_errors", str(summary["internal_errors"]), "0"),
        ("ok_nonfinite", str(summary["ok_nonfinite"]), "0"),
        ("rss_growth_mb", f"{summary['rss_growth_mb']} ({f['rss_mb']})", "<= 20"),
        ("recovery_s_after_link", f"{summary['recovery_s_after_link']} (reset {r['reset']['recovery_s']}, "
                                  f"blackhole {r['blackhole']['recovery_s']}; {r['outage_s']} s cut)", "<= 2"),
        ("lost", f"{summary['lost']} (recovery {r['lost']}, soak {s['lost']})", "0"),
        ("soak_errors", f"{summary['soak_errors']} of {s['calls']} calls", "0"),
        ("soak_p99_ms", f"{summary['soak_p99_ms']} (p50 {s['p50_ms']}; {s['streams']} streams x "
                        f"{s['rate_per_stream']}/s, {s['answers_per_s']} answers/s, {s['seconds']} s)", "-"),
        ("soak_rss_growth_mb", f"{summary['soak_rss_growth_mb']} (start/end MB: {s['rss_mb']})", "flat"),
        ("soak_fallback_rows", str(s["fallback_rows"]), "0"),
    ]
    lines = ["| metric | value | goal |", "|---|---|---|"] + [f"| {k} | {v} | {g} |" for k, v, g in rows]
    note = f"\n\nload average {result['load_average']:.1f} on {result['cpus']} CPUs"
    if result.get("quick"):
        note += "; --quick run (1,000 fuzz requests, short soak): not the benchmark's figures"
    return "\n".join(lines) + note + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, help="bundle to serve (default: a tiny seeded bundle)")
    ap.add_argument("--quick", action="store_true", help="1,000 fuzz requests and a 5 s soak: checks it works")
    ap.add_argument("--fuzz-requests", type=int, default=None, help="mutated requests (default 10000)")
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--soak-seconds", type=float, default=None, help="measured soak (default 60)")
    ap.add_argument("--agents", type=int, default=4)
    ap.add_argument("--streams-per-agent", type=int, default=16)
    ap.add_argument("--rate", type=float, default=5.0, help="requests per second per stream (default 5)")
    args = ap.parse_args()
    requests = args.fuzz_requests or (1000 if args.quick else 10_000)
    soak_s = args.soak_seconds or (5.0 if args.quick else 60.0)
    tmp = Path(tempfile.mkdtemp(prefix="robustness-bench-"))
    bundle = args.bundle or _tiny_bundle(tmp)
    result: dict[str, Any] = {"quick": args.quick, "bundle": str(bundle), "cpus": os.cpu_count(), "logs": str(tmp)}
    t0 = time.monotonic()
    result["fuzz"] = run_fuzz(bundle, tmp, requests, args.seed)
    result["recovery"] = run_recovery(bundle, tmp)
    result["soak"] = run_soak(bundle, tmp, args.agents, args.streams_per_agent, soak_s, args.rate)
    result["seconds"] = round(time.monotonic() - t0, 1)
    result["load_average"] = os.getloadavg()[0]
    f, r, s = result["fuzz"], result["recovery"], result["soak"]
    summary = {
        "fuzz_requests": f["fuzz_requests"], "internal_errors": f["internal_errors"],
        "rss_growth_mb": f["rss_growth_mb"], "ok_nonfinite": f["ok_nonfinite"],
        "fuzz_answers_correct": not f["answer_problems"] and all(f["alive"].values()),
        "lost": r["lost"] + s["lost"], "recovery_s_after_link": r["recovery_s_after_link"],
        "soak_errors": s["soak_errors"], "soak_p99_ms": s["p99_ms"], "soak_p50_ms": s["p50_ms"],
        "soak_streams": s["streams"], "soak_seconds": s["seconds"], "soak_rss_growth_mb": s["rss_growth_mb"],
        "soak_rss_mb": s["rss_mb"], "quick": args.quick,
    }
    result["summary"] = summary
    md = _markdown(summary, result)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "robustness.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "robustness.md").write_text(md)
    print(md)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
