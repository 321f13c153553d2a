"""A real gRPC (HTTP/2, one long-lived connection) channel through the relay: delay, outages on the open
connection, and recovery — the way the device agent talks to the cloud service."""

from __future__ import annotations

import time
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from edgeexit.testbed.netsim import LinkConditions, Relay


@pytest.fixture
def grpc_server():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield ("127.0.0.1", port)
    server.stop(0)


def _check(stub, timeout: float, wait_for_ready: bool = False) -> float:
    t = time.monotonic()
    stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout, wait_for_ready=wait_for_ready)
    return time.monotonic() - t


def test_grpc_through_delay_blackhole_and_reset(grpc_server):
    with Relay(grpc_server, LinkConditions(delay_ms=30)) as relay:
        host, port = relay.address
        with grpc.insecure_channel(f"{host}:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            _check(stub, 5, wait_for_ready=True)  # connect
            assert _check(stub, 5) >= 0.060  # one RPC = one round trip on the open HTTP/2 connection

            relay.outage(1.0, mode="blackhole")
            with pytest.raises(grpc.RpcError) as stalled:
                _check(stub, 0.4)
            assert stalled.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            time.sleep(0.7)
            assert _check(stub, 5) < 1.0  # same connection, back to normal
            assert relay.stats.connections == 1

            relay.outage(0.8, mode="reset")
            time.sleep(0.1)
            with pytest.raises(grpc.RpcError) as reset:
                _check(stub, 0.5)
            assert reset.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            assert relay.stats.connections_reset == 1
            time.sleep(0.8)
            _check(stub, 5, wait_for_ready=True)  # the channel reconnects once the link is back
            assert relay.stats.connections >= 2
