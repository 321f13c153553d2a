"""Offload benchmark: one agent -> service offload round trip over gRPC vs the same bytes over a raw TCP socket.

    .venv/bin/python benchmarks/offload.py [--repeats 300] [--skip-4g] [--quick]

Both paths carry one 100 KB boundary tensor (FP32 [1, 25600]) and both do the same work around the wire:

- offload: ``codec.encode`` -> ``runtime/client.py`` ``InferenceClient.infer`` (the agent's client, one reused
  channel) -> a real ``edgeexit serve``-style server (``oip_server.build_server``) whose handler is the
  service's own ``TailHandler`` (``runtime/service.py``: bundle check, ``decode_input``, shape check, the
  dynamic batcher with batching off (``--max-batch-size 1``), timing parameters, finiteness check, the
  server's metrics) with
  compute skipped: its ``_run`` hook returns 10 zero logits instead of running a model (the null tail);
- tcp: ``codec.encode`` -> a length-prefixed frame to a small threaded TCP server that reads it, runs
  ``codec.decode`` on it (same datatype, shape, checks) and replies 40 bytes (10 float32 logits), which the
  client reads back as a numpy array;
- floor: an empty unary gRPC call (ServerLive) on the same channel: Python gRPC's fixed cost per call.

The three are interleaved (rotating order) on persistent connections; medians of ``--repeats`` rounds with 95%
bootstrap intervals (ratio: paired bootstrap over rounds). Then the same through the emulated 4g link
(``edgeexit.testbed.netsim.Relay``, devices/networks/4g.toml: 8/30 Mbit/s, 50 ms RTT, 10 ms jitter; one relay
per server; EMULATED, userspace relay on loopback). The last stdout line is one JSON object, also written to
benchmarks/results/offload.json.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgeexit.bundle import TensorSpec  # noqa: E402
from edgeexit.runtime import codec  # noqa: E402
from edgeexit.runtime.batching import BatchOptions, DynamicBatcher  # noqa: E402
from edgeexit.runtime.client import InferenceClient  # noqa: E402
from edgeexit.runtime.metrics import ServerMetrics  # noqa: E402
from edgeexit.runtime.oip_server import build_server  # noqa: E402
from edgeexit.runtime.proto import grpc_service_pb2 as pb  # noqa: E402
from edgeexit.runtime.service import ServiceOptions, TailHandler  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
ELEMENTS = 25_600  # FP32: 102,400 bytes
REPLY = 40  # bytes: 10 float32 logits
DIGEST = "ab" * 32  # the bundle digest both sides name (the agent sends it with every request)
MODEL = "null@0"
# Idle time before each call through the emulated link. The relay (netsim/pipe.py) counts a full 64 KiB read as
# available since its connection's link went idle (a backlogged sender on a busy CPU), so a call right after
# another on the same connection gets less of that credit than one after a pause: without equal pauses the
# order of the interleaving decides the ratio (measured: offload after the empty call +6 ms, after tcp 1.06).
GAP_4G_S = 0.1


class NullTail(TailHandler):
    """The service's TailHandler for a [batch, 25600] boundary with compute skipped (``_run`` answers zeros)."""

    def __init__(self, metrics: ServerMetrics) -> None:  # no bundle: what TailHandler.infer uses, set by hand
        options = ServiceOptions(batching=BatchOptions(max_batch_size=1))
        self.start, self.name = 1, MODEL
        self.input_spec = TensorSpec("boundary0", ["batch", ELEMENTS])
        self.exits = [0]
        self.max_rows, self.max_bytes = options.max_batch_rows, options.max_message_bytes
        self.version, self.metrics = DIGEST, metrics  # the server's metrics, as build_handlers wires them
        self.batcher = DynamicBatcher(self._run, options.batching, lambda n: metrics.observe_batch(self.name, n),
                                      name=self.name, on_drop=metrics.observe_drop)

    def _run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return {"exit0": np.zeros((len(x), 10), np.float32)}


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if not k:
            raise ConnectionError("peer closed")
        got += k
    return buf


