"""The bundle: ``<name>.edgeexit/`` with ``manifest.json`` and ``segments/``, the one contract between parts.

Layout and naming (everything downstream relies on it):
- segment ``k`` reads ``input`` (k = 0) or ``boundary{k-1}`` and writes ``boundary{k}`` (all but the last)
  plus ``exit{j}`` for every exit head ``j`` that branches inside it;
- split point ``s`` is the boundary after segment ``s`` (``0 <= s < len(segments) - 1``): a device running
  split ``s`` runs segments ``0..s`` and the cloud runs the tail ``s+1..`` (model name ``<model>@<s>``);
- shapes use the string ``"batch"`` for the dynamic batch axis; a model with other dynamic axes (a sequence
  length) names them too, and ``Manifest.dims`` gives each its example and largest size;
- a model with several inputs (``forward(input_ids, attention_mask)``) lists the first as ``input`` and the rest
  as ``extra_inputs``. Extra inputs are *carried*: a segment that reads one takes it by its own name after its
  primary input (``input`` or ``boundary{k-1}``), so a split point's tensor set is the boundary plus the extra
  inputs the tail reads (``Manifest.carried``); they travel as they are.

Loading trusts nothing in the bundle: ``edgeexit.manifest_schema`` checks every field of the manifest, and
no file is opened unless its path stays inside the bundle (symlinks followed) and is a regular file.

Identity: ``Manifest.model_digest()`` (``Bundle.digest``) is a sha256 over what decides the model's answers
(name, input spec and normalisation, per segment its files' sha256, inputs, outputs and exits, split point
tensors and int8 quantisation), not over calibration, statistics or latency profiles: re-calibrating or
re-profiling a bundle keeps its digest, a changed segment file changes it.

This module is torch-free: the device loads bundles too.
"""

from __future__ import annotations

import hashlib
import json
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgeexit import manifest_schema as mschema
from edgeexit.errors import BundleError
from edgeexit.manifest_schema import BATCH, MANIFEST

SCHEMA = "edgeexit.bundle/1"
MAX_MANIFEST_BYTES = 16 << 20  # a real manifest is tens of KB; refuse to read a huge one into memory
DTYPE_BYTES = {"float32": 4, "float16": 2, "int8": 1, "uint8": 1, "int64": 8, "int32": 4}


@dataclass
class TensorSpec:
    name: str
    shape: list[int | str]
    dtype: str = "float32"

    def sample_elements(self, dims: dict[str, dict[str, int]] | None = None, size: str = "example") -> int:
        """Elements per sample (every axis but the batch axis); another named axis counts at its ``size``
        ("example" or "max") in ``dims`` (``Manifest.dims``)."""
        n = 1
        for d in self.shape:
            if d == BATCH:
                continue
            n *= int(dims[d][size]) if isinstance(d, str) and dims else int(d)
        return n


@dataclass
class InputSpec(TensorSpec):
    # Per-channel normalisation the runtime applies to raw [0, 1] pixels; None means "already normalised".
    normalization: dict[str, list[float]] | None = None


@dataclass
class FileEntry:
    path: str  # relative to the bundle root
    sha256: str
    bytes: int
    batch: str = "dynamic"  # "dynamic" or "fixed:<n>" (a runtime must resize or loop)
    extra: dict[str, Any] = field(default_factory=dict)  # format-specific facts (e.g. TFLite name mapping)


@dataclass
class Segment:
    index: int
    files: dict[str, FileEntry]  # format name ("onnx", "tflite", "tflite-int8", ...) -> file
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    exits: list[int]  # exit heads owned by this segment, in output order after the boundary
    flops: int = 0  # per sample (multiply-adds counted as 2)
    param_bytes: int = 0


@dataclass
class SplitPoint:
    index: int
    tensor: TensorSpec
    bytes_per_sample: dict[str, int]  # wire encoding -> bytes of one sample's boundary tensor
    quantization: dict[str, float] | None = None  # {"scale": s, "zero_point": z} for int8, from real data
    # a learned bottleneck's code (edgeexit/bottleneck.py): {"module", "input_shape", "encoder_param_bytes"};
    # None (and absent from manifest.json) elsewhere
    bottleneck: dict[str, Any] | None = None


@dataclass
class ExitInfo:
    index: int
    segment: int
    output: str
    num_classes: int
    cumulative_flops: int = 0  # per sample, from the input through this exit's head


