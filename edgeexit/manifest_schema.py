"""The schema of ``manifest.json``, checked completely before anything is built from it.

A bundle may come from anywhere (a copy, a download, an attacker), so loading trusts nothing in it:

- ``parse_manifest`` refuses invalid UTF-8/JSON, duplicate keys in an object, and nesting deeper than
  ``MAX_DEPTH`` (deep JSON would otherwise blow Python's recursion limit somewhere later);
- ``check_manifest_dict`` checks every field's type and range (names, shapes, dtypes, counts, the file
  entries' paths and hashes, quantisation, policy and profile shapes) and names the field that is wrong;
- ``check_consistency`` (run by ``Manifest.check``, for loaded and hand-built manifests alike) checks that the
  parts agree: the segment chain, exit ownership, split points, and that no two entries name the same file.

Every problem is a one-line ``BundleError`` ("manifest.json is malformed: segments[2].files must be an object mapping
format -> file; re-export the bundle"); nothing here raises anything else. Echoed values are truncated.
File paths must be relative, with ``/`` separators and no ``..``: ``Bundle`` also refuses, before opening
anything, a path that resolves (through symlinks) outside the bundle.
"""

from __future__ import annotations

import json
import math
import re
from typing import TYPE_CHECKING, Any

from edgeexit.errors import BundleError

if TYPE_CHECKING:
    from edgeexit.bundle import Manifest

MANIFEST = "manifest.json"
BATCH = "batch"
DTYPES = ("float32", "float16", "int8", "uint8", "int64", "int32")
MAX_DEPTH = 32  # the schema itself nests 6 deep; free-form parts (policy, export) get the rest
MAX_DIM = 2**31 - 1
MAX_SAMPLE_ELEMENTS = 2**31  # elements of one sample of one tensor: far above any edge model
MAX_RANK = 8
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_FIXED_BATCH = re.compile(r"^fixed:[1-9][0-9]{0,8}$")
_AXIS_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")  # a named dynamic axis, e.g. "seq" (Manifest.dims)
_REEXPORT = "re-export the bundle"
_RECALIBRATE = "re-run `edgeexit calibrate BUNDLE`"
_REPROFILE = "re-run `edgeexit profile BUNDLE`"


def _show(value: Any, limit: int = 60) -> str:
    """A value for a message: one line, bounded (a hostile manifest must not make a huge error)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def fail(where: str, what: str, todo: str = _REEXPORT) -> BundleError:
    return BundleError(f"{MANIFEST} is malformed: {where + ' ' if where else ''}{what}; {todo}")


# ---------------------------------------------------------------------------------------------- parsing


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise fail(f"key {_show(key)}", "appears twice in one object (the bundle is corrupt or hostile)")
        out[key] = value
    return out


def _depth(value: Any) -> int:
    """Nesting depth, iteratively (the point is not to recurse on hostile input)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict | list):
            deepest = max(deepest, d)
            if d > MAX_DEPTH:
                return d
            stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return deepest


def parse_manifest(raw: bytes) -> Any:
    """The manifest's JSON value; BundleError for anything that is not clean, shallow JSON."""
    try:
        data = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise fail("", f"nests deeper than JSON can be read (limit {MAX_DEPTH}); the bundle is corrupt "
                   "or hostile", _REEXPORT) from None
    except UnicodeDecodeError as e:
        raise fail("", f"is not UTF-8 ({e.reason} at byte {e.start}); the bundle is corrupted") from None
    except ValueError as e:  # JSONDecodeError, and int() of a 5,000-digit number
        raise fail("", f"is not valid JSON ({str(e)[:120]}); the bundle is corrupted") from None
    if _depth(data) > MAX_DEPTH:
        raise fail("", f"nests deeper than {MAX_DEPTH} levels; the bundle is corrupt or hostile")
    return data


# ---------------------------------------------------------------------------------------------- field types


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _obj(v: Any, where: str, keys: set[str], required: set[str], todo: str = _REEXPORT) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise fail(where, f"must be an object, not {type(v).__name__}", todo)
    unknown = sorted(set(v) - keys)
    if unknown:
        raise fail(where, f"has unknown keys {_show(unknown)} (this edgeexit knows {sorted(keys)})", todo)
    missing = sorted(required - set(v))
    if missing:
        raise fail(where, f"lacks {missing}", todo)
    return v


