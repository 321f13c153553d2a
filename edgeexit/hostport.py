"""``HOST:PORT`` parsing, one spelling for every address option (agent, netsim, the testbed)."""

from __future__ import annotations

from edgeexit.errors import ConfigError


def parse_hostport(text: str, what: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 as ``[::1]:PORT``; port 0 = any free port) -> (host, port).

    ``what`` names the option in the error, e.g. ``--listen``."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{what} {text!r} must be HOST:PORT, e.g. 127.0.0.1:8001")
    return host, int(port)
