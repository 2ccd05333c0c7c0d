"""The fused C++ relation kernel per loss: forward + backward of kl, ce, mse_prob and mse_logit.

    pytest bench/test_relation_losses_bench.py     (PYKD_BENCH_TINY=1 for a quick check)

B=8, A_r=12, d_r=64 (and d_r=16, where the GEMMs are cheapest and the per-row passes weigh most),
L=128 and 512, fp32, the same random inputs for every loss. mse_prob's stable gradient (issue 21)
adds a peak search and two sums per row; its cost is reported against kl's, which that change left
alone. Writes bench/results/relation_losses.{json,csv,md}; asserts nothing (the prediction is in
bench/NOTES.md).
"""
import os

import pytest
import torch
from bench_cases import relation_inputs
from conftest import median_ms, write_table

import pykd

TINY = os.environ.get("PYKD_BENCH_TINY") == "1"
CASES = {"d64-L128": (8, 12, 64, 128), "d64-L512": (8, 12, 64, 512), "d16-L128": (8, 12, 16, 128)}
if TINY:
    CASES = {"tiny": (2, 4, 16, 32)}
LOSSES = ("kl", "ce", "mse_prob", "mse_logit")
ROUNDS = 1 if TINY else 7
MEASURED: dict[tuple, float] = {}


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_relation_loss_fwd_bwd(benchmark, case, loss):
    batch, heads, head_dim, length = case
    t_a, t_b, s_a, s_b = relation_inputs(batch, heads, head_dim, length)

    def step():
        value = pykd.attention_relation_loss(t_a, t_b, s_a, s_b, heads, loss=loss, backend="cpp")
        torch.autograd.grad(value, (s_a, s_b))

    step()
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1)
    MEASURED[case, loss] = median_ms(benchmark)


def test_relation_losses_report():
    rows = []
    for case in CASES.values():
        if not all((case, loss) in MEASURED for loss in LOSSES):
            continue
        row = dict(zip(("B", "A_r", "d_r", "L"), case))
        row.update({f"{loss}_ms": MEASURED[case, loss] for loss in LOSSES})
        row.update({f"{loss}_vs_kl": MEASURED[case, loss] / MEASURED[case, "kl"] for loss in LOSSES[1:]})
        rows.append(row)
    if not rows:
        pytest.skip("the per-loss measurements did not run in this session")
    names = list(rows[0])
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    lines += ["| " + " | ".join(f"{r[n]:.2f}" if isinstance(r[n], float) else str(r[n]) for n in names) + " |"
              for r in rows]
    header = f"Fused C++ relation loss per loss, forward + backward, fp32 ({torch.get_num_threads()} threads)."
    write_table("relation_losses", rows, header + "\n\n" + "\n".join(lines) + "\n")