def _list(v: Any, where: str, todo: str = _REEXPORT, min_len: int = 0, max_len: int = 100_000) -> list[Any]:
    if not isinstance(v, list):
        raise fail(where, f"must be a list, not {type(v).__name__}", todo)
    if not min_len <= len(v) <= max_len:
        raise fail(where, f"must have {min_len}..{max_len} entries, has {len(v)}", todo)
    return v


def _int(v: Any, where: str, lo: int = 0, hi: int = 2**62, todo: str = _REEXPORT) -> int:
    if not _is_int(v) or not lo <= v <= hi:
        raise fail(where, f"must be an integer in [{lo}, {hi}], not {_show(v)}", todo)
    return v


def _num(v: Any, where: str, todo: str = _REEXPORT, positive: bool = False) -> float:
    if not _is_num(v) or (positive and v <= 0):
        raise fail(where, f"must be a finite number{' > 0' if positive else ''}, not {_show(v)}", todo)
    return float(v)


def _str(v: Any, where: str, todo: str = _REEXPORT, max_len: int = 256) -> str:
    if not isinstance(v, str) or not 0 < len(v) <= max_len or "\x00" in v:
        raise fail(where, f"must be a non-empty string of at most {max_len} characters, not {_show(v)}", todo)
    return v


def check_shape(shape: Any, where: str, axes: frozenset[str] = frozenset()) -> None:
    """A list of positive ints, ``"batch"`` as its first axis or one of ``axes`` (the manifest's ``dims``) after
    it; its per-sample size (fixed axes) bounded."""
    dims = _list(shape, where, min_len=1, max_len=MAX_RANK)
    elements = 1
    for i, d in enumerate(dims):
        if (d == BATCH and i == 0) or (i > 0 and isinstance(d, str) and d in axes):
            continue
        if not _is_int(d) or not 1 <= d <= MAX_DIM:
            allowed = "a positive integer" + (" or 'batch'" if i == 0 else " (or an axis named in dims)")
            raise fail(f"{where}[{i}]", f"must be {allowed}, not {_show(d)}")
        elements *= d
    if elements > MAX_SAMPLE_ELEMENTS:
        raise fail(where, f"holds {elements} elements per sample (limit {MAX_SAMPLE_ELEMENTS})")


def check_tensor(v: Any, where: str, extra_keys: frozenset[str] = frozenset(), axes: frozenset[str] = frozenset()
                 ) -> None:
    _obj(v, where, {"name", "shape", "dtype"} | extra_keys, {"name", "shape"})
    _str(v["name"], f"{where}.name")
    check_shape(v["shape"], f"{where}.shape", axes)
    if v.get("dtype", "float32") not in DTYPES:
        raise fail(f"{where}.dtype", f"must be one of {list(DTYPES)}, not {_show(v.get('dtype'))}")


def check_path(path: Any, where: str) -> str:
    """A bundle-relative path: ``/`` separators, no absolute path, drive, ``..``, ``.`` or empty part."""
    p = _str(path, where, max_len=1024)
    parts = p.split("/")
    if p.startswith("/") or "\\" in p or ":" in parts[0] or any(part in ("", ".", "..") for part in parts):
        raise fail(where, f"{_show(p)} is not a plain path inside the bundle (absolute, '..' or odd); "
                   "the bundle is corrupt or hostile")
    return p


def _check_file(v: Any, where: str) -> None:
    _obj(v, where, {"path", "sha256", "bytes", "batch", "extra"}, {"path", "sha256", "bytes"})
    check_path(v["path"], f"{where}.path")
    if not isinstance(v["sha256"], str) or not _SHA256.match(v["sha256"]):
        raise fail(f"{where}.sha256", f"must be 64 lowercase hex digits, not {_show(v['sha256'])}")
    _int(v["bytes"], f"{where}.bytes")
    batch = v.get("batch", "dynamic")
    if batch != "dynamic" and not (isinstance(batch, str) and _FIXED_BATCH.match(batch)):
        raise fail(f"{where}.batch", f"must be 'dynamic' or 'fixed:<n>', not {_show(batch)}")
    if not isinstance(v.get("extra", {}), dict):
        raise fail(f"{where}.extra", "must be an object")


