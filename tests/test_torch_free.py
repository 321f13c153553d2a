"""The device side never imports torch: proven in a subprocess where `import torch` fails."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _torchless_env(tmp_path: Path) -> dict[str, str]:
    # A fake `torch` package earlier on the path that refuses to import: any import of torch fails loudly.
    fake = tmp_path / "fake" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('torch is not allowed on the device side')\n")
    path = os.pathsep.join([str(tmp_path / "fake"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path}


def test_runtime_agent_and_policies_import_without_torch(tmp_path):
    code = ("import sys\n"
            "import edgeexit.runtime, edgeexit.runtime.device, edgeexit.runtime.agent, edgeexit.policies\n"
            "import edgeexit.runtime.client, edgeexit.runtime.breaker, edgeexit.runtime.link_stats\n"
            "assert 'torch' not in sys.modules or sys.modules['torch'] is None\n"
            "try:\n    import torch\nexcept ImportError as e:\n    print('blocked:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_torchless_env(tmp_path),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "blocked: torch is not allowed" in out.stdout  # the blocker really was active


def test_agent_help_and_device_only_inference_without_torch(tmp_path, agent_bundle):
    env = _torchless_env(tmp_path)
    out = subprocess.run([sys.executable, "-m", "edgeexit", "agent", "--help"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "fewest fp32 boundary bytes" in out.stdout
    code = ("import numpy as np, sys\n"
            "from edgeexit.runtime.device import DeviceRuntime, DeviceOptions\n"
            f"rt = DeviceRuntime({str(agent_bundle)!r}, DeviceOptions(policy='never'))\n"
            "shape = [int(d) for d in rt.manifest.input.shape[1:]]\n"
            "r = rt.infer(np.random.default_rng(0).random([2, *shape], dtype=np.float32))\n"
            "print(r.decided, 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "['device', 'device'] False" in out.stdout
