"""Small parsing helpers shared by the CLI commands (no heavy imports)."""

from __future__ import annotations

from typing import Any

from edgeexit.errors import ConfigError


def add_backend_args(p: Any) -> None:
    """--backend and --format: one way to pick what runs, for every command that runs a bundle."""
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "litert"],
                   help="inference backend (default onnxruntime)")
    p.add_argument("--format", dest="fmt", metavar="FORMAT",
                   help="which exported variant to run: onnx | tflite | tflite-fp16 | tflite-int8-dynamic | "
                        "tflite-int8-static (default: the backend's fp32 format)")


def parse_int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated whole numbers, e.g. 1,8,32; got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise ConfigError(f"{flag} needs positive whole numbers, got {text!r}")
    return values


def parse_float_list(text: str, flag: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated numbers, e.g. 1,10,100; got {text!r}") from None
    if not values:
        raise ConfigError(f"{flag} is empty")
    return values
