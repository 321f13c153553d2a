"""Start a real NVIDIA Triton Inference Server on a model repository written by ``edgeexit triton-repo``.

The server is the ``tritonserver`` 2.51 binary that the PyPI wheel ``nvidia-pytriton==0.7.0`` ships (installed
``--no-deps`` by ``make setup``: its own pins conflict with ours). Nothing is installed here; what the binary
needs is arranged at launch:

- ``LD_LIBRARY_PATH`` gets the wheel's ``nvidia_pytriton.libs`` (the binary's shared libraries);
- the Python backend needs its ``triton_python_backend_stub`` for the models' Python version beside
  ``libtriton_python.so``; the wheel keeps the stubs apart, so the backend directory is copied once into a
  writable cache (``$XDG_CACHE_HOME/edgeexit``) with the right stub added;
- the models run in their own small Python environment (numpy<2: with numpy 2 this backend answers every
  request with an empty response and no error; onnxruntime; zstandard; edgeexit installed ``--no-deps``):
  its ``bin/`` goes first on ``PATH``, which is how the backend's embedded interpreter finds it. A repository
  written with ``--python-env`` names it in each ``config.pbtxt`` (``EXECUTION_ENV_PATH``) instead.

Core module: standard library only (it must not import the runtime or the exporters).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from edgeexit.errors import ConfigError

WHEEL = "nvidia-pytriton==0.7.0"
ENV_VAR = "EDGEEXIT_TRITON_ENV"  # the models' Python environment when --python-env is not given
SETUP_HINT = (f"run `make setup`, or install the server with `pip install --no-deps {WHEEL}` and make the models' "
              "environment: `python3.11 -m venv .venv-triton && .venv-triton/bin/pip install -c "
              "constraints-triton.txt numpy onnxruntime zstandard && .venv-triton/bin/pip install --no-deps -e .`")
# What the models' environment must import; numpy must be 1.x (see the module docstring).
_ENV_PROBE = ("import json, sys, numpy, onnxruntime, zstandard, edgeexit.runtime.codec; "
              "print(json.dumps({'python': '%d.%d' % sys.version_info[:2], 'numpy': numpy.__version__}))")


@dataclass(frozen=True)
class TritonInstall:
    """Where the wheel put the server."""

    root: Path  # pytriton/tritonserver
    libs: Path  # nvidia_pytriton.libs

    @property
    def binary(self) -> Path:
        return self.root / "bin" / "tritonserver"

    def stub(self, python: str) -> Path:
        return self.root / "python_backend_stubs" / python / "triton_python_backend_stub"


@dataclass
class TritonOptions:
    repository: Path
    host: str = "127.0.0.1"
    grpc_port: int = 8001  # 0 picks a free port
    http_port: int = 8000
    metrics_port: int = 8002
    python_env: Path | None = None  # None: $EDGEEXIT_TRITON_ENV, else .venv-triton beside the source checkout
    ready_timeout_s: float = 60.0
    log_verbose: int = 0


def find_install() -> TritonInstall:
    """The installed wheel's server (found without importing pytriton, whose dependencies are not installed)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the Triton server is not installed; {SETUP_HINT}")
    root = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    install = TritonInstall(root, root.parent.parent / "nvidia_pytriton.libs")
    if not install.binary.is_file() or not install.libs.is_dir():
        raise ConfigError(f"{root} has no bin/tritonserver or nvidia_pytriton.libs: a partial install; "
                          f"reinstall it with `pip install --force-reinstall --no-deps {WHEEL}`")
    return install


def find_python_env(explicit: Path | str | None = None) -> Path:
    """The models' environment: ``explicit``, else $EDGEEXIT_TRITON_ENV, else ``.venv-triton`` in the checkout."""
    if explicit is None:
        explicit = os.environ.get(ENV_VAR) or Path(__file__).resolve().parents[1] / ".venv-triton"
    env = Path(explicit).absolute()
    if not (env / "bin" / "python").exists():
        raise ConfigError(f"{env} is not a Python environment (no bin/python) for the Triton models; "
                          f"pass --python-env DIR or set {ENV_VAR}; {SETUP_HINT}")
    return env


