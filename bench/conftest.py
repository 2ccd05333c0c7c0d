"""Shared machinery of the benchmark suite: subprocess peak memory and result files."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RESULTS_DIR = BENCH / "results"
sys.path.insert(0, str(BENCH))


def measure_peak_mib(variant: str, *case: int) -> float:
    """Extra peak resident memory of one fwd+bwd call of `variant`, in a fresh process."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, str(BENCH / "peak_memory.py"), variant, *map(str, case)],
                         env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def median_ms(benchmark) -> float:
    return benchmark.stats.stats.median * 1e3


def write_table(name: str, rows: list[dict], markdown: str) -> None:
    """bench/results/NAME.json, NAME.csv and NAME.md."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(rows, indent=1))
    with open(RESULTS_DIR / f"{name}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (RESULTS_DIR / f"{name}.md").write_text(markdown)
    print("\n" + markdown)
