"""Wire benchmark: gRPC offload overhead vs plain TCP, dynamic batching throughput, int8 boundary cost.

    .venv/bin/python benchmarks/wire.py [--bundle B.edgeexit] [--seconds 3] [--skip-int8] [--skip-agent]

- grpc_over_tcp: median time of one offload of a ~100 KB FP32 tensor through the real OIP server, client and
  codec on loopback, divided by the median time of sending the same bytes over a plain TCP socket to a tiny
  server that reads them and replies with 40 bytes (the size of 10 logits). Compute is removed by design, not
  subtracted: the server's handler decodes and validates the tensor exactly as the service does, then returns
  10 zero logits ("identity-ish tail"). Both connections are persistent; the two are interleaved.
- batching_throughput_gain: requests/s of 32 concurrent clients (one row each, split 0 of the bundle) against
  `edgeexit serve` processes with --max-batch-size 32 vs 1, interleaved rounds.
- int8_bytes_ratio / int8_accuracy_drop_pp: at the bundle's chosen split (the first split point), int8 boundary
  bytes / fp32, and the Fashion-MNIST test accuracy (final exit, every sample offloaded) with fp32 vs int8
  boundaries. Needs a trained model: artifacts/resnet_exits.pt2 (`make demo` trains it) or --model.
- agent_cold_start_s / agent_rss_mb: benchmarks/agent_startup.measure, when present.

Writes benchmarks/results/wire.json and wire.md, prints Markdown; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgeexit.runtime import codec  # noqa: E402
from edgeexit.runtime.client import InferenceClient  # noqa: E402
from edgeexit.runtime.oip_messages import InferResponse, ModelMetadata, TensorMeta  # noqa: E402
from edgeexit.runtime.oip_server import build_server  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TRAINED_MODEL = ROOT / "artifacts" / "resnet_exits.pt2"
REPLY = 40  # bytes: 10 float32 logits


# ---------------------------------------------------------------- grpc_over_tcp
class NullTail:
    """Decodes and validates like the service, then answers 10 zero logits: the wire cost without compute."""

    name = "null@0"

    def metadata(self) -> ModelMetadata:
        return ModelMetadata(self.name, [TensorMeta("boundary0", "FP32", [-1, -1])], [TensorMeta("exit0", "FP32",
                                                                                                   [-1, 10])])

    def ready(self) -> bool:
        return True

    def infer(self, request):
        t = request.inputs["boundary0"]
        x = codec.decode(t.data, t.datatype, t.shape, {**request.params, **t.params})
        return InferResponse({"exit0": np.zeros((x.shape[0], 10), np.float32)})


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(1 << 20, n - len(buf)))
        if not chunk:
            raise ConnectionError("peer closed")
        buf += chunk
    return bytes(buf)


def _tcp_server() -> tuple[socket.socket, int]:
    srv = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                while True:
                    (n,) = struct.unpack("!I", _recv_exact(conn, 4))
                    _recv_exact(conn, n)
                    conn.sendall(bytes(REPLY))
            except (ConnectionError, OSError):
                conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return srv, srv.getsockname()[1]


def grpc_over_tcp(n: int = 300) -> dict:
    x = np.random.default_rng(0).random((1, 25600), dtype=np.float32)  # 102400 bytes
    wire = codec.encode(x)
    server = build_server([NullTail()]).start()
    srv, port = _tcp_server()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client = InferenceClient(server.target)
    frame = struct.pack("!I", len(wire.data)) + wire.data

    def tcp_once() -> float:
        t = time.perf_counter()
        sock.sendall(frame)
        _recv_exact(sock, REPLY)
        return time.perf_counter() - t

    def grpc_once() -> float:
        t = time.perf_counter()
        client.infer("null@0", "boundary0", wire, timeout=10)
        return time.perf_counter() - t

    def empty_rpc_once() -> float:  # the fixed cost of one Python gRPC call, for the record
        t = time.perf_counter()
        client.ready(5)
        return time.perf_counter() - t

    for _ in range(30):  # warm both paths (connections, allocators)
        tcp_once()
        grpc_once()
    floor = statistics.median(empty_rpc_once() for _ in range(n))
    tcp, grpc_t = [], []
    for i in range(n):  # interleaved, alternating which goes first
        a, b = (tcp_once, grpc_once) if i % 2 == 0 else (grpc_once, tcp_once)
        ra, rb = a(), b()
        (tcp if a is tcp_once else grpc_t).append(ra)
        (grpc_t if a is tcp_once else tcp).append(rb)
    client.close()
    sock.close()
    srv.close()
    server.stop(1)
    t_med, g_med = statistics.median(tcp), statistics.median(grpc_t)
    return {"tensor_bytes": len(wire.data), "tcp_median_ms": t_med * 1e3, "grpc_median_ms": g_med * 1e3,
            "grpc_over_tcp": g_med / t_med, "samples": n, "compute": "none (decode-only handler)",
            "grpc_empty_rpc_median_ms": floor * 1e3}


# ---------------------------------------------------------------- batching
def _spawn_serve(bundle: Path, max_batch: int) -> tuple[subprocess.Popen, str]:
    args = [sys.executable, "-m", "edgeexit", "serve", str(bundle), "--port", "0", "--workers", "48",
            "--max-batch-size", str(max_batch), "--max-batch-delay-ms", "2"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:
        if line.startswith("ready on "):
            return proc, line.split("ready on ", 1)[1].strip()
    raise RuntimeError(f"edgeexit serve exited {proc.wait()}")


def _throughput(target: str, model: str, x: np.ndarray, clients: int, seconds: float) -> float:
    wire = codec.encode(x)
    stubs = [InferenceClient(target) for _ in range(clients)]
    for c in stubs:
        c.infer(model, "boundary0", wire, timeout=30)
    counts = [0] * clients
    stop = time.monotonic() + seconds
    barrier = threading.Barrier(clients + 1)

    def worker(i: int) -> None:
        barrier.wait()
        while time.monotonic() < stop:
            stubs[i].infer(model, "boundary0", wire, timeout=30)
            counts[i] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.monotonic()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    for c in stubs:
        c.close()
    return sum(counts) / elapsed


def batching_gain(bundle: Path, clients: int = 32, seconds: float = 3.0, rounds: int = 2) -> dict:
    from edgeexit.bundle import Bundle
    from edgeexit.runtime.runner import SegmentRunner

    runner = SegmentRunner(bundle)
    m = runner.manifest
    shape = [int(d) for d in m.input.shape[1:]]
    x = runner.run(runner.normalize(np.random.default_rng(0).random((1, *shape), dtype=np.float32)), 0, 1).boundary
    model = f"{Bundle.load(bundle).name}@0"
    on, off = [], []
    procs = {mb: _spawn_serve(bundle, mb) for mb in (32, 1)}
    try:
        for _ in range(rounds):
            on.append(_throughput(procs[32][1], model, x, clients, seconds))
            off.append(_throughput(procs[1][1], model, x, clients, seconds))
    finally:
        for proc, _ in procs.values():
            proc.terminate()
            proc.wait(20)
    return {"clients": clients, "seconds_per_round": seconds, "rounds": rounds,
            "rps_batching_on": statistics.median(on), "rps_batching_off": statistics.median(off),
            "batching_throughput_gain": statistics.median(on) / statistics.median(off),
            "boundary_shape": list(x.shape)}


# ---------------------------------------------------------------- int8 on a trained model
def int8_cost(model_path: Path, work: Path) -> dict:
    from edgeexit import datasets
    from edgeexit.exporters import ExportOptions, export_model
    from edgeexit.runtime.runner import SegmentRunner

    bundle_dir = work / "wire_int8.edgeexit"
    if not bundle_dir.exists():
        export_model(str(model_path), bundle_dir, options=ExportOptions(calibration_data="fashion-mnist",
                                                                        progress=False, force=True))
    runner = SegmentRunner(bundle_dir)
    m = runner.manifest
    split = m.split_points[0]
    x, y = datasets.load("fashion-mnist", "test")
    correct = {"fp32": 0, "int8": 0}
    last = len(m.exits) - 1
    for i in range(0, len(x), 500):
        head = runner.run(runner.normalize(x[i:i + 500].astype(np.float32)), 0, split.index + 1).boundary
        for enc in correct:
            w = codec.encode(head, enc, split.quantization)
            b = codec.decode(w.data, w.datatype, w.shape, w.params)
            logits = runner.run(b, start=split.index + 1).exits[last]
            correct[enc] += int((logits.argmax(1) == y[i:i + 500]).sum())
    acc = {k: 100.0 * v / len(x) for k, v in correct.items()}
    return {"split": split.index, "int8_bytes_ratio": split.bytes_per_sample["int8"] / split.bytes_per_sample["fp32"],
            "accuracy_fp32_pct": acc["fp32"], "accuracy_int8_pct": acc["int8"],
            "int8_accuracy_drop_pp": acc["fp32"] - acc["int8"], "test_samples": len(x)}


def _tiny_bundle(tmp: Path) -> Path:
    from tests.fixtures_bundles import TinyResNet, digits_28, make_bundle, seeded

    return make_bundle(tmp, seeded(TinyResNet()), split_points="exits", calibration_data=digits_28(300))


def _markdown(rows: list[tuple[str, str, str]]) -> str:
    lines = ["| metric | value | goal |", "|---|---|---|"]
    lines += [f"| {k} | {v} | {g} |" for k, v, g in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, help="bundle for batching (default: a tiny seeded bundle)")
    ap.add_argument("--model", type=Path, default=TRAINED_MODEL, help="trained .pt2 for the int8 keys")
    ap.add_argument("--seconds", type=float, default=3.0, help="seconds per throughput round")
    ap.add_argument("--skip-int8", action="store_true")
    ap.add_argument("--skip-agent", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="wire-bench-"))
    bundle = args.bundle or _tiny_bundle(tmp)
    result: dict = {"load_average": os.getloadavg()[0], "cpus": os.cpu_count()}
    result["grpc"] = grpc_over_tcp()
    result["batching"] = batching_gain(bundle, seconds=args.seconds)
    summary = {"grpc_over_tcp": round(result["grpc"]["grpc_over_tcp"], 3),
               "batching_throughput_gain": round(result["batching"]["batching_throughput_gain"], 3),
               "int8_bytes_ratio": None, "int8_accuracy_drop_pp": None,
               "agent_cold_start_s": None, "agent_rss_mb": None}
    if not args.skip_int8 and args.model.is_file():
        result["int8"] = int8_cost(args.model, ROOT / "artifacts")
        summary["int8_bytes_ratio"] = round(result["int8"]["int8_bytes_ratio"], 4)
        summary["int8_accuracy_drop_pp"] = round(result["int8"]["int8_accuracy_drop_pp"], 3)
    elif not args.skip_int8:
        result["int8"] = {"skipped": f"{args.model} missing; run `make demo` (trains it) or pass --model"}
    if not args.skip_agent:
        try:
            from benchmarks.agent_startup import measure

            result["agent"] = measure(bundle)
            summary["agent_cold_start_s"] = result["agent"].get("agent_cold_start_s")
            summary["agent_rss_mb"] = result["agent"].get("agent_rss_mb")
        except ImportError:
            result["agent"] = {"skipped": "benchmarks/agent_startup.py is not there"}
    result["summary"] = summary
    g, b = result["grpc"], result["batching"]
    rows = [
        ("grpc_over_tcp", f"{summary['grpc_over_tcp']} ({g['grpc_median_ms']:.3f} ms gRPC vs "
                          f"{g['tcp_median_ms']:.3f} ms TCP, {g['tensor_bytes']} B)", "<= 1.3"),
        ("batching_throughput_gain", f"{summary['batching_throughput_gain']} ({b['rps_batching_on']:.0f} vs "
                                     f"{b['rps_batching_off']:.0f} req/s, {b['clients']} clients)", ">= 3"),
        ("int8_bytes_ratio", str(summary["int8_bytes_ratio"]), "<= 0.26"),
        ("int8_accuracy_drop_pp", str(summary["int8_accuracy_drop_pp"]), "<= 0.3"),
        ("agent_cold_start_s", str(summary["agent_cold_start_s"]), "<= 0.5"),
        ("agent_rss_mb", str(summary["agent_rss_mb"]), "<= 100"),
    ]
    md = _markdown(rows) + f"\n\nload average {result['load_average']:.1f} on {result['cpus']} CPUs\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "wire.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "wire.md").write_text(md)
    print(md)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
