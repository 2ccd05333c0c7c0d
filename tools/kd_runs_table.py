"""`pykd runs-table` (pykd.distiller.runs_table) from a checkout, writing bench/results/kd_runs.csv by default.

    .venv/bin/python tools/kd_runs_table.py [the options of `pykd runs-table`]

The table README reports ships in the package (pykd/distiller/data/kd_runs.csv with its provenance);
tools/distiller_evidence.sh regenerates it there.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pykd.distiller import runs_table  # noqa: E402

PIPELINES = runs_table.PIPELINES


def main(argv=None) -> int:
    return runs_table.main(argv, default_output=str(ROOT / "bench" / "results" / "kd_runs.csv"))


if __name__ == "__main__":
    sys.exit(main())
