"""Export options (one small dataclass instead of many parameters) and parsers for their CLI spellings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edgeexit.errors import ConfigError

FORMATS = ("onnx", "tflite")
QUANTIZE = ("fp16", "int8-dynamic", "int8-static")
SPLIT_MODES = ("auto", "exits")


@dataclass
class ExportOptions:
    input_shape: tuple[int, ...] | None = None  # e.g. (1, 1, 28, 28); taken from a .pt2 when None
    split_points: str = "auto"  # "auto" (exit branch points + stage boundaries) or "exits"
    opset: int = 18
    formats: tuple[str, ...] = ("onnx",)
    quantize: tuple[str, ...] = ()  # TFLite variants besides fp32
    # dataset name (edgeexit.datasets), a .npz with array "x", or an array of raw inputs; None = no int8 params
    calibration_data: Any = None
    calibration_samples: int = 1000
    factory: str | None = None  # "pkg.mod:factory" (with weights)
    weights: str | None = None  # state_dict for the factory, loaded weights_only=True, strict=True
    trust_pickle: bool = False
    normalize: dict[str, list[float]] | None = None  # {"mean": [...], "std": [...]}
    name: str | None = None  # model name in the manifest; default: the output directory's stem
    force: bool = False
    atol: float = 1e-4
    rtol: float = 1e-3
    seed: int = 0
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        if self.split_points not in SPLIT_MODES:
            raise ConfigError(f"--split-points {self.split_points!r} is unknown; use one of {SPLIT_MODES}")
        bad = [f for f in self.formats if f not in FORMATS]
        if bad or "onnx" not in self.formats:
            raise ConfigError(f"--formats must include onnx and only use {FORMATS}; got {list(self.formats)}")
        badq = [q for q in self.quantize if q not in QUANTIZE]
        if badq:
            raise ConfigError(f"--quantize {badq} unknown; choose from {QUANTIZE}")
        if self.quantize and "tflite" not in self.formats:
            raise ConfigError("--quantize makes TFLite variants; add `--formats onnx,tflite`")
        if not 13 <= int(self.opset) <= 23:
            raise ConfigError(f"--opset {self.opset} is outside the supported range 13..23")
        if (self.factory is None) != (self.weights is None):
            raise ConfigError("--model pkg.mod:factory and --weights state_dict.pt go together; give both")


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.replace("x", ",").split(",") if d.strip())
    except ValueError as e:
        raise ConfigError(f"--input-shape {text!r} must be comma-separated integers like 1,1,28,28") from e
    if len(dims) < 2 or any(d <= 0 for d in dims):
        raise ConfigError(f"--input-shape {text!r} must have a batch axis and positive sizes, like 1,1,28,28")
    return dims


def parse_normalize(text: str) -> dict[str, list[float]]:
    try:
        mean_s, std_s = text.split(":")
        mean = [float(v) for v in mean_s.split(",")]
        std = [float(v) for v in std_s.split(",")]
    except ValueError as e:
        raise ConfigError(f"--normalize {text!r} must look like MEAN,..:STD,.. (e.g. 0.286:0.353)") from e
    if len(mean) != len(std) or any(s <= 0 for s in std):
        raise ConfigError(f"--normalize {text!r}: as many means as stds, and every std > 0")
    return {"mean": mean, "std": std}


def parse_list(text: str | None) -> tuple[str, ...]:
    return tuple(t.strip() for t in (text or "").split(",") if t.strip())
