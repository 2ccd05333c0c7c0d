"""Routed MoE linear (MoS BERT FFN: d=768, f=3072, E=2), forward + backward, CPU.

    pytest bench/test_routed_linear_bench.py     (part of `make bench`)

Fused C++ vs the reference (materialise W, then F.linear) vs a dense F.linear of the same active
shape, one session; the last test writes bench/results/routed_linear.{json,csv,md} and asserts
the targets.
"""
import pytest
import torch
from bench_cases import ROUTED_VARIANTS, step_for
from conftest import fmt, measure_peak_mib, median_ms, ratio, variant_columns, write_table

D, F, EXPERTS = 768, 3072, 2
TOKENS = (128, 4096)
ROUNDS = {128: 30, 4096: 5}
MEASURED: dict[tuple, dict] = {}


@pytest.mark.parametrize("variant", ROUTED_VARIANTS)
@pytest.mark.parametrize("neuron_wise", (0, 1), ids=("layer", "neuron"))
@pytest.mark.parametrize("tokens", TOKENS)
def test_routed_fwd_bwd(benchmark, tokens, neuron_wise, variant):
    case = (tokens, D, F, EXPERTS, neuron_wise)
    step = step_for("routed", variant, case)
    step()
    benchmark.pedantic(step, rounds=ROUNDS[tokens], warmup_rounds=2)
    MEASURED[case, variant] = {"ms": median_ms(benchmark), "peak_mib": measure_peak_mib("routed", variant, *case)}


def _floor_mb(tokens, experts):
    """Bytes every fused fwd+bwd must move (fp32): x, y, dy, dx once each, the experts read in the
    forward and the backward, their gradients written once (the dense layer: one W, one dW)."""
    activations = 4 * tokens * (2 * D + 2 * F)
    return (activations + 4 * F * D * 3 * experts) / 1e6, (activations + 4 * F * D * 3) / 1e6


def _rows():
    rows = []
    for tokens in TOKENS:
        for neuron_wise in (0, 1):
            case = (tokens, D, F, EXPERTS, neuron_wise)
            if (case, "fused") not in MEASURED:
                continue
            row = {"tokens": tokens, "mixing": "neuron" if neuron_wise else "layer"}
            row.update(variant_columns(MEASURED, case, ROUTED_VARIANTS))
            row["fused_vs_dense"] = ratio(row["fused_ms"], row["dense_ms"])
            row["reference_speedup"] = ratio(row["reference_ms"], row["fused_ms"])
            row["floor_MB_fused"], row["floor_MB_dense"] = _floor_mb(tokens, EXPERTS)
            rows.append(row)
    return rows


def _markdown(rows):
    lines = [f"Routed linear d={D}, f={F}, E={EXPERTS}, fp32, forward + backward, CPU "
             f"({torch.get_num_threads()} threads).", "",
             "| tokens | mixing | fused ms | reference ms | dense ms | fused/dense | reference/fused | fused MiB "
             "| reference MiB | dense MiB | bytes floor fused / dense (MB) |", "|" + "---|" * 11]
    for r in rows:
        lines.append(f"| {r['tokens']} | {r['mixing']} | {fmt(r['fused_ms'])} | {fmt(r['reference_ms'])} "
                     f"| {fmt(r['dense_ms'])} | {fmt(r['fused_vs_dense'], '.2f')} "
                     f"| {fmt(r['reference_speedup'], '.2f')} "
                     f"| {fmt(r['fused_peak_mib'])} | {fmt(r['reference_peak_mib'])} | {fmt(r['dense_peak_mib'])} "
                     f"| {r['floor_MB_fused']:.0f} / {r['floor_MB_dense']:.0f} |")
    return "\n".join(lines) + "\n"


def test_routed_report_and_targets():
    rows = _rows()
    if len(rows) < 4:
        pytest.skip("not every case ran in this session")
    write_table("routed_linear", rows, _markdown(rows))
    for r in rows:
        if r["tokens"] == 4096:
            assert r["fused_vs_dense"] <= 1.1, r
        else:
            assert r["fused_vs_dense"] <= 1.5, r
