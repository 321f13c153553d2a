"""Network emulation for tests and benchmarks: a userspace TCP `Relay` (delay, jitter, bandwidth, outages,
traces; no root needed) and `NetnsLink` (two network namespaces joined by a kernel-shaped veth pair; root).

Names load on first use, so `edgeexit --help` and the agent's start-up do not pay for asyncio.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "Effective": "edgeexit.testbed.netsim.conditions",
    "LinkConditions": "edgeexit.testbed.netsim.conditions",
    "Outage": "edgeexit.testbed.netsim.conditions",
    "Relay": "edgeexit.testbed.netsim.relay",
    "RelayStats": "edgeexit.testbed.netsim.relay",
    "Trace": "edgeexit.testbed.netsim.trace",
    "TraceRow": "edgeexit.testbed.netsim.trace",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'edgeexit.testbed.netsim' has no attribute {name!r}")
