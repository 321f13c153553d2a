"""Fixtures for the protocol, OIP server, cloud service and client tests.

``service_bundle`` is ``tiny_bundle`` (tests/fixtures_bundles.py: a real export with calibrated int8
boundary parameters). ``pki`` is a throwaway CA with server and client certificates made by ``openssl``;
``serve`` starts real servers on 127.0.0.1:0.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from edgeexit.runtime import codec
from edgeexit.runtime.batching import BatchOptions
from edgeexit.runtime.metrics import ServerMetrics
from edgeexit.runtime.oip_messages import InferRequest, InferResponse, ModelMetadata, TensorMeta
from edgeexit.runtime.oip_server import ServerHandle, ServerOptions, build_server
from edgeexit.runtime.service import ServiceOptions, build_handlers


@pytest.fixture(scope="session")
def service_bundle(tiny_bundle) -> Path:
    return Path(tiny_bundle)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _make_ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", cwd=d)


def _make_leaf(d: Path, name: str, ca: str, ext: str) -> None:
    (d / f"{name}.ext").write_text(ext)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", cwd=d)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=d)


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> dict[str, str]:
    """Paths: ca, server_cert/key (for 127.0.0.1 and localhost), client_cert/key, rogue_ca, rogue_client_*."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("pki")
    _make_ca(d, "ca")
    _make_ca(d, "rogue")
    _make_leaf(d, "server", "ca", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    _make_leaf(d, "client", "ca", "extendedKeyUsage=clientAuth\n")
    _make_leaf(d, "rogueclient", "rogue", "extendedKeyUsage=clientAuth\n")
    p = {n: str(d / f"{n}.pem") for n in ("ca", "server", "client", "rogue", "rogueclient")}
    return {
        "ca": p["ca"], "server_cert": p["server"], "server_key": str(d / "server.key"),
        "client_cert": p["client"], "client_key": str(d / "client.key"), "rogue_ca": p["rogue"],
        "rogue_client_cert": p["rogueclient"], "rogue_client_key": str(d / "rogueclient.key"),
    }


StartService = Callable[..., ServerHandle]


@pytest.fixture
def serve(service_bundle) -> Iterator[StartService]:
    """``serve(server_options=..., batching=...)`` starts the bundle's service; all stop at teardown."""
    started: list[ServerHandle] = []

    def start(server_options: ServerOptions | None = None, batching: BatchOptions | None = None,
              bundle: Path | None = None) -> ServerHandle:
        metrics = ServerMetrics()
        opts = ServiceOptions(batching=batching or BatchOptions(max_batch_size=1))
        handlers = build_handlers(bundle or service_bundle, opts, metrics)
        handle = build_server(handlers, server_options or ServerOptions(), metrics).start()
        started.append(handle)
        return handle

    yield start
    for h in started:
        h.stop(0.5)


@pytest.fixture
def boundary_batch(service_bundle) -> Callable[[int, int], np.ndarray]:
    """``boundary_batch(split, rows)``: a real boundary tensor, computed by the bundle's head on raw inputs."""
    from edgeexit.runtime.runner import SegmentRunner

    runner = SegmentRunner(service_bundle)
    shape = [int(d) for d in runner.manifest.input.shape[1:]]

    def make(split: int, rows: int = 4, seed: int = 0) -> np.ndarray:
        x = np.random.default_rng(seed).random((rows, *shape), dtype=np.float32)
        return runner.run(runner.normalize(x), 0, split + 1).boundary

    return make


class SlowHandler:
    """A real handler that takes ``delay`` seconds: makes in-flight requests observable during shutdown."""

    name = "slow"

    def __init__(self, delay: float):
        self.delay, self.started = delay, threading.Event()

    def metadata(self) -> ModelMetadata:
        return ModelMetadata("slow", [TensorMeta("x", "FP32", [-1])], [TensorMeta("y", "FP32", [-1])])

    def ready(self) -> bool:
        return True

    def infer(self, request: InferRequest) -> InferResponse:
        self.started.set()
        time.sleep(self.delay)
        t = request.inputs["x"]
        return InferResponse({"y": codec.decode(t.data, t.datatype, t.shape) + 1})
