"""TLS credentials and bearer-token authentication for the OIP servers and the client."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from edgeexit.errors import ConfigError

# Health probes (load balancers, systemd, k8s) carry no token; everything else needs it.
UNAUTHENTICATED_PREFIXES = ("/grpc.health.v1.Health/",)


def read_pem(path: str | Path, what: str) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {p} does not exist; pass the path of a PEM file")
    data = p.read_bytes()
    if b"-----BEGIN" not in data:
        raise ConfigError(f"{what} {p} is not a PEM file (no '-----BEGIN' line)")
    return data


def read_token_file(path: str | Path) -> str:
    """The bearer token in ``path`` (surrounding whitespace ignored); an empty file is an error."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"token file {p} does not exist; write the shared token into it")
    token = p.read_text().strip()
    if not token or any(c.isspace() for c in token):
        raise ConfigError(f"token file {p} must hold one token without spaces")
    return token


def server_credentials(cert: str | Path, key: str | Path, client_ca: str | Path | None = None,
                       ) -> grpc.ServerCredentials:
    """TLS server credentials; with ``client_ca`` clients must present a certificate it signed (mTLS)."""
    pair = [(read_pem(key, "TLS key"), read_pem(cert, "TLS certificate"))]
    if client_ca is None:
        return grpc.ssl_server_credentials(pair)
    return grpc.ssl_server_credentials(pair, root_certificates=read_pem(client_ca, "client CA"),
                                       require_client_auth=True)


def channel_credentials(ca: str | Path, cert: str | Path | None = None, key: str | Path | None = None,
                        ) -> grpc.ChannelCredentials:
    """TLS client credentials trusting ``ca``; ``cert``/``key`` add a client certificate for mTLS."""
    if (cert is None) != (key is None):
        raise ConfigError("mTLS needs both a client certificate and its key (tls_cert and tls_key)")
    return grpc.ssl_channel_credentials(
        root_certificates=read_pem(ca, "TLS CA"),
        private_key=read_pem(key, "TLS key") if key else None,
        certificate_chain=read_pem(cert, "TLS certificate") if cert else None,
    )


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def _deny(message: str) -> grpc.RpcMethodHandler:
    def abort(_request: Any, context: grpc.ServicerContext) -> None:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return grpc.unary_unary_rpc_method_handler(abort)


class TokenInterceptor(grpc.ServerInterceptor):
    """Rejects calls without ``authorization: Bearer <token>`` (constant-time compare) with UNAUTHENTICATED."""

    def __init__(self, token: str):
        if not token:
            raise ConfigError("an empty token would accept anyone; pass a non-empty token or none at all")
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler],
                          details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        if details.method.startswith(UNAUTHENTICATED_PREFIXES):
            return continuation(details)
        got = dict(details.invocation_metadata or ()).get("authorization")
        if got is None:
            return _deny("missing 'authorization: Bearer <token>' metadata; this server requires a token")
        if not hmac.compare_digest(str(got).encode(), self._expected):
            return _deny("wrong bearer token; check the token file shared with the server")
        return continuation(details)
