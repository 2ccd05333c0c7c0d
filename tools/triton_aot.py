"""Compiles every Triton kernel ahead of time for sm_80 and sm_90 without a GPU.

For each kernel, compute capability and input dtype it runs triton.compile on an ASTSource,
reads the shared memory Triton reports, and assembles the PTX with `ptxas -v` for registers and
spills. Writes bench/results/triton_resources.{json,md}; exits non-zero if anything fails.
Run as a script: TRITON_INTERPRET must be unset, since the interpreter replaces JIT functions.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kernels import attention_relation, mi_bound, routed_linear, vocab_kd  # noqa: E402

TARGETS = {"sm_80": 80, "sm_90": 90}
# Warps each kernel family launches with (kernels/*.py).
DTYPES = {"fp32": "*fp32", "bf16": "*bf16"}

# Pointer arguments that carry the op's inputs or outputs take the tested dtype; the rest are fixed.
RELATION_POINTERS = {"XT": "in", "YT": "in", "XS": "in", "YS": "in", "KEY_VALID": "*i8", "DXS": "in", "DYS": "in"}
RELATION_SCALARS = {"scale_t": "fp32", "scale_s": "fp32"}


NUM_WARPS = {"relation": attention_relation.NUM_WARPS, "mi": attention_relation.NUM_WARPS,
             "routed": routed_linear.NUM_WARPS}


def relation_cases():
    for fn in (attention_relation._relation_fwd_kernel, attention_relation._relation_bwd_dx_kernel,
               attention_relation._relation_bwd_dy_kernel):
        # mse_prob holds the most live values; d=64 is AutoDistil's head size.
        block_m, block_n = attention_relation.block_sizes()
        meta = dict(LOSS=attention_relation.MSE_PROB, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_DT=64, BLOCK_DS=64)
        yield f"{fn.__name__}[mse_prob,d=64]", fn, RELATION_POINTERS, RELATION_SCALARS, meta


MI_POINTERS = {"A": "in", "B": "in", "LOG_Q": "in", "DA": "in", "DB": "in"}
MI_SCALARS = {"scale": "fp32", "log_n1": "fp32", "log_alpha": "fp32", "log_one_minus_alpha": "fp32"}


def mi_cases():
    block_m, block_n = attention_relation.block_sizes()
    for fn in (mi_bound._mi_fwd_kernel, mi_bound._mi_bwd_da_kernel, mi_bound._mi_bwd_db_kernel):
        # alpha with a baseline is the heaviest bound; e=128 is the benchmark's critic width.
        meta = dict(BOUND=mi_bound.ALPHA, ALPHA_MODE=mi_bound.ALPHA_INTERIOR, HAS_Q=True,
                    BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_E=128)
        yield f"{fn.__name__}[alpha,e=128]", fn, MI_POINTERS, MI_SCALARS, meta


ROUTED_POINTERS = {"X": "in", "W": "in", "ALPHA": "in", "BIAS": "in", "Y": "in", "DY": "in", "DX": "in",
                   "GRAD_W": "*fp32", "GRAD_ALPHA": "*fp32"}


def routed_cases():
    block_m, block_n, block_k = routed_linear.block_sizes()
    for fn in (routed_linear._routed_fwd_kernel, routed_linear._routed_bwd_dx_kernel,
               routed_linear._routed_bwd_dw_kernel):
        # MoS BERT: two experts, neuron-wise mixing (one coefficient per output row and expert).
        meta = dict(E=2, NEURON=True, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
        if "HAS_BIAS" in fn.arg_names:
            meta["HAS_BIAS"] = True
        yield f"{fn.__name__}[E=2,neuron]", fn, ROUTED_POINTERS, {}, meta


VOCAB_POINTERS = {"H_S": "in", "W_S": "in", "B_S": "in", "H_T": "in", "W_T": "in", "B_T": "in", "T_LOGITS": "in",
                  "TOPK_VAL": "in", "TOPK_IDX": "*i64", "LABELS": "*i64", "ROW_IDX": "*i64", "TOP": "*i32"}
VOCAB_SCALARS = dict.fromkeys(("inv_t", "beta", "log_beta", "log_1m_beta", "kd_value", "hard_value"), "fp32")


def vocab_meta(dtype_name):
    """The launch configuration vocab_kd takes for this dtype (its CONFIGS table), as constexprs
    plus num_warps and num_stages."""
    config = vocab_kd.CONFIGS[dtype_name]
    return dict(BLOCK_M=config.block_m, BLOCK_V=config.block_v, BLOCK_K=config.block_k, HALF_S=dtype_name != "fp32",
                HALF_T=dtype_name != "fp32", num_warps=config.num_warps, num_stages=config.num_stages)


def vocab_cases():
    # jsd with a projected teacher, both biases and a hard-label term at T != 1: every branch of the tiles
    # (each divergence with each teacher compiled spill-free on sm_90 when CONFIGS was chosen).
    flags = dict(DIV=vocab_kd.JSD, TEACHER=vocab_kd.PROJECTED, HAS_BIAS_S=True, HAS_BIAS_T=True, HARD=True,
                 SEPARATE=True)
    extra = {"_vocab_bwd_dh_kernel": {"NEED_DH": True}, "_vocab_bwd_dw_kernel": {"NEED_DW": True}}
    for fn in (vocab_kd._vocab_fwd_kernel, vocab_kd._vocab_bwd_dh_kernel, vocab_kd._vocab_bwd_dw_kernel):
        def meta(dtype_name, fn=fn):
            return dict(flags, **extra.get(fn.__name__, {}), **vocab_meta(dtype_name))
        yield f"{fn.__name__}[jsd,projected,hard]", fn, VOCAB_POINTERS, VOCAB_SCALARS, meta


def all_cases():
    yield from relation_cases()
    yield from mi_cases()
    yield from routed_cases()
    yield from vocab_cases()


def signature(fn, pointers, scalars, meta, pointer_dtype):
    sig = {}
    for param in fn.params:
        name = param.name
        if param.is_constexpr:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointer_dtype if pointers[name] == "in" else pointers[name]
        elif name.isupper():
            sig[name] = "*fp32"
        else:
            sig[name] = scalars.get(name, "i32")
    return sig


def ptxas_resources(ptx: str) -> dict:
    arch = re.search(r"\.target\s+(sm_\w+)", ptx).group(1)  # Triton emits sm_90a for Hopper
    ptxas = shutil.which("ptxas") or str(Path(triton.__file__).parent / "backends/nvidia/bin/ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as handle:
        handle.write(ptx)
    result = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", handle.name, "-o", os.devnull],
                            capture_output=True, text=True)
    os.unlink(handle.name)
    if result.returncode:
        raise RuntimeError(f"ptxas failed for {arch}: {result.stderr}")
    registers = re.search(r"Used (\d+) registers", result.stderr)
    spill_stores = re.search(r"(\d+) bytes spill stores", result.stderr)
    spill_loads = re.search(r"(\d+) bytes spill loads", result.stderr)
    return {
        "registers": int(registers.group(1)) if registers else None,
        "spill_store_bytes": int(spill_stores.group(1)) if spill_stores else 0,
        "spill_load_bytes": int(spill_loads.group(1)) if spill_loads else 0,
    }


def compile_case(name, fn, pointers, scalars, meta, arch, dtype_name):
    precision = "tf32x3" if dtype_name == "fp32" else "tf32"
    meta = dict(meta(dtype_name) if callable(meta) else meta)  # a callable: a launch config per dtype
    launch = {"num_warps": meta.pop("num_warps", None) or NUM_WARPS[fn.__name__.split("_")[1]]}
    if "num_stages" in meta:
        launch["num_stages"] = meta.pop("num_stages")
    constexprs = dict(meta, PRECISION=precision)
    sig = signature(fn, pointers, scalars, constexprs, DTYPES[dtype_name])
    compiled = triton.compile(ASTSource(fn, sig, constexprs=constexprs),
                              target=GPUTarget("cuda", TARGETS[arch], 32), options=launch)
    return {"kernel": name, "arch": arch, "dtype": dtype_name, "shared_bytes": compiled.metadata.shared,
            "num_warps": compiled.metadata.num_warps, **ptxas_resources(compiled.asm["ptx"])}


def write_report(rows, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "triton_resources.json").write_text(json.dumps(rows, indent=1))
    lines = ["| kernel | arch | dtype | shared (B) | registers | spill st/ld (B) |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['kernel']} | {r['arch']} | {r['dtype']} | {r['shared_bytes']} | {r['registers']} | "
                     f"{r['spill_store_bytes']}/{r['spill_load_bytes']} |")
    (out_dir / "triton_resources.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter cannot compile ahead of time", file=sys.stderr)
        return 2
    rows = [compile_case(*case, arch, dtype) for case in all_cases() for arch in TARGETS for dtype in DTYPES]
    write_report(rows, args.out)
    for r in rows:
        print(f"{r['kernel']:48s} {r['arch']} {r['dtype']} shared={r['shared_bytes']} regs={r['registers']} "
              f"spills={r['spill_store_bytes']}/{r['spill_load_bytes']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
