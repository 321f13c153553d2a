"""Agent cold start and memory: process start -> "ready on", and resident memory, with torch unimportable.

`measure(bundle, runs)` is importable (benchmarks/wire.py can merge its keys); run as a script it writes
benchmarks/results/agent_startup.json, prints a Markdown table and, as the last stdout line, one JSON object
with agent_cold_start_s (median of runs; goal <= 0.5) and agent_rss_mb (after ready and 20 requests;
goal <= 100). The agent points at a cloud address where nothing listens: start-up never contacts the cloud.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edgeexit.testbed.harness import free_port

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE = ROOT / "artifacts" / "camera_resnet.edgeexit"  # made by `make demo`


def _torchless_env(tmp: Path) -> dict[str, str]:
    fake = tmp / "torch"
    fake.mkdir(exist_ok=True)
    (fake / "__init__.py").write_text("raise ImportError('torch is blocked for this benchmark')\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp), os.environ.get("PYTHONPATH", "")]),
            "PYTHONUNBUFFERED": "1"}


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def _one_run(bundle: Path, env: dict[str, str], requests: int) -> tuple[float, float, float]:
    """(seconds to ready, RSS MB at ready, RSS MB after `requests` inferences)."""
    cmd = [sys.executable, "-m", "edgeexit", "agent", str(bundle), "--cloud", f"127.0.0.1:{free_port()}",
           "--split", "device", "--listen", "127.0.0.1:0"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        ready_s = time.perf_counter() - t0
        if "ready on" not in line:
            raise RuntimeError(f"agent did not start: {line!r} (exit {proc.wait(10)})")
        rss_ready = _rss_mb(proc.pid)
        target = line.split("ready on", 1)[1].strip()
        import tritonclient.grpc as tc

        from edgeexit.bundle import Bundle

        m = Bundle.load(bundle, verify=False).manifest
        shape = [int(d) for d in m.input.shape[1:]]
        client = tc.InferenceServerClient(target)
        x = np.random.default_rng(0).random((1, *shape), dtype=np.float32)
        for _ in range(requests):
            inp = tc.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            client.infer(m.name, [inp])
        client.close()
        return ready_s, rss_ready, _rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(15)


def measure(bundle: Path, runs: int = 5, requests: int = 20) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        env = _torchless_env(Path(tmp))
        rows = [_one_run(bundle, env, requests) for _ in range(runs)]
    return {
        "agent_cold_start_s": round(statistics.median(r[0] for r in rows), 3),
        "agent_cold_start_max_s": round(max(r[0] for r in rows), 3),
        "agent_rss_ready_mb": round(statistics.median(r[1] for r in rows), 1),
        "agent_rss_mb": round(statistics.median(r[2] for r in rows), 1),
        "runs": runs,
        "requests": requests,
    }


def _tiny_bundle(tmp: Path) -> Path:
    sys.path.insert(0, str(ROOT))
    from tests.fixtures_agent import _build_bundle

    return _build_bundle(tmp / "tiny.edgeexit")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=None,
                    help=f"bundle to serve (default {DEFAULT_BUNDLE.relative_to(ROOT)} if present, else a tiny one)")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle or (DEFAULT_BUNDLE if DEFAULT_BUNDLE.is_dir() else _tiny_bundle(Path(tmp)))
        result = {"bundle": bundle.name, **measure(bundle, args.runs)}
    out = ROOT / "benchmarks" / "results" / "agent_startup.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"Agent start-up ({result['bundle']}, torch blocked, median of {result['runs']} runs)\n")
    print("| metric | value | goal |\n|---|---|---|")
    print(f"| cold start: process start -> ready (s) | {result['agent_cold_start_s']} | <= 0.5 |")
    print(f"| cold start, worst run (s) | {result['agent_cold_start_max_s']} | |")
    print(f"| RSS at ready (MB) | {result['agent_rss_ready_mb']} | |")
    print(f"| RSS after {result['requests']} requests (MB) | {result['agent_rss_mb']} | <= 100 |")
    print(json.dumps({k: result[k] for k in ("agent_cold_start_s", "agent_rss_mb")}))


if __name__ == "__main__":
    main()
