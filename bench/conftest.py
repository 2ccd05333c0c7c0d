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


def measure_peak_mib(op: str, variant: str, *case: int) -> float:
    """Extra peak resident memory of one fwd+bwd call of `variant`, in a fresh process."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, str(BENCH / "peak_memory.py"), op, variant, *map(str, case)],
                         env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def median_ms(benchmark) -> float:
    return benchmark.stats.stats.median * 1e3


def ratio(a, b):
    return a / b if a is not None and b is not None else None


def fmt(value, spec=".1f"):
    return "-" if value is None else format(value, spec)


def variant_columns(measured: dict, case, variants) -> dict:
    """{variant}_ms and {variant}_peak_mib of each variant measured at `case` (None if it did not run)."""
    columns = {}
    for variant in variants:
        got = measured.get((case, variant), {})
        columns[f"{variant}_ms"], columns[f"{variant}_peak_mib"] = got.get("ms"), got.get("peak_mib")
    return columns


def compare_variants(row: dict, variants=("fused", "eager", "compiled", "gemm_floor")) -> dict:
    """Adds the ratios every table reports: fused against the floor, eager and torch.compile."""
    row["fused_vs_floor"] = ratio(row["fused_ms"], row["gemm_floor_ms"])
    row["eager_speedup"] = ratio(row["eager_ms"], row["fused_ms"])
    row["compiled_speedup"] = ratio(row["compiled_ms"], row["fused_ms"])
    row["fused_mem_vs_eager"] = ratio(row["fused_peak_mib"], row["eager_peak_mib"])
    return row


def markdown_table(rows: list[dict], size_columns: list[str], header: str) -> str:
    names = [*size_columns, "fused ms", "eager ms", "compiled ms", "GEMM floor ms", "fused/floor", "eager/fused",
             "compiled/fused", "fused MiB", "eager MiB", "compiled MiB", "fused/eager mem"]
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    for r in rows:
        cells = [str(r[c]) for c in size_columns]
        cells += [fmt(r[f"{v}_ms"]) for v in ("fused", "eager", "compiled", "gemm_floor")]
        cells += [fmt(r["fused_vs_floor"], ".2f"), fmt(r["eager_speedup"], ".2f"), fmt(r["compiled_speedup"], ".2f")]
        cells += [fmt(r[f"{v}_peak_mib"]) for v in ("fused", "eager", "compiled")]
        cells.append(fmt(r["fused_mem_vs_eager"], ".3f"))
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- {r['note']}" for r in rows if r.get("note")]
    return header + "\n\n" + "\n".join(lines) + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else "")


def plot_variants(rows: list[dict], x_key: str, xlabel: str, title: str, path: Path) -> None:
    """Time and extra peak memory of each variant against the size in x_key (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(10, 4))
    for variant in ("fused", "eager", "compiled", "gemm_floor"):
        points = [(r[x_key], r[f"{variant}_ms"], r[f"{variant}_peak_mib"]) for r in rows
                  if r[f"{variant}_ms"] is not None]
        if points:
            xs, ms, mib = zip(*points)
            ax_time.plot(xs, ms, marker="o", label=variant)
            if all(m is not None for m in mib):
                ax_mem.plot(xs, mib, marker="o", label=variant)
    for ax, label in ((ax_time, "fwd+bwd time (ms)"), (ax_mem, "extra peak memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
