"""The device runtime: run the head of an early-exit bundle, answer confident rows locally, offload the rest.

Torch-free (numpy + a backend + gRPC). One ``infer(x)`` call for a batch:
1. run segments ``0..split``; after each exit head, the exit policy decides which rows stop there
   (answered ``"device"``); only the remaining rows go on;
2. encode the remaining rows' boundary tensor (fp32/fp16/int8, optional zstd) and send it to the cloud model
   ``<model>@<split>`` with what is left of the deadline (answered ``"cloud"`` from the deepest exit; split
   ``"cloud"`` sends raw pixels to ``<model>``, UINT8 when lossless; the server's own time is ``cloud_ms``);
3. on a timeout, an unreachable service, an open circuit or a rejected tensor, fall back
   (``"device-fallback"``): the most confident exit computed so far (``best-exit``) or the remaining segments
   run locally (``finish-local``). Every row always gets an answer.
A cascade (``split="cascade@N"``) runs segments 0..N with their exits and sends the rows they leave as raw
pixels to ``<model>``; a finish-local fallback resumes from boundary N, kept on the device. The exit policy of
a request is the planner's chosen setting under ``split="auto"``, unless the user fixed one (``setting_policy``).

Those are its three jobs (check the input, run the local exit loop, offload with fallback). Choosing the split
per request is an :class:`~edgeexit.runtime.adaptation.Adapter`'s; what is known about the link is a
:class:`~edgeexit.runtime.link_monitor.LinkMonitor`'s; fixed split values are resolved in ``splits.py``.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from edgeexit.bundle import Bundle, Manifest
from edgeexit.errors import ConfigError, EdgeExitError, InvalidTensor
from edgeexit.policies import softmax
from edgeexit.runtime import breaker, codec, splits
from edgeexit.runtime.adaptation import Adapter, Choice, build_adapter
from edgeexit.runtime.breaker import HALF_OPEN, OPEN, CircuitBreaker, call_with_retries
from edgeexit.runtime.cloud_health import CloudHealth, HealthChecker
from edgeexit.runtime.decided import CLOUD, DEVICE, FALLBACK
from edgeexit.runtime.device_options import DeviceOptions
from edgeexit.runtime.device_result import Latency, Result
from edgeexit.runtime.link_monitor import LinkMonitor, network_seconds
from edgeexit.runtime.link_stats import LinkStats
from edgeexit.runtime.pending import Pending, decide
from edgeexit.runtime.runner import SegmentRunner
from edgeexit.runtime.setting_policy import PolicyChooser, planned_settings
from edgeexit.runtime.splits import Split, cloud_model, resolve_split

if TYPE_CHECKING:
    from edgeexit.runtime.client import Offload

log = logging.getLogger("edgeexit.device")


class CloudClient(Protocol):
    """What the runtime needs from runtime.client.InferenceClient (a seam for tests). A client that also has
    ``check_health(timeout)`` gets background health checks instead of request probes (see breaker.py)."""

    def infer(self, model: str, input_name: str, tensor: codec.WireTensor, *, timeout: float,
              request_id: str = "", extra: Any = ()) -> Offload: ...

    def ready(self, timeout: float = 1.0) -> bool: ...

    def close(self) -> None: ...


class DeviceRuntime:
    """Early-exit inference on the device with cloud offload, deadlines, retries and a circuit breaker."""

    def __init__(self, bundle: Bundle | str | Path, options: DeviceOptions | None = None, *,
                 client: CloudClient | None = None, clock: Any = time.monotonic,
                 on_event: Callable[[str, dict[str, Any]], None] | None = None):
        self.options = o = options or DeviceOptions()  # the options checked themselves when made
        # merge=False: the exit loop decides between segments; merging would cost RSS and start-up for probes only.
        self.runner = SegmentRunner(bundle, backend=o.backend, threads=o.threads, fmt=o.fmt, merge=False)
        self.manifest = self.runner.manifest
        has_cloud = client is not None or o.cloud is not None
        adaptive = o.split == "auto" and has_cloud and o.adapt != "off"
        self.policy = _resolve_policy(self.manifest, o.policy)
        self._policies = PolicyChooser(self.manifest, self.policy, fixed=o.policy is not None)
        # A fixed split is resolved (and refused) here; "auto" with an adapter is the adapter's choice below.
        self.split: Split = "auto" if adaptive else resolve_split(self.manifest, o.split, has_cloud)
        self._quant = splits.wire_quants(self.manifest, self.split, o.encoding, adaptive)
        self._clock = clock
        # With one backend thread the segment runs on the calling thread, so its CPU time is measurable;
        # with more, fall back to wall time.
        self._cpu_clock = time.thread_time if o.threads == 1 else clock
        self._on_event = on_event  # (event name, fields): the agent turns these into logs and metrics
        self._client = client
        if client is None and has_cloud:
            from edgeexit.runtime.client import InferenceClient

            # Named on every offload and probe: a cloud running another bundle refuses instead of answering wrongly.
            self._client = InferenceClient(o.cloud, o.client, bundle=self.manifest.model_digest(),
                                           model=self.manifest.name)
        self.monitor = LinkMonitor(self._client, self.manifest.name, clock, self._emit)
        self.adapter: Adapter | None = None
        if adaptive:
            adapt = o.adapt_options()
            if o.emulation == "cgroup" and "device" not in self.manifest.profiles:
                adapt.slowdown = 1.0  # profiled inside the quota: already as slow as the emulated device
            if o.policy is not None:
                adapt.settings = planned_settings(self.manifest, self.policy)  # plan for the policy that runs
            self.adapter = build_adapter(self.manifest, self.runner, adapt, self.monitor.stats, clock)
            self.monitor.on_cloud_time = lambda split, ms: self.adapter.observe_cloud(split, ms, 1)
            self.split = self.adapter.choose()
        check = getattr(self._client, "check_health", None)
        self._checker: HealthChecker | None = None
        self.breaker = CircuitBreaker(o.breaker, clock=clock, on_change=self._breaker_changed,
                                      on_outcome=self._cloud_outcome, health_checks=callable(check))
        self.cloud_health = CloudHealth(lambda: self.breaker.reason is not None, self._emit)
        if callable(check):  # a check may take as long as a whole request may
            self._checker = HealthChecker(self.breaker, check, o.breaker, o.deadline_ms / 1000.0)
        for k in self._segments_to_open():
            self.runner.session(k)  # open now: no first-request stall, and no lazy-open race across threads
        if self.adapter is not None:
            self.monitor.warm_up()
        if self._checker is not None:
            self._checker.start()

    # -- public -------------------------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self.manifest.name

    @property
    def num_classes(self) -> int:
        return self.manifest.num_classes

    @property
    def cloud_model(self) -> str | None:
        return cloud_model(self.manifest.name, self.split)

    @property
    def link(self) -> LinkStats:
        """The link samples so far (the monitor's)."""
        return self.monitor.stats

    def infer(self, x: np.ndarray, extras: Mapping[str, np.ndarray] | None = None) -> Result:
        """Answer every row of a raw input batch ([B, C, H, W] float32, before normalisation; a multi-input
        model's first input, e.g. input_ids, with the others in ``extras`` by name)."""
        start = self._clock()
        deadline = start + self.options.deadline_ms / 1000.0
        raw = self.check_input(x, extras)
        x = self.runner.normalize(raw) if extras is None else raw
        # One split (and exit setting) per request: concurrent requests never see a change half-way.
        choice = self.adapter.pick() if self.adapter is not None else Choice(self.split)
        if choice.split != self.split:
            est = self.monitor.stats.estimate()  # what the move was made on, for whoever reads the log
            self._emit("split", old=self.split, new=choice.split, setting=choice.setting,
                       link_mbit=est.bandwidth_bps and round(est.bandwidth_bps / 1e6, 2),
                       rtt_ms=est.rtt_s and round(est.rtt_s * 1e3, 1), samples=est.samples)
        split = self.split = choice.split
        lat = Latency()
        pend = Pending(raw, self.num_classes, self._policies.policy(choice.setting, choice.thresholds), extras)
        cur = self._run_local(pend, x, 0, splits.last_device_segment(split, self.runner.num_segments), lat)
        result_bytes, reason = 0, None
        if not pend.empty:
            result_bytes, reason = self._offload(pend, cur, deadline, lat, split)
        lat.total_ms = (self._clock() - start) * 1000.0
        result = Result(pend.labels, pend.probs, pend.exits, pend.decided, lat, result_bytes, reason, split,
                        pend.codes)
        if self.adapter is not None:
            self.adapter.observe(split, result)
            if self.adapter.probe_due():
                self._probe(raw, extras)
        return result

    def close(self) -> None:
        if self._checker is not None:
            self._checker.close()
        if self._client is not None:
            self._client.close()

    # -- steps --------------------------------------------------------------------------------------------
    def _run_local(self, pend: Pending, cur: np.ndarray, first: int, last: int, lat: Latency,
                   where: str = DEVICE) -> np.ndarray:
        """Run segments first..last on the pending rows, letting the policy answer rows at each exit."""
        final_exit = len(self.manifest.exits) - 1
        for k in range(first, last + 1):
            t0, cpu0 = self._clock(), self._cpu_clock()
            out = self.runner.run_segment(k, cur, pend.pending_extras())
            if self.options.slowdown > 1.0 and self.options.emulation == "stretch":
                # Emulated slower device: this segment should take slowdown x its CPU time. Stretching by CPU
                # rather than wall time keeps a busy host's scheduling delays from being multiplied too.
                target = (self._cpu_clock() - cpu0) * self.options.slowdown
                time.sleep(max(0.0, target - (self._clock() - t0)))
            lat.device_ms += (self._clock() - t0) * 1000.0
            cur = out.boundary
            for j in self.manifest.segments[k].exits:
                pend.history.append(out.exits[j])
                pend.exit_ids.append(j)
                dec = decide(pend.policy, pend.history, j == final_exit)
                if dec is None:
                    continue
                mask, labels, probs = dec
                if mask.any():
                    before = len(pend.rows)
                    pend.answer(mask, labels, probs, j, where)
                    if cur is not None and len(pend.rows) < before:
                        cur = cur[~mask]
            if pend.empty:
                break
        return cur

    def _offload(self, pend: Pending, cur: np.ndarray, deadline: float, lat: Latency, split: int | str
                 ) -> tuple[int, str | None]:
        """Send the pending rows to the cloud; on any failure fall back locally. Returns (bytes sent, reason)."""
        o = self.options
        t0 = self._clock()
        if splits.offloads_input(split):
            # The whole model takes raw pixels (the server normalises them): 1 byte each when lossless.
            wire = codec.encode_input(pend.raw[pend.rows], o.encoding, o.compress) if pend.extras is None else \
                codec.encode_as_is(pend.raw[pend.rows], o.compress)
        else:
            wire = codec.encode(cur, o.encoding, self._quant[split], o.compress)
        extra = self._carried_wires(pend.pending_extras(), split)
        lat.encode_ms = (self._clock() - t0) * 1000.0
        input_name = self.manifest.input.name if splits.offloads_input(split) else f"boundary{split}"
        model = cloud_model(self.manifest.name, split)
        request_id = uuid.uuid4().hex
        kw = {"extra": extra} if extra else {}
        sent = len(wire.data) + sum(len(t.data) for _, t in extra)

        def call(timeout: float) -> Offload:
            return self._client.infer(model, input_name, wire, timeout=timeout, request_id=request_id, **kw)

        t1 = self._clock()
        try:
            reply = call_with_retries(call, deadline, o.retry, self.breaker, clock=self._clock)
            logits = self._deepest_exit(reply, len(pend.rows))
        except EdgeExitError as e:
            lat.network_ms = (self._clock() - t1) * 1000.0
            reason = f"{type(e).__name__}: {e}"
            log.info("offload failed, falling back (%s)", reason)
            self._emit("fallback", rows=len(pend.rows), reason=reason, error=type(e).__name__,
                       cause=breaker.failure_reason(e))  # cause: a fixed set, the agent's metric label
            self._fallback(pend, cur, lat, split)
            return 0, reason
        elapsed = self._clock() - t1
        server = getattr(reply, "server", None)  # a client returning a plain mapping reports no timing
        cloud_s = server.total_s if server is not None else 0.0  # unreported: it stays inside network_ms
        lat.cloud_ms = cloud_s * 1000.0 if server is not None else None
        lat.network_ms = max(elapsed - cloud_s, 0.0) * 1000.0
        self.monitor.record_offload(
            sent, network_seconds(elapsed, server, self._expected_cloud_s(split, len(pend.rows))))
        probs = softmax(logits)
        pend.answer(np.ones(len(pend.rows), bool), probs.argmax(1), probs, len(self.manifest.exits) - 1, CLOUD)
        return sent, None

    def _carried_wires(self, extras: Mapping[str, np.ndarray] | None, split: Split
                       ) -> list[tuple[str, codec.WireTensor]]:
        """The extra model inputs an offload at ``split`` carries (an attention mask), as they are."""
        if extras is None:
            return []
        names = self.manifest.carried(-1 if splits.offloads_input(split) else int(split))
        return [(n, codec.encode_as_is(extras[n], self.options.compress)) for n in names]

    def _fallback(self, pend: Pending, cur: np.ndarray, lat: Latency, split: int | str) -> None:
        if self.options.on_failure == "best-exit" and pend.history:
            probs = [softmax(h) for h in pend.history]
            conf = np.stack([p.max(1) for p in probs])  # [exits seen, rows]
            best = conf.argmax(0)
            for i, p in enumerate(probs):
                mask = best == i
                if mask.any():
                    pend.answer(mask, p.argmax(1), p, pend.exit_ids[i], FALLBACK)
                    best = best[~mask]
                    probs = [q[~mask] for q in probs]
            return
        # finish-local (or nothing was computed yet, as with split "cloud"): run the rest here.
        first = splits.first_fallback_segment(split)
        self._run_local(pend, cur, first, self.runner.num_segments - 1, lat, where=FALLBACK)

    def _expected_cloud_s(self, split: Split, rows: int) -> float:
        return self.adapter.expected_cloud_s(split, rows) if self.adapter is not None else 0.0

    def _probe(self, raw: np.ndarray, extras: Mapping[str, np.ndarray] | None) -> None:
        """The adapter wants the link measured while nothing is offloaded: the monitor sends one row in the
        background (its answer is ignored; the user was answered already)."""
        split, o = self.adapter.probe_split(), self.options
        raw_input = splits.offloads_input(split)
        row = {n: a[:1] for n, a in extras.items()} if extras is not None else None

        def wire() -> list[tuple[str, codec.WireTensor]]:
            if raw_input and row is not None:
                first = codec.encode_as_is(raw[:1], o.compress)
            elif raw_input:
                first = codec.encode_input(raw[:1], o.encoding, o.compress)
            else:
                x = self.runner.normalize(raw[:1]) if row is None else raw[:1]
                boundary = self.runner.run(x, 0, split + 1, extras=row).boundary
                first = codec.encode(boundary, o.encoding, self._quant.get(split), o.compress)
            return [("", first), *self._carried_wires(row, split)]

        name = self.manifest.input.name if raw_input else f"boundary{split}"
        self.monitor.probe(split, name, wire, o.deadline_ms / 1000.0)

    # -- helpers ------------------------------------------------------------------------------------------
    def _deepest_exit(self, outputs: Mapping[str, np.ndarray], rows: int) -> np.ndarray:
        names = [n for n in outputs if n.startswith("exit") and n[4:].isdigit()]
        if not names:
            raise InvalidTensor(f"the cloud answered without exit logits (outputs {sorted(outputs)})")
        logits = np.asarray(outputs[max(names, key=lambda n: int(n[4:]))], np.float32)
        if logits.shape != (rows, self.num_classes):
            raise InvalidTensor(f"cloud logits have shape {list(logits.shape)}, expected [{rows}, {self.num_classes}]")
        return logits

    def check_input(self, x: np.ndarray, extras: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """``x`` as float32 if it is a non-empty finite batch of the bundle's input shape, else InvalidTensor
        (the agent checks each app's tensor before micro-batching it with others'). A multi-input model's
        inputs are checked together, as they are (dtypes, shapes, named axes: ``runner.check_axes``)."""
        if extras is not None or self.manifest.extra_inputs or self.manifest.input.dtype != "float32":
            self.runner.check_inputs(x, dict(extras or {}))
            return x
        x = np.asarray(x)
        if x.dtype != np.float32:
            if not np.issubdtype(x.dtype, np.floating):
                raise InvalidTensor(f"input dtype {x.dtype}: send float32 pixels in [0, 1]")
            x = x.astype(np.float32)
        want = self.manifest.input.shape
        if x.ndim != len(want) or x.shape[0] == 0:
            raise InvalidTensor(f"input shape {list(x.shape)}: expected a non-empty batch of {want}")
        if not np.isfinite(x).all():
            raise InvalidTensor("input contains NaN or inf")
        return x

    def _segments_to_open(self) -> range:
        n = self.runner.num_segments
        if self.adapter is not None or self.split == CLOUD or self.options.on_failure == "finish-local":
            return range(n)
        return range(splits.last_device_segment(self.split, n) + 1)

    def _breaker_changed(self, old: str, new: str) -> None:
        # A passing health check goes through half-open at once: that step is INFO, opening and closing WARNING.
        log.log(logging.INFO if HALF_OPEN in (old, new) else logging.WARNING, "circuit %s -> %s", old, new)
        self._emit("circuit", old=old, new=new)
        if new == OPEN and self._checker is not None:
            self._checker.wake()

    def _cloud_outcome(self, error: BaseException | None) -> None:
        self.cloud_health.observe(error)

    def _emit(self, event: str, **fields: Any) -> None:
        if self._on_event is not None:
            self._on_event(event, fields)


def _resolve_policy(manifest: Manifest, policy: Any) -> Any:
    from edgeexit.policies import policy_from_manifest

    if policy is None or isinstance(policy, str):
        return policy_from_manifest(manifest, policy)
    if not hasattr(policy, "decide"):
        raise ConfigError(f"policy must be a kind name or an ExitPolicy, got {type(policy).__name__}")
    return policy
