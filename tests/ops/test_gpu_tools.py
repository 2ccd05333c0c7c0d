"""tools/gpu_roofline.py (arithmetic on known cases, the report) and tools/gpu_check.py (the dry run CI runs)."""
import json
import math
import os
import subprocess
import sys

import pytest
from tests.paths import REPO

ROOT = REPO
sys.path.insert(0, str(ROOT / "tools"))

import gpu_roofline


def test_relation_case_by_hand():
    """B=8, A=12, d=64, L=512, bf16, kl: 25,165,824 score elements. Score dots (2 forward, 2 in dX,
    2 in dY) at 2 d FLOPs each, 16-bit: 12 d per element; the two dots with G (fp32, one tf32 pass):
    4 d. Six exps per element."""
    elements = 8 * 12 * 512 * 512
    work = gpu_roofline.relation_work(8, 12, 64, 512, "bf16")
    assert work.flops_16 == 12 * 64 * elements
    assert work.flops_tf32 == 4 * 64 * elements
    assert work.mufu == 6 * elements
    h100 = gpu_roofline.ceilings(work, gpu_roofline.H100)
    assert h100["tensor"] == pytest.approx(12 * 64 * elements / 989e12 + 4 * 64 * elements / 495e12)
    assert h100["mufu"] == pytest.approx(6 * elements / (132 * 16 * 1.98e9))  # 36.1 us
    floor, bound = gpu_roofline.floor_seconds(work, gpu_roofline.H100)
    assert bound == "mufu" and floor == pytest.approx(36.1e-6, rel=1e-3)
    # fp32 inputs run every dot as tf32x3: three tf32 passes.
    fp32 = gpu_roofline.relation_work(8, 12, 64, 512, "fp32")
    assert fp32.flops_16 == 0 and fp32.flops_tf32 == 3 * 16 * 64 * elements


def test_anchors_by_hand():
    # SDPA fwd + bwd: 14 B H L^2 d FLOPs at the 16-bit rate.
    sdpa = gpu_roofline.sdpa_work(8, 12, 64, 512, "bf16")
    assert sdpa.flops_16 == 14 * 64 * 8 * 12 * 512 * 512
    # Three GEMMs of n x n x e; the n x n scores written once and read twice: at n = 65536, e = 128 in
    # bf16 that is 25.8 GB, 7.7 ms of HBM on an H100 against 3.3 ms of tensor time.
    gemms = gpu_roofline.gemm3_work(65536, 128, "bf16")
    floor, bound = gpu_roofline.floor_seconds(gemms, gpu_roofline.H100)
    assert bound == "hbm" and floor == pytest.approx((3 * 65536**2 * 2 + 6 * 65536 * 128 * 2) / 3.35e12)
    assert gpu_roofline.floor_seconds(gemms, gpu_roofline.H200)[0] == pytest.approx(floor * 3.35 / 4.8)
    dense = gpu_roofline.dense_work(4096, 768, 3072, "bf16")
    assert dense.flops_16 == 6 * 4096 * 768 * 3072


def test_prediction_is_host_overhead_or_floor_over_attainment():
    work = gpu_roofline.mi_work(65536, 128, "bf16")
    floor, _ = gpu_roofline.floor_seconds(work, gpu_roofline.H100)
    expected = 1e3 * floor / gpu_roofline.ASSUMPTIONS["attainment"]["mi"]
    assert gpu_roofline.predicted_ms(work, "mi") == pytest.approx(expected)
    tiny = gpu_roofline.mi_work(16, 8, "bf16")
    assert gpu_roofline.predicted_ms(tiny, "mi") == gpu_roofline.ASSUMPTIONS["host_ms"]["mi"]


def test_old_figures_are_found_for_their_cases():
    case = next(c for c in gpu_roofline.TIMING_CASES if c.op == "relation" and c.params == (8, 12, 64, 1024)
                and c.dtype == "bf16")
    assert gpu_roofline.old_measurement(case) == pytest.approx(2.27, abs=0.01)
    assert gpu_roofline.old_measurement(next(c for c in gpu_roofline.TIMING_CASES if c.op == "kd")) is None


def test_roofline_report_is_written(tmp_path):
    assert gpu_roofline.main(["--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "gpu_roofline.json").read_text())
    assert len(rows) == len(gpu_roofline.TIMING_CASES)
    assert all(r["H100_floor_us"] > 0 and r["predicted_ms"] > 0 for r in rows)
    text = (tmp_path / "gpu_roofline.md").read_text()
    assert "relation B=8 A=12 d=64 L=512 bf16" in text and "Old figures predate" in text


def run_check(*args, timeout=900):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the script sets it itself for --dry-run
    return subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_gpu_check_dry_run_passes(tmp_path):
    """The whole device check at tiny sizes on CPU under the interpreter (what CI runs)."""
    pytest.importorskip("triton")
    result = run_check("--dry-run", "--out", str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = json.loads((tmp_path / "gpu_check_cpu_dry_run.json").read_text())
    phases = {step["phase"] for step in record["steps"]}
    assert phases == {"correctness", "compile", "timing"}
    assert all(step["status"] == "ok" for step in record["steps"]), [s for s in record["steps"] if s["status"] != "ok"]
    checks = [row for step in record["steps"] for row in step.get("rows", []) if "check" in row]
    assert checks and all(row["pass"] for row in checks)
    timings = [row for step in record["steps"] for row in step.get("rows", []) if "case" in row]
    assert {row["op"] for row in timings} == {"relation", "mi", "routed", "kd", "vocab"}
    assert all(math.isfinite(row["ms"]) and row["predicted_ms"] > 0 for row in timings)
    assert record["predicted_total_s"] > 0 and "predicted on an H100" in result.stdout
    assert (tmp_path / "gpu_check_cpu_dry_run.md").read_text().startswith("# gpu_check on CPU (dry run)")


def test_gpu_check_records_what_the_budget_skips(tmp_path):
    pytest.importorskip("triton")
    result = run_check("--dry-run", "--out", str(tmp_path), "--budget-s", "0.001", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "gpu_check_cpu_dry_run.json").read_text())
    assert record["steps"] and all(step["status"] == "skipped" for step in record["steps"])
    assert "budget" in record["steps"][0]["reason"]


def test_gpu_check_refuses_bad_arguments():
    result = run_check("--budget-s", "-1", timeout=300)
    assert result.returncode == 2 and "--budget-s" in result.stderr
