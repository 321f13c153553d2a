"""`edgeexit doctor [BUNDLE] [--cloud HOST:PORT]`: is this machine ready to run a bundle (and reach its cloud)?

Each check prints one line, OK / WARN / FAIL, with what to do; exit 0 unless a check FAILs (then 1). Works on
any install (a missing package is a finding, not a crash): the base install is enough to run it.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

OK, WARN, FAIL = "OK", "WARN", "FAIL"
# A Pi has no real-time clock: before NTP syncs it may think it is 1970 (or its last shutdown), and TLS then
# rejects every certificate as not yet valid. Any wall clock before this date is certainly wrong.
EARLIEST_PLAUSIBLE = time.mktime((2025, 1, 1, 0, 0, 0, 0, 0, -1))
DEVICE_PACKAGES = ("grpc_health", "zstandard", "prometheus_client")  # agent and serve import these
MIB = 1 << 20


@dataclass
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""
    data: dict[str, Any] = field(default_factory=dict)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "doctor", help="check this machine: backends, a bundle's integrity, the cloud, clock, disk and memory",
        description="Check what a device (or server) needs: inference backends found (onnxruntime and its "
                    "providers, LiteRT; torch should be absent on a device), BUNDLE loaded with every checksum "
                    "and the formats this machine can run, the cloud ready (ServerReady) and serving the same "
                    "bundle digest (ModelMetadata versions), the clocks, free disk and memory. One line per "
                    "check, OK/WARN/FAIL with what to do; exit 1 when any check fails, else 0.")
    p.add_argument("bundle", nargs="?", help="a <name>.edgeexit bundle to verify (optional)")
    p.add_argument("--cloud", metavar="HOST:PORT", help="`edgeexit serve` (or Triton) the agent will offload to")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds for each cloud call (default 3)")
    p.add_argument("--token-file", help="file holding the bearer token the cloud requires (as the agent's)")
    p.add_argument("--tls-ca", help="PEM CA of the cloud's certificate (enables TLS, as the agent's)")
    p.add_argument("--tls-cert", help="client certificate for mTLS")
    p.add_argument("--tls-key", help="client key for mTLS")
    p.add_argument("--tls-server-name", metavar="NAME", help="check the cloud's certificate against NAME")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    checks = [check_python(), *check_backends()]
    bundle = None
    if args.bundle:
        bundle_check, bundle = check_bundle(args.bundle, checks[1].data)
        checks.append(bundle_check)
    if args.cloud:
        checks.append(check_cloud(args, bundle))
    checks += [check_clock(), check_disk(Path(args.bundle) if args.bundle else Path.cwd()), check_memory()]
    failed = any(c.status == FAIL for c in checks)
    if args.json:
        print(json.dumps({"ok": not failed, "checks": [asdict(c) for c in checks]}, indent=2))
    else:
        for c in checks:
            print(f"{c.status:<4}  {c.name:<9} {c.detail}" + (f"\n{'':15} -> {c.fix}" if c.fix else ""))
        print("doctor: " + ("FAIL: fix the lines marked FAIL" if failed else "all checks passed"))
    return 1 if failed else 0


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_python() -> Check:
    v = sys.version_info
    ok = v >= (3, 11)
    return Check("python", OK if ok else FAIL, f"{sys.version.split()[0]} at {sys.executable}",
                 "" if ok else "edgeexit needs Python 3.11 or newer", {"version": sys.version.split()[0]})


def check_backends() -> list[Check]:
    """onnxruntime (imported: its providers), LiteRT (found, not imported: slow), torch (found or not)."""
    backends: dict[str, Any] = {"onnxruntime": None, "litert": None, "torch": None}
    ort_note = "absent"
    try:
        import onnxruntime as ort

        backends["onnxruntime"] = {"version": ort.__version__, "providers": ort.get_available_providers()}
        ort_note = f"{ort.__version__} ({', '.join(ort.get_available_providers())})"
    except ImportError as e:  # absent, or a broken wheel (a missing shared library)
        if importlib.util.find_spec("onnxruntime") is not None:
            ort_note = f"installed but fails to import ({e})"
    if importlib.util.find_spec("ai_edge_litert") is not None:
        backends["litert"] = {"version": _version("ai-edge-litert")}
    if importlib.util.find_spec("torch") is not None:
        backends["torch"] = {"version": _version("torch")}
    litert = backends["litert"]
    detail = f"onnxruntime {ort_note}; LiteRT {litert['version'] if litert else 'absent'}"
    if backends["onnxruntime"] is None and litert is None:
        found = Check("backends", FAIL, detail, 'install one: pip install "edgeexit[device]" (onnxruntime) or '
                      '"edgeexit[device-litert]" (LiteRT)', backends)
    else:
        found = Check("backends", OK, detail, data=backends)
    torch = Check("torch", OK, "absent (the runtime never needs it)")
    if backends["torch"]:
        torch = Check("torch", WARN, f"{backends['torch']['version']} installed: needed only to export",
                      "on a device, install edgeexit[device] in a venv without torch (it frees ~1 GB)")
    missing = [m for m in DEVICE_PACKAGES if importlib.util.find_spec(m) is None]
    pkgs = Check("packages", OK, "grpcio-health-checking, zstandard, prometheus-client present")
    if missing:
        pkgs = Check("packages", FAIL, f"missing {', '.join(missing)}: `edgeexit agent` and `serve` need them",
                     'pip install "edgeexit[device]" (or [serve] on a server)', {"missing": missing})
    return [found, torch, pkgs]


def runnable_formats(formats: list[str], backends: dict[str, Any]) -> list[str]:
    """The bundle's formats a backend here runs: onnx on onnxruntime, tflite* on LiteRT."""
    return [f for f in formats if (f == "onnx" and backends.get("onnxruntime"))
            or (f.startswith("tflite") and backends.get("litert"))]


