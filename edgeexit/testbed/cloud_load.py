"""Closed-loop load from many simulated devices against an OIP v2 server, generated in separate processes.

Each *stream* is one device: its own gRPC channel (a local subchannel pool, so its own TCP connection, as a
real device's agent has), sending its next request as soon as the previous one answers. Streams run as
threads inside a few long-lived worker processes, so the client side is not one GIL; the processes stay up
across conditions and receive one job at a time over a pipe (no process start-up inside a measurement).

A job has a shared schedule in ``time.monotonic()`` (one clock for every process on Linux): warm-up from
``begin`` to ``t0`` (not measured), measurement from ``t0`` to ``t1``. An answer counts when it arrives
inside [t0, t1]; streams stop sending at ``t1`` and let their last request finish.

The request is built exactly as ``edgeexit.runtime.client.InferenceClient.infer`` builds it (the agent's
offload): one input with the codec's datatype and shape, ``raw_input_contents``, and the codec's parameters
(``edgeexit.scale`` / ``edgeexit.zero_point`` for INT8) as request parameters. A failed call is counted by
its gRPC status, never raised: the benchmark reports errors, it does not stop at the first.

Also here: reading a server's batch counters from its /metrics page, and the bootstrap interval of a ratio
over rounds, which the cloud benchmark reports.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeexit.runtime.codec import WireTensor

BOOTS = 4000  # bootstrap resamples of the rounds
READY_TIMEOUT_S = 120.0  # a load process's start-up (imports) on a busy machine
START_SLACK_S = 0.3  # between sending the jobs and the schedule's begin: every worker has its job by then


@dataclass
class LoadResult:
    """One condition's answers, merged over the worker processes."""

    streams: int
    seconds: float  # measured window
    answers: int  # answers that arrived inside the window
    latencies_ms: np.ndarray  # of those answers
    errors: dict[str, int] = field(default_factory=dict)  # gRPC status -> count, warm-up and window
    warmup_answers: int = 0
    late_streams: int = 0  # streams that were not set up when the warm-up began (a machine too busy to start)

    @property
    def throughput(self) -> float:
        return self.answers / self.seconds

    def percentile(self, q: float) -> float | None:
        return float(np.percentile(self.latencies_ms, q)) if len(self.latencies_ms) else None

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def _stream(target: str, model: str, input_name: str, tensors: list[tuple], job: dict, offset: int,
            out: list) -> None:
    import grpc

    from edgeexit.runtime.oip_messages import params_to_pb
    from edgeexit.runtime.proto import grpc_service_pb2 as pb
    from edgeexit.runtime.proto import grpc_service_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(target, options=[
        ("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20),
        ("grpc.use_local_subchannel_pool", 1)])  # a connection of its own, like a separate device
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    requests = []
    for data, datatype, shape, params in tensors:
        req = pb.ModelInferRequest(model_name=model)
        req.inputs.add(name=input_name, datatype=datatype, shape=list(shape))
        req.raw_input_contents.append(data)
        params_to_pb(params, req.parameters)
        requests.append(req)
    t0, t1, timeout = job["t0"], job["t1"], job["timeout"]
    lat: list[float] = []
    errors: dict[str, int] = {}
    warm = 0
    i = offset
    late = time.monotonic() > job["begin"]  # set up too slowly: its warm-up was cut short
    while time.monotonic() < job["begin"]:
        time.sleep(0.005)
    while (start := time.monotonic()) < t1:
        req = requests[i % len(requests)]
        i += 1
        try:
            stub.ModelInfer(req, timeout=timeout)
        except grpc.RpcError as e:
            name = e.code().name  # the server's status (RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, ...)
            errors[name] = errors.get(name, 0) + 1
            time.sleep(0.01)  # a failing server must not turn the loop into a busy spin
            continue
        end = time.monotonic()
        if t0 <= end <= t1:
            lat.append((end - start) * 1e3)
        elif end < t0:
            warm += 1
    channel.close()
    out.append((lat, errors, warm, late))


def _worker(conn: Any) -> None:
    """A load process: run each job it receives with one thread per stream, send back what they measured."""
    import grpc  # noqa: F401  imported before saying ready: no import inside a measurement

    from edgeexit.runtime.proto import grpc_service_pb2_grpc  # noqa: F401

    conn.send("ready")
    while True:
        job = conn.recv()
        if job is None:
            return
        out: list = []
        threads = [threading.Thread(target=_stream, args=(job["target"], job["model"], job["input_name"],
                                                          job["tensors"], job, job["first_stream"] + k, out),
                                    daemon=True) for k in range(job["streams"])]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        lat = [x for o in out for x in o[0]]
        errors: dict[str, int] = {}
        for o in out:
            for k, v in o[1].items():
                errors[k] = errors.get(k, 0) + v
        conn.send((lat, errors, sum(o[2] for o in out), sum(o[3] for o in out)))


class LoadGenerator:
    """``processes`` long-lived load processes; ``run`` spreads N streams over them for one condition."""

    def __init__(self, processes: int = 4):
        if processes < 1:
            raise ValueError("processes must be at least 1")
        ctx = mp.get_context("spawn")  # a fresh interpreter: no inherited gRPC state (fork is unsafe with it)
        self._pipes = []
        self._procs = []
        for i in range(processes):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(child,), name=f"cloud-load-{i}", daemon=True)
            p.start()
            self._pipes.append(parent)
            self._procs.append(p)
        for pipe, p in zip(self._pipes, self._procs, strict=True):
            if not pipe.poll(READY_TIMEOUT_S) or pipe.recv() != "ready":
                self.close()
                raise RuntimeError(f"load process {p.name} did not start within {READY_TIMEOUT_S:.0f} s")

    @property
    def processes(self) -> int:
        return len(self._procs)

    def run(self, target: str, model: str, input_name: str, tensors: list[WireTensor], streams: int,
            seconds: float, warmup_s: float, timeout_s: float = 30.0) -> LoadResult:
        """Closed-loop load from ``streams`` devices: warm-up, then ``seconds`` measured. Blocks until done."""
        wire = [(bytes(t.data), t.datatype, list(t.shape), dict(t.params)) for t in tensors]
        begin = time.monotonic() + START_SLACK_S
        t0 = begin + warmup_s
        sched = {"target": target, "model": model, "input_name": input_name, "tensors": wire,
                 "begin": begin, "t0": t0, "t1": t0 + seconds, "timeout": timeout_s}
        share = [streams // self.processes + (1 if i < streams % self.processes else 0)
                 for i in range(self.processes)]
        first = 0
        busy = []
        for pipe, n in zip(self._pipes, share, strict=True):
            if n:
                pipe.send({**sched, "streams": n, "first_stream": first})
                busy.append(pipe)
            first += n
        lat: list[float] = []
        errors: dict[str, int] = {}
        warm = late = 0
        for pipe in busy:
            got_lat, got_err, got_warm, got_late = pipe.recv()
            lat += got_lat
            warm += got_warm
            late += got_late
            for k, v in got_err.items():
                errors[k] = errors.get(k, 0) + v
        return LoadResult(streams, seconds, len(lat), np.asarray(lat, float), errors, warm, late)

    def close(self) -> None:
        for pipe in self._pipes:
            try:
                pipe.send(None)
            except OSError:
                pass
        for p in self._procs:
            p.join(10)
            if p.is_alive():
                p.terminate()
                p.join()

    def __enter__(self) -> LoadGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------- reading the results