def _check_segment(v: Any, where: str, axes: frozenset[str]) -> None:
    _obj(v, where, {"index", "files", "inputs", "outputs", "exits", "flops", "param_bytes"},
         {"index", "files", "inputs", "outputs", "exits"})
    _int(v["index"], f"{where}.index", hi=10_000)
    files = v["files"]
    if not isinstance(files, dict) or not files:
        raise fail(f"{where}.files", "must be an object mapping format -> file")
    for fmt, entry in files.items():
        _str(fmt, f"{where}.files key", max_len=64)
        _check_file(entry, f"{where}.files[{_show(fmt, 30)}]")
    for part in ("inputs", "outputs"):
        for i, t in enumerate(_list(v[part], f"{where}.{part}", min_len=1, max_len=1_000)):
            check_tensor(t, f"{where}.{part}[{i}]", axes=axes)
    for i, j in enumerate(_list(v["exits"], f"{where}.exits", max_len=1_000)):
        _int(j, f"{where}.exits[{i}]", hi=10_000)
    for key in ("flops", "param_bytes"):
        _int(v.get(key, 0), f"{where}.{key}")


def _check_split(v: Any, where: str, axes: frozenset[str]) -> None:
    _obj(v, where, {"index", "tensor", "bytes_per_sample", "quantization", "bottleneck"},
         {"index", "tensor", "bytes_per_sample"})
    _int(v["index"], f"{where}.index", hi=10_000)
    check_tensor(v["tensor"], f"{where}.tensor", axes=axes)
    per = v["bytes_per_sample"]
    if not isinstance(per, dict):
        raise fail(f"{where}.bytes_per_sample", "must be an object mapping encoding -> bytes")
    for enc, n in per.items():
        _int(n, f"{where}.bytes_per_sample[{_show(enc, 30)}]")
    q = v.get("quantization")
    if q is not None:
        _obj(q, f"{where}.quantization", {"scale", "zero_point"}, {"scale", "zero_point"})
        _num(q["scale"], f"{where}.quantization.scale", positive=True)
        _int(q["zero_point"], f"{where}.quantization.zero_point", lo=-128, hi=127)
    b = v.get("bottleneck")
    if b is not None:  # a learned bottleneck's code (edgeexit/bottleneck.py)
        keys = {"module", "input_shape", "encoder_param_bytes"}
        _obj(b, f"{where}.bottleneck", keys, keys)
        _str(b["module"], f"{where}.bottleneck.module")
        for i, d in enumerate(_list(b["input_shape"], f"{where}.bottleneck.input_shape", min_len=1, max_len=MAX_RANK)):
            _int(d, f"{where}.bottleneck.input_shape[{i}]", lo=1, hi=MAX_DIM)
        _int(b["encoder_param_bytes"], f"{where}.bottleneck.encoder_param_bytes")


def _check_exit(v: Any, where: str) -> None:
    _obj(v, where, {"index", "segment", "output", "num_classes", "cumulative_flops"},
         {"index", "segment", "output", "num_classes"})
    _int(v["index"], f"{where}.index", hi=10_000)
    _int(v["segment"], f"{where}.segment", hi=10_000)
    _str(v["output"], f"{where}.output")
    _int(v["num_classes"], f"{where}.num_classes", lo=1, hi=10_000_000)
    _int(v.get("cumulative_flops", 0), f"{where}.cumulative_flops")


def _numbers_or_null(v: Any, where: str, todo: str) -> None:
    for i, x in enumerate(_list(v, where, todo)):
        if x is not None and not _is_num(x):
            raise fail(f"{where}[{i}]", f"must be a finite number or null, not {_show(x)}", todo)


def _check_policy(v: Any) -> None:
    """What the runtime reads of a calibrated policy (the rest is the calibration's report, kept as is)."""
    if v is None:
        return
    if not isinstance(v, dict):
        raise fail("policy", f"must be an object or null, not {type(v).__name__}", _RECALIBRATE)
    if "kind" in v and v["kind"] is not None:
        _str(v["kind"], "policy.kind", _RECALIBRATE, max_len=64)
    if v.get("thresholds") is not None:
        _numbers_or_null(v["thresholds"], "policy.thresholds", _RECALIBRATE)
    if v.get("params") is not None and not isinstance(v["params"], dict):
        raise fail("policy.params", "must be an object", _RECALIBRATE)
    if v.get("final_accuracy") is not None:
        _num(v["final_accuracy"], "policy.final_accuracy", _RECALIBRATE)
    for i, c in enumerate(_list(v.get("candidates", []), "policy.candidates", _RECALIBRATE)):
        where = f"policy.candidates[{i}]"
        if not isinstance(c, dict):
            raise fail(where, "must be an object", _RECALIBRATE)
        if not isinstance(c.get("valid", False), bool):
            raise fail(f"{where}.valid", "must be true or false", _RECALIBRATE)
        if "name" in c:
            _str(c["name"], f"{where}.name", _RECALIBRATE)
        for key in ("exit_rates", "thresholds", "accuracy_delta"):
            if key in c:
                _numbers_or_null(c[key], f"{where}.{key}", _RECALIBRATE)