def check_bundle(path: str, backends: dict[str, Any]) -> tuple[Check, Any]:
    from edgeexit.bundle import Bundle
    from edgeexit.errors import EdgeExitError

    try:
        bundle = Bundle.load(path, verify=True)  # every file against its sha256
    except EdgeExitError as e:
        return Check("bundle", FAIL, f"{path}: {e}", "re-copy or re-export the bundle"), None
    formats = bundle.formats
    can = runnable_formats(formats, backends)
    data = {"name": bundle.name, "digest": bundle.digest, "segments": len(bundle.manifest.segments),
            "formats": formats, "runnable": can}
    detail = (f"{bundle.name}: {len(bundle.manifest.segments)} segments, checksums OK, digest {bundle.digest}, "
              f"formats {', '.join(formats) or 'none'}")
    if not can:
        return Check("bundle", FAIL, f"{detail}; none runs here",
                     'onnx needs edgeexit[device], tflite needs edgeexit[device-litert]', data), bundle
    return Check("bundle", OK, f"{detail}; runs here: {', '.join(can)}", data=data), bundle


def check_cloud(args: argparse.Namespace, bundle: Any) -> Check:
    """ServerReady with our token/TLS, then (with a bundle) ModelMetadata's versions against its digest."""
    import grpc

    from edgeexit.errors import BundleMismatch, EdgeExitError, PeerRefused
    from edgeexit.runtime.client import ClientOptions, InferenceClient
    from edgeexit.runtime.proto import grpc_service_pb2 as pb
    from edgeexit.runtime.security import read_token_file

    target = args.cloud
    try:
        options = ClientOptions(tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key,
                                token=read_token_file(args.token_file) if args.token_file else None,
                                tls_server_name=args.tls_server_name)
        client = InferenceClient(target, options, bundle=bundle.digest if bundle else None,
                                 model=bundle.name if bundle else None)
    except EdgeExitError as e:
        return Check("cloud", FAIL, f"{target}: {e}", "fix the address or the TLS/token flags")
    t0 = time.perf_counter()
    with client:
        try:
            client.check_health(args.timeout)  # ready, token accepted, and no digest that differs from ours
        except BundleMismatch as e:
            return Check("cloud", FAIL, f"{target}: {e}", f"serve this bundle ({bundle.digest}) on the cloud, or "
                         "copy the cloud's bundle here", {"cloud_digest": e.served, "digest": bundle.digest})
        except PeerRefused as e:
            return Check("cloud", FAIL, f"{target} refuses us: {e}", "use the cloud's token and CA (--token-file, "
                         "--tls-ca), as the agent will")
        except EdgeExitError as e:
            return Check("cloud", FAIL, f"{target} unreachable or not ready within {args.timeout:g} s: {e}",
                         "is `edgeexit serve` running there? check the address, port and firewall")
        rtt_ms = (time.perf_counter() - t0) * 1000
        data: dict[str, Any] = {"target": target, "ready_ms": round(rtt_ms, 1)}
        if bundle is None:
            return Check("cloud", OK, f"{target} ready ({rtt_ms:.0f} ms); give BUNDLE to compare digests", data=data)
        try:  # check_health passes a server that lacks the model: say so here
            meta = client._stub.ModelMetadata(pb.ModelMetadataRequest(name=bundle.name), timeout=args.timeout,
                                              metadata=client._metadata)
        except grpc.RpcError as e:
            return Check("cloud", FAIL, f"{target} is ready but ModelMetadata({bundle.name}) fails: "
                         f"{e.code().name} {e.details()}", "serve this bundle there", data)
    versions = list(meta.versions)
    data["versions"] = versions
    if bundle.digest in versions:
        return Check("cloud", OK, f"{target} ready ({rtt_ms:.0f} ms), serves {bundle.name} with the same bundle "
                     f"digest {bundle.digest}", data=data)
    # Triton lists integer versions: it checks the requests' edgeexit.bundle parameter itself.
    return Check("cloud", WARN, f"{target} ready ({rtt_ms:.0f} ms), serves {bundle.name} with versions "
                 f"{versions}: no digest to compare (Triton?); it refuses a mismatched bundle per request",
                 "check that its repository was made from this bundle (`edgeexit triton-repo` prints its digest)",
                 data)


