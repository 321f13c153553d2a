"""The one wire codec for boundary tensors: fp32, fp16 or int8 (per-tensor affine), optionally zstd.

A tensor travels as Open Inference Protocol ``raw_input_contents`` with datatype FP32/FP16/INT8; how to read
the bytes back is in the request's parameters (keys below), so an unmodified Triton client can still send
plain FP32. Decoding checks everything a hostile or broken peer could get wrong and raises InvalidTensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgeexit.errors import InvalidTensor

ENCODINGS = ("fp32", "fp16", "int8")
DATATYPES = {"fp32": "FP32", "fp16": "FP16", "int8": "INT8"}
NUMPY = {"FP32": np.float32, "FP16": np.float16, "INT8": np.int8}
# Request parameters that describe an encoded tensor.
P_SCALE = "edgeexit.scale"
P_ZERO = "edgeexit.zero_point"
P_COMPRESSION = "edgeexit.compression"


@dataclass
class WireTensor:
    data: bytes
    datatype: str  # FP32 | FP16 | INT8
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
    if compress:
        import zstandard

        raw = zstandard.ZstdCompressor(level=level).compress(raw)
        params[P_COMPRESSION] = "zstd"
    return WireTensor(raw, DATATYPES[encoding], list(x.shape), params)


def decode(data: bytes, datatype: str, shape: list[int], params: dict[str, str | float | int] | None = None,
           ) -> np.ndarray:
    """Decode wire bytes back to float32, validating dtype, byte count, quantisation and finiteness."""
    params = params or {}
    if datatype not in NUMPY:
        raise InvalidTensor(f"datatype {datatype!r} is not a boundary encoding; send one of {sorted(NUMPY)}")
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
    out = arr.astype(np.float32)
    if not np.isfinite(out).all():
        raise InvalidTensor("tensor contains NaN or inf; check the device side's computation")
    return out


def encoded_bytes(elements: int, encoding: str) -> int:
    """Uncompressed bytes of ``elements`` values in an encoding (the manifest's bytes per split point)."""
    return elements * {"fp32": 4, "fp16": 2, "int8": 1}[encoding]
