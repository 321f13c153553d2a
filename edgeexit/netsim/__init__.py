"""Network emulation for tests and benchmarks: a userspace TCP `Relay` (delay, jitter, bandwidth, outages,
traces; no root needed) and `NetnsLink` (two network namespaces joined by a kernel-shaped veth pair; root)."""

from edgeexit.netsim.conditions import Effective, LinkConditions, Outage
from edgeexit.netsim.namespaces import NetnsLink, available
from edgeexit.netsim.relay import Relay, RelayStats
from edgeexit.netsim.trace import Trace, TraceRow

__all__ = [
    "Effective", "LinkConditions", "NetnsLink", "Outage", "Relay", "RelayStats", "Trace", "TraceRow", "available",
]
