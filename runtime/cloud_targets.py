"""``--cloud``: one cloud target or several, as the gRPC channel target the client dials (torch-free, no grpc).

- ``HOST:PORT``: one server, as before (gRPC's default ``pick_first``);
- ``A:PORT,B:PORT,...``: several servers by IP address (all IPv4 or all IPv6), dialled as one
  ``ipv4:``/``ipv6:`` target;
- ``dns:///NAME:PORT``: every address NAME resolves to (re-resolved by gRPC; e.g. a Kubernetes headless Service);
- gRPC's own ``unix:PATH``, ``ipv4:A:P,B:P`` and ``ipv6:`` targets, as written.

Several servers (a list or ``dns:///``) are used round-robin with gRPC's client-side health checking: each
server's ``grpc.health.v1`` status for ``HEALTH_SERVICE`` is watched, and a server that is down, draining or
NOT_SERVING is skipped without a user request being sent to it (``service_config``).

TLS with a list: one channel checks every server's certificate against one name, and an address list has no
name, so ``--tls-server-name NAME`` (``grpc.ssl_target_name_override``) is required: a name every server's
certificate carries. With ``dns:///NAME:PORT`` the name is NAME.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass

from edgeexit.errors import ConfigError
from edgeexit.hostport import parse_hostport

# The service whose health decides whether a server gets requests: `edgeexit serve` marks it SERVING while it
# serves and NOT_SERVING while it drains (runtime/oip_server.py); a server without the health service
# (UNIMPLEMENTED) counts as healthy, per gRPC's client-side health checking design (A17). Client-side checks use the
# health service's Watch, which Triton does not implement (only Check): against Triton a server is skipped when its
# connection fails, not when it reports NOT_SERVING.
HEALTH_SERVICE = "inference.GRPCInferenceService"
_PASSED_ON = ("unix:", "unix-abstract:", "ipv4:", "ipv6:", "vsock:")
_EXAMPLE = "e.g. 10.0.0.5:8000, 10.0.0.5:8000,10.0.0.6:8000 or dns:///cloud.example:8000"


@dataclass(frozen=True)
class CloudTarget:
    """The channel target for a ``--cloud`` value; ``balanced``: several servers, round-robin + health checks."""

    spec: str  # as the user wrote it
    target: str  # what grpc dials
    balanced: bool
    servers: int | None = None  # how many addresses were listed (None: whatever DNS returns)
    name: str | None = None  # the host name in the target, the default TLS server name (None: only addresses)

    def service_config(self) -> str | None:
        """gRPC service config JSON for balanced targets (None: gRPC's defaults)."""
        if not self.balanced:
            return None
        return json.dumps({"loadBalancingConfig": [{"round_robin": {}}],
                           "healthCheckConfig": {"serviceName": HEALTH_SERVICE}})

    def tls_name(self, override: str | None) -> str | None:
        """The name to check the servers' certificates against (None: gRPC's default, the target's host).
        Raises ConfigError for an address list without ``override``."""
        if override:
            return override
        if self.balanced and self.name is None:
            raise ConfigError(f"--cloud {self.spec}: TLS with several addresses needs --tls-server-name NAME, a name "
                              "every server's certificate carries (gRPC checks them all against one name)")
        return None


def parse_cloud(spec: str) -> CloudTarget:
    """Parse a ``--cloud`` value (see module docstring); raises ConfigError saying what to write."""
    spec = spec.strip()
    if not spec:
        raise ConfigError(f"--cloud is empty; give HOST:PORT, a comma-separated list, or dns:///NAME:PORT ({_EXAMPLE})")
    if spec.startswith("dns:"):
        name = spec[len("dns:"):].lstrip("/")
        if "," in name or "/" in name:
            raise ConfigError(f"--cloud {spec}: dns:///NAME:PORT takes one name (it resolves to every server)")
        host, _ = parse_hostport(name, "--cloud dns:///")
        return CloudTarget(spec, f"dns:///{name}", True, None, host)
    if spec.startswith(_PASSED_ON):  # gRPC's own target syntax, as written (several ipv4:/ipv6: ones: balanced)
        many = spec.startswith(("ipv4:", "ipv6:")) and "," in spec
        return CloudTarget(spec, spec, many, spec.count(",") + 1 if many else 1, None)
    parts = [p.strip() for p in spec.split(",")]
    if len(parts) == 1:
        host, _ = parse_hostport(parts[0], "--cloud")
        return CloudTarget(spec, parts[0], False, 1, host)
    if len(set(parts)) != len(parts) or not all(parts):
        raise ConfigError(f"--cloud {spec}: list each server once, separated by commas ({_EXAMPLE})")
    families, addresses = set(), []
    for part in parts:
        host, port = parse_hostport(part, "--cloud")
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise ConfigError(f"--cloud {spec}: a list takes IP addresses, and {host!r} is a name; give one name "
                              "resolving to every server as dns:///NAME:PORT instead") from None
        families.add(ip.version)
        addresses.append(f"{ip}:{port}" if ip.version == 4 else f"[{ip}]:{port}")
    if len(families) > 1:
        raise ConfigError(f"--cloud {spec}: mix of IPv4 and IPv6 addresses; gRPC takes one family per list")
    return CloudTarget(spec, f"ipv{families.pop()}:{','.join(addresses)}", True, len(parts), None)
