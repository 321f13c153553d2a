"""Prometheus metrics of one server, in its own registry (two servers in a process never collide).

Naming (README "Metrics"): ``edgeexit_*`` is what every OIP server counts (the agent's and serve's),
``edgeexit_server_*`` the cloud service's queue and compute, ``edgeexit_agent_*`` the device agent
(runtime/agent.py); ``process_*``/``python_*`` come from prometheus_client's standard collectors. Counters end in
``_total``, units are seconds and bytes, and every label takes values from a set fixed by the code or the
bundle (a model a client names but we do not serve counts as ``<unknown>``).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, GCCollector, Histogram, PlatformCollector, ProcessCollector

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServerMetrics:
    """Requests by model and status code, latency, batch sizes, queue and compute time, errors by code, and the
    process (resident memory, CPU seconds, open fds, start time; Python GC and version)."""

    def __init__(self, prefix: str = "edgeexit"):
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_*: reads /proc at scrape time (nothing on Windows/macOS)
        PlatformCollector(registry=self.registry)  # python_info
        GCCollector(registry=self.registry)  # python_gc_* (registers nothing where gc.get_stats is missing)
        self.requests = Counter(f"{prefix}_requests", "Inference requests by model and gRPC status code",
                                ["model", "code"], registry=self.registry)
        self.errors = Counter(f"{prefix}_errors", "Failed inference requests by gRPC status code",
                              ["code"], registry=self.registry)
        self.latency = Histogram(f"{prefix}_request_seconds", "Inference request latency in the server",
                                 ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram(f"{prefix}_batch_size", "Requests run together in one batch",
                                    ["model"], buckets=BATCH_BUCKETS, registry=self.registry)
        self.dropped = Counter(f"{prefix}_server_dropped", "Requests refused or dropped before compute, by reason "
                               "(overloaded: queue full; deadline: the client's deadline passed while queued)",
                               ["reason"], registry=self.registry)
        self.queue = Histogram(f"{prefix}_server_queue_seconds", "Time a request waited in the service: from its "
                               "handler receiving it (decoding included) until its batch started running",
                               ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.compute = Histogram(f"{prefix}_server_compute_seconds", "Run time of the batch a request ran in "
                                 "(shared by its batch-mates)", ["model"], buckets=LATENCY_BUCKETS,
                                 registry=self.registry)
        self._http = None

    def observe_request(self, model: str, code: str, seconds: float) -> None:
        self.requests.labels(model=model, code=code).inc()
        self.latency.labels(model=model).observe(seconds)
        if code != "OK":
            self.errors.labels(code=code).inc()

    def observe_batch(self, model: str, requests: int) -> None:
        self.batch_size.labels(model=model).observe(requests)

    def observe_drop(self, reason: str) -> None:
        self.dropped.labels(reason=reason).inc()

    def observe_timing(self, model: str, queue_s: float, compute_s: float) -> None:
        """One served request's time in the queue and in compute (the numbers of edgeexit.queue_us/compute_us)."""
        self.queue.labels(model=model).observe(queue_s)
        self.compute.labels(model=model).observe(compute_s)

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """The sum of the samples called ``name`` whose labels include ``labels`` (0 when none): for tests and
        benchmarks, so ``value("edgeexit_agent_rows_total", {"decided": "cloud"})`` sums over exits."""
        want = (labels or {}).items()
        return float(sum(s.value for metric in self.registry.collect() for s in metric.samples
                         if s.name == name and want <= s.labels.items()))

    def serve_http(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve /metrics over HTTP on ``port`` (0 picks one); returns the bound port."""
        from prometheus_client import start_http_server

        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return int(server.server_address[1])

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
