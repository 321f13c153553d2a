"""`edgeexit doctor`: against a real `edgeexit serve` on loopback (same bundle: OK; another digest: FAIL naming
both), a corrupt bundle, no cloud; and the extras map (edgeexit.extras) against pyproject.toml."""

from __future__ import annotations

import json
import re
import shutil
import socket
import sys
import tomllib
from pathlib import Path

import pytest

from edgeexit.bundle import MANIFEST, Bundle
from edgeexit.cli import main
from edgeexit.extras import BASE, EXTRA_MODULES, MODULE_EXTRA, extra_for, missing_extra
from edgeexit.runtime.oip_server import ServerOptions
from edgeexit.runtime.security import read_token_file

ROOT = Path(__file__).resolve().parents[1]


def doctor(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, dict]:
    rc = main(["doctor", *args, "--json"])
    return rc, json.loads(capsys.readouterr().out)


def by_name(report: dict) -> dict[str, dict]:
    return {c["name"]: c for c in report["checks"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_same_bundle_on_a_real_serve_is_ok(serve, service_bundle, capsys) -> None:
    handle = serve()
    rc, report = doctor(capsys, str(service_bundle), "--cloud", f"127.0.0.1:{handle.port}", "--timeout", "5")
    checks = by_name(report)
    digest = Bundle.load(service_bundle).digest
    assert checks["bundle"]["status"] == "OK" and checks["bundle"]["data"]["digest"] == digest
    assert "onnx" in checks["bundle"]["data"]["runnable"]
    assert checks["cloud"]["status"] == "OK" and digest in checks["cloud"]["detail"], checks["cloud"]
    assert checks["backends"]["data"]["onnxruntime"]["providers"]
    # Every check but these machine-dependent ones is OK here, so the exit code follows the FAIL lines.
    others = [c for c in report["checks"] if c["name"] not in ("torch", "disk", "memory")]
    assert all(c["status"] == "OK" for c in others), others
    assert rc == (1 if any(c["status"] == "FAIL" for c in report["checks"]) else 0) and report["ok"] == (rc == 0)


def test_another_bundle_on_the_cloud_fails_naming_both_digests(serve, service_bundle, tmp_path, capsys) -> None:
    other = tmp_path / "other.edgeexit"
    shutil.copytree(service_bundle, other)
    manifest = json.loads((other / MANIFEST).read_text())
    manifest["input"]["normalization"] = {"mean": [0.25], "std": [0.5]}  # what decides answers: a new digest
    (other / MANIFEST).write_text(json.dumps(manifest))
    ours, theirs = Bundle.load(other).digest, Bundle.load(service_bundle).digest
    assert ours != theirs
    handle = serve()
    rc, report = doctor(capsys, str(other), "--cloud", f"127.0.0.1:{handle.port}")
    cloud = by_name(report)["cloud"]
    assert rc == 1 and cloud["status"] == "FAIL", cloud
    assert ours in cloud["detail"] and theirs in cloud["detail"], cloud["detail"]
    assert by_name(report)["bundle"]["status"] == "OK"  # the bundle itself is sound


def test_corrupt_bundle_fails(service_bundle, tmp_path, capsys) -> None:
    bad = tmp_path / "bad.edgeexit"
    shutil.copytree(service_bundle, bad)
    seg = next(p for p in sorted((bad / "segments").iterdir()) if p.suffix == ".onnx")
    seg.write_bytes(seg.read_bytes() + b"\0")
    rc, report = doctor(capsys, str(bad))
    bundle = by_name(report)["bundle"]
    assert rc == 1 and bundle["status"] == "FAIL" and "sha256" in bundle["detail"], bundle
    assert bundle["fix"]


def test_no_cloud_fails_quickly(capsys) -> None:
    rc, report = doctor(capsys, "--cloud", f"127.0.0.1:{free_port()}", "--timeout", "1")
    cloud = by_name(report)["cloud"]
    assert rc == 1 and cloud["status"] == "FAIL" and "edgeexit serve" in cloud["fix"], cloud


def test_wrong_token_is_a_refusal_not_unreachable(serve, service_bundle, tmp_path, capsys) -> None:
    (tmp_path / "good").write_text("s3cret-token-for-doctor\n")
    (tmp_path / "bad").write_text("another-token-entirely\n")
    handle = serve(ServerOptions(token=read_token_file(tmp_path / "good")))
    rc, report = doctor(capsys, str(service_bundle), "--cloud", f"127.0.0.1:{handle.port}",
                        "--token-file", str(tmp_path / "bad"))
    cloud = by_name(report)["cloud"]
    assert rc == 1 and "refuses" in cloud["detail"] and "--token-file" in cloud["fix"], cloud
    rc, report = doctor(capsys, str(service_bundle), "--cloud", f"127.0.0.1:{handle.port}",
                        "--token-file", str(tmp_path / "good"))
    assert by_name(report)["cloud"]["status"] == "OK"


def test_text_output_one_line_per_check(service_bundle, capsys) -> None:
    main(["doctor", str(service_bundle)])
    out = capsys.readouterr().out
    for name in ("python", "backends", "torch", "bundle", "clock", "disk", "memory"):
        assert re.search(rf"^(OK|WARN|FAIL)\s+{name}\b", out, re.M), (name, out)
    assert "gRPC carries no server time" in out  # says what the clock check does not do


@pytest.mark.timeout(60)  # were the import to succeed, the agent would serve until stopped
def test_a_missing_package_names_its_extra(monkeypatch, service_bundle, capsys) -> None:
    # As on a client-only install: the agent's module imports prometheus_client, which is not there.
    monkeypatch.delitem(sys.modules, "edgeexit.runtime.agent", raising=False)
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    monkeypatch.setitem(sys.modules, "grpc_health", None)
    monkeypatch.setitem(sys.modules, "grpc_health.v1", None)
    rc = main(["agent", str(service_bundle), "--listen", "127.0.0.1:0"])
    err = capsys.readouterr().err
    assert rc == 2 and 'pip install "edgeexit[device]"' in err and "Traceback" not in err, err
    assert extra_for("onnxruntime", "serve") == "serve" and extra_for("torch", "agent") == "export"
    assert missing_extra(ModuleNotFoundError("x", name="no_such_module")) is None  # a bug keeps its traceback


def _module(dist: str) -> str:
    name = re.split(r"[=<>\[]", dist)[0].lower()
    return {"onnxruntime-gpu": "onnxruntime", "grpcio-health-checking": "grpc_health", "scikit-learn": "sklearn",
            "prometheus-client": "prometheus_client"}.get(name, name.replace("-", "_"))


def test_extras_map_matches_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert {_module(d) for d in project["dependencies"]} == BASE  # what `edgeexit.client` and the CLI need
    extras = project["optional-dependencies"]
    for extra, modules in EXTRA_MODULES.items():
        assert {_module(d) for d in extras[extra]} - BASE == modules, extra
    for module, extra in MODULE_EXTRA.items():
        assert module in EXTRA_MODULES[extra], (module, extra)
    for extra in ("device", "device-litert", "serve", "client"):
        # onnx (protobuf only) is allowed: device/serve merge segments at load (runtime/merge.py)
        assert not {_module(d) for d in extras[extra]} & {"torch", "onnxscript", "tensorflow"}, extra
