"""The one wire codec: boundary tensors as fp32, fp16 or int8 (per-tensor affine), raw pixels as uint8;
optionally zstd.

A model's other inputs (token ids, an attention mask: ``Manifest.extra_inputs``) travel *as they are*
(``encode_as_is``/``decode_as_is``: their own dtype, INT64 for token ids, optionally zstd), never quantised.

A tensor travels as Open Inference Protocol ``raw_input_contents`` with datatype FP32/FP16/INT8/UINT8; how to
read the bytes back is in the request's parameters (keys below), so an unmodified Triton client can still send
plain FP32. UINT8 is only for the raw input of the whole model: value k means the pixel k/255 (``encode_input``
picks it when that is lossless). Decoding checks everything a hostile or broken peer could get wrong and
raises InvalidTensor.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import numpy as np

from edgeexit.errors import InvalidTensor

ENCODINGS = ("fp32", "fp16", "int8")
DATATYPES = {"fp32": "FP32", "fp16": "FP16", "int8": "INT8"}
NUMPY = {"FP32": np.float32, "FP16": np.float16, "INT8": np.int8, "UINT8": np.uint8}
PIXELS = "UINT8"  # raw [0, 1] pixels, 1 byte each: k on the wire means k/255
INPUT_DATATYPES = ("FP32", "FP16", PIXELS)  # what the whole model <model> takes: raw [0, 1] pixels
BOUNDARY_DATATYPES = ("FP32", "FP16", "INT8")  # what a tail <model>@<split> takes: a boundary tensor
_PIXEL_LEVELS = np.float32(255.0)
# How far from a level k/255 (in units of one level) a pixel may be and still travel as UINT8: float32
# arithmetic puts a k/255 computed another way (e.g. k * (1/255), or in float64 then cast) within ~1e-4.
_PIXEL_SNAP = 1e-3
# Request parameters that describe an encoded tensor.
P_SCALE = "edgeexit.scale"
P_ZERO = "edgeexit.zero_point"
P_COMPRESSION = "edgeexit.compression"
# The largest tensor decode() produces by default (bytes in the wire dtype, after decompression): the servers'
# default message limit. Servers pass their own (--max-message-mb), so zstd cannot slip past it.
MAX_DECODED_BYTES = 64 << 20
MAX_RANK = 32  # numpy's limit is 64; no model here needs more than a handful
# An int8 scale s maps q - zp (at most 255 in size) to (q - zp) * s: above float32's max / 255 that overflows.
_MAX_SCALE = float(np.finfo(np.float32).max) / 255.0
_MIN_SCALE = float(np.finfo(np.float32).tiny)  # smallest normal float32; below it the values vanish
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_MAX_ZSTD_WINDOW = 8 << 20  # what a streaming decoder may allocate for a frame's history (zstd level 19: 8 MiB)


@dataclass
class WireTensor:
    data: bytes
    datatype: str  # FP32 | FP16 | INT8 | UINT8 (raw pixels)
    shape: list[int]
    params: dict[str, str | float | int] = field(default_factory=dict)


def affine_params(lo: float, hi: float) -> dict[str, float]:
    """Per-tensor affine int8 parameters covering [lo, hi] (always including 0 so ReLU zeros stay exact)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = (hi - lo) / 255.0 if hi > lo else 1.0
    zero_point = int(np.clip(round(-128 - lo / scale), -128, 127))
    return {"scale": float(scale), "zero_point": zero_point}


