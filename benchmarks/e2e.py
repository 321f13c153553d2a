"""The end-to-end split-computing benchmark: the same code as `edgeexit bench` (see `edgeexit bench --help`).

    .venv/bin/python benchmarks/e2e.py [--bundle artifacts/camera_resnet.edgeexit] [--samples 200] ...

Writes benchmarks/results/bench.json, bench.md and bench.png; the last stdout line is one JSON object
(worst_over_oracle, mean_over_oracle, distinct_winners, best/mean_speedup_over_baselines, cost_model_error,
samples_per_condition, emulation).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgeexit.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