def tcp_server() -> tuple[socket.socket, int]:
    """Length-prefixed FP32 [1, ELEMENTS] frames in, ``codec.decode`` (as the service does), 40 bytes out."""
    srv = socket.create_server(("127.0.0.1", 0))

    def handle(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:
                (n,) = struct.unpack("!I", _recv_exact(conn, 4))
                x = codec.decode(bytes(_recv_exact(conn, n)), "FP32", [1, ELEMENTS], {})
                conn.sendall(np.zeros((x.shape[0], 10), np.float32).tobytes())
        except (ConnectionError, OSError):
            conn.close()

    def accept() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return srv, srv.getsockname()[1]


def bootstrap(values: np.ndarray, rng: np.random.Generator, boots: int = 2000) -> tuple[float, float]:
    med = np.median(values[rng.integers(0, len(values), (boots, len(values)))], axis=1)
    return float(np.quantile(med, 0.025)), float(np.quantile(med, 0.975))


def paired_ratio(num: np.ndarray, den: np.ndarray, rng: np.random.Generator, boots: int = 2000
                 ) -> tuple[float, float, float]:
    """median(num) / median(den) with a paired bootstrap interval (rounds resampled together)."""
    idx = rng.integers(0, len(num), (boots, len(num)))
    ratios = np.median(num[idx], axis=1) / np.median(den[idx], axis=1)
    return (float(np.median(num) / np.median(den)), float(np.quantile(ratios, 0.025)),
            float(np.quantile(ratios, 0.975)))


def measure(grpc_target: str, tcp_addr: tuple[str, int], repeats: int, warmup: int, gap_s: float = 0.0
            ) -> dict[str, np.ndarray]:
    """Interleaved rounds of (offload, tcp, floor) in rotating order; seconds per call, each after ``gap_s`` idle."""
    x = np.random.default_rng(0).random((1, ELEMENTS), dtype=np.float32)
    client = InferenceClient(grpc_target, bundle=DIGEST)
    live = client._channel.unary_unary("/inference.GRPCInferenceService/ServerLive",  # same channel
                                       request_serializer=pb.ServerLiveRequest.SerializeToString,
                                       response_deserializer=pb.ServerLiveResponse.FromString)
    sock = socket.create_connection(tcp_addr)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    empty = pb.ServerLiveRequest()

    def offload() -> None:
        out = client.infer(MODEL, "boundary0", codec.encode(x), timeout=30)
        assert out["exit0"].shape == (1, 10)

    def tcp() -> None:
        wire = codec.encode(x)
        sock.sendall(struct.pack("!I", len(wire.data)) + wire.data)
        out = np.frombuffer(_recv_exact(sock, REPLY), np.float32).reshape(1, 10)
        assert out.shape == (1, 10)

    def floor() -> None:
        live(empty, timeout=30)

    calls: dict[str, Callable[[], None]] = {"offload": offload, "tcp": tcp, "floor": floor}
    names = list(calls)
    for _ in range(warmup):
        for f in calls.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in names}
    try:
        for i in range(repeats):
            for k in names[i % 3:] + names[:i % 3]:
                if gap_s:
                    time.sleep(gap_s)
                t = time.perf_counter()
                calls[k]()
                times[k].append(time.perf_counter() - t)
    finally:
        client.close()
        sock.close()
    return {k: np.asarray(v) for k, v in times.items()}