def _check_profiles(v: Any) -> None:
    if not isinstance(v, dict):
        raise fail("profiles", f"must be an object mapping role -> profile, not {type(v).__name__}", _REPROFILE)
    for role, p in v.items():
        where = f"profiles[{_show(role, 30)}]"
        if not isinstance(p, dict):
            raise fail(where, "must be an object", _REPROFILE)
        _str(p.get("backend"), f"{where}.backend", _REPROFILE, max_len=64)
        _int(p.get("threads"), f"{where}.threads", lo=1, hi=4096, todo=_REPROFILE)
        for key in ("segment_ms", "segment_p90_ms", "encode_ms", "decode_ms"):
            table = p.get(key, {})
            if not isinstance(table, dict):
                raise fail(f"{where}.{key}", "must be an object", _REPROFILE)
            for k, ms in table.items():
                if key.startswith("segment") and not (k.isdigit() and 0 < int(k) <= 1_000_000):
                    raise fail(f"{where}.{key}", f"keys are batch sizes, not {_show(k)}", _REPROFILE)
                for i, x in enumerate(_list(ms, f"{where}.{key}[{_show(k, 20)}]", _REPROFILE)):
                    if not _is_num(x) or x < 0:
                        raise fail(f"{where}.{key}[{_show(k, 20)}][{i}]", "must be a number >= 0", _REPROFILE)
        for key in ("slowdown", "request_ms"):
            if key in p:
                _num(p[key], f"{where}.{key}", _REPROFILE)
        for key in ("host", "device_class"):
            if key in p and not isinstance(p[key], str):
                raise fail(f"{where}.{key}", "must be a string", _REPROFILE)


def check_manifest_dict(d: dict[str, Any]) -> None:
    """Types and ranges of every field ``Manifest.from_dict`` reads (the schema string is checked before)."""
    _str(d.get("name"), "name", max_len=128)
    dims = d.get("dims", {})
    if not isinstance(dims, dict) or len(dims) > MAX_RANK * 8:
        raise fail("dims", "must be an object mapping an axis name -> {example, max}")
    for name, v in dims.items():
        where = f"dims[{_show(name, 30)}]"
        if not isinstance(name, str) or not _AXIS_NAME.match(name) or name == BATCH:
            raise fail(where, "is not an axis name (letters, digits, '_'; not 'batch')")
        _obj(v, where, {"example", "max"}, {"example", "max"})
        _int(v["max"], f"{where}.max", lo=1, hi=MAX_DIM)
        _int(v["example"], f"{where}.example", lo=1, hi=v["max"])
    axes = frozenset(dims)
    inp = d.get("input")
    check_tensor(inp, "input", frozenset({"normalization"}), axes)
    norm = inp.get("normalization")
    if norm is not None:
        _obj(norm, "input.normalization", {"mean", "std"}, {"mean", "std"})
        channels = inp["shape"][1] if len(inp["shape"]) > 1 else None
        for key in ("mean", "std"):
            values = _list(norm[key], f"input.normalization.{key}", min_len=1, max_len=MAX_DIM)
            for i, x in enumerate(values):
                _num(x, f"input.normalization.{key}[{i}]", positive=key == "std")
            if len(values) != channels:
                raise fail(f"input.normalization.{key}", f"has {len(values)} values for {channels} channels")
    for i, t in enumerate(_list(d.get("extra_inputs", []), "extra_inputs", max_len=64)):
        check_tensor(t, f"extra_inputs[{i}]", axes=axes)
    for i, s in enumerate(_list(d.get("segments"), "segments", min_len=1, max_len=1_000)):
        _check_segment(s, f"segments[{i}]", axes)
    for i, p in enumerate(_list(d.get("split_points"), "split_points", max_len=1_000)):
        _check_split(p, f"split_points[{i}]", axes)
    for i, e in enumerate(_list(d.get("exits"), "exits", min_len=1, max_len=1_000)):
        _check_exit(e, f"exits[{i}]")
    _check_policy(d.get("policy"))
    _check_profiles(d.get("profiles", {}))
    if not isinstance(d.get("export", {}), dict):
        raise fail("export", "must be an object")