def check_python_env(env: Path) -> str:
    """Check the models' environment can run them; returns its Python version ("3.11")."""
    proc = subprocess.run([str(env / "bin" / "python"), "-c", _ENV_PROBE], capture_output=True, text=True,
                          timeout=120)
    if proc.returncode != 0:
        raise ConfigError(f"the Triton models' environment {env} cannot import numpy, onnxruntime, zstandard and "
                          f"edgeexit ({proc.stderr.strip().splitlines()[-1:]}); {SETUP_HINT}")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    if int(info["numpy"].split(".")[0]) >= 2:
        raise ConfigError(f"{env} has numpy {info['numpy']}: Triton's Python backend answers every request with "
                          "an empty response under numpy 2; install numpy<2 there (constraints-triton.txt pins it)")
    return info["python"]


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgeexit"


def backend_directory(install: TritonInstall, python: str, cache: Path | None = None) -> Path:
    """A writable copy of the wheel's ``backends/`` with the Python stub for ``python`` in ``python/``.

    Made once per wheel location and Python version; copied to a temporary name and renamed, so concurrent
    launches never see half a copy.
    """
    stub = install.stub(python)
    if not stub.is_file():
        raise ConfigError(f"the Triton wheel has no Python backend stub for Python {python} ({stub}); make the "
                          "models' environment with a Python it has (3.8-3.13)")
    key = f"{hashlib.sha256(str(install.root).encode()).hexdigest()[:10]}-py{python}"
    target = (cache or cache_dir()) / f"triton-backends-{key}"
    if (target / "python" / stub.name).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(install.root / "backends", tmp, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(stub, tmp / "python" / stub.name)
    try:
        tmp.rename(target)
    except OSError:  # another launch got there first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class TritonServer:
    """One tritonserver process: ``start()`` returns once it is ready; ``stop()`` sends SIGTERM and waits."""

    def __init__(self, options: TritonOptions):
        o = options
        if not (Path(o.repository) / "README.md").is_file():
            raise ConfigError(f"{o.repository} is not a repository written by `edgeexit triton-repo` (no README.md "
                              "at its top); write one with `edgeexit triton-repo BUNDLE --out REPO`")
        self.options = o
        self.grpc_port, self.http_port, self.metrics_port = (
            p or free_port(o.host) for p in (o.grpc_port, o.http_port, o.metrics_port))
        self.popen: subprocess.Popen | None = None

    def command(self) -> tuple[list[str], dict[str, str]]:
        """The argv and environment that run the server (checks the install and the models' environment)."""
        o = self.options
        install = find_install()
        env_dir = find_python_env(o.python_env)
        backends = backend_directory(install, check_python_env(env_dir))
        argv = [
            str(install.binary), f"--model-repository={Path(o.repository).absolute()}",
            f"--backend-directory={backends}",
            f"--grpc-address={o.host}", f"--grpc-port={self.grpc_port}",
            f"--http-address={o.host}", f"--http-port={self.http_port}",
            f"--metrics-address={o.host}", f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false", "--backend-config=python,shm-default-byte-size=4194304",
            f"--log-verbose={o.log_verbose}",
        ]
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(install.libs), env.get("LD_LIBRARY_PATH")) if p)
        env["PATH"] = os.pathsep.join(p for p in (str(env_dir / "bin"), env.get("PATH")) if p)
        env.pop("PYTHONHOME", None)
        env.pop("PYTHONPATH", None)  # the models import edgeexit and numpy from their own environment only
        return argv, env

    @property
    def target(self) -> str:
        return f"{self.options.host}:{self.grpc_port}"

    def start(self, stdout=None, stderr=None) -> TritonServer:
        argv, env = self.command()
        self.popen = subprocess.Popen(argv, env=env, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + self.options.ready_timeout_s
        while not self.ready():
            if self.popen.poll() is not None:
                raise ConfigError(f"tritonserver exited with {self.popen.returncode} before it was ready; its log "
                                  "(stderr) says why (a model that failed to load, a port in use, ...)")
            if time.monotonic() > deadline:
                self.stop()
                raise ConfigError(f"tritonserver was not ready after {self.options.ready_timeout_s:.0f} s; see its "
                                  "log for the model that did not load")
            time.sleep(0.2)
        return self

    def ready(self) -> bool:
        """Triton's server readiness (every model loaded), as ServerReady reports it, over HTTP."""
        url = f"http://{self.options.host}:{self.http_port}/v2/health/ready"
        try:
            with urllib.request.urlopen(url, timeout=1.0) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def signal(self, sig: int = signal.SIGTERM) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(sig)

    def wait(self, timeout: float | None = None) -> int:
        return 0 if self.popen is None else self.popen.wait(timeout)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait (~4 s: its ports are free once this returns); SIGKILL after ``timeout``."""
        if self.popen is None:
            return 0
        self.signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait()
