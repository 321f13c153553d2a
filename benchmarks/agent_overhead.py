"""The agent's own tax: an app's device-only request through the agent vs bare onnxruntime (issue 14, parts 5-6).

Camera model (``artifacts/camera_resnet.edgeexit``), a real agent process (``edgeexit agent --split device``,
torch not imported), apps in this process talking to it over loopback gRPC with the generated OIP stub:

(a) ``agent_overhead_over_floor``: one batch-1 request's round trip (app -> agent -> app) over the floor =
    bare onnxruntime forward of the same model in this process (the bundle's segments chained with plain
    ``InferenceSession``s, same ``--threads``) + one empty gRPC round trip (``ServerLive`` to the same agent on the
    same channel). The three are interleaved request by request (ABCABC...); ratio of medians with a 95%
    bootstrap interval (each sample set resampled independently).
(b) ``agent_throughput_over_bare``: requests/s of 32 concurrent apps (one grpc.aio event loop, 32 requests always
    in flight) through an agent with ``--threads`` = cores, over bare onnxruntime throughput with 32 Python threads
    each calling the same bare sessions (``--threads`` = cores, onnxruntime's default options) for batch-1 inputs.
    That is the fair comparison: the agent's alternative is every app running the model itself on the same cores
    with onnxruntime as it comes. Context rows: a bare batch-32 run (what perfect batching reaches; on this model
    ~15% less CPU per row than batch 1), and bare threads with intra-op spinning off, as the agent opens its
    sessions (runtime/backends.py INTRA_OP_SPINNING): the agent's ratio against that is its pure overhead.
    Windows alternate agent/bare (ABAB...); ratio = median over rounds of the per-round ratio, bootstrap interval
    over rounds. The agent runs with its defaults (every request on its own gRPC thread, 4 workers); a second agent
    with ``--micro-batch-rows 32`` (concurrent requests micro-batched, two batches at a time: runtime/micro_batch.py)
    runs in the same rounds, so the table shows what micro-batching buys.

Both use the exit policy ``never`` by default (``--policy``): every segment runs for every request, so the agent
does exactly the bare forward's work and the ratios measure only the agent's cost (the calibrated policy would let
it skip segments and flatter it). Plus the agent's cold start and RSS with the camera bundle
(benchmarks/agent_startup.py). The last stdout line is the JSON of benchmarks/results/agent_overhead.json.

Real figures: ``.venv/bin/python benchmarks/agent_overhead.py`` with nothing else running (~4 min).
Smoke: ``--quick`` (~30 s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
DEFAULT_BUNDLE = ROOT / "artifacts" / "camera_resnet.edgeexit"
APPS = 32


def _bare_forward(bundle: Path, threads: int, spin: bool = True):
    """The bundle's segments chained with plain onnxruntime sessions (its defaults: intra-op threads spin)."""
    from edgeexit.bundle import Bundle

    b = Bundle.load(bundle, verify=False)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sessions = [ort.InferenceSession(str(b.segment_path(k, "onnx")), opts, providers=["CPUExecutionProvider"])
                for k in range(len(b.manifest.segments))]
    names = [s.get_inputs()[0].name for s in sessions]

    def forward(x: np.ndarray) -> None:
        for sess, name in zip(sessions, names, strict=True):
            x = sess.run(None, {name: x})[0]

    return forward, b.manifest


class AgentProcess:
    def __init__(self, bundle: Path, threads: int, policy: str, extra: list[str]):
        cmd = [sys.executable, "-m", "edgeexit", "agent", str(bundle), "--split", "device", "--listen",
               "127.0.0.1:0", "--threads", str(threads), *(["--policy", policy] if policy != "calibrated" else []),
               *extra]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        line = self.proc.stdout.readline()
        if "ready on" not in line:
            raise RuntimeError(f"agent did not start: {line!r}")
        self.target = line.split("ready on", 1)[1].strip()

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(15)


def _request(manifest, x: np.ndarray):
    from edgeexit.runtime.proto import grpc_service_pb2 as pb

    req = pb.ModelInferRequest(model_name=manifest.name)
    req.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    req.raw_input_contents.append(x.tobytes())
    return req


