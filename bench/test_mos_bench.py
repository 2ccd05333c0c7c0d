"""Mixture-of-Supernets step cost: E=2 (layer- and neuron-wise) against E=1 on the same sub-networks.

    pytest bench/test_mos_bench.py     (part of `make bench`; PYKD_BENCH_TINY=1 for a quick check)

MiniLM-L6 teacher, the "base" sub-space's largest, smallest and two random sub-networks, each forward
+ backward of a teacher-free loss, then one Adam update (superlm_step.mos_step), batch 16, L=128,
fp32. Peak memory of two steps in a fresh process against the prediction: E=1's peak plus 16 bytes
(weight, gradient, two Adam moments) per extra parameter. Writes bench/results/mos_step.{json,csv,md};
asserts E=2/E=1 <= 1.3x in time and the measured extra memory within [0.9, 1.3] x the predicted bytes.
"""
import os
import subprocess
import sys

import pytest
from conftest import BENCH, median_ms, ratio, write_table

pytest.importorskip("transformers")

TINY = os.environ.get("PYKD_BENCH_TINY") == "1"
BATCH, LENGTH = (2, 16) if TINY else (16, 128)
ROUNDS = 1 if TINY else 3
VARIANTS = {"E=1": (1, "layer"), "E=2 layer": (2, "layer"), "E=2 neuron": (2, "neuron")}
TIME_TARGET = 1.3
MEASURED: dict[str, dict] = {}


def peak_mib(experts: int, routing: str) -> float:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, str(BENCH / "superlm_step.py"), "mos-peak", str(experts), routing,
                          str(BATCH), str(LENGTH)], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def parameter_count(experts: int, routing: str) -> int:
    from superlm_step import supernet

    return sum(p.numel() for p in supernet(experts, routing).parameters())


@pytest.mark.parametrize("name", list(VARIANTS))
def test_mos_step(benchmark, name):
    from superlm_step import mos_step

    experts, routing = VARIANTS[name]
    step = mos_step(experts, routing, BATCH, LENGTH)
    step()
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=0)
    MEASURED[name] = {"ms": median_ms(benchmark), "peak_mib": peak_mib(experts, routing),
                      "params": parameter_count(experts, routing)}


def test_mos_report_and_targets():
    if len(MEASURED) < len(VARIANTS):
        pytest.skip("not every variant ran in this session")
    base = MEASURED["E=1"]
    rows = []
    for name, got in MEASURED.items():
        extra_params = got["params"] - base["params"]
        predicted = base["peak_mib"] + 16 * extra_params / 2**20
        rows.append({"variant": name, "batch": BATCH, "L": LENGTH, "ms": got["ms"],
                     "time_vs_e1": ratio(got["ms"], base["ms"]), "params": got["params"],
                     "extra_params": extra_params, "peak_mib": got["peak_mib"], "predicted_peak_mib": predicted,
                     "extra_mib": got["peak_mib"] - base["peak_mib"],
                     "predicted_extra_mib": predicted - base["peak_mib"]})
    lines = [f"MoS step (MiniLM-L6, 'base' sub-space: largest, smallest, 2 random; fwd+bwd each, one Adam update), "
             f"batch {BATCH}, L={LENGTH}, fp32, CPU; median of {ROUNDS}. Peak: two steps in a fresh process, over "
             f"the resident size with the teacher loaded; predicted = E=1's peak + 16 B per extra parameter.", "",
             "| variant | ms | vs E=1 | params | peak MiB | predicted MiB | extra MiB | predicted extra MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['ms']:.0f} | {r['time_vs_e1']:.3f}x | {r['params']:,} | "
                     f"{r['peak_mib']:.0f} | {r['predicted_peak_mib']:.0f} | {r['extra_mib']:.0f} | "
                     f"{r['predicted_extra_mib']:.0f} |")
    write_table("mos_step", rows, "\n".join(lines) + "\n")
    for r in rows[1:]:
        assert r["time_vs_e1"] <= TIME_TARGET, f"{r['variant']}: {r['time_vs_e1']:.3f}x E=1, target {TIME_TARGET}x"
        assert 0.9 * r["predicted_extra_mib"] <= r["extra_mib"] <= 1.3 * r["predicted_extra_mib"], \
            f"{r['variant']}: extra peak {r['extra_mib']:.0f} MiB, predicted {r['predicted_extra_mib']:.0f} MiB"