def encode(x: np.ndarray, encoding: str = "fp32", quant: dict[str, float] | None = None,
           compress: bool = False, level: int = 3) -> WireTensor:
    """Encode a float32 tensor for the wire."""
    if encoding not in ENCODINGS:
        raise InvalidTensor(f"unknown wire encoding {encoding!r}; choose one of {ENCODINGS}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    params: dict[str, str | float | int] = {}
    if encoding == "fp32":
        raw = x.tobytes()
    elif encoding == "fp16":
        raw = x.astype(np.float16).tobytes()
    else:
        if not quant:
            raise InvalidTensor(
                "int8 encoding needs calibrated scale/zero_point for this split point; "
                "run `edgeexit export ... --calibration-data DATA` or `edgeexit calibrate`, or use fp16"
            )
        q = np.clip(np.rint(x / quant["scale"]) + quant["zero_point"], -128, 127).astype(np.int8)
        raw = q.tobytes()
        params[P_SCALE] = float(quant["scale"])
        params[P_ZERO] = int(quant["zero_point"])
    raw = _maybe_compress(raw, compress, level, params)
    return WireTensor(raw, DATATYPES[encoding], list(x.shape), params)


def _maybe_compress(raw: bytes, compress: bool, level: int, params: dict[str, str | float | int]) -> bytes:
    if not compress:
        return raw
    import zstandard

    params[P_COMPRESSION] = "zstd"
    return zstandard.ZstdCompressor(level=level).compress(raw)


def pixel_levels(x: np.ndarray) -> np.ndarray | None:
    """``x`` as uint8 levels k (x = k/255) when every value is within 1/1000 of a level, else None.

    The snap absorbs float32 noise (k/255 computed as ``k * (1/255)`` lands within ~1e-4 of a level); it moves
    a value by less than 4e-6. NaN, inf and values off the grid (e.g. a bilinear resize done in float) or
    outside [0, 1] give None: they are never rounded behind the caller's back.
    """
    levels = np.asarray(x, np.float32) * _PIXEL_LEVELS
    if not np.isfinite(levels).all():
        return None
    q = np.rint(levels)
    if not ((np.abs(levels - q) <= _PIXEL_SNAP).all() and (q >= 0).all() and (q <= 255).all()):
        return None
    return q.astype(np.uint8)


def encode_input(x: np.ndarray, fallback: str = "fp32", compress: bool = False) -> WireTensor:
    """Encode raw [0, 1] pixels for the whole model ``<model>``: UINT8 (1 byte each) when ``pixel_levels``
    says that is lossless (the server's float32 ``k / 255`` is exactly the float32 of k/255, what our data sets
    and 8-bit cameras give), else in ``fallback`` (fp32, or fp16 when asked for). Quantise off-grid inputs
    yourself (``np.rint(x * 255) / 255``) to get the 4x smaller request.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    q = pixel_levels(x)
    if q is None:
        return encode(x, "fp16" if fallback == "fp16" else "fp32", compress=compress)
    params: dict[str, str | float | int] = {}
    raw = _maybe_compress(q.tobytes(), compress, 3, params)
    return WireTensor(raw, PIXELS, list(x.shape), params)


def decode(data: bytes | memoryview, datatype: str, shape: list[int],
           params: dict[str, str | float | int] | None = None, max_bytes: int = MAX_DECODED_BYTES, *,
           copy: bool = True) -> np.ndarray:
    """Decode wire bytes back to float32, validating dtype, shape, size, quantisation and finiteness.

    Sizes come from the declared shape with Python ints (never an int64 product that can wrap) and are refused
    above ``max_bytes`` (the server's message limit) before anything is decompressed or allocated.
    ``copy=False``: an FP32 tensor comes back as a read-only view of ``data`` (no copy; ``data`` stays alive with
    it), for callers that never write into it (the service's tails).
    """
    params = params or {}
    if datatype not in NUMPY:
        raise InvalidTensor(f"datatype {str(datatype)[:20]!r} is not on the wire: send "
                            f"{describe_datatypes(INPUT_DATATYPES)} to <model>, "
                            f"{describe_datatypes(BOUNDARY_DATATYPES)} to <model>@<split>")
    dims = check_shape(shape)
    dtype = NUMPY[datatype]
    expected = tensor_bytes(dims, np.dtype(dtype).itemsize)
    if expected > max_bytes:
        size = f"{expected}" if expected < 10**15 else "more than 10**15"
        raise InvalidTensor(f"{datatype} tensor of shape {dims} would take {size} bytes; this server decodes "
                            f"at most {max_bytes} bytes per tensor (--max-message-mb): send fewer rows per request")
    compression = params.get(P_COMPRESSION)
    if compression not in (None, "", "zstd"):
        raise InvalidTensor(f"unknown compression {str(compression)[:40]!r}; only 'zstd' is supported")
    quant = _int8_params(params) if datatype == "INT8" else None  # refuse bad parameters before any work
    if compression == "zstd":
        data = _zstd_decompress(bytes(data), expected)
    if len(data) != expected:
        raise InvalidTensor(f"{datatype} tensor of shape {dims} needs {expected} bytes but {len(data)} arrived")
    arr = np.frombuffer(data, dtype=dtype).reshape(dims)
    if quant is not None:
        scale, zero = quant
        return ((arr.astype(np.float32) - np.float32(zero)) * np.float32(scale)).astype(np.float32)
    if datatype == PIXELS:
        return arr.astype(np.float32) / _PIXEL_LEVELS  # float32 division: exactly the float32 of k/255
    out = arr.astype(np.float32, copy=copy)
    if not all_finite(out):
        raise InvalidTensor("tensor contains NaN or inf; check the device side's computation")
    return out


# numpy dtype name <-> OIP datatype of a tensor sent as it is
AS_IS = {"float32": "FP32", "float16": "FP16", "int64": "INT64", "int32": "INT32", "int8": "INT8", "uint8": "UINT8"}


def encode_as_is(x: np.ndarray, compress: bool = False) -> WireTensor:
    """``x`` in its own dtype (a model input such as token ids or a mask); zstd's parameter on the tensor."""
    x = np.ascontiguousarray(x)
    if x.dtype.name not in AS_IS:
        raise InvalidTensor(f"dtype {x.dtype} cannot travel; use one of {sorted(AS_IS)}")
    params: dict[str, str | float | int] = {}
    raw = _maybe_compress(x.tobytes(), compress, 3, params)
    return WireTensor(raw, AS_IS[x.dtype.name], list(x.shape), params)


def decode_as_is(data: bytes | memoryview, datatype: str, shape: list[int], dtype: str,
                 params: dict[str, str | float | int] | None = None, max_bytes: int = MAX_DECODED_BYTES
                 ) -> np.ndarray:
    """A tensor sent as it is, which must be of the model's ``dtype`` (numpy name); sizes, compression and
    float finiteness checked as in ``decode``. Returns a writable array of that dtype."""
    want = AS_IS.get(dtype)
    if datatype != want:
        raise InvalidTensor(f"datatype {str(datatype)[:20]} but this input takes {want} ({dtype}); cast it first")
    dims = check_shape(shape)
    np_dtype = np.dtype(dtype)
    expected = tensor_bytes(dims, np_dtype.itemsize)
    if expected > max_bytes:
        raise InvalidTensor(f"{datatype} tensor of shape {dims} would take more than {max_bytes} bytes (the "
                            "server's --max-message-mb): send fewer rows per request")
    compression = (params or {}).get(P_COMPRESSION)
    if compression not in (None, "", "zstd"):
        raise InvalidTensor(f"unknown compression {str(compression)[:40]!r}; only 'zstd' is supported")
    if compression == "zstd":
        data = _zstd_decompress(bytes(data), expected)
    if len(data) != expected:
        raise InvalidTensor(f"{datatype} tensor of shape {dims} needs {expected} bytes but {len(data)} arrived")
    arr = np.frombuffer(data, dtype=np_dtype).reshape(dims).copy()
    if arr.dtype.kind == "f" and not all_finite(arr):
        raise InvalidTensor("tensor contains NaN or inf; check the sender's computation")
    return arr


def all_finite(x: np.ndarray) -> bool:
    """Whether every value is finite (not a BLAS dot: OpenBLAS runs long ones on threads that spin)."""
    return bool(np.isfinite(x).all())


def describe_datatypes(datatypes: tuple[str, ...] | list[str]) -> str:
    """What a model takes, in words for an error message: raw pixels, a boundary tensor, or just the names."""
    names = list(datatypes)
    listed = ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else "".join(names)
    if set(names) <= set(INPUT_DATATYPES):
        note = f" ({PIXELS}: k means k/255)" if PIXELS in names else ""
        return f"raw [0, 1] pixels as {listed}{note}"
    if set(names) <= set(BOUNDARY_DATATYPES):
        note = f" (INT8 with {P_SCALE} and {P_ZERO})" if "INT8" in names else ""
        return f"the boundary tensor as {listed}{note}"
    return listed


def check_shape(shape: list[int]) -> list[int]:
    """``shape`` as a list of Python ints, refusing non-integers, negative dimensions and absurd ranks."""
    try:
        dims = [operator.index(d) for d in shape]
    except TypeError:
        raise InvalidTensor(f"shape {str(list(shape))[:80]} must be a list of integers") from None
    if len(dims) > MAX_RANK:
        raise InvalidTensor(f"shape has {len(dims)} dimensions; at most {MAX_RANK} are supported")
    if any(d < 0 for d in dims):
        raise InvalidTensor(f"shape {dims} has a negative dimension")
    return dims


def tensor_bytes(dims: list[int], itemsize: int) -> int:
    """Bytes of a tensor of shape ``dims``: a Python int, exact however large (np.prod would wrap at 2**63)."""
    return math.prod(dims) * itemsize


def _int8_params(params: dict[str, str | float | int]) -> tuple[float, int]:
    """(scale, zero point) of an INT8 tensor, refusing types and ranges that could give non-finite values."""
    if P_SCALE not in params or P_ZERO not in params:
        raise InvalidTensor(f"INT8 tensor without {P_SCALE!r} and {P_ZERO!r} request parameters")
    scale, zero = params[P_SCALE], params[P_ZERO]
    # bool is an int in Python, and a string is a client's mistake: neither is silently converted.
    if isinstance(scale, bool) or not isinstance(scale, int | float | np.integer | np.floating):
        raise InvalidTensor(f"cannot decode with the given parameters: {P_SCALE} must be a number (a double, or an "
                            f"int64 for clients without doubles), not {type(scale).__name__}")
    if not _MIN_SCALE <= scale <= _MAX_SCALE:  # also false for NaN
        raise InvalidTensor(f"{P_SCALE} must be a positive finite number in [{_MIN_SCALE:.3g}, {_MAX_SCALE:.3g}] "
                            f"(larger overflows float32), got {scale!r:.40}")
    if isinstance(zero, bool) or not isinstance(zero, int | np.integer):
        raise InvalidTensor(f"cannot decode with the given parameters: {P_ZERO} must be an int64 in [-128, 127], "
                            f"not {type(zero).__name__}")
    if not -128 <= zero <= 127:
        raise InvalidTensor(f"{P_ZERO} must be an int in [-128, 127], got {int(zero)}")
    return float(scale), int(zero)


def _zstd_decompress(data: bytes, expected: int) -> bytes:
    """Exactly one zstd frame, no trailing bytes, decompressed to at most ``expected`` bytes."""
    import zstandard

    _check_one_frame(data, expected)
    try:
        declared = zstandard.frame_content_size(data)
        # zstandard trusts (and allocates) a declared size, so it must be the one the shape promises; a frame
        # without one gets an output buffer of exactly `expected` bytes and fails if it would write more.
        if declared not in (-1, expected):
            raise InvalidTensor(f"zstd frame declares {declared} bytes but the shape needs {expected}")
        window = max(_MAX_ZSTD_WINDOW, expected)  # streaming decoders allocate the window the frame asks for
        return zstandard.ZstdDecompressor(max_window_size=window).decompress(data, max_output_size=max(expected, 1))
    except zstandard.ZstdError as e:
        raise InvalidTensor(f"zstd payload does not decompress to {expected} bytes: {e}") from e


def _check_one_frame(data: bytes, expected: int) -> None:
    """Walk the frame's block headers (RFC 8878 3.1.1): one zstd frame that ends exactly where ``data`` ends.

    zstandard ignores whatever follows the first frame (more frames, junk), so this is where it is refused.
    The walk costs a few operations per block; more blocks than a tensor of ``expected`` bytes needs is refused.
    """
    import zstandard

    if data[:4] != _ZSTD_MAGIC:
        raise InvalidTensor("edgeexit.compression is 'zstd' but the payload is not a zstd frame")
    if len(data) < 9:  # magic, header descriptor, at least a window or size byte, one block header
        raise InvalidTensor("zstd frame is truncated; send the whole frame")
    try:
        pos = zstandard.frame_header_size(data)
    except zstandard.ZstdError as e:
        raise InvalidTensor(f"zstd frame header is invalid: {e}") from e
    checksum = 4 if data[4] & 0x04 else 0  # Content_Checksum_flag of the frame header descriptor
    max_blocks = 16 + expected // 1024  # one-shot compression writes one block per 128 KiB
    for _ in range(max_blocks):
        if pos + 3 > len(data):
            raise InvalidTensor("zstd frame is truncated; send the whole frame")
        header = int.from_bytes(data[pos:pos + 3], "little")
        last, kind, size = header & 1, (header >> 1) & 3, header >> 3
        if kind == 3:
            raise InvalidTensor("zstd frame has a reserved block type; the payload is corrupt")
        pos += 3 + (1 if kind == 1 else size)  # an RLE block stores one byte, repeated `size` times
        if last:
            break
    else:
        raise InvalidTensor(f"zstd frame has more than {max_blocks} blocks for {expected} bytes; compress the "
                            "tensor in one call")
    end = pos + checksum
    if end != len(data):
        what = "is truncated" if end > len(data) else f"is followed by {len(data) - end} more bytes"
        raise InvalidTensor(f"zstd payload {what}; send exactly one zstd frame")


def encoded_bytes(elements: int, encoding: str) -> int:
    """Uncompressed bytes of ``elements`` values in an encoding (the manifest's bytes per split point)."""
    return elements * {"fp32": 4, "fp16": 2, "int8": 1, "uint8": 1}[encoding]
