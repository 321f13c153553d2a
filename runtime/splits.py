"""Static split resolution (torch-free): what a fixed ``--split`` value means for a bundle.

A split value is a split point N (the device runs segments 0..N and sends boundary N), ``"device"`` (never
offload), ``"cloud"`` (send the raw input) or ``"cascade@N"`` (the device runs segments 0..N with their exits
and sends the rows none of them took as their raw input to the whole model, keeping boundary N for a local
fallback). ``"auto"`` is chosen per request by an adapter (``runtime/adaptation.py``), except with
``--adapt off``, where :func:`auto_split` picks it once here.
"""

from __future__ import annotations

from typing import Any

from edgeexit.bundle import Manifest
from edgeexit.errors import ConfigError
from edgeexit.planner import Candidate

Split = int | str  # a split point index, "device", "cloud" or "cascade@N"
DEVICE_SPLIT, CLOUD_SPLIT = "device", "cloud"
SPLIT_WORDS = ("auto", DEVICE_SPLIT, CLOUD_SPLIT)
CASCADE = "cascade@"


def cascade_point(split: Split) -> int | None:
    """N for ``"cascade@N"`` (the last segment the device runs), else None."""
    if isinstance(split, str) and split.startswith(CASCADE):
        return int(split[len(CASCADE):])
    return None


def parse_split(split: int | str) -> int | str:
    """An int split point, ``"cascade@N"`` or one of SPLIT_WORDS, from what a user wrote (``"2"`` -> 2); bounds
    come later."""
    if isinstance(split, bool) or not isinstance(split, int | str):
        raise ConfigError(f"split {split!r}: give a split point number, cascade@N or one of {SPLIT_WORDS}")
    if isinstance(split, str) and split.startswith(CASCADE):
        n = split[len(CASCADE):]
        if not n.isdigit():
            raise ConfigError(f"split {split!r}: write cascade@N with N the last segment the device runs (0, 1, ...)")
        return f"{CASCADE}{int(n)}"
    if isinstance(split, str) and split not in SPLIT_WORDS:
        try:
            split = int(split)
        except ValueError:
            raise ConfigError(f"split {split!r} is not a number, cascade@N or one of {SPLIT_WORDS}") from None
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
    last = len(manifest.split_points) - 1
    if isinstance(split, int) and not 0 <= split <= last:
        raise ConfigError(f"split {split} is outside this bundle's split points 0..{last}; "
                          "use 'device' to run everything locally")
    n = cascade_point(split)
    if n is not None and not 0 <= n <= last:
        # cascade@<last segment> would be device-only: the final exit answers every row
        raise ConfigError(f"split {split}: a cascade runs segments 0..N on the device, N in 0..{last} for this "
                          f"bundle ({len(manifest.segments)} segments); use 'device' to run every exit locally")
    return split


def offloads_input(split: Split) -> bool:
    """True when an offload at ``split`` sends the raw input to the whole model (cloud-only and cascades)."""
    return split == CLOUD_SPLIT or cascade_point(split) is not None


def last_device_segment(split: Split, num_segments: int) -> int:
    """The last segment the device runs before offloading at ``split`` (-1 for "cloud")."""
    if split == DEVICE_SPLIT:
        return num_segments - 1
    if split == CLOUD_SPLIT:
        return -1
    n = cascade_point(split)
    return int(split) if n is None else n


def first_cloud_segment(split: Split) -> int:
    """The first segment the cloud runs for an offload at ``split`` (not for "device")."""
    return 0 if offloads_input(split) else int(split) + 1


def first_fallback_segment(split: Split) -> int:
    """The first segment a finish-local fallback runs: the one after what the device ran (a cascade keeps its
    boundary, so it resumes there rather than where the cloud would have started)."""
    return last_device_segment(split, 0) + 1


def cloud_model(model: str, split: Split) -> str | None:
    """The OIP model name that finishes a request offloaded at ``split`` (None for "device")."""
    if split == DEVICE_SPLIT:
        return None
    return model if offloads_input(split) else f"{model}@{split}"


Quant = dict[str, float] | None  # int8 scale/zero_point, or None where nothing travels as int8


def wire_quants(manifest: Manifest, split: Split, encoding: str, adaptive: bool) -> dict[Split, Quant]:
    """The int8 quantisation of every split a runtime may offload at (its fixed one, or under an adapter every
    one); None where nothing is int8. Refuses an int8 boundary without calibrated parameters."""
    n = len(manifest.split_points)
    every = [*range(n), *(f"{CASCADE}{k}" for k in range(n)), DEVICE_SPLIT, CLOUD_SPLIT]
    return {s: _wire_quant(manifest, s, encoding, adaptive) for s in (every if adaptive else [split])}


def _wire_quant(manifest: Manifest, split: Split, encoding: str, adaptive: bool) -> Quant:
    if encoding != "int8" or split == DEVICE_SPLIT or cascade_point(split) is not None:
        return None  # a cascade sends raw pixels (UINT8 when lossless), never int8
    if split == CLOUD_SPLIT:
        if adaptive:
            return None  # the planner never sends the input as int8; see Planner(encodings=...)
        raise ConfigError("int8 needs calibrated quantisation, and the raw input has none; "
                          "use --encoding fp16 or fp32 with --split cloud")
    q = manifest.split_points[int(split)].quantization
    if not q:
        raise ConfigError(f"split {split} has no calibrated int8 quantisation; run "
                          "`edgeexit calibrate BUNDLE` first, or use --encoding fp16")
    return q


def candidate_split(c: Candidate) -> Split:
    """The split value of a planner candidate."""
    if c.strategy == "device-only":
        return DEVICE_SPLIT
    if c.strategy == "cloud-only":
        return CLOUD_SPLIT
    if c.strategy == "cascade":
        return f"{CASCADE}{c.split}"
    return int(c.split)