def _boot_ratio(num: list[float], den: list[float], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    a, b = np.asarray(num), np.asarray(den)
    r = [np.median(rng.choice(a, len(a))) / np.median(rng.choice(b, len(b))) for _ in range(n)]
    return float(np.percentile(r, 2.5)), float(np.percentile(r, 97.5))


def _boot_paired_floor(agent: list[float], bare: list[float], empty: list[float], n: int = 2000
                       ) -> tuple[float, float]:
    rng = np.random.default_rng(1)
    a, b, e = map(np.asarray, (agent, bare, empty))
    r = [np.median(rng.choice(a, len(a))) / (np.median(rng.choice(b, len(b))) + np.median(rng.choice(e, len(e))))
         for _ in range(n)]
    return float(np.percentile(r, 2.5)), float(np.percentile(r, 97.5))


def latency(bundle: Path, threads: int, policy: str, repeats: int, warmup: int = 20) -> dict:
    """(a): interleaved agent request / bare forward / empty gRPC call, batch 1."""
    from edgeexit.runtime.proto import grpc_service_pb2 as pb
    from edgeexit.runtime.proto import grpc_service_pb2_grpc as pb_grpc

    forward, manifest = _bare_forward(bundle, threads)
    shape = [1, *(int(d) for d in manifest.input.shape[1:])]
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    agent = AgentProcess(bundle, threads, policy, [])
    try:
        channel = grpc.insecure_channel(agent.target, options=[("grpc.max_receive_message_length", 64 << 20)])
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        req, live = _request(manifest, x), pb.ServerLiveRequest()
        steps = {"agent": lambda: stub.ModelInfer(req), "bare": lambda: forward(x),
                 "empty": lambda: stub.ServerLive(live)}
        times: dict[str, list[float]] = {k: [] for k in steps}
        for i in range(warmup + repeats):
            for name, fn in steps.items():
                t0 = time.perf_counter()
                fn()
                if i >= warmup:
                    times[name].append(time.perf_counter() - t0)
        channel.close()
    finally:
        agent.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    floor = med["bare"] + med["empty"]
    lo, hi = _boot_paired_floor(times["agent"], times["bare"], times["empty"])
    return {"agent_overhead_over_floor": round(med["agent"] / floor, 3), "overhead_ci": [round(lo, 3), round(hi, 3)],
            "agent_request_ms": round(med["agent"] * 1e3, 3), "bare_forward_ms": round(med["bare"] * 1e3, 3),
            "empty_grpc_ms": round(med["empty"] * 1e3, 3),
            "agent_minus_floor_ms": round((med["agent"] - floor) * 1e3, 3), "latency_repeats": repeats}


async def _agent_window(target: str, req, seconds: float, apps: int) -> float:
    from edgeexit.runtime.proto import grpc_service_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        done = 0
        stop = time.perf_counter() + seconds

        async def app() -> None:
            nonlocal done
            while time.perf_counter() < stop:
                await stub.ModelInfer(req)
                done += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(app() for _ in range(apps)))
        return done / (time.perf_counter() - t0)


