"""Compiles every Triton launch configuration ahead of time for sm_80 and sm_90, without a GPU.

    python tools/triton_aot.py [--out DIR] [--all-variants]        (make aot)

For every entry of every kernel module's CONFIGS table (kernels/configs.py: kernel, dtype class,
architecture, width bucket -> tiles, warps, stages), it compiles the kernel's heaviest variant
(AOT_KERNELS in the kernel's module) with triton.compile on an ASTSource and reads:
  - shared memory (Triton's allocation plus the cubin's static shared memory),
  - registers and spill bytes (`ptxas -v` on the PTX),
  - the tensor-core instructions of the SASS (`cuobjdump -sass` on the cubin: HGMMA is Hopper's
    warp-group MMA, wgmma in PTX; HMMA is mma.sync),
  - the occupancy its registers, shared memory and warps allow (occupancy() below).
Writes bench/results/triton_resources.{json,md}; exits 1 if a compile fails or an entry spills,
2 if TRITON_INTERPRET is set (the interpreter replaces JIT functions). --all-variants also
compiles every other variant (losses, bounds, expert counts) at every entry: slower, for the
record in bench/NOTES.md. ptxas and cuobjdump are those inside the triton package.
"""
import argparse
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kernels import configs  # noqa: E402

TARGETS = {"sm_80": 80, "sm_90": 90}
NVIDIA_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


@dataclass(frozen=True)
class Chip:
    """Per-SM limits the occupancy follows (CUDA programming guide, compute capabilities table)."""

    registers: int = 65536
    threads: int = 2048
    blocks: int = 32
    shared: int = 0            # usable shared memory per SM, bytes
    shared_per_block: int = 0  # opt-in maximum per block
    register_unit: int = 256   # registers are allocated per warp in units of 256
    reserved_shared: int = 1024  # the runtime reserves 1 KiB of shared memory per block


CHIPS = {"sm_80": Chip(shared=164 * 1024, shared_per_block=163 * 1024),
         "sm_90": Chip(shared=228 * 1024, shared_per_block=227 * 1024)}