def run_condition(label: str, repeats: int, warmup: int, link: object | None, gap_s: float = 0.0) -> dict:
    metrics = ServerMetrics()
    server = build_server([NullTail(metrics)], metrics=metrics).start()
    srv, port = tcp_server()
    relays = []
    try:
        grpc_target, tcp_addr = server.target, ("127.0.0.1", port)
        if link is not None:
            from edgeexit.testbed.netsim import Relay

            relays = [Relay(("127.0.0.1", server.port), link).__enter__(),
                      Relay(("127.0.0.1", port), link).__enter__()]
            grpc_target = "{}:{}".format(*relays[0].address)
            tcp_addr = relays[1].address
        t = measure(grpc_target, tcp_addr, repeats, warmup, gap_s)
    finally:
        for r in relays:
            r.__exit__(None, None, None)
        srv.close()
        server.stop(0)
    rng = np.random.default_rng(1)
    row: dict = {"condition": label, "repeats": repeats}
    for k, v in t.items():
        lo, hi = bootstrap(v * 1e3, rng)
        row[f"{k}_ms"], row[f"{k}_ci_ms"] = float(np.median(v) * 1e3), (lo, hi)
    row["offload_over_tcp"] = paired_ratio(t["offload"], t["tcp"], rng)
    row["floor_over_tcp"] = paired_ratio(t["floor"], t["tcp"], rng)
    row["offload_minus_floor_over_tcp"] = float((np.median(t["offload"]) - np.median(t["floor"]))
                                                / np.median(t["tcp"]))
    return row


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=300, help="interleaved rounds on loopback (default 300)")
    p.add_argument("--repeats-4g", type=int, default=150, help="interleaved rounds through emulated 4g (default 150)")
    p.add_argument("--skip-4g", action="store_true", help="loopback only")
    p.add_argument("--no-jitter", action="store_true", help="4g without its jitter: the relay draws jitter per read, "
                   "so a transfer in more writes (gRPC's frames) ends later on average than one sendall")
    p.add_argument("--quick", action="store_true", help="smoke run: 30 rounds loopback, 8 through 4g")
    a = p.parse_args(argv)
    if a.quick:
        a.repeats, a.repeats_4g = 30, 8
    rows = [run_condition("loopback", a.repeats, 30, None)]
    if not a.skip_4g:
        from edgeexit.profiles import load_network
        from edgeexit.testbed.netsim import LinkConditions

        net = load_network("4g")
        jitter = 0.0 if a.no_jitter else net.jitter_ms / 2
        link = LinkConditions(delay_ms=net.rtt_ms / 2, jitter_ms=jitter, up_mbit=net.up_mbit, down_mbit=net.down_mbit)
        rows.append(run_condition(f"4g (emulated{', no jitter' if a.no_jitter else ''})", a.repeats_4g, 3, link,
                                  gap_s=GAP_4G_S))
    print("| condition | offload ms | tcp ms | empty gRPC ms | offload/tcp [95% CI] | floor/tcp |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ratio, lo, hi = r["offload_over_tcp"]
        print(f"| {r['condition']} | {r['offload_ms']:.3f} | {r['tcp_ms']:.3f} | {r['floor_ms']:.3f} | "
              f"{ratio:.2f} [{lo:.2f}, {hi:.2f}] | {r['floor_over_tcp'][0]:.2f} |")
    loop = rows[0]
    result = {
        "offload_over_tcp_loopback": round(loop["offload_over_tcp"][0], 3),
        "offload_over_tcp_loopback_ci": [round(v, 3) for v in loop["offload_over_tcp"][1:]],
        "offload_over_tcp_4g": round(rows[1]["offload_over_tcp"][0], 3) if len(rows) > 1 else None,
        "offload_over_tcp_4g_ci": [round(v, 3) for v in rows[1]["offload_over_tcp"][1:]] if len(rows) > 1 else None,
        "grpc_empty_call_ms": round(loop["floor_ms"], 4),
        "grpc_floor_over_tcp": round(loop["floor_over_tcp"][0], 3),
        "offload_ms": round(loop["offload_ms"], 4),
        "tcp_ms": round(loop["tcp_ms"], 4),
        "offload_4g_ms": round(rows[1]["offload_ms"], 3) if len(rows) > 1 else None,
        "tcp_4g_ms": round(rows[1]["tcp_ms"], 3) if len(rows) > 1 else None,
        "tensor_bytes": ELEMENTS * 4,
        "null_tail": "service TailHandler, batching off, _run hook answers zeros (no model)",
        "link_4g": (f"emulated: userspace relay, devices/networks/4g.toml{', jitter off' if a.no_jitter else ''}"
                    if len(rows) > 1 else None),
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "offload.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
