"""What the device knows about its link to the cloud, and how it keeps that knowledge fresh (torch-free).

A :class:`LinkMonitor` holds the link samples (:class:`LinkStats`: bytes and network time of each real
offload), times an empty round trip at start-up (the warm-up: it also opens the connection, so the first
offload does not pay connection set-up and make the link look slow), and sends background probes when an
adapter asks for one because nothing is being offloaded (then there are no samples to notice a recovery).
The adapters read ``stats``; the device runtime records its offloads here.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from edgeexit.errors import EdgeExitError
from edgeexit.runtime.codec import WireTensor
from edgeexit.runtime.link_stats import LinkStats
from edgeexit.runtime.splits import Split, cloud_model

if TYPE_CHECKING:
    from edgeexit.runtime.device import CloudClient
    from edgeexit.runtime.oip_messages import ServerTiming

WARM_UP_TIMEOUT_S = 2.0
WARM_UP_RTT_CALLS = 3
# A probe starts this long after the request that asked for it, so it does not time that request's CPU tail as
# link time. On a throttled device (an emulated one under a CPU quota of up to 40 ms periods) probes sent at once
# read 24-44 ms for an 8 ms link and kept an agent device-only where offloading was 1.2x faster (`bench --logs`).
PROBE_DELAY_S = 0.05


def network_seconds(elapsed_s: float, server: ServerTiming | None, expected_cloud_s: float = 0.0) -> float:
    """The link's share of an offload call that took ``elapsed_s``: minus the time the server reports it spent
    (queue + compute), or, from a server that reports nothing, minus the cloud profile's estimate; that one is
    floored at a tenth of the call, since an estimate can exceed it (and a loaded server then looks like a
    slow link: the reason servers report their time)."""
    if server is not None:
        return elapsed_s - server.total_s
    return max(elapsed_s - expected_cloud_s, elapsed_s / 10)


class LinkMonitor:
    """Link samples, the warm-up round trip and background probes for one cloud connection."""

    def __init__(self, client: CloudClient | None, model: str, clock: Callable[[], float] = time.monotonic,
                 on_event: Callable[..., None] | None = None):
        self.stats = LinkStats()
        self._client = client
        self._model = model
        self._clock = clock
        self._on_event = on_event  # (event name, **fields), e.g. DeviceRuntime._emit
        # (split, the server's reported ms) of each probe's answer: the adapter's only news of the server while
        # nothing is offloaded (set by the runtime that owns the adapter).
        self.on_cloud_time: Callable[[Split, float], None] | None = None

    def record_offload(self, nbytes: int, network_s: float) -> None:
        """One real offload: ``nbytes`` on the wire took ``network_s`` of network time (cloud compute excluded)."""
        self.stats.record(nbytes, network_s)

    def warm_up(self) -> threading.Thread | None:
        """Connect and time an empty round trip in the background (None without a cloud)."""
        if self._client is None:
            return None
        thread = threading.Thread(target=self._warm_up, name="edgeexit-warm-up", daemon=True)
        thread.start()
        return thread

    def probe(self, split: Split, input_name: str, make_wire: Callable[[], WireTensor | list[tuple[str, WireTensor]]],
              timeout_s: float) -> threading.Thread | None:
        """Send one tensor (``input_name`` of the cloud model at ``split``) in the background and record how long
        it took; its answer is ignored. ``make_wire`` runs on the probe thread, so the request that triggered the
        probe is not delayed; it may return [(name, tensor), ...], the first one being ``input_name``'s and the
        others the extra inputs a multi-input model carries."""
        if self._client is None:
            return None
        thread = threading.Thread(target=self._probe, args=(split, input_name, make_wire, timeout_s),
                                  name="edgeexit-probe", daemon=True)
        thread.start()
        return thread

    def _warm_up(self) -> None:
        if self._client.ready(timeout=WARM_UP_TIMEOUT_S):  # the first call connects
            self._time_rtt(WARM_UP_RTT_CALLS)

    def _time_rtt(self, calls: int) -> None:
        """Record the fastest of ``calls`` empty round trips: waiting for a CPU (the agent is loading, or busy
        with requests) only ever adds, so the minimum is the link's RTT."""
        best = None
        for _ in range(calls):
            t0 = self._clock()
            if not self._client.ready(timeout=WARM_UP_TIMEOUT_S):
                break
            best = min(best or float("inf"), self._clock() - t0)
        if best is not None:
            self.stats.record_rtt(best)

    def _probe(self, split: Split, input_name: str, make_wire: Callable[[], WireTensor], timeout_s: float) -> None:
        try:
            time.sleep(PROBE_DELAY_S)
            made = make_wire()
            self._time_rtt(1)  # the RTT may have moved with the link; timed before the payload's CPU is spent
            (_, wire), *extra = made if isinstance(made, list) else [("", made)]
            kw = {"extra": extra} if extra else {}
            t0 = self._clock()
            reply = self._client.infer(cloud_model(self._model, split), input_name, wire, timeout=timeout_s, **kw)
            seconds = self._clock() - t0
            # Without a report the probe's whole time counts as link (no estimate of the cloud's share here).
            server = getattr(reply, "server", None)
            nbytes = len(wire.data) + sum(len(t.data) for _, t in extra)
            self.stats.record(nbytes, network_seconds(seconds, server))
            if server is not None and self.on_cloud_time is not None:
                self.on_cloud_time(split, server.total_s * 1e3)
            self._emit("probe", split=split, bytes=nbytes, seconds=round(seconds, 4))
        except EdgeExitError as e:
            self._emit("probe", split=split, error=type(e).__name__)

    def _emit(self, event: str, **fields: Any) -> None:
        if self._on_event is not None:
            self._on_event(event, **fields)
