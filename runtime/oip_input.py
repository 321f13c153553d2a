"""Decoding the one input tensor of an Open Inference Protocol request, for every handler that takes one
(the cloud service's models and the device agent), so they accept and refuse the same requests alike."""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np

from edgeexit.bundle import TensorSpec
from edgeexit.errors import InvalidTensor
from edgeexit.runtime import codec
from edgeexit.runtime.oip_messages import InferRequest


def decode_input(request: InferRequest, model: str, name: str, datatypes: Collection[str] | None = None, *,
                 shape: Sequence[int | str] | None = None, max_rows: int | None = None,
                 max_bytes: int = codec.MAX_DECODED_BYTES, copy: bool = True) -> np.ndarray:
    """The request's only input, which must be called ``name``, as a non-empty float32 batch.

    How to read the bytes (int8 scale and zero point, compression) may come as request parameters or as
    parameters of the tensor itself, as Triton and KServe clients send them; the tensor's win. ``datatypes``
    limits what a model accepts (None: whatever the codec decodes). ``shape`` (the model's, with ``BATCH`` for the
    rows), ``max_rows`` and ``max_bytes`` are checked on the declared shape before anything is decompressed or
    allocated. ``copy=False``: FP32 may come back as a read-only view of the request's bytes (``codec.decode``).
    Raises InvalidTensor saying what to send.
    """
    if len(request.inputs) != 1:
        names = sorted(request.inputs)
        got = "none" if not names else f"{len(names)}: {str(names[:5])[:200]}"
        raise InvalidTensor(f"{model} takes exactly one input {name!r}, got {got}")
    (got, t), = request.inputs.items()
    if got != name:
        raise InvalidTensor(f"{model} takes input {name!r}, not {got[:100]!r}")
    if datatypes is not None and t.datatype not in datatypes:
        raise InvalidTensor(f"{model}: input {name!r} takes {codec.describe_datatypes(tuple(datatypes))}, "
                            f"not {t.datatype[:20]}")
    dims = codec.check_shape(t.shape)
    if shape is not None:
        check_declared_shape(dims, shape, name)
    if max_rows is not None and dims and dims[0] > max_rows:
        raise InvalidTensor(f"{name}: {dims[0]} rows in one request, but this server takes at most {max_rows} "
                            f"(--max-batch-rows); split the batch into several requests")
    try:
        x = codec.decode(t.data, t.datatype, dims, {**request.params, **t.params}, max_bytes=max_bytes,
                         copy=copy)
    except (ValueError, TypeError) as e:  # e.g. a scale or zero point that is not a number
        raise InvalidTensor(f"{name}: cannot decode with the given parameters ({e}); check {codec.P_SCALE}, "
                            f"{codec.P_ZERO} and {codec.P_COMPRESSION}") from e
    if x.ndim > 0 and x.shape[0] == 0:  # a wrong rank is the caller's shape check to report
        raise InvalidTensor(f"{name}: the batch is empty; send at least one row")
    return x


def decode_inputs(request: InferRequest, model: str, specs: Sequence[TensorSpec], datatypes: Collection[str], *,
                  max_rows: int | None = None, max_bytes: int = codec.MAX_DECODED_BYTES, copy: bool = True
                  ) -> list[np.ndarray]:
    """Every input of a model that takes several (``specs``: the first, then the extra inputs it carries), in
    that order. A float32 first input decodes as ``decode_input`` does (``datatypes``, encodings, parameters of
    the request or the tensor); every other input travels as it is, in its own dtype (``codec.decode_as_is``,
    only its own tensor parameters). Shapes are checked as declared, before decoding; named axes match later
    (``runner.check_axes``). Raises InvalidTensor saying what to send."""
    want = [s.name for s in specs]
    if sorted(request.inputs) != sorted(want):
        got = sorted(request.inputs)
        raise InvalidTensor(f"{model} takes the inputs {want}, got {str(got[:8])[:200]}")
    out = []
    for i, spec in enumerate(specs):
        t = request.inputs[spec.name]
        dims = codec.check_shape(t.shape)
        check_declared_shape(dims, spec.shape, spec.name)
        if max_rows is not None and dims and dims[0] > max_rows:
            raise InvalidTensor(f"{spec.name}: {dims[0]} rows in one request, but this server takes at most "
                                f"{max_rows} (--max-batch-rows); split the batch into several requests")
        if i == 0 and spec.dtype == "float32":
            single = InferRequest(request.model, {spec.name: t}, request.params)
            out.append(decode_input(single, model, spec.name, datatypes, shape=spec.shape, max_bytes=max_bytes,
                                    copy=copy))
            continue
        try:
            x = codec.decode_as_is(t.data, t.datatype, dims, spec.dtype, t.params, max_bytes=max_bytes)
        except InvalidTensor as e:
            raise InvalidTensor(f"{spec.name}: {e}") from None
        if x.ndim > 0 and x.shape[0] == 0:
            raise InvalidTensor(f"{spec.name}: the batch is empty; send at least one row")
        out.append(x)
    if len({len(x) for x in out}) != 1:
        raise InvalidTensor(f"{model}: the inputs {want} must have the same number of rows, got "
                            f"{[len(x) for x in out]}")
    return out


def check_declared_shape(dims: Sequence[int], want: Sequence[int | str], name: str) -> None:
    """Refuse a declared shape that is not ``want`` (a named axis such as ``BATCH`` matching any size), before
    decoding."""
    ok = len(dims) == len(want) and all(isinstance(w, str) or int(w) == d for w, d in zip(want, dims, strict=True))
    if not ok:
        raise InvalidTensor(f"{name}: shape {list(dims)} but the bundle expects {list(want)} ('batch' is any size)")
