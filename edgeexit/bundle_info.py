"""What a bundle holds, for `edgeexit info`: one JSON-ready dict (stable keys, ``INFO_SCHEMA``) and its text form.

Everything comes from the manifest (and, when verified, the files' sha256); nothing is run, so it works on a
device without onnxruntime. Non-finite numbers (a "never" threshold) appear as null in JSON, "-" in text.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from edgeexit.bundle import Bundle, TensorSpec

INFO_SCHEMA = "edgeexit.info/1"
_POLICY_KEYS = ("kind", "mode", "scheme", "epsilon", "delta", "final_accuracy")
_PROFILE_KEYS = ("backend", "threads", "device_class", "host", "slowdown")


def bundle_info(path: str | Path, verify: bool = True) -> dict[str, Any]:
    """The bundle's contents as plain data; raises BundleError for a bundle that does not load (or verify)."""
    bundle = Bundle.load(path, verify=verify)
    m = bundle.manifest
    policy = m.policy or {}
    thresholds = list(policy.get("thresholds") or [])
    stats = {s.get("exit"): s for s in policy.get("exit_stats") or [] if isinstance(s, dict)}
    return {
        "info_schema": INFO_SCHEMA,
        "path": str(bundle.root),
        "name": m.name,
        "digest": bundle.digest,
        "schema": m.schema,
        "verified": verify,
        "input": {**_tensor(m.input), "normalization": m.input.normalization},
        "formats": bundle.formats,
        "segments": [{
            "index": s.index, "exits": list(s.exits), "flops": s.flops, "param_bytes": s.param_bytes,
            "files": {fmt: {"path": f.path, "bytes": f.bytes, "batch": f.batch} for fmt, f in s.files.items()},
        } for s in m.segments],
        "split_points": [{
            "index": p.index, **_tensor(p.tensor), "bytes_per_sample": dict(p.bytes_per_sample),
            "int8_calibrated": p.quantization is not None, "quantization": p.quantization,
        } for p in m.split_points],
        "exits": [{
            "index": e.index, "segment": e.segment, "output": e.output, "num_classes": e.num_classes,
            "cumulative_flops": e.cumulative_flops,
            "threshold": _finite(thresholds[e.index]) if e.index < len(thresholds) else None,
            "exit_rate": _finite(stats.get(e.index, {}).get("exit_rate")),
            "accuracy": _finite(stats.get(e.index, {}).get("accuracy")),
        } for e in m.exits],
        "policy": None if not policy else {
            **{k: _finite(policy.get(k)) for k in _POLICY_KEYS},
            "thresholds": [_finite(t) for t in thresholds],
            "calibration": policy.get("calibration"),
            "candidates": len(policy.get("candidates") or []),
        },
        "profiles": {role: {k: p.get(k) for k in _PROFILE_KEYS} for role, p in sorted(m.profiles.items())
                     if isinstance(p, dict)},
        "export": dict(m.export),
    }


def _tensor(t: TensorSpec) -> dict[str, Any]:
    return {"name": t.name, "shape": list(t.shape), "dtype": t.dtype}


def _finite(x: Any) -> Any:
    return None if isinstance(x, float) and not math.isfinite(x) else x


def format_info(info: dict[str, Any]) -> str:
    """Aligned, compact text for humans."""
    inp = info["input"]
    norm = inp["normalization"]
    lines = [
        f"{info['name']}  ({info['schema']}, {'files verified' if info['verified'] else 'files NOT verified'})",
        _kv("path", info["path"]),
        _kv("digest", info["digest"]),
        _kv("input", f"{inp['name']} {inp['dtype']} {_shape(inp['shape'])}, normalisation "
                     + (", ".join(f"{k} {v}" for k, v in norm.items()) if norm else "none (raw [0, 1] pixels)")),
        _kv("formats", ", ".join(info["formats"]) or "-"),
    ]
    if info["export"]:
        e = info["export"]
        lines.append(_kv("export", ", ".join(f"{k} {e[k]}" for k in ("source", "opset", "torch") if k in e)))
    lines += ["", "segments"]
    lines += _table(["#", "files", "MFLOPs", "params", "exits"], [
        [s["index"], ", ".join(f"{fmt} {_bytes(f['bytes'])}" for fmt, f in s["files"].items()),
         f"{s['flops'] / 1e6:.1f}", _bytes(s["param_bytes"]), ",".join(map(str, s["exits"])) or "-"]
        for s in info["segments"]])
    if info["split_points"]:
        found = {e for p in info["split_points"] for e in p["bytes_per_sample"]}
        encodings = [e for e in ("fp32", "fp16", "int8") if e in found] + sorted(found - {"fp32", "fp16", "int8"})
        lines += ["", "split points (bytes per sample)"]
        lines += _table(["#", "boundary", *encodings, "int8 calibration"], [
            [p["index"], _shape(p["shape"]), *(_bytes(p["bytes_per_sample"].get(e)) for e in encodings),
             _quant(p["quantization"])] for p in info["split_points"]])
    lines += ["", "exits"]
    lines += _table(["#", "segment", "classes", "MFLOPs", "threshold", "exit rate", "accuracy"], [
        [e["index"], e["segment"], e["num_classes"], f"{e['cumulative_flops'] / 1e6:.1f}", _num(e["threshold"]),
         _num(e["exit_rate"]), _num(e["accuracy"])] for e in info["exits"]])
    lines += ["", _kv("policy", _policy(info["policy"]))]
    profiles = info["profiles"]
    lines.append(_kv("profiles", "; ".join(
        f"{role}: {p.get('backend')}, {p.get('threads')} thread(s), class {p.get('device_class')}"
        + (f" on {p['host']}" if p.get("host") else "") for role, p in profiles.items())
        or "none (measure with `edgeexit profile`)"))
    return "\n".join(lines)


def _policy(p: dict[str, Any] | None) -> str:
    if not p:
        return "none stored (every exit answers only if asked; run `edgeexit calibrate`)"
    parts = [str(p["kind"])] + [f"{k} {p[k]}" for k in ("mode", "scheme", "epsilon", "delta") if p.get(k) is not None]
    cal = p.get("calibration")
    if isinstance(cal, dict):
        parts.append("calibrated on " + " ".join(str(cal[k]) for k in ("dataset", "split") if cal.get(k))
                     + (f" ({cal['n']} rows)" if cal.get("n") else ""))
    if p.get("final_accuracy") is not None:
        parts.append(f"accuracy {_num(p['final_accuracy'])}")
    if p.get("candidates"):
        parts.append(f"{p['candidates']} settings tested")
    return ", ".join(parts)


def _quant(q: dict[str, Any] | None) -> str:
    return f"calibrated (scale {q['scale']:.4g}, zero point {q['zero_point']})" if q else "not calibrated"


def _kv(key: str, value: str) -> str:
    return f"{key:<9} {value}"


def _shape(shape: list[Any]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _num(x: Any) -> str:
    return "-" if x is None else f"{x:.4g}" if isinstance(x, float) else str(x)


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