def check_clock() -> Check:
    """The monotonic clock (deadlines, link estimates) and a plausible wall clock (TLS validity). The wall clock
    is not compared with the cloud's: OIP gRPC carries no server time (no HTTP Date), so NTP is the check."""
    info = time.get_clock_info("monotonic")
    now = time.time()
    data = {"monotonic": info.monotonic, "monotonic_resolution_s": info.resolution, "wall_clock": now}
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(now))
    if not info.monotonic:
        return Check("clock", FAIL, "no monotonic clock", "edgeexit's deadlines need one (a Linux kernel has it)",
                     data)
    if now < EARLIEST_PLAUSIBLE:
        return Check("clock", FAIL, f"wall clock says {stamp}: certainly wrong (no RTC, NTP not synced yet?)",
                     "enable NTP (timedatectl set-ntp true) and wait for sync: TLS rejects certificates", data)
    return Check("clock", OK, f"monotonic ({info.implementation}); wall clock {stamp}, not compared with the "
                 "cloud's (gRPC carries no server time): keep NTP on", data=data)


def check_disk(where: Path) -> Check:
    where = where if where.exists() else Path.cwd()
    free = shutil.disk_usage(where).free
    data = {"path": str(where), "free_mib": free // MIB}
    detail = f"{free / MIB:,.0f} MiB free at {where}"
    if free < 100 * MIB:
        return Check("disk", FAIL, detail, "free disk space: logs and bundle updates need room", data)
    if free < 500 * MIB:
        return Check("disk", WARN, detail, "little room left for logs and bundle updates", data)
    return Check("disk", OK, detail, data=data)


def check_memory() -> Check:
    try:
        with open("/proc/meminfo") as f:
            info = {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f) if v.split()}
        avail = info["MemAvailable"]
    except (OSError, KeyError, ValueError):
        return Check("memory", WARN, "unknown (no /proc/meminfo)", "check free memory by hand: the agent needs "
                     "about 100 MiB plus its bundle's segments")
    data = {"available_mib": avail // MIB, "total_mib": info.get("MemTotal", 0) // MIB, "cpus": os.cpu_count()}
    detail = f"{avail / MIB:,.0f} MiB available of {info.get('MemTotal', 0) / MIB:,.0f} MiB; {os.cpu_count()} CPUs"
    if avail < 100 * MIB:
        return Check("memory", FAIL, detail, "free memory: the agent needs about 100 MiB plus its segments", data)
    if avail < 256 * MIB:
        return Check("memory", WARN, detail, "little memory left: watch the agent's RSS (/metrics)", data)
    return Check("memory", OK, detail, data=data)