# ---------------------------------------------------------------------------------------------- consistency


def _same_tensor(a: Any, b: Any) -> bool:
    return a.name == b.name and list(a.shape) == list(b.shape) and a.dtype == b.dtype


def _check_axes(m: Manifest) -> None:
    """Every named axis in a shape is one of ``dims``."""
    specs = [("input", m.input), *((f"extra_inputs[{i}]", t) for i, t in enumerate(m.extra_inputs))]
    specs += [(f"segments[{s.index}].{part}", t) for s in m.segments for part in ("inputs", "outputs")
              for t in getattr(s, part)]
    specs += [(f"split_points[{p.index}].tensor", p.tensor) for p in m.split_points]
    for where, t in specs:
        for d in t.shape[1:]:
            if isinstance(d, str) and d not in m.dims:
                raise fail(f"{where}.shape", f"names the axis {_show(d, 30)}, which dims does not list")


def check_consistency(m: Manifest) -> None:
    """The parts of a (type-correct) manifest agree with each other and with the layout in ``edgeexit.bundle``."""
    if not m.segments or not m.exits:
        raise fail("", "lists no segments or no exits")
    n = len(m.segments)
    seen: dict[str, str] = {}
    extras = {t.name: t for t in m.extra_inputs}
    if len(extras) != len(m.extra_inputs) or m.input.name in extras:
        raise fail("extra_inputs", "repeat a name (of input or of each other)")
    _check_axes(m)
    for k, seg in enumerate(m.segments):
        want_in = m.input.name if k == 0 else f"boundary{k - 1}"
        carried = seg.inputs[1:]
        order = [t.name for t in m.extra_inputs if t.name in {c.name for c in carried}]
        if seg.index != k or seg.inputs[0].name != want_in or [c.name for c in carried] != order or \
                any(not _same_tensor(c, extras[c.name]) for c in carried):
            what = f"{want_in!r}, then extra inputs in extra_inputs order" if m.extra_inputs else f"only {want_in!r}"
            raise fail(f"segments[{k}]", f"must read {what}, as segment {k}")
        want_out = ([f"boundary{k}"] if k < n - 1 else []) + [f"exit{j}" for j in seg.exits]
        if [t.name for t in seg.outputs] != want_out:
            raise fail(f"segments[{k}].outputs", f"are {_show([t.name for t in seg.outputs])}, expected {want_out}")
        if k > 0 and not _same_tensor(seg.inputs[0], m.segments[k - 1].outputs[0]):
            raise fail(f"segments[{k}].inputs[0]", f"differs from what segment {k - 1} writes")
        for fmt, entry in seg.files.items():
            where = f"segments[{k}].files[{_show(fmt, 30)}].path"
            path = check_path(entry.path, where)
            if path in seen:
                raise fail(where, f"{_show(path)} is also {seen[path]}: two entries name one file; the bundle is "
                           "corrupt or hostile")
            seen[path] = where
    first = m.segments[0].inputs[0]
    if list(first.shape) != list(m.input.shape):
        raise fail("segments[0].inputs[0].shape", f"is {first.shape} but input.shape is {m.input.shape}")
    owned = [j for s in m.segments for j in s.exits]
    if owned != list(range(len(m.exits))) or [e.index for e in m.exits] != owned:
        raise fail("exits", f"heads {owned} are not 0..{len(m.exits) - 1} in order")
    for e in m.exits:
        seg = m.segments[e.segment] if 0 <= e.segment < n else None
        if seg is None or e.index not in seg.exits or e.output != f"exit{e.index}":
            raise fail(f"exits[{e.index}]", f"says segment {e.segment} / output {e.output!r}, but segment owning "
                       f"exit {e.index} writes it as 'exit{e.index}'")
        spec = next(t for t in seg.outputs if t.name == e.output)
        if len(spec.shape) != 2 or spec.shape[-1] != e.num_classes:
            raise fail(f"exits[{e.index}].num_classes", f"is {e.num_classes} but its output's shape is {spec.shape}")
    if [p.index for p in m.split_points] != list(range(n - 1)):
        raise fail("split_points", "must be 0..len(segments)-2, one after each segment but the last")
    for p in m.split_points:
        if not _same_tensor(p.tensor, m.segments[p.index].outputs[0]):
            raise fail(f"split_points[{p.index}].tensor", f"differs from segment {p.index}'s boundary output")
