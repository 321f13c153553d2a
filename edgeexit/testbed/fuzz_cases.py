"""Seeded mutations of Open Inference Protocol ModelInferRequests, for the fuzz runner (``fuzz.py``).

A case starts from a valid request for one of a bundle's models (``base_requests``), then changes it at the
protobuf level (model names, datatypes, shapes with huge/negative/zero dims, parameters of every type incl.
NaN/inf doubles and bools for edgeexit.scale/zero_point/compression, raw contents truncated/extended/
zstd-bombed, input counts) and/or at the byte level (bit flips, truncation, insertion on the serialized
message). Every case is a pure function of (seed, index): a failing case can be rebuilt alone by its index.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edgeexit.bundle import BATCH, Manifest
from edgeexit.runtime import codec
from edgeexit.runtime.proto import grpc_service_pb2 as pb

PB = pb.ModelInferRequest
INT64_MAX, INT64_MIN = 2**63 - 1, -(2**63)
HUGE_DIMS = [2**62, 2**63 - 1, 2**40, 2**31, 2**32 + 1, 10_000, 1_000_000, 3_037_000_500]
ODD_DATATYPES = ["", "FP64", "BOOL", "BYTES", "INT64", "INT32", "UINT8", "INT8", "FP16", "FP32", "fp32",
                 "UINT64", "BF16", "x" * 300]
DOUBLES = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1e308, -1e308, 5e-324, 1e-45, 2.0**62, -1.0, 0.5, 3e38]
INT64S = [0, -1, 1, 127, -128, 255, 2**62, INT64_MAX, INT64_MIN, 2**31]
STRINGS = ["", "zstd", "gzip", "ZSTD", "1.0", "nan", "inf", "-3", "\x00", "é" * 50, "z" * 20_000]
PARAM_KEYS = [codec.P_SCALE, codec.P_ZERO, codec.P_COMPRESSION, "edgeexit.split", "edgeexit.queue_us",
              "priority", "timeout", "k" * 5000]


@dataclass(frozen=True)
class Base:
    """A valid request for one model of a target, and what its rows look like."""

    target: str  # "serve" or "agent"
    request: bytes  # serialized valid ModelInferRequest
    rows: int
    row_bytes: int  # uncompressed bytes of one row in its datatype
    inner_shape: tuple[int, ...]  # the shape without the batch axis


@dataclass(frozen=True)
class Case:
    index: int
    target: str
    payload: bytes  # the serialized (maybe broken) request, sent as is
    label: str  # the mutations applied, "+"-joined ("valid" for an unmutated probe)
    valid: bool = False


def _inner(shape: list[int | str]) -> tuple[int, ...]:
    return tuple(int(d) for d in shape if d != BATCH)


def _request(model: str, name: str, datatype: str, arr: np.ndarray, params: dict | None = None) -> PB:
    req = PB(model_name=model, id="fuzz")
    req.inputs.add(name=name, datatype=datatype, shape=list(arr.shape))
    req.raw_input_contents.append(arr.tobytes())
    for k, v in (params or {}).items():
        if isinstance(v, str):
            req.parameters[k].string_param = v
        elif isinstance(v, float):
            req.parameters[k].double_param = v
        else:
            req.parameters[k].int64_param = int(v)
    return req


def base_requests(manifest: Manifest, rows: int = 2, seed: int = 0) -> list[Base]:
    """Valid requests: for serve every model name in every wire encoding; for the agent its FP32/FP16 input."""
    rng = np.random.default_rng(seed)
    name, inp = manifest.name, manifest.input
    shape = (rows, *_inner(inp.shape))
    pixels = rng.random(shape, dtype=np.float32)
    out: list[Base] = []

    def add(target: str, req: PB, row_bytes: int, inner: tuple[int, ...]) -> None:
        out.append(Base(target, req.SerializeToString(), rows, row_bytes, inner))

    n_in = int(np.prod(shape[1:]))
    add("serve", _request(name, inp.name, "FP32", pixels), 4 * n_in, shape[1:])
    add("serve", _request(name, inp.name, "UINT8", (pixels * 255).astype(np.uint8)), n_in, shape[1:])
    for sp in manifest.split_points:
        inner = _inner(sp.tensor.shape)
        b = rng.standard_normal((rows, *inner), dtype=np.float32)
        n = int(np.prod(inner))
        model = f"{name}@{sp.index}"
        add("serve", _request(model, sp.tensor.name, "FP32", b), 4 * n, inner)
        fp16 = codec.encode(b, "fp16", compress=True)
        req = _request(model, sp.tensor.name, "FP16", b.astype(np.float16), fp16.params)
        req.raw_input_contents[0] = fp16.data
        add("serve", req, 2 * n, inner)
        if sp.quantization:
            q = codec.encode(b, "int8", sp.quantization)
            add("serve", _request(model, sp.tensor.name, "INT8", np.frombuffer(q.data, np.int8).reshape(b.shape),
                                  q.params), n, inner)
    add("agent", _request(name, "input", "FP32", pixels), 4 * n_in, shape[1:])
    add("agent", _request(name, "input", "FP16", pixels.astype(np.float16)), 2 * n_in, shape[1:])
    return out


class Bombs:
    """zstd payloads that decompress to ``mb`` MiB of zeros, built once (with and without a declared size)."""

    def __init__(self, mb: int = 16):
        import zstandard

        zeros = bytes(mb << 20)
        self.nbytes = len(zeros)
        self.declared = zstandard.ZstdCompressor(level=1).compress(zeros)
        self.undeclared = zstandard.ZstdCompressor(level=1, write_content_size=False).compress(zeros)


# ------------------------------------------------------------------------------------------- protobuf level
Mutation = Callable[[random.Random, PB, Base, Bombs, list[str]], None]


def _t(req: PB, rng: random.Random) -> PB.InferInputTensor | None:
    return rng.choice(req.inputs) if req.inputs else None


def m_model(rng, req, base, bombs, models) -> None:
    req.model_name = rng.choice([*models, "", "x" * 100_000, "\x00\xff", f"{models[0]}@99", f"{models[0]}@-1",
                                 f"{models[0]}@", "@0", f"{models[0]}@0@1", f"{models[0]}@ 0", "é" * 3000])


def m_version_id(rng, req, base, bombs, models) -> None:
    req.model_version = rng.choice(["", "2", "x" * 50_000])
    req.id = rng.choice(["", "i" * 100_000, "\x00"])


def m_datatype(rng, req, base, bombs, models) -> None:
    if (t := _t(req, rng)) is not None:
        t.datatype = rng.choice(ODD_DATATYPES)


def m_shape(rng, req, base, bombs, models) -> None:
    t = _t(req, rng)
    if t is None:
        return
    dims = list(t.shape)
    kind = rng.randrange(7)
    if kind == 0 and dims:  # one huge dim
        dims[rng.randrange(len(dims))] = rng.choice(HUGE_DIMS)
    elif kind == 1:  # product overflows int64
        dims = [rng.choice(HUGE_DIMS) for _ in range(rng.randint(2, 5))]
    elif kind == 2 and dims:
        dims[rng.randrange(len(dims))] = rng.choice([-1, -2, INT64_MIN, -(2**31)])
    elif kind == 3 and dims:
        dims[rng.randrange(len(dims))] = 0
    elif kind == 4:
        dims = rng.choice([[], [1], [1] * rng.randint(10, 2000), dims[:-1], [*dims, 1]])
    elif kind == 5:  # huge batch, everything else right
        dims = [rng.choice([10_000, 2**20, 2**31, 2**40]), *base.inner_shape]
    else:
        rng.shuffle(dims)
    del t.shape[:]
    t.shape.extend(dims)


def _set_param(rng: random.Random, m, key: str) -> None:
    kind = rng.randrange(4)
    if kind == 0:
        m[key].double_param = rng.choice(DOUBLES)
    elif kind == 1:
        m[key].int64_param = rng.choice(INT64S)
    elif kind == 2:
        m[key].bool_param = rng.random() < 0.5
    else:
        m[key].string_param = rng.choice(STRINGS)


def m_params(rng, req, base, bombs, models) -> None:
    t = _t(req, rng)
    where = t.parameters if (t is not None and rng.random() < 0.5) else req.parameters
    for _ in range(rng.randint(1, 3)):
        _set_param(rng, where, rng.choice(PARAM_KEYS))
    if rng.random() < 0.02:  # many parameters
        for i in range(rng.randint(100, 3000)):
            _set_param(rng, where, f"p{i}")


def m_int8(rng, req, base, bombs, models) -> None:
    """INT8 with hostile scale / zero point (NaN, inf, 2^62, 1e308, bools, strings)."""
    t = _t(req, rng)
    if t is None:
        return
    t.datatype = "INT8"
    if req.raw_input_contents:  # the right byte count for the base's rows, random levels
        req.raw_input_contents[0] = rng.randbytes(base.rows * math.prod(base.inner_shape))
    where = t.parameters if rng.random() < 0.5 else req.parameters
    for key in (codec.P_SCALE, codec.P_ZERO):
        _set_param(rng, where, key)


def m_extreme_values(rng, req, base, bombs, models) -> None:
    """Finite FP32 values at the edge of the range (±3e38) or NaN/inf, with the right byte count."""
    if not req.raw_input_contents or not req.inputs:
        return
    n = len(req.raw_input_contents[0]) // 4
    value = rng.choice([3e38, -3e38, 1e30, math.nan, math.inf, 65504.0])
    req.inputs[0].datatype = "FP32"
    req.raw_input_contents[0] = np.full(n, value, np.float32).tobytes()
    for m in (req.parameters, req.inputs[0].parameters):
        m.pop(codec.P_COMPRESSION, None)


def m_raw(rng, req, base, bombs, models) -> None:
    if not req.raw_input_contents:
        req.raw_input_contents.append(b"")
    data = req.raw_input_contents[0]
    kind = rng.randrange(6)
    if kind == 0:
        data = data[: rng.randrange(len(data) + 1)]
    elif kind == 1:
        data += rng.randbytes(rng.randint(1, 64))
    elif kind == 2:
        data += bytes(1 << 20)  # 1 MiB of junk
    elif kind == 3:
        data = b""
    elif kind == 4:
        data = rng.randbytes(len(data))
    else:
        data = data[: len(data) // 2] + data
    req.raw_input_contents[0] = data


def m_zstd(rng, req, base, bombs, models) -> None:
    """zstd: a bomb bigger than any limit, garbage claiming to be zstd, a frame with trailing data."""
    import zstandard

    t = _t(req, rng)
    if t is None or not req.raw_input_contents:
        return
    where = t.parameters if rng.random() < 0.5 else req.parameters
    where[codec.P_COMPRESSION].string_param = "zstd"
    kind = rng.randrange(4)
    if kind == 0:  # a bomb whose shape matches what it decompresses to
        rows = max(1, bombs.nbytes // max(1, base.row_bytes))
        del t.shape[:]
        t.shape.extend([rows, *base.inner_shape])
        req.raw_input_contents[0] = rng.choice([bombs.declared, bombs.undeclared])
    elif kind == 1:  # a bomb behind the valid shape
        req.raw_input_contents[0] = rng.choice([bombs.declared, bombs.undeclared])
    elif kind == 2:
        req.raw_input_contents[0] = rng.randbytes(rng.randint(0, 300))
    else:  # one good frame and junk after it
        frame = zstandard.ZstdCompressor().compress(req.raw_input_contents[0])
        req.raw_input_contents[0] = frame + rng.choice([b"\x00" * 16, bytes(1 << 20), frame])


def m_inputs(rng, req, base, bombs, models) -> None:
    kind = rng.randrange(7)
    if kind == 0:
        del req.inputs[:]
    elif kind == 1 and req.inputs:
        req.inputs.add().CopyFrom(req.inputs[0])
    elif kind == 2 and req.inputs:
        extra = req.inputs.add()
        extra.CopyFrom(req.inputs[0])
        extra.name = "other"
        req.raw_input_contents.append(req.raw_input_contents[0] if req.raw_input_contents else b"")
    elif kind == 3:
        req.raw_input_contents.append(b"\x00" * rng.randint(0, 64))
    elif kind == 4 and req.inputs:  # typed contents instead of (or as well as) raw bytes
        n = math.prod(base.inner_shape) * max(1, req.inputs[0].shape[0] if req.inputs[0].shape else 1)
        req.inputs[0].contents.fp32_contents.extend([rng.choice(DOUBLES) for _ in range(min(n, 20_000))])
        if rng.random() < 0.7:
            del req.raw_input_contents[:]
    elif kind == 5 and rng.random() < 0.05:  # thousands of inputs
        for i in range(rng.randint(1000, 10_000)):
            req.inputs.add(name=f"in{i}", datatype="FP32", shape=[1])
    elif req.inputs:
        req.inputs[0].name = rng.choice(["", "input", "boundary0", "boundary1", "n" * 100_000, "\x00"])


def m_outputs(rng, req, base, bombs, models) -> None:
    for _ in range(rng.randint(1, 4)):
        o = req.outputs.add(name=rng.choice(["exit0", "exit1", "exit2", "label", "probabilities", "missing", "",
                                             "o" * 50_000]))
        if rng.random() < 0.3:
            _set_param(rng, o.parameters, rng.choice(PARAM_KEYS))


# (mutation, weight): the bombs are rare because, unfixed, each one runs hundreds of rows.
MUTATIONS: list[tuple[Mutation, float]] = [
    (m_model, 1.0), (m_version_id, 0.3), (m_datatype, 1.0), (m_shape, 2.0), (m_params, 1.5), (m_int8, 1.0),
    (m_extreme_values, 0.6), (m_raw, 1.5), (m_zstd, 0.6), (m_inputs, 1.0), (m_outputs, 0.5),
]


# ------------------------------------------------------------------------------------------------ byte level
def mutate_bytes(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    b = bytearray(data)
    kind = rng.randrange(5)
    if kind == 0:
        for _ in range(rng.randint(1, 8)):
            if b:
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return bytes(b), "bitflip"
    if kind == 1:
        return bytes(b[: rng.randrange(len(b) + 1)]), "truncate"
    if kind == 2:
        at = rng.randrange(len(b) + 1)
        return bytes(b[:at]) + rng.randbytes(rng.randint(1, 32)) + bytes(b[at:]), "insert"
    if kind == 3:  # a varint that never ends, or a length prefix far past the end
        at = rng.randrange(len(b) + 1)
        return bytes(b[:at]) + b"\xff" * rng.randint(1, 12) + bytes(b[at:]), "varint"
    return rng.randbytes(rng.randint(0, 512)), "random"


def make_case(seed: int, index: int, bases: list[Base], bombs: Bombs, models: list[str],
              valid_every: int = 25) -> Case:
    """Case ``index`` of the run seeded ``seed``: every ``valid_every``-th is an unmutated probe."""
    rng = random.Random(seed * 1_000_003 + index)
    base = rng.choice(bases)
    if valid_every and index % valid_every == 0:
        return Case(index, base.target, base.request, "valid", valid=True)
    req = PB.FromString(base.request)
    labels: list[str] = []
    if rng.random() < 0.8:  # protobuf level
        funcs, weights = zip(*MUTATIONS, strict=True)
        for m in rng.choices(funcs, weights, k=rng.choice([1, 1, 1, 2, 2, 3])):
            m(rng, req, base, bombs, models)
            labels.append(m.__name__[2:])
    payload = req.SerializeToString()
    if not labels or rng.random() < 0.25:  # byte level, alone or on top
        payload, what = mutate_bytes(rng, payload)
        labels.append(f"bytes-{what}")
    return Case(index, base.target, payload, "+".join(sorted(set(labels))))
