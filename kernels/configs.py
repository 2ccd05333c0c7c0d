"""Launch configurations of the Triton kernels: what a launcher reads and what tools/triton_aot.py compiles.

Each kernel module keeps one table, CONFIGS, beside its kernels: for every kernel, dtype class,
architecture and (where the kernel has one) width bucket, the tile sizes, warps and pipeline
stages it launches with. The table is fixed (no autotuning, so nothing retunes per batch shape),
and the ahead-of-time report compiles exactly its entries, so a spill in any configuration the
dispatch can launch shows up there (`make aot`, bench/results/triton_resources.md).

Dtype class: the kernels' operands. When the tensor inputs that feed tl.dot share one 16-bit dtype
("bf16", "fp16") they go to the tensor cores as they are (bf16 x bf16 and fp16 x fp16 products
are exact in the fp32 accumulator); any other mix (fp32 or fp64 among them, or fp16 with bf16)
is "fp32": the loads are upcast and every dot runs tf32x3, which keeps fp32 accuracy (the MI
bounds' promise at 10-80 nat separations needs it; one tf32 pass would move an 80-nat score by
~80 * 2^-11 = 0.04 nat). Operands a kernel computes itself (the score gradient G, the mixed expert
weights) take the dtype that kernel's module states.

Architecture: "sm_90" for compute capability 9.x (Hopper, warp-group MMA), "sm_80" for every other
(Ampere and Ada, and newer chips until they get entries of their own). sm_80 entries keep shared
memory within 99 KiB per block, the opt-in limit of sm_86/sm_89, so they run on those too.

A new kernel joins with one table entry per (dtype class, architecture, width bucket) in its
module's CONFIGS and one AotKernel in its module's AOT_KERNELS; a new kernel module also adds its
name to KERNEL_MODULES below.
"""
import os
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

KERNEL_MODULES = ("attention_relation", "mi_bound", "routed_linear", "vocab_kd")
DTYPE_CLASSES = ("fp32", "bf16", "fp16")
ARCHS = ("sm_80", "sm_90")
SIXTEEN_BIT = {torch.bfloat16: "bf16", torch.float16: "fp16"}
TRITON_DTYPES = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16}
POINTER_TYPES = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}
# fp32 operands: three tf32 passes (hi*hi + hi*lo + lo*hi) keep fp32 accuracy on the tensor cores.
FP32_PRECISION = "tf32x3"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class Config:
    """One launch configuration: the kernel's tile constexprs, warps and software-pipeline stages."""

    blocks: tuple[tuple[str, int], ...]
    num_warps: int
    num_stages: int
    spill_reason: str = ""  # a spilling entry must say why it is kept (the AOT report fails otherwise)

    def meta(self) -> dict:
        return dict(self.blocks, num_warps=self.num_warps, num_stages=self.num_stages)

    def block(self, name: str) -> int:
        return dict(self.blocks)[name]


def config(num_warps: int, num_stages: int, **blocks: int) -> Config:
    return Config(tuple(blocks.items()), num_warps, num_stages)


def table(block_names: tuple[str, ...], rows: list[tuple]) -> dict:
    """CONFIGS from rows (kernel, dtype class, arch, bucket, *tile sizes in block_names order, warps,
    stages[, why it may spill]); the interpreter's rows have class "any" and bucket None."""
    built = {}
    for row in rows:
        reason = row[-1] if isinstance(row[-1], str) else ""
        kernel, cls, arch, bucket, *sizes, num_warps, num_stages = row[:-1] if reason else row
        key = (kernel, cls, arch, bucket)
        if key in built:
            raise ValueError(f"two CONFIGS rows for {key}")
        built[key] = Config(tuple(zip(block_names, sizes, strict=True)), num_warps, num_stages, reason)
    return built


@dataclass(frozen=True)
class AotKernel:
    """How tools/triton_aot.py compiles one kernel: its pointer arguments' dtypes ("in": the dtype
    class's pointer type; otherwise a fixed Triton pointer type, the default "*fp32"), its fp32
    scalars (others are i32), and the constexprs of its heaviest variant per bucket (a width, or
    the expert count)."""

    fn: object
    table_key: str
    label: str
    pointers: dict
    scalars: dict
    variant_meta: dict                       # constexprs that do not depend on the bucket
    bucket_meta: dict = field(default_factory=dict)   # bucket -> its constexprs (no buckets: empty)
    variants: tuple = ()                     # the other (label, constexprs) the AOT report compiles; a
    #                                          callable constexpr value is called with the bucket
    bucket_label: str = "w"                  # what the bucket counts, in the report's kernel names


def dtype_class(*tensors: torch.Tensor) -> str:
    """"bf16"/"fp16" when every tensor has that dtype, else "fp32" (see the module docstring)."""
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) == 1 and next(iter(dtypes)) in SIXTEEN_BIT:
        return SIXTEEN_BIT[next(iter(dtypes))]
    return "fp32"


def arch_of(device: torch.device) -> str:
    major, _ = torch.cuda.get_device_capability(device)
    return "sm_90" if major == 9 else "sm_80"


def lookup(table: dict, kernel: str, cls: str, device: torch.device, bucket=None) -> Config:
    """The table's entry for a launch on `device` (the interpreter's small tiles on CPU)."""
    arch = "interpreter" if interpreting() else arch_of(device)
    key = (kernel, "any" if arch == "interpreter" else cls, arch, None if arch == "interpreter" else bucket)
    return table[key]


def operand_meta(cls: str) -> dict:
    """Constexprs of the dot operands for a dtype class.

    DOT: the dtype operands enter tl.dot in; ROUND: the dtype they are rounded to first. On a GPU
    both are the class dtype (a no-op for 16-bit loads, a rounding for operands a kernel forms
    itself). The interpreter's tl.dot multiplies bf16 bit patterns as integers, so there DOT is
    fp32 and ROUND the GPU's operand dtype: the interpreter rounds exactly where the GPU does.
    PRECISION is the input_precision of dots whose operands are fp32.
    """
    dot = TRITON_DTYPES[cls]
    return dict(DOT=tl.float32 if interpreting() else dot, ROUND=dot,
                PRECISION=FP32_PRECISION if cls == "fp32" else "tf32")


@triton.jit
def as_operand(x, DOT: tl.constexpr, ROUND: tl.constexpr):
    """x as a tl.dot operand: rounded to ROUND, held as DOT (see operand_meta)."""
    return x.to(ROUND).to(DOT)
