"""Prometheus metrics of one server, in its own registry (two servers in a process never collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServerMetrics:
    """Requests by model and status code, latency, batch sizes and errors by code."""

    def __init__(self, prefix: str = "edgeexit"):
        self.registry = CollectorRegistry()
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

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """One sample's current value (0 when absent): for tests and benchmarks."""
        got = self.registry.get_sample_value(name, labels or {})
        return float(got or 0.0)

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
