"""Attention-relation loss, forward + backward, CPU: fused C++ vs eager, torch.compile, GEMM floor.

    make bench        (or: pytest bench/test_attention_relation_bench.py)

Every variant of a length runs in one session; the last test writes bench/results/
attention_relation.{json,csv,md,png} and asserts the targets at L=512.
"""
import pytest
import torch
from bench_cases import RELATION_VARIANTS, relation_flops, relation_inputs, relation_step
from conftest import RESULTS_DIR, measure_peak_mib, median_ms, write_table

CASES = {"L128": (8, 12, 64, 128), "L512": (8, 12, 64, 512), "L1024": (8, 12, 64, 1024)}
LONG_CASE = (2, 12, 32, 8192)
ROUNDS = {128: 10, 512: 5, 1024: 3, 8192: 2}
MEASURED: dict[tuple, dict] = {}


@pytest.mark.parametrize("variant", RELATION_VARIANTS)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_relation_fwd_bwd(benchmark, case, variant):
    step = relation_step(variant, relation_inputs(*case), case[1], case[2])
    step()  # compiles torch.compile's graph and warms the allocator
    benchmark.pedantic(step, rounds=ROUNDS[case[3]], warmup_rounds=1)
    MEASURED[case, variant] = {"ms": median_ms(benchmark), "peak_mib": measure_peak_mib(variant, *case)}


def test_relation_long_sequence(benchmark):
    step = relation_step("fused", relation_inputs(*LONG_CASE), LONG_CASE[1], LONG_CASE[2])
    benchmark.pedantic(step, rounds=ROUNDS[LONG_CASE[3]], warmup_rounds=0)
    MEASURED[LONG_CASE, "fused"] = {"ms": median_ms(benchmark), "peak_mib": measure_peak_mib("fused", *LONG_CASE)}


def _reference_bytes(batch, heads, _head_dim, length):
    """The eager reference holds at least six fp32 (B, A, L, L) maps (scores, log-probs, their grads)."""
    return 6 * 4 * batch * heads * length * length


def _rows():
    rows = []
    for case in [*CASES.values(), LONG_CASE]:
        fused = MEASURED.get((case, "fused"))
        if fused is None:
            continue
        row = {"B": case[0], "A_r": case[1], "d_r": case[2], "L": case[3],
               "GFLOP": relation_flops(*case) / 1e9}
        for variant in RELATION_VARIANTS:
            got = MEASURED.get((case, variant), {})
            row[f"{variant}_ms"] = got.get("ms")
            row[f"{variant}_peak_mib"] = got.get("peak_mib")
        row["fused_vs_floor"] = _ratio(row["fused_ms"], row["gemm_floor_ms"])
        row["eager_speedup"] = _ratio(row["eager_ms"], row["fused_ms"])
        row["compiled_speedup"] = _ratio(row["compiled_ms"], row["fused_ms"])
        row["fused_mem_vs_eager"] = _ratio(row["fused_peak_mib"], row["eager_peak_mib"])
        row["fused_GFLOPs"] = row["GFLOP"] / (row["fused_ms"] / 1e3)
        row["note"] = ("" if row["eager_ms"] is not None else
                       f"reference not run: needs >= {_reference_bytes(*case) / 2**30:.0f} GiB of maps")
        rows.append(row)
    return rows


def _ratio(a, b):
    return a / b if a is not None and b is not None else None


def _fmt(value, spec=".1f"):
    return "-" if value is None else format(value, spec)


def _markdown(rows):
    lines = [
        "| B | A_r | d_r | L | fused ms | eager ms | compiled ms | GEMM floor ms | fused/floor | eager/fused "
        "| compiled/fused | fused MiB | eager MiB | compiled MiB | fused/eager mem |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['B']} | {r['A_r']} | {r['d_r']} | {r['L']} | {_fmt(r['fused_ms'])} | {_fmt(r['eager_ms'])} "
            f"| {_fmt(r['compiled_ms'])} | {_fmt(r['gemm_floor_ms'])} | {_fmt(r['fused_vs_floor'], '.2f')} "
            f"| {_fmt(r['eager_speedup'], '.2f')} | {_fmt(r['compiled_speedup'], '.2f')} "
            f"| {_fmt(r['fused_peak_mib'])} | {_fmt(r['eager_peak_mib'])} | {_fmt(r['compiled_peak_mib'])} "
            f"| {_fmt(r['fused_mem_vs_eager'], '.3f')} |"
        )
    notes = [f"- L={r['L']}: {r['note']}" for r in rows if r["note"]]
    header = f"Forward + backward, fp32, CPU ({torch.get_num_threads()} threads), median of rounds.\n\n"
    return header + "\n".join(lines) + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else "")


def _plot(rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(10, 4))
    for variant in RELATION_VARIANTS:
        points = [(r["L"], r[f"{variant}_ms"], r[f"{variant}_peak_mib"]) for r in rows
                  if r[f"{variant}_ms"] is not None and r["B"] == 8]
        if points:
            lengths, ms, mib = zip(*points)
            ax_time.plot(lengths, ms, marker="o", label=variant)
            ax_mem.plot(lengths, mib, marker="o", label=variant)
    for ax, label in ((ax_time, "fwd+bwd time (ms)"), (ax_mem, "extra peak memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L (B=8, A_r=12, d_r=64)")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle("pykd.attention_relation_loss on CPU")
    fig.tight_layout()
    fig.savefig(RESULTS_DIR / "attention_relation.png", dpi=120)


def test_relation_report_and_targets():
    rows = _rows()
    if not any(r["L"] == 512 and r["eager_ms"] is not None for r in rows):
        pytest.skip("the L=512 measurements did not run in this session")
    write_table("attention_relation", rows, _markdown(rows))
    _plot(rows)
    at_512 = next(r for r in rows if r["L"] == 512)
    assert at_512["fused_vs_floor"] <= 2.0
    assert at_512["eager_speedup"] >= 3.0
    assert at_512["compiled_speedup"] >= 1.5
    assert at_512["fused_mem_vs_eager"] <= 0.05
    long_row = next((r for r in rows if r["L"] == LONG_CASE[3]), None)
    if long_row is not None:
        assert long_row["fused_peak_mib"] <= 1024
