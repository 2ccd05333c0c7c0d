"""Vocabulary KD loss (DistilBERT's MLM distillation head), forward + backward, fp32, CPU.

    pytest bench/test_vocab_kd_bench.py                       (part of `make bench`; ~20 min on 2 idle cores)
    PYKD_BENCH_TINY=1 pytest bench/test_vocab_kd_bench.py     (a smoke run: N=256, V=3001/25001, d=64)

N = 4096 selected positions, V = 30,522 (BERT) and 250,002 (XLM-R), d = 384 and 768. Variants
(bench/vocab_kd_step.py): fused C++, DistilBERT's eager formula and torch.compile of it (V =
30,522 only), and the GEMM floor. The last test writes bench/results/vocab_kd.{json,csv,md} and
asserts the targets: fused within 1.3x of the floor, and extra memory within the strips and the
gradients (O(N + V) beside the eager formula's O(N V)). The eager formula is not run at V =
250,002: its need is computed from the copies of the (N, V) logits it was measured to hold at
V = 30,522.
"""
import os

import pytest
import torch
from bench_cases import step_for
from conftest import compare_variants, markdown_table, measure_peak_mib, median_ms, variant_columns, write_table
from vocab_kd_step import logits_gib, vocab_flops

from pykd.ops.vocab_kd import CPP_STRIP_BYTES, cpp_blocking

TINY = os.environ.get("PYKD_BENCH_TINY") == "1"
N = 256 if TINY else 4096
VOCABS = (3001, 25001) if TINY else (30522, 250002)
WIDTHS = (64,) if TINY else (384, 768)
EAGER_VOCAB = VOCABS[0]  # the eager formula and torch.compile run at the smaller vocabulary only
MACHINE_GIB = 24
VARIANTS = ("fused", "eager", "compiled", "gemm_floor")
MEASURED: dict[tuple, dict] = {}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("vocab", VOCABS)
def test_vocab_fwd_bwd(benchmark, vocab, width, variant):
    if variant in ("eager", "compiled") and vocab != EAGER_VOCAB:
        pytest.skip(f"the eager formula at V={vocab} needs more than {MACHINE_GIB} GiB (computed in the report)")
    case = (N, vocab, width)
    step = step_for("vocab", variant, case)
    step()  # compiles torch.compile's graph, warms the allocator and the extension
    benchmark.pedantic(step, rounds=3 if vocab == EAGER_VOCAB else 1, warmup_rounds=0)
    MEASURED[case, variant] = {"ms": median_ms(benchmark), "peak_mib": measure_peak_mib("vocab", variant, *case)}


def fused_budget_mib(vocab, width) -> float:
    """What the fused path may hold beyond its inputs: two R x V fp32 strips, the fp32 gradients
    (dh, dW, db) and per-(row, tile) statistics (a few floats per 256 words)."""
    rows, tile = cpp_blocking(N, vocab)
    strips = 2 * rows * vocab * 4
    grads = 4 * (N * width + vocab * width + vocab)
    stats = 64 * rows * (vocab // tile + 1)
    return (strips + grads + stats) / 2**20


def eager_copies(width) -> float | None:
    """The eager formula's extra peak as a number of fp32 (N, V) logits, measured at EAGER_VOCAB."""
    got = MEASURED.get(((N, EAGER_VOCAB, width), "eager"))
    return got["peak_mib"] / 1024 / logits_gib(N, EAGER_VOCAB) if got else None


def _rows():
    rows = []
    for vocab in VOCABS:
        for width in WIDTHS:
            case = (N, vocab, width)
            if (case, "fused") not in MEASURED:
                continue
            row = {"N": N, "V": vocab, "d": width, "GFLOP": vocab_flops(*case) / 1e9}
            row.update(variant_columns(MEASURED, case, VARIANTS))
            row["fused_GFLOPs"] = row["GFLOP"] / (row["fused_ms"] / 1e3)
            row["fused_budget_mib"] = fused_budget_mib(vocab, width)
            copies = eager_copies(width)
            row["eager_need_gib"], row["note"] = None, ""
            if row["eager_ms"] is None and copies is not None:
                need = copies * logits_gib(N, vocab)
                row["eager_need_gib"] = need
                verdict = "more" if need > MACHINE_GIB else "less"
                row["note"] = (f"V={vocab}, d={width}: eager not run; it held {copies:.1f} fp32 (N, V) logits at "
                               f"V={EAGER_VOCAB} ({logits_gib(N, vocab):.2f} GiB each here), so it needs "
                               f"{need:.1f} GiB, {verdict} than the {MACHINE_GIB} GiB machine")
            rows.append(compare_variants(row))
    return rows


def test_vocab_report_and_targets():
    rows = _rows()
    if not rows:
        pytest.skip("no vocab_kd measurements ran in this session")
    header = (f"Vocabulary KD loss (DistilBERT: kl at T=2 x T^2, weight 5, + MLM cross-entropy, weight 2), forward + "
              f"backward, fp32, CPU ({torch.get_num_threads()} threads); C++ strips of R x V logits within "
              f"{CPP_STRIP_BYTES // 2**20} MiB.")
    write_table("vocab_kd_tiny" if TINY else "vocab_kd", rows, markdown_table(rows, ["N", "V", "d"], header))
    if TINY:
        return  # a smoke run: the targets are for N = 4096
    for row in rows:
        assert row["fused_vs_floor"] <= 1.3, row
        assert row["fused_peak_mib"] <= 1.1 * row["fused_budget_mib"] + 64, row
    for row in rows:
        if row["V"] != EAGER_VOCAB:
            assert row["eager_need_gib"] > MACHINE_GIB, row
