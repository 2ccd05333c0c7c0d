"""Compiles every Triton launch configuration ahead of time for sm_80 and sm_90, without a GPU.

    python tools/triton_aot.py [--out DIR] [--heaviest-only] [--jobs N]        (make aot)

For every entry of every kernel module's CONFIGS table (kernels/configs.py: kernel, dtype class,
architecture, bucket -> tiles, warps, stages), it compiles the kernel at its heaviest variant and
at every other variant the dispatch can launch with that entry (AOT_KERNELS in the kernel's
module: losses, bounds, expert mixings) with triton.compile on an ASTSource, and reads:
  - shared memory (Triton's allocation plus the cubin's static shared memory),
  - registers (the cubin's, `cuobjdump -res-usage`: what the launch uses) and spill bytes
    (`ptxas -v` on the PTX, with Triton's flags),
  - the tensor-core instructions of the SASS (`cuobjdump -sass` on the cubin: HGMMA is Hopper's
    warp-group MMA, wgmma in PTX; HMMA is mma.sync),
  - the occupancy its registers, shared memory and warps allow (occupancy() below).
Writes bench/results/triton_resources.{json,md}; exits 1 if a compile fails or an entry spills
in any variant without a written reason (Config.spill_reason), 2 if TRITON_INTERPRET is set
(the interpreter replaces JIT functions). ptxas and cuobjdump are those inside the triton package.
"""
import argparse
import importlib
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
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
        # The flags Triton's own ptxas call uses (triton/backends/nvidia/compiler.py); the spill bytes
        # agree with the cubin's stack size (tests/test_triton_aot.py checks it).
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
    replace some of it; a callable value is called with the bucket)) and returns its report row."""
    label, variant_meta = variant if variant is not None else (spec.label, {})
    variant_meta = {name: value(bucket) if callable(value) else value for name, value in variant_meta.items()}
    constexprs = {**spec.variant_meta, **spec.bucket_meta.get(bucket, {}), **variant_meta, **dict(chosen.blocks),
                  **configs.operand_meta(cls)}
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
    # The launch uses the cubin's register count (ptxas -v may say a couple more on sm_90).
    row["ptxas_registers"], row["registers"] = row["registers"], row["cubin_registers"]
    row["shared_bytes"] = compiled.metadata.shared + row["static_shared_bytes"]
    row["mma"] = mma_kind(row)
    row["spill_reason"] = chosen.spill_reason
    row.update(occupancy(arch, row["registers"], row["shared_bytes"], chosen.num_warps))
    return row


def _compile_task(task) -> dict:
    """One compile of the report, by names and indices so that a worker process can run it."""
    module_name, spec_index, cls, arch, bucket, variant_index = task
    module = importlib.import_module(f"kernels.{module_name}")
    spec = module.AOT_KERNELS[spec_index]
    chosen = module.CONFIGS[spec.table_key, cls, arch, bucket]
    variant = spec.variants[variant_index] if variant_index is not None else None
    row = compile_entry(spec, cls, arch, bucket, chosen, variant)
    row["variant"] = (variant or (spec.label,))[0]
    row["heaviest"] = variant is None
    return row


def all_rows(all_variants: bool = True, select=None, jobs: int | None = None) -> list[dict]:
    """Report rows of every table entry (only those `select(spec, cls, arch, bucket)` keeps): the
    heaviest variant and, with all_variants, every other one; compiled by `jobs` processes."""
    tasks = []
    for name, module in zip(configs.KERNEL_MODULES, kernel_modules()):
        for spec, cls, arch, bucket, _ in entries(module):
            if select is not None and not select(spec, cls, arch, bucket):
                continue
            index = module.AOT_KERNELS.index(spec)
            variants = range(len(spec.variants)) if all_variants else ()
            tasks += [(name, index, cls, arch, bucket, None)] + [(name, index, cls, arch, bucket, k) for k in variants]
    jobs = jobs or os.cpu_count() or 1
    if jobs == 1:
        return [_compile_task(task) for task in tasks]
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_compile_task, tasks))


def spills(row: dict) -> bool:
    return bool(row["spill_store_bytes"] or row["spill_load_bytes"])


def unexplained_spills(rows: list[dict]) -> list[str]:
    """Entries that spill without a written reason in their table."""
    return [f"{r['kernel']} {r['arch']} {r['dtype']}" for r in rows if spills(r) and not r.get("spill_reason")]


def write_report(rows, out_dir: Path) -> None:
    """The JSON keeps every compiled variant; the Markdown one line per entry: its heaviest variant's
    figures and the worst registers and spills over all of its variants."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "triton_resources.json").write_text(json.dumps(rows, indent=1))
    by_entry = {}
    for r in rows:
        by_entry.setdefault((r["kernel"].split("[")[0], r["arch"], r["dtype"], r["bucket"]), []).append(r)
    names = ["kernel", "arch", "dtype", "tiles", "warps", "stages", "shared (B)", "registers", "spill st/ld (B)",
             "all variants: registers, spill st (B)", "MMA (SASS)", "blocks/SM", "occupancy", "limited by"]
    lines = ["Every launch configuration of the kernels' CONFIGS tables (kernels/*.py), compiled by "
             "`make aot` (tools/triton_aot.py) without a GPU: each entry at its heaviest variant (its figures) "
             "and at every other variant the dispatch can launch with it (the worst of them). MMA: the SASS's "
             "tensor-core instructions (wgmma = Hopper's warp-group MMA, HGMMA; mma.sync = HMMA). Occupancy: "
             "resident warps of 64 per SM from registers, shared memory, threads and blocks.", "",
             "| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    reasons = sorted({r["spill_reason"] for r in rows if spills(r) and r.get("spill_reason")})
    for group in by_entry.values():
        r = next(row for row in group if row.get("heaviest", True))
        spilled = [row for row in group if spills(row)]
        mark = f" [{reasons.index(r['spill_reason']) + 1}]" if spilled and r.get("spill_reason") else ""
        worst = (f"{max(row['registers'] for row in group)}, {max(row['spill_store_bytes'] for row in group)}"
                 f" ({len(group)} variants)")
        lines.append(f"| {r['kernel']} | {r['arch']} | {r['dtype']} | {r['tiles']} | {r['num_warps']} | "
                     f"{r['num_stages']} | {r['shared_bytes']} | {r['registers']} | "
                     f"{r['spill_store_bytes']}/{r['spill_load_bytes']}{mark} | {worst} | {r['mma']} | "
                     f"{r['blocks_per_sm']} | {r['occupancy']:.0%} | {r['occupancy_limit']} |")
    spilled_entries = sum(any(spills(row) for row in group) for group in by_entry.values())
    lines += ["", f"{len(by_entry)} entries ({len(rows)} compiles), {len(by_entry) - spilled_entries} spill-free in "
              f"every variant; the {spilled_entries} that spill keep the least-spilling tile, for the reason their "
              "table gives:"]
    lines += [f"{k}. {reason}" for k, reason in enumerate(reasons, 1)]
    (out_dir / "triton_resources.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--heaviest-only", action="store_true",
                        help="compile each entry at its heaviest variant only (faster; not the report of record)")
    parser.add_argument("--jobs", type=int, default=None, help="compile processes (default: every CPU)")
    args = parser.parse_args()
    if configs.interpreting():
        print("unset TRITON_INTERPRET: the interpreter cannot compile ahead of time", file=sys.stderr)
        return 2
    rows = all_rows(all_variants=not args.heaviest_only, jobs=args.jobs)
    write_report(rows, args.out)
    for r in rows:
        print(f"{r['kernel']:52s} {r['arch']} {r['dtype']} {r['tiles']:>9s} w{r['num_warps']} s{r['num_stages']} "
              f"shared={r['shared_bytes']} regs={r['registers']} spills={r['spill_store_bytes']}/"
              f"{r['spill_load_bytes']} {r['mma']} occupancy={r['occupancy']:.0%}", flush=True)
    spilled = unexplained_spills(rows)
    if spilled:
        print("spills without a written reason (spill_reason in the table) in: " + "; ".join(spilled), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
