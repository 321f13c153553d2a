"""`python -m edgeexit.testbed.cpu_probe --group PROCS [--bundle B]`: time one workload in and out of a CPU quota.

Run by :func:`edgeexit.testbed.device_emulation.calibrate` as a separate process (as root), because it moves
itself between its own cgroup and the quota group ``PROCS`` (a ``cgroup.procs`` file) request by request:
the two sides are measured interleaved in one warm process, so a noisy neighbour slows both alike. Before each
request it idles a few periods, as an agent does between app requests, so every request starts with the
group's budget refilled, as it would on the device. Prints one JSON line: {"free_ms": [...], "quota_ms": [...]}.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgeexit.emulation import cpu_controller_v1

# ~15 ms on this machine: several quota periods. A request of one scheduler tick or less barely feels a quota
# (the kernel notices an exhausted budget only at a tick), so a shorter probe measures ~1 whatever the quota.
NUMPY_ITERATIONS = 300


def numpy_workload() -> Callable[[], object]:
    """A fixed single-threaded CPU workload of ~15 ms: small matmuls and activations, as a CNN segment does."""
    rng = np.random.default_rng(0)
    a = rng.random((64, 128), dtype=np.float32)
    w = (rng.random((128, 128), dtype=np.float32) - 0.5) / 8

    def work() -> object:
        x = a
        for _ in range(NUMPY_ITERATIONS):
            x = np.tanh(x @ w)
        return x

    return work


def bundle_workload(bundle: str) -> Callable[[], object]:
    """Every segment of a bundle on one random input (batch 1, one thread): what a device-only request runs."""
    from edgeexit.runtime.profiling import sample_inputs
    from edgeexit.runtime.runner import SegmentRunner

    runner = SegmentRunner(bundle, threads=1)
    x, extras = sample_inputs(runner, 1, np.random.default_rng(0))
    x = runner.normalize(x)
    return lambda: runner.run(x, extras=extras)


def _home_procs() -> Path:
    """The cgroup.procs of the cpu group this process started in (where it returns between quota requests)."""
    root = cpu_controller_v1()
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, rel = line.split(":", 2)
        if "cpu" in controllers.split(",") and root is not None:
            return root / rel.lstrip("/") / "cgroup.procs"
    raise SystemExit("no cgroup v1 cpu controller")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--group", required=True, help="cgroup.procs of the quota group")
    p.add_argument("--bundle", help="bundle whose segments are the workload (default: a fixed numpy workload)")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--gap-ms", type=float, default=20.0)
    args = p.parse_args(argv)
    work = bundle_workload(args.bundle) if args.bundle else numpy_workload()
    home, group, pid = _home_procs(), Path(args.group), str(os.getpid())
    for _ in range(5):
        work()  # warm caches, arenas and lazily opened sessions outside the measurement
    free, quota = [], []
    for i in range(args.rounds):
        for inside in ((False, True) if i % 2 == 0 else (True, False)):  # alternate the order too
            if inside:
                group.write_text(pid)
            time.sleep(args.gap_ms / 1000)
            t = time.perf_counter()
            work()
            (quota if inside else free).append((time.perf_counter() - t) * 1e3)
            if inside:
                home.write_text(pid)
    print(json.dumps({"free_ms": free, "quota_ms": quota}), flush=True)


if __name__ == "__main__":
    main()
