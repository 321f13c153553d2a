"""End-to-end benchmark: the same code as `edgeexit bench` (see `edgeexit bench --help`).

    .venv/bin/python benchmarks/e2e.py [--model artifacts/resnet_exits.pt2 | --bundle B] [--samples 20] ...

Writes benchmarks/results/bench.json, bench.md and bench.png; the last stdout line is one JSON object with
edgeexit_over_oracle_worst and edgeexit_over_best_baseline_mean.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgeexit.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
