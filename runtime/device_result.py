"""What the device runtime answers for one request (torch-free): per-row answers and the latency breakdown."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeexit.runtime.decided import to_codes


@dataclass
class Latency:
    device_ms: float = 0.0  # segment compute on the device (fallback compute included)
    encode_ms: float = 0.0
    network_ms: float = 0.0  # offload call wall time, minus the cloud's queue + compute when the server reports it
    cloud_ms: float | None = None  # the server's reported queue + compute; None: not reported (inside network_ms)
    total_ms: float = 0.0


@dataclass
class Result:
    labels: np.ndarray  # int64 [B]
    probabilities: np.ndarray  # float32 [B, C]
    exits: np.ndarray  # int32 [B]: the exit head that answered each row
    decided: list[str]  # per row: "device" | "cloud" | "device-fallback"
    latency: Latency
    bytes_sent: int = 0
    fallback_reason: str | None = None  # set when rows fell back
    split: int | str | None = None  # the split this request ran with
    codes: np.ndarray | None = None  # int32 [B]: ``decided`` as the agent's codes, when the runtime has them

    @property
    def decided_codes(self) -> np.ndarray:
        return self.codes if self.codes is not None else to_codes(self.decided)
