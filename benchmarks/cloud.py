"""Cloud benchmark (issue 12 §7): `edgeexit serve` with batching off and on, and Triton, under N device streams.

    .venv/bin/python benchmarks/cloud.py [--quick] [--rounds 5] [--seconds 5] [--streams 16,32,64] [--no-triton]

The default run takes about 8 minutes (45 conditions of ~7 s, plus start-up); --quick about 1.5 minutes.

Workload: the tail of the camera model (artifacts/camera_resnet.edgeexit) after the split the planner offloads
at for a Raspberry Pi 4 on wifi (its best `split@k/int8` candidate; `--split` overrides), fed with real
wire requests: Fashion-MNIST-96 test images run through the head, encoded INT8 by runtime/codec.py exactly as
the agent sends them, batch 1 per request. Every stream is one device (its own connection) in a closed loop;
the streams run as threads in `--processes` separate load processes (edgeexit.testbed.cloud_load).

Servers, each a real process started once and kept for the whole run:
- serve-off: `edgeexit serve BUNDLE --max-batch-size 1`
- serve-on:  `edgeexit serve BUNDLE --max-batch-size 32 --max-batch-delay-ms 2`
- triton:    `edgeexit triton-repo BUNDLE --encoding int8` + `edgeexit triton REPO` (python backend, dynamic
             batching); skipped with the reason when those commands or the server are not installed.
Both serve processes get `--workers 64` (a request needs a handler thread to be batched at all).

Rounds: each round runs every server x streams condition for `--seconds` (after `--warmup` s not measured),
in a freshly shuffled order. Per condition: throughput (answers/s), p50/p99 latency, errors; medians over
rounds. Ratios come with a 95% bootstrap interval over rounds (rounds resampled jointly: paired).

Client and server share this machine's cores: the figures are contention-bound, and the ratios, not the
absolute numbers, are the result. Writes benchmarks/results/cloud.{json,md,png}; the last stdout line is one
JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
CAMERA = ROOT / "artifacts" / "camera_resnet.edgeexit"
SERVE_ARGS = {"serve-off": ["--max-batch-size", "1"],
              "serve-on": ["--max-batch-size", "32", "--max-batch-delay-ms", "2"]}
WORKERS = "64"
THREADS = "1"  # onnxruntime intra-op threads per session, serve's default (and the Triton repository's)


# ---------------------------------------------------------------- workload
def planner_split(bundle: Path, device: str, network: str) -> tuple[int, str]:
    """The split the planner would offload at: its fastest `split@k/int8` candidate (and that candidate's label)."""
    from edgeexit.bundle import Bundle
    from edgeexit.plan_report import load_profiles
    from edgeexit.planner import Planner
    from edgeexit.profiles import load_device_class, load_network

    b = Bundle.load(bundle)
    dev, cloud = load_profiles(b, load_device_class(device), None, None)
    plan = Planner(b.manifest, dev, cloud).plan(load_network(network), "latency")
    splits = sorted((c for c in plan.candidates if c.strategy == "split" and c.encoding == "int8"),
                    key=lambda c: c.latency_ms)
    if not splits:
        raise SystemExit(f"the planner offers no int8 split for {bundle}; pass --split")
    return int(splits[0].split), f"{splits[0].label} (planner's overall choice: {plan.choice.label})"


def wire_requests(bundle: Path, split: int, rows: int = 64) -> tuple[str, str, list]:
    """(model name, input name, INT8 wire tensors of `rows` test images' boundary at `split`, batch 1 each)."""
    from edgeexit import datasets
    from edgeexit.bundle import Bundle
    from edgeexit.runtime import codec
    from edgeexit.runtime.runner import SegmentRunner

    runner = SegmentRunner(bundle)
    sp = runner.manifest.split_points[split]
    x, _ = datasets.load("fashion-mnist-96", "test", limit=rows)
    head = runner.run(runner.normalize(x.astype(np.float32)), 0, split + 1).boundary
    wires = [codec.encode(head[i:i + 1], "int8", sp.quantization) for i in range(rows)]
    return f"{Bundle.load(bundle).name}@{split}", sp.tensor.name, wires


def compute_per_row(bundle: Path, split: int, wires: list, sizes: tuple[int, ...] = (1, 32)) -> dict:
    """The tail's onnxruntime time per row at each batch size, one thread, in this process, nothing else of
    ours running: how much batching can save in compute at all (per-request overheads aside)."""
    from edgeexit.runtime import codec
    from edgeexit.runtime.runner import SegmentRunner

    runner = SegmentRunner(bundle, threads=int(THREADS))
    rows = np.concatenate([codec.decode(w.data, w.datatype, w.shape, w.params) for w in wires])
    out = {}
    for b in sizes:
        x = np.resize(rows, (b, *rows.shape[1:]))
        runner.run(x, split + 1)
        reps = max(3, 64 // b)
        t = time.perf_counter()
        for _ in range(reps):
            runner.run(x, split + 1)
        out[str(b)] = round((time.perf_counter() - t) / reps / b * 1e3, 3)
    return out


# ---------------------------------------------------------------- servers
class Triton:
    """`edgeexit triton REPO` as a process of its own session (so a stop also ends its tritonserver child)."""

    def __init__(self, bundle: Path, work: Path):
        self.popen: subprocess.Popen | None = None
        self.bundle, self.work = bundle, work
        self.target = ""
        self.metrics_url: str | None = None

    @staticmethod
    def _help(cmd: str) -> str | None:
        p = subprocess.run([sys.executable, "-m", "edgeexit", cmd, "--help"], capture_output=True, text=True,
                           cwd=ROOT, timeout=120)
        return p.stdout if p.returncode == 0 else None

    def start(self) -> str | None:
        """Start it; None when ready, else the reason it is unavailable."""
        from edgeexit.runtime.client import InferenceClient
        from edgeexit.testbed.harness import free_port

        repo_help, run_help = self._help("triton-repo"), self._help("triton")
        if repo_help is None or run_help is None:
            return "`edgeexit triton-repo` / `edgeexit triton` are not in this checkout yet"
        repo = self.work / "triton-repo"
        args = ["triton-repo", str(self.bundle), "--out", str(repo)]
        for flag, value in (("--encoding", "int8"), ("--max-batch-size", "32"), ("--force", None)):
            if flag in repo_help:
                args += [flag] + ([value] if value else [])
        p = subprocess.run([sys.executable, "-m", "edgeexit", *args], capture_output=True, text=True, cwd=ROOT,
                           timeout=600)
        if p.returncode != 0:
            return f"`edgeexit {' '.join(args)}` failed: {(p.stderr or p.stdout).strip()[-400:]}"
        ports = {"--grpc-port": free_port()}
        ports.update({f: free_port() for f in ("--http-port", "--metrics-port") if f in run_help})
        self.target = f"127.0.0.1:{ports['--grpc-port']}"
        if "--metrics-port" in ports:
            self.metrics_url = f"http://127.0.0.1:{ports['--metrics-port']}/metrics"
        log = open(self.work / "triton.log", "w")  # noqa: SIM115  kept open for the process's life
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "edgeexit", "triton", str(repo), *[str(a) for kv in ports.items() for a in kv]],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 180
        with InferenceClient(self.target) as c:
            while time.monotonic() < deadline:
                if self.popen.poll() is not None:
                    return f"`edgeexit triton` exited {self.popen.returncode}: {self._tail()}"
                if c.ready(1.0):
                    return None
                time.sleep(0.5)
        self.stop()
        return f"Triton was not ready after 180 s: {self._tail()}"

    def _tail(self) -> str:
        path = self.work / "triton.log"
        return path.read_text()[-400:].strip() if path.exists() else ""

    def stop(self) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.terminate()
        try:
            self.popen.wait(40)  # Triton takes ~4 s to exit after SIGTERM
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, 9)  # our own session: the CLI and the tritonserver it started
            self.popen.wait()


