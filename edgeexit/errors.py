"""The one error tree of edgeexit.

Every error a user can cause is an ``EdgeExitError`` whose message says what went wrong *and what to do*.
The CLI prints it without a traceback and exits non-zero; the cloud service maps it to a gRPC status in
one place (``edgeexit.runtime.status``).

    EdgeExitError
    ├── BundleError          a bundle is missing, partial, corrupted (checksum) or of an unknown schema
    ├── ExportError          a model cannot be exported as asked
    │   ├── ShapeError       the model's inputs/outputs do not match what was given or what the contract says
    │   └── ToleranceError   exported segments disagree with torch beyond the tolerance
    ├── ConfigError          bad options, profiles, configs or datasets (incl. a missing dataset)
    ├── OffloadError         the cloud could not finish a request
    │   ├── LinkTimeout      the deadline passed before the answer arrived
    │   ├── PeerUnavailable  the service is unreachable, refused us, or the circuit is open
    │   │   └── PeerRefused  it refused our credentials (token, TLS): a config mistake, not an outage
    │   ├── Overloaded       the service's queue is full: refused at once, retry later or elsewhere
    │   └── BundleMismatch   the service runs another bundle than the device (a half-finished rollout)
    └── InvalidTensor        a tensor is malformed: wrong shape, dtype, byte count, NaN/inf, bad quantisation
"""

from __future__ import annotations


class EdgeExitError(Exception):
    """Base of every error edgeexit raises on purpose."""


class BundleError(EdgeExitError):
    """The bundle is missing, partial, corrupted or of an unknown schema."""


class ExportError(EdgeExitError):
    """The model cannot be exported as asked."""


class ShapeError(ExportError):
    """Shapes or the output structure of the model do not match the contract or the given input shape."""


class ToleranceError(ExportError):
    """An exported segment's exit disagrees with torch beyond the tolerance."""


class ConfigError(EdgeExitError):
    """Bad options, profiles, configs or datasets."""


class OffloadError(EdgeExitError):
    """The cloud could not finish a request."""


class LinkTimeout(OffloadError):
    """The per-request deadline passed before the cloud answered."""


class PeerUnavailable(OffloadError):
    """The cloud service is unreachable, refused the request, or the circuit breaker is open."""


class PeerRefused(PeerUnavailable):
    """The cloud refused our credentials: ``reason`` "auth" (a wrong or missing token, UNAUTHENTICATED or
    PERMISSION_DENIED) or "tls" (the TLS handshake failed). Retrying each request cannot fix it."""

    def __init__(self, message: str, reason: str = "auth"):
        super().__init__(message)
        self.reason = reason


class Overloaded(OffloadError):
    """The service's queue is full (``edgeexit serve --max-queue``); it refused the request without queueing it,
    so the device can answer locally at once. Retry later, elsewhere, or add replicas."""


class BundleMismatch(OffloadError):
    """The request names a bundle (its digest, request parameter ``edgeexit.bundle``) other than the one the
    service runs: answers would be wrong. ``served`` is the service's digest ("" when unknown)."""

    def __init__(self, message: str, served: str = ""):
        super().__init__(message)
        self.served = served


class InvalidTensor(EdgeExitError):
    """A tensor is malformed: wrong shape, dtype, byte count, non-finite values or bad quantisation."""
