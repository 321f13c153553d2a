"""Static split resolution (torch-free): what a fixed ``--split`` value means for a bundle.

A split value is a split point N (the device runs segments 0..N and sends boundary N), ``"device"`` (never
offload) or ``"cloud"`` (send the raw input). ``"auto"`` is chosen per request by an adapter
(``runtime/adaptation.py``), except with ``--adapt off``, where :func:`auto_split` picks it once here.
"""

from __future__ import annotations

from typing import Any

from edgeexit.bundle import Manifest
from edgeexit.errors import ConfigError

Split = int | str  # a split point index, "device" or "cloud"
DEVICE_SPLIT, CLOUD_SPLIT = "device", "cloud"
SPLIT_WORDS = ("auto", DEVICE_SPLIT, CLOUD_SPLIT)


def parse_split(split: int | str) -> int | str:
    """An int split point or one of SPLIT_WORDS, from what a user wrote (``"2"`` -> 2); bounds come later."""
    if isinstance(split, bool) or not isinstance(split, int | str):
        raise ConfigError(f"split {split!r}: give a split point number or one of {SPLIT_WORDS}")
    if isinstance(split, str) and split not in SPLIT_WORDS:
        try:
            split = int(split)
        except ValueError:
            raise ConfigError(f"split {split!r} is not a number or one of {SPLIT_WORDS}") from None
    if isinstance(split, int) and split < 0:
        raise ConfigError(f"split {split} is negative; split points count from 0 (or use 'device')")
    return split


def fp32_bytes(point: Any) -> int:
    """Bytes per sample of a split point's boundary in fp32."""
    return int(point.bytes_per_sample.get("fp32", point.tensor.sample_elements() * 4))


def cheapest_split(manifest: Manifest, among: int | None = None) -> int:
    """The split point (of the first ``among``, default all) with the fewest fp32 boundary bytes."""
    candidates = manifest.split_points[:among]
    if not candidates:
        raise ConfigError("the bundle has a single segment: there is no split point; use --split device or cloud")
    return min(candidates, key=lambda p: (fp32_bytes(p), p.index)).index


def auto_split(manifest: Manifest) -> int:
    """`--adapt off`: the cheapest fp32 boundary among the first half of the network (no measurements)."""
    return cheapest_split(manifest, max(1, len(manifest.segments) // 2))


def resolve_split(manifest: Manifest, split: int | str, has_cloud: bool) -> int | str:
    """A fixed split (an int split point, "device" or "cloud"), validated against the bundle; "auto" here
    means :func:`auto_split`. Without a cloud everything runs on the device."""
    split = parse_split(split)
    if not has_cloud:
        if split == CLOUD_SPLIT:
            raise ConfigError("split 'cloud' sends every input to the cloud: give the address (--cloud HOST:PORT)")
        return DEVICE_SPLIT
    if split == "auto":
        return auto_split(manifest)
    if isinstance(split, int):
        last = len(manifest.split_points) - 1
        if not 0 <= split <= last:
            raise ConfigError(f"split {split} is outside this bundle's split points 0..{last}; "
                              "use 'device' to run everything locally")
    return split


def first_cloud_segment(split: int | str) -> int:
    """The first segment the cloud runs for an offload at ``split`` (not for "device")."""
    return 0 if split == CLOUD_SPLIT else int(split) + 1


def cloud_model(model: str, split: int | str) -> str | None:
    """The OIP model name that finishes a request offloaded at ``split`` (None for "device")."""
    if split == DEVICE_SPLIT:
        return None
    return model if split == CLOUD_SPLIT else f"{model}@{split}"
