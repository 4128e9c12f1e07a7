"""Run the whole study (stage 1 pretraining -> stage 2 segmentation) as one Ray Tune experiment.

    python experiments/grid.py [--grid smoke|paper|FILE] [--data-root DIR] [--output DIR] [--resume]
                               [--address ADDR] [--wandb offline|online|disabled] [--max-concurrent N]
                               [--no-report] [--num-cpus N] [--no-dashboard] [--dry-run]

The engine is the package experiments/engine/ (its docstring describes the design); this file parses
the arguments and runs it (`experiments.engine.cli.main`).
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python experiments/grid.py` puts experiments/ first, not the repo
    sys.path.insert(0, str(REPO_ROOT))

from experiments.engine.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
