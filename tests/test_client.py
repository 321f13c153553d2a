"""The offload client maps every failure to the edgeexit error the device runtime acts on."""

from __future__ import annotations

import socket

import numpy as np
import pytest

from edgeexit.errors import InvalidTensor, LinkTimeout, OffloadError, PeerUnavailable
from edgeexit.runtime import codec
from edgeexit.runtime.client import InferenceClient
from edgeexit.runtime.oip_server import build_server
from tests.fixtures_service import SlowHandler


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_service_is_peer_unavailable():
    client = InferenceClient(f"127.0.0.1:{_closed_port()}")
    assert client.ready(0.5) is False
    with pytest.raises(PeerUnavailable, match="UNAVAILABLE"):
        client.infer("m@0", "boundary0", codec.encode(np.zeros((1, 2), np.float32)), timeout=2)
    client.close()


def test_deadline_is_link_timeout():
    server = build_server([SlowHandler(1.0)]).start()
    try:
        with InferenceClient(server.target) as client, pytest.raises(LinkTimeout, match="deadline"):
            client.infer("slow", "x", codec.encode(np.zeros(2, np.float32)), timeout=0.2)
    finally:
        server.stop(2)


def test_server_errors_keep_the_servers_message(serve, service_bundle, boundary_batch):
    from edgeexit.bundle import Bundle

    name = Bundle.load(service_bundle).name
    server = serve()
    x = boundary_batch(0, 1)
    with InferenceClient(server.target) as client:
        assert client.ready()
        with pytest.raises(InvalidTensor, match="needs .* bytes"):
            bad = codec.encode(x)
            bad.data = bad.data[:-4]
            client.infer(f"{name}@0", "boundary0", bad, timeout=5)
        with pytest.raises(OffloadError, match="NOT_FOUND.*not served here") as e:
            client.infer(f"{name}@42", "boundary0", codec.encode(x), timeout=5)
        assert not isinstance(e.value, PeerUnavailable | LinkTimeout)
        out = client.infer(f"{name}@0", "boundary0", codec.encode(x, "fp16", compress=True), timeout=5,
                           request_id="abc")
        assert all(v.dtype == np.float32 and v.shape[0] == 1 for v in out.values())


def test_large_boundary_tensor_above_grpc_default_limit():
    """A 6 MB tensor travels (gRPC's default would refuse anything above 4 MB) and returns intact."""
    from edgeexit.runtime.oip_messages import InferResponse, ModelMetadata, TensorMeta

    class Echo:
        name = "echo"

        def metadata(self):
            return ModelMetadata("echo", [TensorMeta("x", "FP32", [-1])], [TensorMeta("x", "FP32", [-1])])

        def ready(self):
            return True

        def infer(self, request):
            t = request.inputs["x"]
            return InferResponse({"x": codec.decode(t.data, t.datatype, t.shape)})

    server = build_server([Echo()]).start()
    try:
        x = np.random.default_rng(0).random(1_500_000, dtype=np.float32)
        with InferenceClient(server.target) as client:
            np.testing.assert_array_equal(client.infer("echo", "x", codec.encode(x), timeout=20)["x"], x)
    finally:
        server.stop(1)