# ---------------------------------------------------------------- statistics
def _median(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(np.median(xs)) if xs else None


def summarise(runs: dict, servers: list[str], streams: list[int]) -> list[dict]:
    rows = []
    for s in servers:
        for n in streams:
            rs = runs[(s, n)]
            rows.append({"server": s, "streams": n, "throughput_rps": round(_median([r["rps"] for r in rs]), 2),
                         "p50_ms": _round(_median([r["p50_ms"] for r in rs])),
                         "p99_ms": _round(_median([r["p99_ms"] for r in rs])),
                         "errors": sum(r["errors"] for r in rs), "answers": sum(r["answers"] for r in rs),
                         "mean_batch": _median([r["mean_batch"] for r in rs]),
                         "per_round_rps": [round(r["rps"], 2) for r in rs]})
    return rows


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


# ---------------------------------------------------------------- outputs
def markdown(result: dict) -> str:
    from edgeexit.reports import fmt, markdown_table

    h, w = result["summary"], result["workload"]

    def ci(key: str) -> str:
        r = result["ratios"].get(key)
        return "-" if r is None else f"{r['value']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"

    quick = " -- QUICK RUN (1 round, 2 s): a check that it works, not a result" if result["quick"] else ""
    lines = [f"# Cloud serving: {w['model']} ({w['split_label']}){quick}\n",
             f"Requests: {w['encoding']} boundary {w['boundary_shape']} ({w['request_bytes']} B), batch 1, "
             f"closed loop, one connection per stream, streams spread over "
             f"{result['load']['processes']} load processes. "
             f"{result['rounds']} round(s) x {result['seconds_per_condition']} s per condition "
             f"({result['warmup_s']} s warm-up excluded), order shuffled per round; medians over rounds; "
             "[lo, hi] = 95% bootstrap interval over rounds.\n",
             f"**Contention-bound**: {result['machine']}. Load generator and server(s) share them, so the absolute "
             "figures are low and noisy; the ratios are the result.\n",
             "| figure | value | goal |", "|---|---:|---|",
             f"| batching_throughput_gain (serve on/off, 32 streams) | {ci('batching_throughput_gain')} | >= 3 |",
             f"| triton_over_serve_throughput (32 streams) | {ci('triton_over_serve_throughput')} | - |",
             f"| p99_ms_at_64 (serve on) | {fmt(h['p99_ms_at_64'])} | - |",
             f"| errors | {h['errors']} | 0 |\n"]
    pr = result["tail_compute_ms_per_row_by_batch"]
    lines.append("The tail's compute per row (onnxruntime, 1 thread, measured here before the servers started): "
                 + ", ".join(f"batch {b}: {ms:.2f} ms" for b, ms in pr.items())
                 + ": the most batching can save in compute; the rest of any gain is per-request overhead.\n")
    if result.get("triton_unavailable"):
        lines.append(f"Triton not measured: {result['triton_unavailable']}\n")
    lines.append(markdown_table(["server", "streams", "answers/s", "p50 ms", "p99 ms", "errors", "mean batch",
                                 "per round answers/s"],
                                [[r["server"], str(r["streams"]), r["throughput_rps"], r["p50_ms"], r["p99_ms"],
                                  str(r["errors"]), r["mean_batch"],
                                  ", ".join(f"{x:.0f}" for x in r["per_round_rps"])]
                                 for r in result["conditions"]], left=1))
    lines.append("\nmean batch: requests per batch run by the server (its /metrics; Triton: requests per model "
                 "execution) over the whole condition, warm-up included.")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    from edgeexit.reports import figure

    servers = list(dict.fromkeys(r["server"] for r in result["conditions"]))
    with figure(path, 2, size=(10, 4), title=f"{result['workload']['model']}: CONTENTION-BOUND "
                f"({result['machine']})") as (ax_t, ax_l):
        for k, s in enumerate(servers):  # one colour per server in both panels
            rs = [r for r in result["conditions"] if r["server"] == s]
            x, c = [r["streams"] for r in rs], f"C{k}"
            ax_t.plot(x, [r["throughput_rps"] for r in rs], marker="o", color=c, label=s)
            ax_l.plot(x, [r["p99_ms"] for r in rs], marker="o", color=c, label=f"{s} p99")
            ax_l.plot(x, [r["p50_ms"] for r in rs], marker=".", linestyle=":", color=c, label=f"{s} p50")
        ax_t.set(xlabel="concurrent device streams", ylabel="answers/s (median over rounds)")
        ax_l.set(xlabel="concurrent device streams", ylabel="latency ms", yscale="log")
        ax_t.legend(fontsize=7)
        ax_l.legend(fontsize=6)


# ---------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=CAMERA)
    ap.add_argument("--split", type=int, help="split point (default: the planner's int8 split, see --device)")
    ap.add_argument("--device", default="raspberry-pi-4", help="device class the split is planned for")
    ap.add_argument("--network", default="wifi", help="network the split is planned for")
    ap.add_argument("--streams", default="16,32,64", help="comma-separated stream counts")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=5.0, help="measured seconds per condition and round")
    ap.add_argument("--warmup", type=float, default=1.5, help="seconds of load before each measurement")
    ap.add_argument("--processes", type=int, default=4, help="load generator processes")
    ap.add_argument("--no-triton", action="store_true", help="measure edgeexit serve only")
    ap.add_argument("--quick", action="store_true", help="1 round, 2 s per condition, 1 s warm-up: does it work")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.seconds, args.warmup = 1, 2.0, 1.0
    if not args.bundle.is_dir():
        raise SystemExit(f"{args.bundle} is missing: build it with `make artifacts/.camera-ready`")
    from edgeexit.testbed.cloud_load import COUNTERS, LoadGenerator, mean_batch, ratio_ci, scrape
    from edgeexit.testbed.harness import free_port, launch

    streams = [int(s) for s in args.streams.split(",")]
    if args.split is None:
        split, label = planner_split(args.bundle, args.device, args.network)
    else:
        split, label = args.split, f"split@{args.split}/int8 (--split)"
    model, input_name, wires = wire_requests(args.bundle, split)
    work = Path(tempfile.mkdtemp(prefix="cloud-bench-"))
    per_row = compute_per_row(args.bundle, split, wires)
    print(f"workload {model} ({label}); logs in {work}", file=sys.stderr)
    procs, triton, unavailable, metrics = {}, None, None, {}
    load = LoadGenerator(args.processes)
    try:
        for name, extra in SERVE_ARGS.items():
            port = free_port()
            procs[name] = launch(name, ["serve", str(args.bundle), "--port", "0", "--workers", WORKERS,
                                        "--threads", THREADS, "--metrics-port", str(port), *extra], work)
            metrics[name] = (f"http://127.0.0.1:{port}/metrics", COUNTERS["serve"])
        targets = {name: p.target for name, p in procs.items()}
        if args.no_triton:
            unavailable = "--no-triton"
        else:
            triton = Triton(args.bundle, work)
            unavailable = triton.start()
            if unavailable is None:
                targets["triton"] = triton.target
                metrics["triton"] = (triton.metrics_url, COUNTERS["triton"])
            else:
                print(f"Triton unavailable: {unavailable}", file=sys.stderr)
        servers = list(targets)
        conditions = [(s, n) for s in servers for n in streams]
        runs: dict = {c: [] for c in conditions}
        rng = random.Random(args.seed)
        for s in servers:  # once, not measured: sessions, allocators and connections warm before round 1
            load.run(targets[s], model, input_name, wires, max(streams), args.warmup, args.warmup)
        for rnd in range(args.rounds):
            rng.shuffle(conditions)
            for s, n in conditions:
                before = scrape(metrics[s][0], model, *metrics[s][1])
                r = load.run(targets[s], model, input_name, wires, n, args.seconds, args.warmup)
                runs[(s, n)].append({"rps": r.throughput, "p50_ms": r.percentile(50), "p99_ms": r.percentile(99),
                                     "errors": r.error_count, "error_types": r.errors, "answers": r.answers,
                                     "late_streams": r.late_streams,
                                     "mean_batch": mean_batch(before, scrape(metrics[s][0], model, *metrics[s][1]))})
                print(f"round {rnd + 1}/{args.rounds} {s:9s} {n:3d} streams: {r.throughput:7.1f}/s "
                      f"p50 {r.percentile(50) or 0:.1f} ms p99 {r.percentile(99) or 0:.1f} ms "
                      f"errors {r.errors or 0}" + (f" ({r.late_streams} streams late)" if r.late_streams else ""),
                      file=sys.stderr)
        exit_codes = {name: p.stop() for name, p in procs.items()}
    finally:
        load.close()
        for p in procs.values():
            p.stop()
        if triton is not None:
            triton.stop()

    rows = summarise(runs, servers, streams)
    at = {(r["server"], r["streams"]): r for r in rows}
    rps = {c: [x["rps"] for x in v] for c, v in runs.items()}
    ratios: dict = {}
    if 32 in streams:
        ratios["batching_throughput_gain"] = ratio_ci(rps[("serve-on", 32)], rps[("serve-off", 32)], args.seed)
        if "triton" in servers:
            ratios["triton_over_serve_throughput"] = ratio_ci(rps[("triton", 32)], rps[("serve-on", 32)], args.seed)
    errors = sum(r["errors"] for r in rows)
    summary = {
        "batching_throughput_gain": ratios.get("batching_throughput_gain", {}).get("value"),
        "triton_over_serve_throughput": ratios.get("triton_over_serve_throughput", {}).get("value"),
        "triton_unavailable": unavailable if "triton" not in servers else None,
        "p99_ms_at_64": at.get(("serve-on", 64), {}).get("p99_ms"),
        "errors": errors, "rounds": args.rounds, "seconds_per_condition": args.seconds,
        "split": split, "encoding": "int8", "model": model, "cpus": os.cpu_count(),
    }
    w0 = wires[0]
    result = {
        "summary": summary, "ratios": ratios, "conditions": rows, "rounds": args.rounds,
        "seconds_per_condition": args.seconds, "warmup_s": args.warmup, "quick": args.quick,
        "machine": f"{os.cpu_count()} CPU cores in all, shared by the load generator and the server(s)",
        "load": {"processes": load.processes, "closed_loop": True, "connection_per_stream": True},
        "load_average_after": os.getloadavg()[0], "server_exit_codes": exit_codes,
        "tail_compute_ms_per_row_by_batch": per_row,
        "triton_unavailable": summary["triton_unavailable"],
        "servers": {s: (["serve", "--workers", WORKERS, "--threads", THREADS, *SERVE_ARGS[s]] if s in SERVE_ARGS else
                        ["triton-repo --encoding int8", "triton (python backend, dynamic batching)"])
                    for s in servers},
        "workload": {"bundle": str(args.bundle), "model": model, "split": split, "split_label": label,
                     "encoding": "int8", "boundary_shape": list(w0.shape), "request_bytes": len(w0.data),
                     "distinct_requests": len(wires), "data": "fashion-mnist-96 test"},
        "raw": {f"{s}/{n}": v for (s, n), v in runs.items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    md = markdown(result)
    (args.out / "cloud.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "cloud.md").write_text(md)
    plot(result, args.out / "cloud.png")
    print(md)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
