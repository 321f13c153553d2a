"""edgeexit.runtime: the torch-free side (backends, device runtime and agent, cloud service, wire codec).

Names are imported on first use, so ``import edgeexit.runtime`` stays cheap for the agent's cold start.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "DeviceRuntime": "edgeexit.runtime.device",
    "DeviceOptions": "edgeexit.runtime.device",
    "Result": "edgeexit.runtime.device",
    "SegmentRunner": "edgeexit.runtime.runner",
    "InferenceClient": "edgeexit.runtime.client",
    "ClientOptions": "edgeexit.runtime.client",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'edgeexit.runtime' has no attribute {name!r}")
