"""SuperLM elastic overhead: fwd+bwd of a SuperLM sub-network against the plain model of its shape.

    pytest bench/test_superlm_bench.py     (part of `make bench`; PYKD_BENCH_TINY=1 for a quick check)

On the packaged MiniLM-L6 teacher, batch 16, L=128, fp32 (see superlm_step.py): the SuperLM with
the teacher's shape active against the plain teacher, and a mid-size architecture against the same
architecture exported as a plain BertModel. Each pair computes the same loss (checked). The last
test writes bench/results/superlm_overhead.{json,csv,md} and asserts both ratios <= 1.15.
"""
import os

import pytest
from conftest import median_ms, ratio, write_table
from superlm_step import MID_ARCH, superlm_step

pytest.importorskip("transformers")

TINY = os.environ.get("PYKD_BENCH_TINY") == "1"
BATCH, LENGTH, ROUNDS = (2, 16, 1) if TINY else (16, 128, 5)
PAIRS = {"teacher shape": ("superlm_full", "hf"), f"mid ({MID_ARCH})": ("superlm_mid", "exported_mid")}
TARGET = 1.15
MEASURED: dict[str, dict] = {}


@pytest.mark.parametrize("variant", ["hf", "superlm_full", "exported_mid", "superlm_mid"])
def test_superlm_step(benchmark, variant):
    step = superlm_step(variant, BATCH, LENGTH)
    loss = step()
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1)
    MEASURED[variant] = {"ms": median_ms(benchmark), "loss": loss}


def test_superlm_overhead_report_and_targets():
    if len(MEASURED) < 4:
        pytest.skip("not every variant ran in this session")
    rows = []
    for name, (elastic, plain) in PAIRS.items():
        ours, theirs = MEASURED[elastic], MEASURED[plain]
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
        rows.append({"case": name, "batch": BATCH, "L": LENGTH, "superlm_ms": ours["ms"], "plain_ms": theirs["ms"],
                     "overhead": ratio(ours["ms"], theirs["ms"]), "loss": ours["loss"]})
    lines = [f"SuperLM elastic overhead, MiniLM-L6 teacher, fwd+bwd, batch {BATCH}, L={LENGTH}, fp32, CPU "
             f"(median of {ROUNDS}).", "", "| case | SuperLM ms | plain ms | SuperLM/plain |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['superlm_ms']:.0f} | {r['plain_ms']:.0f} | {r['overhead']:.3f}x |")
    write_table("superlm_overhead", rows, "\n".join(lines) + "\n")
    for r in rows:
        assert r["overhead"] <= TARGET, f"{r['case']}: SuperLM/plain {r['overhead']:.3f}x, target {TARGET}x"
