"""Each install path of the README installs alone: a fresh venv, `pip install -c constraints.txt "SRC[EXTRA]"`,
then the check a user would run (`make check-extras` runs these; `.ci/run` too).

Real pip, real venvs: pip reads the machine's indexes (here a local mirror and /opt/wheels, so torch 2.13's CPU
wheel comes from local disk). The source is copied first, so pip's in-tree build never writes into the checkout
other processes are using. Without onnxruntime a command names the extra to install (no ImportError traceback).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["pyproject.toml", "README.md", "constraints.txt", "edgeexit", "runtime", "exporters", "devices", "proto"]

# Minutes, not seconds, and heavy on the disk: `make check-extras` (which `.ci/run` runs) sets the variable.
pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.environ.get("EDGEEXIT_CHECK_EXTRAS") != "1",
                                                    reason="fresh-venv installs: run `make check-extras`")]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("src") / "edgeexit"
    dst.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in SOURCES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=ignore)
        else:
            shutil.copy2(src, dst / name)
    return dst


def _venv_with(extra: str, source: Path, tmp: Path) -> Path:
    """A fresh venv holding edgeexit[extra] and nothing else; returns its bin/ directory."""
    env = tmp / f"venv-{extra}"
    venv.EnvBuilder(with_pip=True, clear=True).create(env)
    bin_dir = env / "bin"
    proc = subprocess.run(
        [str(bin_dir / "python"), "-m", "pip", "install", "-q", "-c", str(source / "constraints.txt"),
         f"{source}[{extra}]"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"pip install edgeexit[{extra}] failed:\n{proc.stdout}\n{proc.stderr}"
    return bin_dir


def _run(cmd: list[str], ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd="/")
    if ok:
        assert proc.returncode == 0, f"{cmd} -> {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def _installed(bin_dir: Path) -> set[str]:
    out = _run([str(bin_dir / "python"), "-m", "pip", "list", "--format=freeze"]).stdout
    return {line.split("==")[0].lower().replace("_", "-") for line in out.splitlines() if "==" in line}


def test_client_extra_is_numpy_grpcio_protobuf_only(source: Path, tmp_path: Path) -> None:
    bin_dir = _venv_with("client", source, tmp_path)
    extra = _installed(bin_dir) - {"edgeexit", "pip", "setuptools", "wheel"}
    assert extra <= {"numpy", "grpcio", "protobuf", "typing-extensions"}, f"client pulls in {sorted(extra)}"
    client_module = "edgeexit.client" if (source / "edgeexit" / "client.py").exists() else "edgeexit.runtime.client"
    _run([str(bin_dir / "python"), "-c", f"import {client_module}"])
    _run([str(bin_dir / "edgeexit"), "--help"])  # the CLI's parser needs only the base
    # A command that runs a bundle says which extra to install: one line, exit 2, no traceback.
    proc = _run([str(bin_dir / "edgeexit"), "agent", str(tmp_path / "none.edgeexit")], ok=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert 'pip install "edgeexit[device]"' in proc.stderr and "lacks" in proc.stderr, proc.stderr


def test_device_extra_has_no_torch_and_doctor_runs(source: Path, tmp_path: Path) -> None:
    bin_dir = _venv_with("device", source, tmp_path)
    pkgs = _installed(bin_dir)
    assert "onnxruntime" in pkgs and not pkgs & {"torch", "tensorflow", "onnxscript"}, sorted(pkgs)
    proc = _run([str(bin_dir / "edgeexit"), "doctor", "--json"], ok=False)
    assert proc.returncode in (0, 1), proc.stderr  # 1 = a FAIL line (e.g. disk): the report still printed
    assert '"onnxruntime"' in proc.stdout and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    _run([str(bin_dir / "edgeexit"), "agent", "--help"])


def test_serve_extra(source: Path, tmp_path: Path) -> None:
    bin_dir = _venv_with("serve", source, tmp_path)
    assert "torch" not in _installed(bin_dir)
    _run([str(bin_dir / "edgeexit"), "serve", "--help"])
    _run([str(bin_dir / "python"), "-c", "import edgeexit.runtime.service, edgeexit.runtime.oip_server"])


def test_export_extra(source: Path, tmp_path: Path) -> None:
    bin_dir = _venv_with("export", source, tmp_path)
    _run([str(bin_dir / "edgeexit"), "export", "--help"])
    _run([str(bin_dir / "python"), "-c", "import torch, edgeexit.exporters.export; "
          "assert '+cpu' in torch.__version__ or not torch.cuda.is_available(), torch.__version__"])


if __name__ == "__main__":
    os.environ["EDGEEXIT_CHECK_EXTRAS"] = "1"
    sys.exit(pytest.main([__file__, "-q", "-p", "no:cacheprovider"]))