def _bare_threads_window(forward, x: np.ndarray, seconds: float, apps: int) -> float:
    done = [0] * apps
    stop = time.perf_counter() + seconds

    def app(i: int) -> None:
        while time.perf_counter() < stop:
            forward(x)
            done[i] += 1

    threads = [threading.Thread(target=app, args=(i,)) for i in range(apps)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / (time.perf_counter() - t0)


def _bare_batched_window(forward, xb: np.ndarray, seconds: float) -> float:
    rows, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        forward(xb)
        rows += len(xb)
    return rows / (time.perf_counter() - t0)


def throughput(bundle: Path, threads: int, policy: str, rounds: int, seconds: float, extra: list[str]) -> dict:
    """(b): 32 apps through the agent vs 32 threads on bare sessions, alternating windows."""
    forward, manifest = _bare_forward(bundle, threads)
    quiet, _ = _bare_forward(bundle, threads, spin=False)
    shape = [1, *(int(d) for d in manifest.input.shape[1:])]
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    xb = np.repeat(x, APPS, axis=0)
    agent = AgentProcess(bundle, threads, policy, extra)
    single = AgentProcess(bundle, threads, policy, [*extra, "--micro-batch-rows", "32"])
    req = _request(manifest, x)
    agent_rps, single_rps, bare_rps, batched_rps, quiet_rps = [], [], [], [], []
    try:
        for a in (agent, single):  # warm-up
            asyncio.run(_agent_window(a.target, req, min(seconds, 1.0), APPS))
        _bare_threads_window(forward, x, min(seconds, 1.0), APPS)
        for _ in range(rounds):
            agent_rps.append(asyncio.run(_agent_window(agent.target, req, seconds, APPS)))
            bare_rps.append(_bare_threads_window(forward, x, seconds, APPS))
            single_rps.append(asyncio.run(_agent_window(single.target, req, seconds, APPS)))
            batched_rps.append(_bare_batched_window(forward, xb, seconds / 2))
            quiet_rps.append(_bare_threads_window(quiet, x, seconds / 2, APPS))
    finally:
        agent.close()
        single.close()
    ratios = [a / b for a, b in zip(agent_rps, bare_rps, strict=True)]
    single_ratios = [a / b for a, b in zip(single_rps, bare_rps, strict=True)]
    return {"agent_throughput_over_bare": round(statistics.median(ratios), 3),
            "throughput_ci": _boot_median(ratios),
            "microbatched_agent_throughput_over_bare": round(statistics.median(single_ratios), 3),
            "microbatched_ci": _boot_median(single_ratios),
            "agent_microbatched_rps": round(statistics.median(single_rps), 1),
            "agent_rps": round(statistics.median(agent_rps), 1),
            "bare_threads_rps": round(statistics.median(bare_rps), 1),
            "bare_batched32_rps": round(statistics.median(batched_rps), 1),
            "bare_threads_nospin_rps": round(statistics.median(quiet_rps), 1), "rounds": rounds, "window_s": seconds}


def _boot_median(values: list[float], n: int = 2000) -> list[float]:
    rng = np.random.default_rng(2)
    boot = [np.median(rng.choice(values, len(values))) for _ in range(n)]
    return [round(float(np.percentile(boot, 2.5)), 3), round(float(np.percentile(boot, 97.5)), 3)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    ap.add_argument("--policy", default="never", help="agent exit policy: never (default: same work as bare) or "
                    "calibrated (the bundle's own)")
    ap.add_argument("--repeats", type=int, default=300, help="batch-1 requests per variant in (a)")
    ap.add_argument("--rounds", type=int, default=8, help="agent/bare window pairs in (b)")
    ap.add_argument("--window-s", type=float, default=4.0, help="seconds per throughput window")
    ap.add_argument("--startup-runs", type=int, default=5)
    ap.add_argument("--agent-args", default="", help="extra agent flags for (b), e.g. '--workers 8'")
    ap.add_argument("--quick", action="store_true", help="smoke run: few repeats, short windows")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.rounds, args.window_s, args.startup_runs = 30, 2, 1.5, 1
    cores = os.cpu_count() or 1
    lat = latency(args.bundle, 1, args.policy, args.repeats)
    thr = throughput(args.bundle, cores, args.policy, args.rounds, args.window_s, args.agent_args.split())
    import agent_startup

    start = agent_startup.measure(args.bundle, args.startup_runs)
    result = {"bundle": args.bundle.name, "policy": args.policy, "cores": cores, **lat, **thr,
              "agent_cold_start_s": start["agent_cold_start_s"], "agent_rss_mb": start["agent_rss_mb"]}
    out = ROOT / "benchmarks" / "results" / "agent_overhead.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"Agent overhead ({result['bundle']}, real agent process, loopback gRPC, policy {args.policy}, "
          f"{cores} cores; no emulation)\n")
    print("| figure | value | 95% CI | goal |\n|---|---|---|---|")
    print(f"| agent request, batch 1 (ms) | {lat['agent_request_ms']} | | |")
    print(f"| bare onnxruntime forward, 1 thread (ms) | {lat['bare_forward_ms']} | | |")
    print(f"| empty gRPC round trip, ServerLive (ms) | {lat['empty_grpc_ms']} | | |")
    print(f"| agent / (bare + empty) | {lat['agent_overhead_over_floor']} | {lat['overhead_ci']} | <= 1.3 |")
    print(f"| agent, {APPS} apps, --threads {cores} (req/s) | {thr['agent_rps']} | | |")
    print(f"| agent, same, --micro-batch-rows 32 (req/s) | {thr['agent_microbatched_rps']} | | |")
    print(f"| bare, {APPS} threads on one session set (req/s) | {thr['bare_threads_rps']} | | |")
    print(f"| bare, batch {APPS} (rows/s, context) | {thr['bare_batched32_rps']} | | |")
    print(f"| bare, {APPS} threads, intra-op spinning off as in the agent (req/s, context) | "
          f"{thr['bare_threads_nospin_rps']} | | |")
    print(f"| agent / bare throughput | {thr['agent_throughput_over_bare']} | {thr['throughput_ci']} | >= 0.7 |")
    print(f"| micro-batched agent / bare throughput | {thr['microbatched_agent_throughput_over_bare']} | "
          f"{thr['microbatched_ci']} | |")
    print(f"| agent cold start (s) | {result['agent_cold_start_s']} | | <= 0.5 |")
    print(f"| agent RSS after 20 requests (MB) | {result['agent_rss_mb']} | | <= 100 |")
    keys = ("agent_overhead_over_floor", "overhead_ci", "agent_throughput_over_bare", "throughput_ci",
            "microbatched_agent_throughput_over_bare", "agent_request_ms", "bare_forward_ms", "empty_grpc_ms",
            "agent_rps", "agent_microbatched_rps", "bare_threads_rps", "bare_threads_nospin_rps",
            "bare_batched32_rps", "agent_cold_start_s", "agent_rss_mb")
    print(json.dumps({k: result[k] for k in keys}))


if __name__ == "__main__":
    main()