@dataclass
class Manifest:
    name: str
    input: InputSpec
    segments: list[Segment]
    split_points: list[SplitPoint]
    exits: list[ExitInfo]
    schema: str = SCHEMA
    policy: dict[str, Any] | None = None  # written by `edgeexit calibrate`
    profiles: dict[str, Any] = field(default_factory=dict)  # written by `edgeexit profile`
    export: dict[str, Any] = field(default_factory=dict)  # provenance: source, opset, versions, tolerance
    extra_inputs: list[TensorSpec] = field(default_factory=list)  # the model's inputs after ``input``
    # named dynamic axes besides the batch -> {"example": size the byte counts use, "max": largest allowed}
    dims: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return self.exits[-1].num_classes

    @property
    def inputs(self) -> list[TensorSpec]:
        """Every model input, in forward() order."""
        return [self.input, *self.extra_inputs]

    def example_shape(self, spec: TensorSpec, batch: int) -> list[int]:
        """``spec``'s shape with ``batch`` rows and every named axis at its example size."""
        return [batch if d == BATCH else int(self.dims[d]["example"]) if isinstance(d, str) else int(d)
                for d in spec.shape]

    def input_bytes(self) -> int:
        """Bytes per sample of the raw input on the wire at the example sizes: 1 per pixel for an image (UINT8),
        every input in its own dtype for a model with several or integer inputs."""
        if not self.extra_inputs and self.input.dtype == "float32":
            return self.input.sample_elements()
        return sum(t.sample_elements(self.dims) * DTYPE_BYTES[t.dtype] for t in self.inputs)

    def carried(self, split: int) -> list[str]:
        """Extra inputs the tail after ``split`` reads (-1: the whole model): they cross with the boundary."""
        read = {t.name for s in self.segments[split + 1:] for t in s.inputs[1:]}
        return [t.name for t in self.extra_inputs if t.name in read]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for p in d["split_points"]:  # bundles without a bottleneck keep their manifest.json as before
            if p.get("bottleneck") is None:
                p.pop("bottleneck", None)
        for key in ("extra_inputs", "dims"):  # single-input bundles too
            if not d[key]:
                d.pop(key)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        if not isinstance(d, dict) or d.get("schema") != SCHEMA:
            found = d.get("schema") if isinstance(d, dict) else type(d).__name__
            raise BundleError(
                f"unknown bundle schema {found!r} (this edgeexit reads {SCHEMA!r}); "
                "re-export the model with this version of edgeexit"
            )
        mschema.check_manifest_dict(d)  # every field's type and range: what follows cannot fail on them
        try:
            inp = InputSpec(**d["input"])
            segments = [
                Segment(
                    index=s["index"],
                    files={k: FileEntry(**v) for k, v in s["files"].items()},
                    inputs=[TensorSpec(**t) for t in s["inputs"]],
                    outputs=[TensorSpec(**t) for t in s["outputs"]],
                    exits=list(s["exits"]),
                    flops=s.get("flops", 0),
                    param_bytes=s.get("param_bytes", 0),
                )
                for s in d["segments"]
            ]
            splits = [
                SplitPoint(
                    index=p["index"],
                    tensor=TensorSpec(**p["tensor"]),
                    bytes_per_sample=dict(p["bytes_per_sample"]),
                    quantization=p.get("quantization"),
                    bottleneck=p.get("bottleneck"),
                )
                for p in d["split_points"]
            ]
            exits = [ExitInfo(**e) for e in d["exits"]]
            return cls(
                name=d["name"], input=inp, segments=segments, split_points=splits, exits=exits,
                policy=d.get("policy"), profiles=d.get("profiles", {}), export=d.get("export", {}),
                extra_inputs=[TensorSpec(**t) for t in d.get("extra_inputs", [])],
                dims={k: dict(v) for k, v in d.get("dims", {}).items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:  # unreachable after the schema check
            raise BundleError(f"manifest.json is malformed ({e!r}); re-export the bundle") from e

    def check(self) -> None:
        """Structural invariants: chained names and shapes, exit ownership, split points, one file per entry.
        Raises BundleError."""
        mschema.check_consistency(self)

    def model_digest(self) -> str:
        """sha256 hex over what decides the segments' answers; calibration and profiles are left out, so
        re-calibrating or re-profiling keeps it (see the module docstring)."""

        def tensor(t: TensorSpec) -> dict[str, Any]:
            return {"name": t.name, "shape": list(t.shape), "dtype": t.dtype}

        identity = {
            "schema": self.schema, "name": self.name,
            "input": {**tensor(self.input), "normalization": self.input.normalization},
            "segments": [{"files": {fmt: e.sha256 for fmt, e in s.files.items()},
                          "inputs": [tensor(t) for t in s.inputs], "outputs": [tensor(t) for t in s.outputs],
                          "exits": list(s.exits)} for s in self.segments],
            "split_points": [{"tensor": tensor(p.tensor), "quantization": p.quantization} for p in self.split_points],
        }
        if self.extra_inputs:  # absent for single-input, fixed-shape models: their digests stay as they were
            identity["extra_inputs"] = [tensor(t) for t in self.extra_inputs]
        if self.dims:
            identity["dims"] = self.dims
        canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(canonical.encode()).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_entry(root: Path, relpath: str, **kw: Any) -> FileEntry:
    """Describe a file already written under ``root``: checksum and size."""
    p = Path(root) / relpath
    return FileEntry(path=relpath, sha256=sha256_file(p), bytes=p.stat().st_size, **kw)


class Bundle:
    """A loaded, validated bundle directory."""

    def __init__(self, root: Path, manifest: Manifest):
        self.root = Path(root)
        self.manifest = manifest

    @classmethod
    def load(cls, path: str | Path, verify: bool = True) -> Bundle:
        root = Path(path)
        if not root.is_dir():
            raise BundleError(f"{root} is not a bundle directory; create one with `edgeexit export MODEL --out {root}`")
        mpath = root / MANIFEST
        if not mpath.is_file():
            raise BundleError(f"{root} has no {MANIFEST}: not an edgeexit bundle, or a partial copy; re-export it")
        inside(root, MANIFEST, MANIFEST)
        try:
            with open(mpath, "rb") as f:
                raw = f.read(MAX_MANIFEST_BYTES + 1)
        except OSError as e:
            raise BundleError(f"cannot read {mpath} ({e.strerror}); check its permissions") from e
        if len(raw) > MAX_MANIFEST_BYTES:
            raise BundleError(f"{mpath} is larger than {MAX_MANIFEST_BYTES >> 20} MiB: not a manifest edgeexit "
                              "wrote; the bundle is corrupt or hostile, re-export it")
        manifest = Manifest.from_dict(mschema.parse_manifest(raw))
        manifest.check()
        bundle = cls(root, manifest)
        if verify:
            bundle.verify()
        return bundle

    def verify(self, formats: list[str] | None = None) -> None:
        """Check that every listed file is inside the bundle, distinct, exists and matches its sha256."""
        seen: dict[Path, str] = {}
        for seg in self.manifest.segments:
            for fmt, entry in seg.files.items():
                if formats is not None and fmt not in formats:
                    continue
                p = self.file_path(seg.index, fmt)
                if p in seen:  # e.g. two names linked to one file: a segment would run another's graph
                    raise BundleError(f"segment {seg.index} ({fmt}) file {entry.path} is the same file as "
                                      f"{seen[p]}; the bundle is corrupt or hostile, re-export it")
                seen[p] = f"segment {seg.index} ({fmt}) file {entry.path}"
                if sha256_file(p) != entry.sha256:
                    raise BundleError(
                        f"segment {seg.index} ({fmt}) file {entry.path} fails its sha256 check: "
                        "the bundle is corrupted or was edited; re-export it"
                    )

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def formats(self) -> list[str]:
        """Formats every segment has."""
        sets = [set(s.files) for s in self.manifest.segments]
        return sorted(set.intersection(*sets)) if sets else []

    def segment_path(self, k: int, fmt: str = "onnx") -> Path:
        seg = self.manifest.segments[k]
        if fmt not in seg.files:
            raise BundleError(
                f"segment {k} has no {fmt!r} file (has {sorted(seg.files)}); "
                f"export with `--formats {fmt}` to add it"
            )
        return self.file_path(k, fmt)

    def file_path(self, k: int, fmt: str) -> Path:
        """The resolved path of segment ``k``'s ``fmt`` file, refused (BundleError) unless it is a regular file
        inside the bundle: checked before anything opens it, since the manifest may be hostile."""
        entry = self.manifest.segments[k].files[fmt]
        what = f"segment {k} ({fmt}) file {entry.path!r}"
        p = inside(self.root, entry.path, what)
        try:
            mode = p.stat().st_mode
        except OSError:
            raise BundleError(f"{what} is missing; re-export the bundle") from None
        if not stat.S_ISREG(mode):  # a FIFO or device would hang or stream forever when read
            raise BundleError(f"{what} is not a regular file; the bundle is corrupt or hostile, re-export it")
        return p

    @property
    def digest(self) -> str:
        """The model's identity (``Manifest.model_digest``): equal digests answer alike."""
        return self.manifest.model_digest()

    def save(self) -> None:
        """Write the manifest back (after calibrate/profile); atomically, so a crash never leaves half a file."""
        write_manifest(self.root, self.manifest)


def inside(root: Path, relpath: str, what: str) -> Path:
    """``root / relpath`` resolved (symlinks followed), or BundleError if that leaves the bundle."""
    mschema.check_path(relpath, what)
    base = Path(root).resolve()
    try:
        p = (base / relpath).resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise BundleError(f"{what} cannot be resolved ({e}); the bundle is corrupt or hostile, re-export it") from e
    if not p.is_relative_to(base):
        raise BundleError(f"{what} resolves outside the bundle (a symlink, or a path out of it): refused "
                          "before opening it; the bundle is corrupt or hostile, re-export it")
    return p


def write_manifest(root: Path, manifest: Manifest) -> None:
    manifest.check()
    tmp = Path(root) / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
    tmp.replace(Path(root) / MANIFEST)
