"""The Triton launch tables and their ahead-of-time report (tools/triton_aot.py, `make aot`).

The full report compiles every CONFIGS entry at every variant it launches (180 entries, about 1000
compiles: most of an hour on 2 cores); this test compiles a representative subset, every kernel
at its smallest bucket and heaviest variant, fp32 and bf16, sm_80 and sm_90 (48 compiles), checks
it spills nothing, fits the chip and matches the committed report, and checks that the committed
report covers every entry and variant of the tables with no spill left unexplained.
"""
import importlib
import json
import os
import subprocess
import sys

import pytest
from tests.paths import REPO

ROOT = REPO
REPORT = ROOT / "bench" / "results" / "triton_resources.json"
KERNELS = {"_relation_fwd_kernel", "_relation_bwd_dx_kernel", "_relation_bwd_dy_kernel", "_mi_fwd_kernel",
           "_mi_bwd_da_kernel", "_mi_bwd_db_kernel", "_routed_fwd_kernel", "_routed_bwd_dx_kernel",
           "_routed_bwd_dw_kernel", "_vocab_fwd_kernel", "_vocab_bwd_dh_kernel", "_vocab_bwd_dw_kernel"}
SUBSET = """
import json, sys
sys.path.insert(0, {tools!r})
import triton_aot
smallest = {{}}
for module in triton_aot.kernel_modules():
    for spec, cls, arch, bucket, _ in triton_aot.entries(module):
        smallest[id(spec)] = min(smallest.get(id(spec), bucket or 0), bucket or 0)
rows = triton_aot.all_rows(all_variants=False, select=lambda spec, cls, arch, bucket: cls in ("fp32", "bf16")
                           and (bucket or 0) == smallest[id(spec)])
print(json.dumps(rows))
"""


def kernel_modules():
    sys.path.insert(0, str(ROOT))
    from kernels import configs

    return configs, [importlib.import_module(f"kernels.{name}") for name in configs.KERNEL_MODULES]


@pytest.fixture(scope="module")
def subset():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", SUBSET.format(tools=str(ROOT / "tools"))], env=env,
                            capture_output=True, text=True, timeout=1800, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def report():
    return json.loads(REPORT.read_text())


def test_subset_covers_every_kernel_on_both_architectures(subset):
    compiled = {(r["kernel"].split("[")[0], r["arch"], r["dtype"]) for r in subset}
    assert compiled == {(k, arch, cls) for k in KERNELS for arch in ("sm_80", "sm_90") for cls in ("fp32", "bf16")}


def test_subset_spills_nothing_and_fits_the_chip(subset):
    limit = {"sm_80": 99 * 1024, "sm_90": 227 * 1024}  # sm_80 entries must also run on sm_86/sm_89
    for row in subset:
        assert row["spill_store_bytes"] == 0 and row["spill_load_bytes"] == 0 and row["cubin_stack_bytes"] == 0, row
        # The launch uses the cubin's count. ptxas -v (a separate compile with Triton's flags) may report a
        # few more on sm_90, and often far fewer (the cubin's allocation is what the SM reserves: up to 64
        # more in the report of record), so only its excess over the cubin's is bounded.
        assert 0 < row["registers"] <= 255 and row["ptxas_registers"] <= row["registers"] + 8, row
        assert row["shared_bytes"] <= limit[row["arch"]], row
        assert row["blocks_per_sm"] >= 1, row


def test_bf16_relation_routed_and_vocab_dots_are_warp_group_mma_on_hopper(subset):
    for row in subset:
        if row["arch"] == "sm_90" and row["dtype"] == "bf16" and not row["kernel"].startswith("_mi"):
            assert row["hgmma"] > 0, row
        if row["arch"] == "sm_80":
            assert row["hgmma"] == 0 and row["hmma"] > 0, row


