"""The one wire codec: boundary tensors as fp32, fp16 or int8 (per-tensor affine), raw pixels as uint8;
optionally zstd.

A tensor travels as Open Inference Protocol ``raw_input_contents`` with datatype FP32/FP16/INT8/UINT8; how to
read the bytes back is in the request's parameters (keys below), so an unmodified Triton client can still send
plain FP32. UINT8 is only for the raw input of the whole model: value k means the pixel k/255 (``encode_input``
picks it when that is lossless). Decoding checks everything a hostile or broken peer could get wrong and
raises InvalidTensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgeexit.errors import InvalidTensor

ENCODINGS = ("fp32", "fp16", "int8")
DATATYPES = {"fp32": "FP32", "fp16": "FP16", "int8": "INT8"}
NUMPY = {"FP32": np.float32, "FP16": np.float16, "INT8": np.int8, "UINT8": np.uint8}
PIXELS = "UINT8"  # raw [0, 1] pixels, 1 byte each: k on the wire means k/255
_PIXEL_LEVELS = np.float32(255.0)
# How far from a level k/255 (in units of one level) a pixel may be and still travel as UINT8: float32
# arithmetic puts a k/255 computed another way (e.g. k * (1/255), or in float64 then cast) within ~1e-4.
_PIXEL_SNAP = 1e-3
# Request parameters that describe an encoded tensor.
P_SCALE = "edgeexit.scale"
P_ZERO = "edgeexit.zero_point"
P_COMPRESSION = "edgeexit.compression"


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


def decode(data: bytes, datatype: str, shape: list[int], params: dict[str, str | float | int] | None = None,
           ) -> np.ndarray:
    """Decode wire bytes back to float32, validating dtype, byte count, quantisation and finiteness."""
    params = params or {}
    if datatype not in NUMPY:
        raise InvalidTensor(f"datatype {datatype!r} is not a boundary encoding; send one of {sorted(NUMPY)} "
                            f"({PIXELS} only as the whole model's raw input)")
    if any(int(d) < 0 for d in shape):
        raise InvalidTensor(f"shape {list(shape)} has a negative dimension")
    dtype = NUMPY[datatype]
    expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    compression = params.get(P_COMPRESSION)
    if compression not in (None, "", "zstd"):
        raise InvalidTensor(f"unknown compression {compression!r}; only 'zstd' is supported")
    if compression == "zstd":
        import zstandard

        try:
            # max_output_size bounds a decompression bomb to the size the shape promises, but only for frames
            # without a declared content size: zstandard trusts (and allocates) a declared size, so check it.
            declared = zstandard.frame_content_size(data)
            if declared > expected:
                raise InvalidTensor(f"zstd payload declares {declared} bytes but the shape allows {expected}")
            data = zstandard.ZstdDecompressor().decompress(data, max_output_size=max(expected, 1))
        except zstandard.ZstdError as e:
            raise InvalidTensor(f"zstd payload does not decompress to {expected} bytes: {e}") from e
    if len(data) != expected:
        raise InvalidTensor(
            f"{datatype} tensor of shape {list(shape)} needs {expected} bytes but {len(data)} arrived"
        )
    arr = np.frombuffer(data, dtype=dtype).reshape(shape)
    if datatype == "INT8":
        if P_SCALE not in params or P_ZERO not in params:
            raise InvalidTensor(f"INT8 tensor without {P_SCALE!r} and {P_ZERO!r} request parameters")
        scale, zero = float(params[P_SCALE]), float(params[P_ZERO])
        if not np.isfinite(scale) or scale <= 0:
            raise InvalidTensor(f"{P_SCALE} must be a positive finite number, got {scale}")
        return ((arr.astype(np.float32) - zero) * scale).astype(np.float32)
    if datatype == PIXELS:
        return arr.astype(np.float32) / _PIXEL_LEVELS  # float32 division: exactly the float32 of k/255
    out = arr.astype(np.float32)
    if not np.isfinite(out).all():
        raise InvalidTensor("tensor contains NaN or inf; check the device side's computation")
    return out


def encoded_bytes(elements: int, encoding: str) -> int:
    """Uncompressed bytes of ``elements`` values in an encoding (the manifest's bytes per split point)."""
    return elements * {"fp32": 4, "fp16": 2, "int8": 1, "uint8": 1}[encoding]
