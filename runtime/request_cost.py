"""The fixed cost of one request on a role, outside segment compute, measured on real servers on loopback
(torch-free).

The planner adds it per request (``LatencyProfile.request_ms``): every request pays the device's request path,
offloaded ones the cloud's too. Kept apart from ``profiling`` because it starts an agent, whose runtime may
itself profile the bundle.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import grpc
import numpy as np

from edgeexit.errors import ConfigError
from edgeexit.runtime import codec
from edgeexit.runtime.agent import Agent, AgentOptions
from edgeexit.runtime.client import InferenceClient
from edgeexit.runtime.device import DeviceOptions
from edgeexit.runtime.oip_messages import params_from_pb
from edgeexit.runtime.oip_server import ServerOptions, build_server
from edgeexit.runtime.profiling import sample_inputs
from edgeexit.runtime.proto import grpc_service_pb2 as pb
from edgeexit.runtime.proto import grpc_service_pb2_grpc as pb_grpc
from edgeexit.runtime.runner import SegmentRunner
from edgeexit.runtime.service import ServiceOptions, build_handlers

ROLES = ("device", "cloud")


def measure_request_ms(runner: SegmentRunner, role: str, repeats: int = 30, warmup: int = 5) -> float:
    """Median fixed cost of one one-row request on ``role``, outside the compute the server reports.

    device: an in-process agent (device-only, never exits early) called with a raw gRPC stub, as an app on the
    device calls it; round trip minus the agent's ``edgeexit.device_us``. cloud: an in-process service called
    on ``<model>`` with the raw input as the device sends it; round trip minus ``edgeexit.queue_us`` +
    ``compute_us``. Both on 127.0.0.1, so the figure is gRPC, (de)serialisation and request handling only.
    """
    if role not in ROLES:
        raise ConfigError(f"role {role!r}: choose one of {ROLES}")
    x, extras = sample_inputs(runner, 1, np.random.default_rng(0))  # token ids: every input, as the app sends
    if x.dtype == np.float32:
        # Pixels on the 8-bit grid, as cameras and our data sets give: the cloud role then gets UINT8 like cloud-only.
        x = np.rint(x * 255).astype(np.float32) / 255
    inputs = {runner.manifest.input.name: x, **(extras or {})}
    call = _device_call if role == "device" else _cloud_call
    overheads = []
    with call(runner, inputs) as one:
        for r in range(-warmup, repeats):
            t = time.perf_counter()
            server_ms = one()
            if r >= 0:
                overheads.append((time.perf_counter() - t) * 1e3 - server_ms)
    return max(0.0, float(np.median(overheads)))


@contextmanager
def _device_call(runner: SegmentRunner, inputs: dict[str, np.ndarray]) -> Iterator[Callable[[], float]]:
    """One request to a real agent; the call returns the compute the agent reports (ms)."""
    dev = DeviceOptions(backend=runner.backend, fmt=runner.fmt, threads=runner.threads, policy="never",
                        split="device")
    agent = Agent(runner.bundle.root, AgentOptions(dev, listen="127.0.0.1:0", grace_s=1.0)).start()
    req = pb.ModelInferRequest(model_name=runner.manifest.name)
    for name, a in inputs.items():
        req.inputs.add(name=name, datatype=codec.AS_IS[a.dtype.name], shape=list(a.shape))
        req.raw_input_contents.append(a.tobytes())
    limit = 64 << 20  # like the runtime's client: big inputs must not hit gRPC's 4 MB default
    channel = grpc.insecure_channel(agent.target, options=[("grpc.max_receive_message_length", limit),
                                                           ("grpc.max_send_message_length", limit)])
    stub = pb_grpc.GRPCInferenceServiceStub(channel)

    def one() -> float:
        params = params_from_pb(stub.ModelInfer(req, timeout=60).parameters)
        return int(params["edgeexit.device_us"]) / 1000.0

    try:
        yield one
    finally:
        channel.close()
        agent.stop()


@contextmanager
def _cloud_call(runner: SegmentRunner, inputs: dict[str, np.ndarray]) -> Iterator[Callable[[], float]]:
    """One request to a real service's whole model, through the device's own client; returns queue + compute."""
    handlers = build_handlers(runner.bundle, ServiceOptions(runner.backend, runner.threads, fmt=runner.fmt))
    handle = build_server(handlers, ServerOptions(port=0)).start()
    client = InferenceClient(handle.target)
    first, *rest = inputs.items()
    wire = codec.encode_input(first[1]) if not rest and first[1].dtype == np.float32 else codec.encode_as_is(first[1])
    extra = [(n, codec.encode_as_is(a)) for n, a in rest]

    def one() -> float:
        out = client.infer(runner.manifest.name, first[0], wire, timeout=60, **({"extra": extra} if extra else {}))
        if out.server is None:
            raise RuntimeError("the in-process service reported no queue/compute time")  # ours always does
        return out.server.total_s * 1e3

    try:
        yield one
    finally:
        client.close()
        handle.stop(1.0)