def test_committed_report_matches_a_fresh_compile(subset, report):
    """The compile is deterministic: a kernel or table change must come with `make aot`."""
    committed = {(r["kernel"], r["arch"], r["dtype"]): r for r in report}
    for row in subset:
        old = committed.get((row["kernel"], row["arch"], row["dtype"]))
        assert old is not None, f"{row['kernel']} {row['arch']} {row['dtype']} is not in the report: run make aot"
        for field in ("tiles", "num_warps", "num_stages", "registers", "spill_store_bytes", "shared_bytes", "mma"):
            assert old[field] == row[field], (field, old, row)


def test_committed_report_covers_every_table_entry_and_explains_each_spill(report):
    _, modules = kernel_modules()
    reported = {}
    for r in report:
        key = (r["table_key"], r["arch"], r["dtype"], r["bucket"], r["kernel"].split("[")[0])
        reported.setdefault(key, set()).add(r["variant"])
    for module in modules:
        specs = {spec.table_key: spec for spec in module.AOT_KERNELS}
        for kernel, cls, arch, bucket in module.CONFIGS:
            if arch == "interpreter":
                continue
            spec = specs[kernel]
            variants = reported.get((kernel, arch, cls, bucket, spec.fn.__name__), set())
            assert variants == {spec.label, *(label for label, _ in spec.variants)}, (module.__name__, kernel, cls,
                                                                                     arch, bucket, variants)
    for row in report:
        module = next(m for m in modules if any(s.fn.__name__ == row["kernel"].split("[")[0] for s in m.AOT_KERNELS))
        chosen = module.CONFIGS[row["table_key"], row["dtype"], row["arch"], row["bucket"]]
        if row["spill_store_bytes"] or row["spill_load_bytes"]:
            assert chosen.spill_reason, f"{row['kernel']} {row['arch']} {row['dtype']} spills with no written reason"


def test_tables_cover_every_launch():
    """Every kernel, dtype class, architecture and width bucket the launchers can ask for has an entry."""
    configs, modules = kernel_modules()
    for module in modules:
        for spec in module.AOT_KERNELS:
            kernel, buckets = spec.table_key, tuple(spec.bucket_meta) or (None,)
            assert (kernel, "any", "interpreter", None) in module.CONFIGS
            for cls in configs.DTYPE_CLASSES:
                for arch in configs.ARCHS:
                    for bucket in buckets:
                        assert (kernel, cls, arch, bucket) in module.CONFIGS, (module.__name__, kernel, cls, arch,
                                                                                bucket)


def test_occupancy_follows_the_chip_limits():
    sys.path.insert(0, str(ROOT / "tools"))
    pytest.importorskip("triton")
    import triton_aot

    # 255 registers: 8 warps of 8160 -> 8192 registers fit 65536; 4-warp blocks, 2 per SM.
    assert triton_aot.occupancy("sm_90", 255, 10_000, 4) == {
        "blocks_per_sm": 2, "warps_per_sm": 8, "occupancy": 0.125, "occupancy_limit": "registers"}
    # 64 registers, 4 warps, 100 KB shared: shared memory allows 2 blocks on sm_90 (228 KB), 1 on sm_80.
    assert triton_aot.occupancy("sm_90", 64, 100 * 1024, 4)["blocks_per_sm"] == 2
    assert triton_aot.occupancy("sm_80", 64, 100 * 1024, 4)["blocks_per_sm"] == 1
    # 32 registers, 1 warp, no shared memory: the 32-block limit binds before 64 warps.
    assert triton_aot.occupancy("sm_80", 32, 0, 1) == {
        "blocks_per_sm": 32, "warps_per_sm": 32, "occupancy": 0.5, "occupancy_limit": "blocks"}
    assert triton_aot.mma_kind({"hgmma": 3, "hmma": 0}) == "wgmma"
    assert triton_aot.mma_kind({"hgmma": 0, "hmma": 2}) == "mma.sync"
    assert triton_aot.mma_kind({"hgmma": 1, "hmma": 2}) == "mixed"


def test_aot_refuses_the_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "triton_aot.py"), "--out", os.devnull], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "TRITON_INTERPRET" in result.stderr