def scrape(url: str | None, model: str, requests: str, batches: str) -> tuple[float, float] | None:
    """(requests, batches) counters of ``model`` from a Prometheus /metrics page; None when unreadable."""
    import urllib.request

    if url is None:
        return None
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    got = {requests: 0.0, batches: 0.0}
    for line in text.splitlines():
        name = line.split("{", 1)[0]
        if name in got and f'model="{model}"' in line:
            got[name] += float(line.rsplit(" ", 1)[1])
    return got[requests], got[batches]


# Per server: its /metrics counters of requests and of batches run (Triton: executions).
COUNTERS = {"serve": ("edgeexit_batch_size_sum", "edgeexit_batch_size_count"),
            "triton": ("nv_inference_request_success", "nv_inference_exec_count")}


def mean_batch(before: tuple | None, after: tuple | None) -> float | None:
    if before is None or after is None or after[1] <= before[1]:
        return None
    return round((after[0] - before[0]) / (after[1] - before[1]), 2)


def ratio_ci(num: list[float], den: list[float], seed: int) -> dict:
    """median(num) / median(den) with a 95% bootstrap interval, rounds resampled jointly (a round is a pair)."""
    a, b = np.asarray(num, float), np.asarray(den, float)
    value = float(np.median(a) / np.median(b))
    idx = np.random.default_rng(seed).integers(0, len(a), (BOOTS, len(a)))
    boots = np.median(a[idx], axis=1) / np.median(b[idx], axis=1)
    lo, hi = np.quantile(boots, [0.025, 0.975])
    return {"value": round(value, 4), "ci95": [round(float(lo), 4), round(float(hi), 4)], "rounds": len(a)}