def occupancy(arch: str, registers: int, shared: int, num_warps: int) -> dict:
    """Resident blocks per SM and what limits them, from the chip's registers, threads, blocks and
    shared memory (the occupancy calculator's rules, register granularity one warp)."""
    chip = CHIPS[arch]
    per_warp = -(-registers * 32 // chip.register_unit) * chip.register_unit
    limits = {
        "registers": (chip.registers // per_warp) // num_warps,
        "threads": chip.threads // (32 * num_warps),
        "blocks": chip.blocks,
        "shared": chip.shared // (shared + chip.reserved_shared) if shared else chip.blocks,
    }
    blocks = min(limits.values())
    bound = min(limits, key=lambda k: (limits[k], k != "registers"))
    return {"blocks_per_sm": blocks, "warps_per_sm": blocks * num_warps,
            "occupancy": blocks * num_warps * 32 / chip.threads, "occupancy_limit": bound}


def tool(name: str) -> str:
    return shutil.which(name) or str(NVIDIA_BIN / name)


def ptxas_resources(ptx: str) -> dict:
    arch = re.search(r"\.target\s+(sm_\w+)", ptx).group(1)  # Triton emits sm_90a for Hopper
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as handle:
        handle.write(ptx)
    try:
        # The flags Triton's own ptxas call uses (triton/backends/nvidia/compiler.py), so the figures are
        # the launched cubin's (checked against its cuobjdump -res-usage in tests/test_triton_aot.py).
        result = subprocess.run([tool("ptxas"), "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}",
                                 handle.name, "-o", os.devnull], capture_output=True, text=True)
    finally:
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


def cubin_facts(cubin: bytes) -> dict:
    """Tensor-core instructions of the SASS and the cubin's static shared memory."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as handle:
        handle.write(cubin)
    try:
        sass = subprocess.run([tool("cuobjdump"), "-sass", handle.name], capture_output=True, text=True,
                              check=True).stdout
        usage = subprocess.run([tool("cuobjdump"), "-res-usage", handle.name], capture_output=True, text=True,
                               check=True).stdout
    finally:
        os.unlink(handle.name)
    usage = dict(re.findall(r"(REG|STACK|SHARED):(\d+)", usage))
    return {"hgmma": len(re.findall(r"\bHGMMA\.", sass)), "hmma": len(re.findall(r"\bHMMA\.", sass)),
            "static_shared_bytes": int(usage.get("SHARED", 0)), "cubin_registers": int(usage["REG"]),
            "cubin_stack_bytes": int(usage.get("STACK", 0))}


def mma_kind(row: dict) -> str:
    """"wgmma" when every tensor-core instruction is Hopper's warp-group MMA, "mma.sync" when none
    is, "mixed" otherwise ("none": no tensor-core instruction)."""
    if row["hgmma"] and row["hmma"]:
        return "mixed"
    return "wgmma" if row["hgmma"] else "mma.sync" if row["hmma"] else "none"


def kernel_modules() -> list:
    return [importlib.import_module(f"kernels.{name}") for name in configs.KERNEL_MODULES]


def signature(spec: configs.AotKernel, pointer_type: str) -> dict:
    sig = {}
    for param in spec.fn.params:
        name = param.name
        if param.is_constexpr:
            sig[name] = "constexpr"
        elif name in spec.pointers:
            sig[name] = pointer_type if spec.pointers[name] == "in" else spec.pointers[name]
        elif name.isupper():
            sig[name] = "*fp32"
        else:
            sig[name] = spec.scalars.get(name, "i32")
    return sig


def entries(module) -> list[tuple]:
    """(AotKernel, dtype class, arch, bucket, Config) for every GPU entry of the module's table."""
    by_key = {spec.table_key: spec for spec in module.AOT_KERNELS}
    return [(by_key[kernel], cls, arch, bucket, chosen) for (kernel, cls, arch, bucket), chosen
            in module.CONFIGS.items() if arch in TARGETS]


def compile_entry(spec: configs.AotKernel, cls: str, arch: str, bucket, chosen: configs.Config,
                  variant=None) -> dict:
    """Compiles one table entry (the heaviest variant, or `variant` = (label, constexprs that
    replace some of it)) and returns its report row."""
    label, variant_meta = variant if variant is not None else (spec.label, {})
    constexprs = dict(spec.variant_meta, **variant_meta, **spec.bucket_meta.get(bucket, {}), **dict(chosen.blocks),
                      **configs.operand_meta(cls))
    for name in [name for name in constexprs if name not in spec.fn.arg_names]:
        constexprs.pop(name)
    compiled = triton.compile(ASTSource(spec.fn, signature(spec, configs.POINTER_TYPES[cls]), constexprs=constexprs),
                              target=GPUTarget("cuda", TARGETS[arch], 32),
                              options={"num_warps": chosen.num_warps, "num_stages": chosen.num_stages})
    row = {"kernel": f"{spec.fn.__name__}[{label}{f',{spec.bucket_label}={bucket}' if bucket is not None else ''}]",
           "table_key": spec.table_key, "arch": arch, "dtype": cls, "bucket": bucket,
           "tiles": "x".join(str(size) for _, size in chosen.blocks), "num_warps": chosen.num_warps,
           "num_stages": chosen.num_stages, **ptxas_resources(compiled.asm["ptx"]),
           **cubin_facts(compiled.asm["cubin"])}
    row["shared_bytes"] = compiled.metadata.shared + row["static_shared_bytes"]
    row["mma"] = mma_kind(row)
    row.update(occupancy(arch, row["registers"], row["shared_bytes"], chosen.num_warps))
    return row


def all_rows(all_variants: bool = False, select=None) -> list[dict]:
    """Report rows of every table entry (only those `select(spec, cls, arch, bucket)` keeps)."""
    rows = []
    for module in kernel_modules():
        for spec, cls, arch, bucket, chosen in entries(module):
            if select is not None and not select(spec, cls, arch, bucket):
                continue
            rows.append(compile_entry(spec, cls, arch, bucket, chosen))
            if all_variants:
                rows += [compile_entry(spec, cls, arch, bucket, chosen, variant) for variant in spec.variants]
    return rows


def spills(row: dict) -> bool:
    return bool(row["spill_store_bytes"] or row["spill_load_bytes"])


def write_report(rows, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "triton_resources.json").write_text(json.dumps(rows, indent=1))
    names = ["kernel", "arch", "dtype", "tiles", "warps", "stages", "shared (B)", "registers", "spill st/ld (B)",
             "MMA (SASS)", "blocks/SM", "occupancy", "limited by"]
    lines = ["Every launch configuration of the kernels' CONFIGS tables (kernels/*.py), compiled by "
             "`make aot` (tools/triton_aot.py) without a GPU. MMA: the SASS's tensor-core instructions "
             "(wgmma = Hopper's warp-group MMA, HGMMA; mma.sync = HMMA). Occupancy: resident warps of 64 "
             "per SM from registers, shared memory, threads and blocks.", "",
             "| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    for r in rows:
        lines.append(f"| {r['kernel']} | {r['arch']} | {r['dtype']} | {r['tiles']} | {r['num_warps']} | "
                     f"{r['num_stages']} | {r['shared_bytes']} | {r['registers']} | "
                     f"{r['spill_store_bytes']}/{r['spill_load_bytes']} | {r['mma']} | {r['blocks_per_sm']} | "
                     f"{r['occupancy']:.0%} | {r['occupancy_limit']} |")
    (out_dir / "triton_resources.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--all-variants", action="store_true",
                        help="also compile every loss/bound/expert-count variant at each entry (not written as "
                             "the report: printed)")
    args = parser.parse_args()
    if configs.interpreting():
        print("unset TRITON_INTERPRET: the interpreter cannot compile ahead of time", file=sys.stderr)
        return 2
    rows = all_rows(all_variants=args.all_variants)
    if not args.all_variants:
        write_report(rows, args.out)
    for r in rows:
        print(f"{r['kernel']:52s} {r['arch']} {r['dtype']} {r['tiles']:>9s} w{r['num_warps']} s{r['num_stages']} "
              f"shared={r['shared_bytes']} regs={r['registers']} spills={r['spill_store_bytes']}/"
              f"{r['spill_load_bytes']} {r['mma']} occupancy={r['occupancy']:.0%}", flush=True)
    spilled = [r["kernel"] + f" {r['arch']} {r['dtype']}" for r in rows if spills(r)]
    if spilled:
        print("spills in: " + "; ".join(spilled), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
