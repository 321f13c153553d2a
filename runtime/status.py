"""THE one place that maps edgeexit errors to gRPC status codes (server side) and back (client side).

Handlers raise edgeexit errors; the servicer turns them into a status here, so every RPC reports the same
code for the same mistake and the message always says what was wrong. Anything unexpected is INTERNAL and
logged with its traceback; the server keeps serving either way.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import grpc

from edgeexit.errors import (
    BundleError,
    ConfigError,
    EdgeExitError,
    InvalidTensor,
    LinkTimeout,
    OffloadError,
    PeerUnavailable,
    ShapeError,
)

log = logging.getLogger("edgeexit.runtime.status")


class ModelNotFound(ConfigError):
    """The request names a model (or split point) this server does not serve."""


# Most specific first: the first class the error is an instance of wins.
_SERVER_CODES: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (ModelNotFound, grpc.StatusCode.NOT_FOUND),
    (InvalidTensor, grpc.StatusCode.INVALID_ARGUMENT),
    (ShapeError, grpc.StatusCode.INVALID_ARGUMENT),
    (LinkTimeout, grpc.StatusCode.DEADLINE_EXCEEDED),
    (OffloadError, grpc.StatusCode.UNAVAILABLE),
    (ConfigError, grpc.StatusCode.FAILED_PRECONDITION),
    (BundleError, grpc.StatusCode.FAILED_PRECONDITION),
    (EdgeExitError, grpc.StatusCode.FAILED_PRECONDITION),
]


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a handler's exception becomes."""
    for cls, code in _SERVER_CODES:
        if isinstance(exc, cls):
            return code, str(exc) or cls.__name__
    log.error("unexpected error while serving a request", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal server error ({type(exc).__name__}: {exc}); see the server log"


def grpc_status(method: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a servicer method ``(self, request, context)`` so raised errors become statuses."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except Exception as e:  # noqa: BLE001 - every error must become a status, never kill the server
            code, message = status_for(e)
        context.abort(code, message)

    return wrapper


def error_for(code: grpc.StatusCode, message: str) -> EdgeExitError:
    """The edgeexit error a client raises for a failed RPC (the inverse mapping, for the device side)."""
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return LinkTimeout(f"the cloud did not answer before the deadline: {message}")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED):
        return PeerUnavailable(f"the cloud service is unavailable or refused us ({code.name}): {message}")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidTensor(f"the cloud rejected the tensor: {message}")
    return OffloadError(f"the cloud could not finish the request ({code.name}): {message}")
