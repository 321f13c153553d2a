"""`edgeexit serve` as a real process: ready line, offload, token file, SIGTERM drains and exits 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgeexit.bundle import Bundle
from edgeexit.errors import PeerUnavailable
from edgeexit.runtime import codec
from edgeexit.runtime.client import ClientOptions, InferenceClient

ROOT = Path(__file__).resolve().parents[1]


def _spawn(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "edgeexit", "serve", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _ready_target(proc: subprocess.Popen, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("ready on "):
            return line.split("ready on ", 1)[1].strip()
        if not line and proc.poll() is not None:
            raise AssertionError(f"serve exited {proc.returncode}: {proc.stderr.read()}")
    raise AssertionError("serve never printed 'ready on'")


def test_serve_process_offloads_and_stops_cleanly_on_sigterm(service_bundle, boundary_batch, tmp_path):
    token = tmp_path / "token"
    token.write_text("tok\n")
    proc = _spawn(str(service_bundle), "--port", "0", "--token-file", str(token), "--max-batch-size", "8")
    try:
        target = _ready_target(proc)
        name = Bundle.load(service_bundle).name
        with InferenceClient(target, ClientOptions(token="tok")) as client:
            out = client.infer(f"{name}@0", "boundary0", codec.encode(boundary_batch(0, 2)), timeout=10)
            assert all(v.shape[0] == 2 for v in out.values())
        with pytest.raises(PeerUnavailable):
            InferenceClient(target).infer(f"{name}@0", "boundary0", codec.encode(boundary_batch(0, 1)), timeout=5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert "draining" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_reports_user_errors_without_traceback(tmp_path):
    proc = _spawn(str(tmp_path / "missing.edgeexit"), "--port", "0")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "not a bundle directory" in err and "Traceback" not in err
