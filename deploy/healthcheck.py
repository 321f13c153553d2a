"""gRPC health check of `edgeexit serve` for container HEALTHCHECKs and Kubernetes exec probes.

Why not the kubelet's built-in `grpc:` probe: it dials in plaintext (TLS mode is alpha from Kubernetes 1.37,
feature gate GRPCContainerProbeTLS), so it cannot reach a service started with --tls-cert. This script speaks
TLS (and mTLS) and needs only grpcio + grpcio-health-checking, which every edgeexit install has.

Exit status: 0 when /grpc.health.v1.Health/Check answers SERVING, 1 otherwise (one line on stderr says why).
Every option also reads an environment variable, so an image can set defaults once (EDGEEXIT_HEALTH_*).
The health service needs no bearer token (runtime/security.py lets it through), so no token is sent.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"EDGEEXIT_HEALTH_{name}", default) or default


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--address", default=_env("ADDRESS", "127.0.0.1:8001"),
                   help="HOST:PORT of edgeexit serve (env EDGEEXIT_HEALTH_ADDRESS; default 127.0.0.1:8001)")
    p.add_argument("--service", default=_env("SERVICE", ""),
                   help="health service name; '' = the whole server (env EDGEEXIT_HEALTH_SERVICE)")
    p.add_argument("--tls-ca", default=_env("TLS_CA"),
                   help="PEM CA of the server's certificate: enables TLS (env EDGEEXIT_HEALTH_TLS_CA)")
    p.add_argument("--tls-cert", default=_env("TLS_CERT"),
                   help="client certificate, when serve runs with --tls-client-ca (env EDGEEXIT_HEALTH_TLS_CERT)")
    p.add_argument("--tls-key", default=_env("TLS_KEY"), help="its key (env EDGEEXIT_HEALTH_TLS_KEY)")
    p.add_argument("--server-name", default=_env("SERVER_NAME"),
                   help="name the server certificate is issued for, when it is not the --address host "
                        "(e.g. edgeexit-serve.default.svc) (env EDGEEXIT_HEALTH_SERVER_NAME)")
    p.add_argument("--timeout", type=float, default=float(_env("TIMEOUT", "2")),
                   help="seconds for the whole check (env EDGEEXIT_HEALTH_TIMEOUT; default 2)")
    return p


def _channel(args: argparse.Namespace) -> grpc.Channel:
    if args.tls_ca is None:
        if args.tls_cert or args.server_name:
            raise ValueError("--tls-cert/--server-name need --tls-ca (the CA that signed the server's certificate)")
        return grpc.insecure_channel(args.address)
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ValueError("mTLS needs both --tls-cert and --tls-key")
    creds = grpc.ssl_channel_credentials(
        root_certificates=Path(args.tls_ca).read_bytes(),
        private_key=Path(args.tls_key).read_bytes() if args.tls_key else None,
        certificate_chain=Path(args.tls_cert).read_bytes() if args.tls_cert else None,
    )
    options = [("grpc.ssl_target_name_override", args.server_name)] if args.server_name else []
    return grpc.secure_channel(args.address, creds, options=options)


def check(args: argparse.Namespace) -> tuple[bool, str]:
    """(healthy, what was seen)."""
    try:
        channel = _channel(args)
    except (OSError, ValueError) as e:
        return False, f"cannot set up the check: {e}"
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
        except grpc.RpcError as e:
            return False, f"{args.address}: {e.code().name}: {e.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, f"{args.address}: {status}"


def main(argv: list[str] | None = None) -> int:
    healthy, seen = check(build_parser().parse_args(argv))
    print(seen, file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
