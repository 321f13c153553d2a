"""THE one place that maps edgeexit errors to gRPC status codes (server side) and back (client side).

Handlers raise edgeexit errors; the servicer turns them into a status here, so every RPC reports the same
code for the same mistake and the message always says what was wrong. Anything unexpected is INTERNAL and
logged with its traceback; the server keeps serving either way.

Messages echo what the client sent (model and input names); a status travels in gRPC's trailing metadata
(16 KiB at most), so an unbounded echo turns NOT_FOUND into RESOURCE_EXHAUSTED "Stream removed". ``clip``
bounds one echoed string, and ``status_for`` caps every message at ``MAX_MESSAGE_BYTES``.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Iterable
from typing import Any

import grpc

from edgeexit.errors import (
    BundleError,
    BundleMismatch,
    ConfigError,
    EdgeExitError,
    InvalidTensor,
    LinkTimeout,
    OffloadError,
    Overloaded,
    PeerRefused,
    PeerUnavailable,
    ShapeError,
)

log = logging.getLogger("edgeexit.runtime.status")

MAX_MESSAGE_BYTES = 1024  # a status message, UTF-8; far below gRPC's metadata limit even percent-encoded
CLIP_CHARS = 64  # an echoed client string (a name) beyond this is shortened by ``clip``
CLIP_ITEMS = 8  # an echoed list beyond this many items is shortened by ``clip_names``


def clip(text: object, limit: int = CLIP_CHARS) -> str:
    """``repr`` of a client-supplied string, shortened to ``limit`` characters with "… (N chars)"."""
    s = str(text)
    if len(s) <= limit:
        return repr(s)
    return f"{s[:limit]!r}… ({len(s)} chars)"


def clip_names(names: Iterable[object], limit: int = CLIP_ITEMS) -> str:
    """A client-supplied collection of names, each ``clip``ped, at most ``limit`` of them, "… (N names)"."""
    items = list(names)
    shown = ", ".join(clip(n) for n in items[:limit])
    return f"[{shown}]" if len(items) <= limit else f"[{shown}, …] ({len(items)} names)"


def cap_message(message: str, limit: int = MAX_MESSAGE_BYTES) -> str:
    """``message`` cut to ``limit`` UTF-8 bytes (on a character boundary), saying how long it was."""
    data = message.encode("utf-8", "replace")
    if len(data) <= limit:
        return message
    suffix = f"… (message cut; {len(data)} bytes)"
    head = data[: limit - len(suffix.encode())].decode("utf-8", "ignore")
    return head + suffix


class ModelNotFound(ConfigError):
    """The request names a model (or split point) this server does not serve."""


# Most specific first: the first class the error is an instance of wins.
_SERVER_CODES: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (ModelNotFound, grpc.StatusCode.NOT_FOUND),
    (InvalidTensor, grpc.StatusCode.INVALID_ARGUMENT),
    (ShapeError, grpc.StatusCode.INVALID_ARGUMENT),
    (LinkTimeout, grpc.StatusCode.DEADLINE_EXCEEDED),
    (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),  # fail fast: the client falls back instead of waiting
    (BundleMismatch, grpc.StatusCode.FAILED_PRECONDITION),  # the deployment, not the request, must change
    (OffloadError, grpc.StatusCode.UNAVAILABLE),
    (ConfigError, grpc.StatusCode.FAILED_PRECONDITION),
    (BundleError, grpc.StatusCode.FAILED_PRECONDITION),
    (EdgeExitError, grpc.StatusCode.FAILED_PRECONDITION),
]


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a handler's exception becomes."""
    for cls, code in _SERVER_CODES:
        if isinstance(exc, cls):
            return code, cap_message(str(exc) or cls.__name__)
    log.error("unexpected error while serving a request", exc_info=exc)
    detail = cap_message(f"{type(exc).__name__}: {exc}", MAX_MESSAGE_BYTES // 2)
    return grpc.StatusCode.INTERNAL, f"internal server error ({detail}); see the server log"


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


def mismatch_message(model: str, served: str, sent: str) -> str:
    """The refusal of a request naming another bundle; ``error_for`` reads the served digest back from it."""
    return (f"{model}: this service runs bundle {served[:12]}, the request names bundle {clip(sent[:12])}; their "
            "answers differ. Roll the same bundle out to the device and the cloud (`edgeexit serve` prints its "
            "digest at start)")


_SERVED_DIGEST = re.compile(r"runs bundle ([0-9a-f]{12,64})")
_TRITON_QUEUE_FULL = "exceeds maximum queue size"  # Triton's UNAVAILABLE when a model's max_queue_size is reached
# UNIMPLEMENTED: Triton's python models (exporters/triton_python) refuse another bundle with UNSUPPORTED.
_MISMATCH_CODES = (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL,
                   grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNIMPLEMENTED)
_OVERLOADED = "is overloaded"  # in Overloaded's message; gRPC's own RESOURCE_EXHAUSTED (message size) lacks it

# grpcio reports a failed TLS handshake as UNAVAILABLE with this in the details ("Ssl handshake failed: ...").
_TLS_FAILURE = "handshake failed"


def error_for(code: grpc.StatusCode, message: str) -> EdgeExitError:
    """The edgeexit error a client raises for a failed RPC (the inverse mapping, for the device side)."""
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return LinkTimeout(f"the cloud did not answer before the deadline: {message}")
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return PeerRefused(f"the cloud service refused our credentials ({code.name}): {message}; check the token "
                           "file shared with the service", "auth")
    if code == grpc.StatusCode.UNAVAILABLE and _TLS_FAILURE in message.lower():
        return PeerRefused(f"the TLS handshake with the cloud service failed: {message}; check --tls-ca (and the "
                           "client certificate for mTLS)", "tls")
    if code == grpc.StatusCode.UNAVAILABLE and _TRITON_QUEUE_FULL in message.lower():
        return Overloaded(f"the cloud service is overloaded: {message}")
    if code == grpc.StatusCode.UNAVAILABLE:
        return PeerUnavailable(f"the cloud service is unavailable or refused us ({code.name}): {message}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and _OVERLOADED in message:
        return Overloaded(f"the cloud service is overloaded: {message}")
    # serve refuses with FAILED_PRECONDITION; a Triton model reports its errors under another code, with the same
    # message (``mismatch_message``), so the message decides.
    if code in _MISMATCH_CODES and (m := _SERVED_DIGEST.search(message)):
        return BundleMismatch(f"the cloud runs another bundle: {message}", served=m.group(1))
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidTensor(f"the cloud rejected the tensor: {message}")
    return OffloadError(f"the cloud could not finish the request ({code.name}): {message}")


def app_error_for(code: grpc.StatusCode, message: str, target: str) -> EdgeExitError:
    """The edgeexit error an app's client (``edgeexit.client``) raises for a failed RPC to the agent at ``target``:
    the same classes as ``error_for``, with messages that name the agent, not the cloud behind it."""
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return LinkTimeout(f"the agent at {target} did not answer before the deadline ({message}); raise timeout_s "
                           "or send fewer rows per request")
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return PeerRefused(f"{target} refused our credentials ({code.name}): {message}; pass the token it "
                           "expects (token=...)", "auth")
    if code == grpc.StatusCode.UNAVAILABLE and _TLS_FAILURE in message.lower():
        return PeerRefused(f"the TLS handshake with {target} failed: {message}; check tls_ca, server_name and (for "
                           "mTLS) tls_cert/tls_key, or connect without TLS if it serves plain gRPC", "tls")
    if code == grpc.StatusCode.UNAVAILABLE and _TRITON_QUEUE_FULL not in message.lower():
        return PeerUnavailable(f"cannot reach {target} ({message}); is the agent running on {target}?")
    if code == grpc.StatusCode.NOT_FOUND:
        return ModelNotFound(f"{target}: {message}; pass the model it serves (model=...) or leave it out")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and _OVERLOADED not in message:
        return InvalidTensor(f"{target} refused the request's size: {message}; send fewer rows per request")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidTensor(f"{target} refused the input: {message}")
    err = error_for(code, message)  # overloaded, bundle mismatch: the same classes as offloads
    if type(err) is OffloadError:
        return OffloadError(f"{target} could not answer the request ({code.name}): {message}")
    return err
