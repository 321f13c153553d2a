"""What a device runtime is told: backend, split, cloud, wire encoding, deadline, failure handling, emulation
(torch-free). Checked when made, so a bad flag fails before anything is loaded."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edgeexit.errors import ConfigError
from edgeexit.runtime.adaptation import AdaptOptions
from edgeexit.runtime.breaker import BreakerOptions, RetryOptions
from edgeexit.runtime.splits import parse_split

ON_FAILURE = ("best-exit", "finish-local")


@dataclass
class DeviceOptions:
    backend: str = "onnxruntime"  # or "litert"
    fmt: str | None = None  # exported variant to run (e.g. "tflite-int8-static"); None = the backend's fp32
    threads: int = 1
    policy: Any = None  # None = the manifest's calibrated policy; a kind name; or an ExitPolicy object
    # Split point N (device runs segments 0..N), "device" (never offload), "cloud" (send the input), "cascade@N"
    # (segments 0..N with their exits, then the rows left go to the whole cloud model as raw input), or "auto":
    # chosen per request by `adapt` ("planner": the planner's choice for the measured link; "bandit": UCB over
    # split points; "off": the split with the fewest fp32 boundary bytes among the first half of the network).
    split: int | str = "auto"
    adapt: str = "planner"
    network: str = "wifi"  # the planner's prior for the link until offloads measure it
    # EMULATION of a slower device class: every segment's compute is stretched to this many times its
    # measured time (by sleeping), and the planner's device profile is scaled alike. 1.0 = no emulation.
    slowdown: float = 1.0
    # "stretch": the sleeping above; "cgroup": a launcher already runs this whole process under a CPU quota worth
    # the slowdown, so nothing is stretched (the planner's device profile is still scaled, unless measured here).
    emulation: str = "stretch"
    # HOST:PORT of `edgeexit serve` (or Triton), a comma-separated list of IP:PORT, or dns:///NAME:PORT (several:
    # round-robin with health checks, see cloud_targets.py); None = device-only
    cloud: str | None = None
    client: Any = None  # runtime.client.ClientOptions (TLS, token, message limit)
    encoding: str = "fp32"  # fp32 | fp16 | int8 (int8 uses the manifest's calibrated split quantization)
    compress: bool = False  # zstd on the wire
    deadline_ms: float = 1000.0  # per infer() call, device compute included
    on_failure: str = "best-exit"  # or "finish-local"
    retry: RetryOptions = field(default_factory=RetryOptions)
    breaker: BreakerOptions = field(default_factory=BreakerOptions)

    def __post_init__(self) -> None:
        if self.on_failure not in ON_FAILURE:
            raise ConfigError(f"on_failure {self.on_failure!r}: choose one of {ON_FAILURE}")
        if not self.deadline_ms > 0:  # also refuses NaN
            raise ConfigError(f"deadline_ms must be positive, got {self.deadline_ms}")
        if self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")
        if self.emulation not in ("stretch", "cgroup"):
            raise ConfigError(f"emulation {self.emulation!r}: choose 'stretch' or 'cgroup'")
        if self.cloud is not None:
            from edgeexit.runtime.cloud_targets import parse_cloud

            parse_cloud(self.cloud)  # refuse a malformed --cloud before anything is loaded
        self.split = parse_split(self.split)
        self.adapt_options()  # checks adapt, slowdown and encoding, which the adapter shares

    def adapt_options(self) -> AdaptOptions:
        """What the adapter behind ``split="auto"`` needs from these options."""
        return AdaptOptions(mode=self.adapt, network=self.network, slowdown=self.slowdown, encoding=self.encoding)

