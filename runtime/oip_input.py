"""Decoding the one input tensor of an Open Inference Protocol request, for every handler that takes one
(the cloud service's models and the device agent), so they accept and refuse the same requests alike."""

from __future__ import annotations

from collections.abc import Collection

import numpy as np

from edgeexit.errors import InvalidTensor
from edgeexit.runtime import codec
from edgeexit.runtime.oip_messages import InferRequest


def decode_input(request: InferRequest, model: str, name: str, datatypes: Collection[str] | None = None,
                 ) -> np.ndarray:
    """The request's only input, which must be called ``name``, as a non-empty float32 batch.

    How to read the bytes (int8 scale and zero point, compression) may come as request parameters or as
    parameters of the tensor itself, as Triton and KServe clients send them; the tensor's win. ``datatypes``
    limits what a model accepts (None: whatever the codec decodes). Raises InvalidTensor saying what to send.
    """
    if len(request.inputs) != 1:
        raise InvalidTensor(f"{model} takes exactly one input {name!r}, got {sorted(request.inputs) or 'none'}")
    (got, t), = request.inputs.items()
    if got != name:
        raise InvalidTensor(f"{model} takes input {name!r}, not {got!r}")
    if datatypes is not None and t.datatype not in datatypes:
        raise InvalidTensor(f"{model}: send input {name!r} as {' or '.join(datatypes)}, not {t.datatype}")
    try:
        x = codec.decode(t.data, t.datatype, t.shape, {**request.params, **t.params})
    except (ValueError, TypeError) as e:  # e.g. a scale or zero point that is not a number
        raise InvalidTensor(f"{name}: cannot decode with the given parameters ({e}); check {codec.P_SCALE}, "
                            f"{codec.P_ZERO} and {codec.P_COMPRESSION}") from e
    if x.ndim > 0 and x.shape[0] == 0:  # a wrong rank is the caller's shape check to report
        raise InvalidTensor(f"{name}: the batch is empty; send at least one row")
    return x
