"""Roofline of every GPU-benchmarked case on an H100 and an H200: what the next device run should show.

    python tools/gpu_roofline.py [--out DIR]      (writes DIR/gpu_roofline.{md,json}; default bench/results)

Each case's work is counted from the kernels' code, per score element (one (row, key) pair of one
head, or one (row, column) pair of the MI matrix): tensor-core FLOPs by operand type (16-bit,
one tf32 pass; tf32x3 is three), special-function results (MUFU: ex2, lg2, rcp; tl.exp and tl.log
are one each, an fp32 division one rcp plus ~5 FMA-pipe ops), other fp32 instructions (about:
each add, multiply, select, compare and conversion one), and HBM bytes (inputs, outputs and
statistics once; the tiles re-read across programs stay in L2). The time floor is the largest of
the four ceilings (they run on different pipes, so at best they overlap):

    t = max(flops_16 / P_16 + flops_tf32 / P_tf32 + flops_fp32 / P_fp32, bytes / BW, mufu / R_mufu, alu / R_alu)

Each case stands beside the anchor the issue compares it with (SDPA flash fwd+bwd at the same
(B, heads, L, d) for the relation loss, the three cuBLAS GEMMs S = a b^T, G b, G^T a for MI,
dense F.linear fwd+bwd for the routed op, the peers' KD step for pykd's, the four cuBLAS GEMMs of
the materialised logits and their gradients for the vocabulary KD loss), counted the same way,
and the old measured figure where one exists (bench/results/gpu_check_h100*.json, which predate
the kernel changes listed in OLD_FIGURES_PREDATE). The prediction of a measurement is

    predicted = max(host overhead, floor / attainment)

with the attainments and host overheads of ASSUMPTIONS (the old H100 run's smallest cases give
the host cost of one fwd+bwd call; the attainments are stated guesses that the next run tests).
tools/gpu_check.py imports TIMING_CASES and predicted_ms() for its plan and its time budget.
"""
import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


@dataclass(frozen=True)
class Gpu:
    """Dense peak rates (no sparsity) of one GPU, per second."""

    name: str
    flops_16: float      # bf16/fp16 tensor cores, fp32 accumulation
    flops_tf32: float    # one tf32 pass
    flops_fp32: float    # fp32 FMA pipe (no tensor cores), FLOPs
    hbm: float           # bytes
    mufu: float          # special-function results: 16 / clock / SM
    alu: float           # fp32 instructions: 128 / clock / SM


# H100 SXM: 132 SMs at 1.98 GHz (66.9 TFLOP/s fp32 = 132 x 128 x 2 x 1.98e9); the H200 is the same
# chip with HBM3e.
H100 = Gpu("H100 SXM", flops_16=989e12, flops_tf32=495e12, flops_fp32=67e12, hbm=3.35e12,
           mufu=132 * 16 * 1.98e9, alu=132 * 128 * 1.98e9)
H200 = replace(H100, name="H200 SXM", hbm=4.8e12)
GPUS = (H100, H200)


@dataclass
class Work:
    flops_16: float = 0.0
    flops_tf32: float = 0.0   # tf32 passes (tf32x3 counts three)
    flops_fp32: float = 0.0
    bytes: float = 0.0
    mufu: float = 0.0
    alu: float = 0.0

    def __add__(self, other: "Work") -> "Work":
        return Work(**{k: getattr(self, k) + getattr(other, k) for k in asdict(self)})

    def scaled(self, factor: float) -> "Work":
        return Work(**{k: v * factor for k, v in asdict(self).items()})


def ceilings(work: Work, gpu: Gpu) -> dict:
    """Seconds each pipe needs for `work` on `gpu`."""
    return {"tensor": work.flops_16 / gpu.flops_16 + work.flops_tf32 / gpu.flops_tf32
            + work.flops_fp32 / gpu.flops_fp32,
            "hbm": work.bytes / gpu.hbm, "mufu": work.mufu / gpu.mufu, "alu": work.alu / gpu.alu}


def floor_seconds(work: Work, gpu: Gpu) -> tuple[float, str]:
    """(the roofline time, the ceiling that binds)."""
    times = ceilings(work, gpu)
    bound = max(times, key=times.get)
    return times[bound], bound


BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def _dot_flops(flops: float, dtype: str, computed_operand: bool = False) -> Work:
    """A dot's FLOPs on the tensor cores: 16-bit operands at the 16-bit rate; fp32 ones (and
    fp32 operands a kernel computes, such as the score gradient G) as tf32 passes, three for
    fp32 inputs (tf32x3), one otherwise (kernels/configs.py)."""
    if dtype == "fp32":
        return Work(flops_tf32=3 * flops)
    if computed_operand:
        return Work(flops_tf32=flops)
    return Work(flops_16=flops)


# ---- attention-relation loss: kernels/attention_relation.py ----
# Per score element and kernel: MUFU results (tl.exp) and other fp32 instructions, read off the
# kernels (scale, mask selects, running max, shifts, exp argument, sums; G and its tf32 rounding).
RELATION_MUFU = {"kl": (2, 2, 2), "ce": (2, 2, 2), "mse_prob": (4, 2, 2), "mse_logit": (0, 0, 0)}
RELATION_ALU = {"kl": (20, 13, 13), "ce": (19, 13, 13), "mse_prob": (33, 18, 18), "mse_logit": (6, 6, 6)}
TF32X3_SPLIT_ALU = 4  # splitting a computed fp32 operand into tf32 hi + lo, per element


def relation_work(batch, heads, head_dim, length, dtype, loss="kl") -> Work:
    """Forward (2 score dots; mse_prob 4), dX and dY (2 score dots and one with G each)."""
    elements = batch * heads * length * length
    per_dot = 2.0 * head_dim * elements
    score_dots = {"mse_prob": 4}.get(loss, 2) + 2 + 2
    work = _dot_flops(score_dots * per_dot, dtype) + _dot_flops(2 * per_dot, dtype, computed_operand=True)
    work.mufu = sum(RELATION_MUFU[loss]) * elements
    work.alu = (sum(RELATION_ALU[loss]) + (2 * TF32X3_SPLIT_ALU if dtype == "fp32" else 0)) * elements
    tensor_bytes = batch * length * heads * head_dim * BYTES[dtype]
    # Four inputs read by each of the three kernels, two gradients written, four fp32 row statistics.
    work.bytes = 3 * 4 * tensor_bytes + 2 * tensor_bytes + 4 * 4 * batch * heads * length
    return work


def sdpa_work(batch, heads, head_dim, length, dtype) -> Work:
    """FlashAttention fwd + bwd: QK^T and PV forward, the backward's five (S again, dV, dP, dQ, dK);
    one exp per element each way; Q, K, V, O, dO read, dQ, dK, dV written."""
    elements = batch * heads * length * length
    flops = 14.0 * head_dim * elements
    # fp32 SDPA has no flash kernel: the memory-efficient one runs on the FMA pipe.
    work = Work(flops_fp32=flops) if dtype == "fp32" else Work(flops_16=flops)
    work.mufu = 2 * elements
    work.alu = 12 * elements
    work.bytes = 8 * batch * length * heads * head_dim * BYTES[dtype] + 2 * 4 * batch * heads * length
    return work


# ---- MI bounds: kernels/mi_bound.py ----
# Per matrix element, (forward, dA, dB): alpha strictly inside (0, 1): pass 1's exp; pass 2's
# leave-one-out sum (exp + log), two log-add-exp shares (exp, log, rcp each), V's exp; each
# backward recomputes all of that for G and adds four exps and a division.
MI_MUFU = {"alpha": (1 + 9, 13, 13), "infonce": (1, 2, 2), "nwj": (1, 2, 2), "tuba": (1, 2, 2), "js": (1, 2, 2)}
MI_ALU = {"alpha": (14 + 56, 62, 62), "infonce": (14, 13, 13), "nwj": (14, 13, 13), "tuba": (14, 13, 13),
          "js": (14, 14, 14)}


def mi_work(n, embed, dtype, bound="alpha") -> Work:
    """Forward (one score pass; alpha two), dA and dB (a score pass and a dot with G each)."""
    elements = float(n) * n
    per_dot = 2.0 * embed * elements
    score_dots = (2 if bound == "alpha" else 1) + 2
    work = _dot_flops(score_dots * per_dot, dtype) + _dot_flops(2 * per_dot, dtype, computed_operand=True)
    work.mufu = sum(MI_MUFU[bound]) * elements
    work.alu = (sum(MI_ALU[bound]) + (2 * TF32X3_SPLIT_ALU if dtype == "fp32" else 0)) * elements
    # a, b read by each kernel, their gradients written, 13 fp32 statistics per row.
    work.bytes = 3 * 2 * n * embed * BYTES[dtype] + 2 * n * embed * BYTES[dtype] + 2 * 13 * 4 * n
    return work


def gemm3_work(n, embed, dtype) -> Work:
    """The three cuBLAS GEMMs every MI path needs: S = a b^T (written), G b and G^T a (G read twice)."""
    flops = 3 * 2.0 * n * n * embed
    work = Work(flops_fp32=flops) if dtype == "fp32" else Work(flops_16=flops)
    work.bytes = 3.0 * n * n * BYTES[dtype] + 6 * n * embed * BYTES[dtype]
    return work


# ---- routed linear: kernels/routed_linear.py ----

def routed_work(tokens, d, f, experts, dtype, neuron_wise=True, block_m=128) -> Work:
    """Three GEMMs (y = x W^T, dx = dy W, dW = dy^T x) with the experts mixed in the K-loops of the
    first two (E FMAs per weight element per row block), dW scattered to every expert."""
    flops = 3 * 2.0 * tokens * d * f
    work = _dot_flops(flops, dtype)
    row_blocks = math.ceil(tokens / block_m)
    work.alu = 2 * row_blocks * f * d * 2 * experts + f * d * experts * 4
    b = BYTES[dtype]
    activations = tokens * (2 * d + 2 * f) * b  # x, y, dy, dx
    # Experts read by the forward, dx and the d-alpha dots; fp32 grad_w zeroed, written, then cast.
    weights = 3 * experts * f * d * b + experts * f * d * (4 + 4 + 4 + b)
    work.bytes = activations + weights + tokens * f * b  # dy read twice (dx and dW)
    return work


def dense_work(tokens, d, f, dtype) -> Work:
    """nn.functional.linear fwd + bwd of the same active shape: three GEMMs, one W and one dW."""
    flops = 3 * 2.0 * tokens * d * f
    work = Work(flops_fp32=flops) if dtype == "fp32" else Work(flops_16=flops)
    b = BYTES[dtype]
    work.bytes = tokens * (2 * d + 3 * f) * b + 3 * f * d * b
    return work


# ---- vocabulary KD loss: kernels/vocab_kd.py ----
# Per logit element (row, word), (forward, dh, dW), kl with a projected teacher: the forward's two
# top-split steps (one exp each; the per-row rescales are per row, not per element), the backward's
# q and p; other fp32 instructions read off the kernels (masks, running maxima, shifts, the cross
# sum; G, its row sums, the top word's select).
VOCAB_MUFU = (2, 2, 2)
VOCAB_ALU = (30, 16, 16)


def vocab_work(n, vocab, d_s, d_t, dtype) -> Work:
    """Forward (the student's and the projected teacher's logit dots), dh and dW (each recomputes
    both and adds its dot with G, which is rounded to the 16-bit dtype for 16-bit inputs)."""
    elements = float(n) * vocab
    logit_dots = 3 * 2.0 * (d_s + d_t) * elements
    grad_dots = 2 * 2.0 * d_s * elements
    work = _dot_flops(logit_dots + grad_dots, dtype)
    work.mufu = sum(VOCAB_MUFU) * elements
    work.alu = (sum(VOCAB_ALU) + (2 * TF32X3_SPLIT_ALU if dtype == "fp32" else 0)) * elements
    b = BYTES[dtype]
    inputs = (n * (d_s + d_t) + vocab * (d_s + d_t)) * b
    # Inputs read by each of the three kernels; dh and dW accumulated in fp32 (zeroed, written, cast).
    work.bytes = 3 * inputs + (n + vocab) * d_s * (4 + 4 + 4 + b) + 8 * 4 * n
    return work


def gemm4_work(n, vocab, d_s, d_t, dtype) -> Work:
    """The four cuBLAS GEMMs of the floor: z_s = h_s W_s^T and z_t = h_t W_t^T (N x V, written),
    dh = G W_s and dW = G^T h_s (G read twice)."""
    flops = 2.0 * n * vocab * (d_s + d_t) + 2 * 2.0 * n * vocab * d_s
    work = Work(flops_fp32=flops) if dtype == "fp32" else Work(flops_16=flops)
    work.bytes = 4.0 * n * vocab * BYTES[dtype] + 3 * (n + vocab) * (d_s + d_t) * BYTES[dtype]
    return work


# ---- KD step (bench/kd_step.py): MiniLM-L6 teacher fwd, 3-layer student fwd + bwd, fp32 ----
KD_HIDDEN, KD_FFN, KD_HEADS, KD_TEACHER_LAYERS, KD_STUDENT_LAYERS = 384, 1536, 12, 6, 3


def _encoder_layer_fwd(batch, length) -> Work:
    tokens = batch * length
    gemm = 2.0 * tokens * (4 * KD_HIDDEN * KD_HIDDEN + 2 * KD_HIDDEN * KD_FFN)
    attention = 4.0 * batch * length * length * KD_HIDDEN
    # fp32 eager: cuBLAS fp32 GEMMs (tf32 is off by default) and fp32 attention on the FMA pipe.
    return Work(flops_fp32=gemm + attention, bytes=tokens * KD_HIDDEN * 4 * 12)


def kd_work(batch, length, way: str) -> Work:
    """Teacher forward (6 layers) + student forward and backward (3 layers, backward = 2 forwards),
    and the relation losses: pykd's two fused ones (QK, VV; 12 heads of 32), the peers' KL of
    materialised maps (every layer returns its (B, H, L, L) fp32 map: written, read by softmax,
    kept) and a materialised VV relation."""
    layer = _encoder_layer_fwd(batch, length)
    work = layer.scaled(KD_TEACHER_LAYERS + 3 * KD_STUDENT_LAYERS)
    head_dim = KD_HIDDEN // KD_HEADS
    if way == "pykd":
        return work + relation_work(batch, KD_HEADS, head_dim, length, "fp32").scaled(2)
    map_bytes = 4.0 * batch * KD_HEADS * length * length
    # Each layer's map: scores written, softmax read + written, the student's kept for backward and
    # read back; the KL and the VV relation materialise about six more maps each way.
    maps = map_bytes * (3 * KD_TEACHER_LAYERS + 5 * KD_STUDENT_LAYERS + 12)
    return work + Work(bytes=maps)


# ---- the cases, their anchors and the old figures ----

@dataclass(frozen=True)
class Case:
    """One timed case of tools/gpu_check.py: the op, its sizes and dtype, and its anchor."""

    op: str            # "relation", "mi", "routed", "kd", "vocab"
    params: tuple      # relation (B, heads, d, L); mi (n, e); routed (tokens, d, f, E, neuron_wise); kd (B, L);
    #                    vocab (N, V, d_s, d_t)
    dtype: str
    anchor: str
    priority: int      # order in gpu_check's timing phase (most informative first)
    target: float | None = None  # issue 18's ratio target against the anchor
    extra: tuple = field(default_factory=tuple)

    @property
    def label(self) -> str:
        names = {"relation": ("B", "A", "d", "L"), "mi": ("n", "e"), "routed": ("tokens", "d", "f", "E", "neuron"),
                 "kd": ("B", "L"), "vocab": ("N", "V", "d_s", "d_t")}[self.op]
        return f"{self.op} " + " ".join(f"{k}={v}" for k, v in zip(names, self.params)) + f" {self.dtype}"


def case_work(case: Case) -> tuple[Work, Work]:
    """(the case's work, its anchor's)."""
    if case.op == "relation":
        batch, heads, head_dim, length = case.params
        return (relation_work(batch, heads, head_dim, length, case.dtype),
                sdpa_work(batch, heads, head_dim, length, case.dtype))
    if case.op == "mi":
        n, embed = case.params
        return mi_work(n, embed, case.dtype), gemm3_work(n, embed, case.dtype)
    if case.op == "routed":
        tokens, d, f, experts, neuron_wise = case.params
        return routed_work(tokens, d, f, experts, case.dtype, bool(neuron_wise)), dense_work(tokens, d, f, case.dtype)
    if case.op == "vocab":
        return vocab_work(*case.params, case.dtype), gemm4_work(*case.params, case.dtype)
    batch, length = case.params
    return kd_work(batch, length, "pykd"), kd_work(batch, length, "peers")


def _cases(op, anchor, sizes_by_dtype, base, target_dtypes, target):
    return [Case(op, size, dtype, anchor, priority=base[dtype] + k, target=target if dtype in target_dtypes else None)
            for dtype, sizes in sizes_by_dtype.items() for k, size in enumerate(sizes)]


# Every timed case, most informative first (bf16 at the sizes the issues' targets name, then the
# other dtypes and sizes); tools/gpu_check.py times them in this order.
TIMING_CASES = tuple(sorted(
    _cases("relation", "sdpa", {"bf16": ((8, 12, 64, 512), (8, 12, 64, 1024), (8, 12, 64, 2048), (2, 12, 64, 4096),
                                         (8, 12, 64, 128)),
                                "fp16": ((8, 12, 64, 512), (8, 12, 64, 2048)),
                                "fp32": ((8, 12, 64, 512), (8, 12, 64, 2048))},
           {"bf16": 0, "fp16": 4, "fp32": 4}, ("bf16", "fp16"), 1.5)
    + _cases("mi", "gemm3", {"bf16": ((4096, 128), (16384, 128), (65536, 128), (1024, 128)),
                             "fp32": ((4096, 128), (16384, 128))},
             {"bf16": 1, "fp32": 5}, ("bf16",), 3.0)
    + _cases("routed", "dense", {"bf16": ((4096, 768, 3072, 2, 1), (4096, 768, 3072, 2, 0), (128, 768, 3072, 2, 1),
                                          (4096, 768, 3072, 4, 1)),
                                 "fp32": ((4096, 768, 3072, 2, 1), (128, 768, 3072, 2, 1))},
             {"bf16": 2, "fp32": 6}, ("bf16",), 1.3)
    + _cases("kd", "peers", {"fp32": ((16, 512), (16, 2048))}, {"fp32": 3}, (), None)
    # BERT's vocabulary, 4096 positions, a 384-wide student against a 768-wide projected teacher.
    + _cases("vocab", "gemm4", {"bf16": ((4096, 30522, 384, 768),)}, {"bf16": 3}, (), None),
    key=lambda c: (c.priority, c.op, c.dtype)))

# Stated assumptions of the predictions (the next device run measures them).
ASSUMPTIONS = {
    # Fraction of the roofline floor reached: Triton kernels without warp specialisation, first
    # tuning; cuBLAS GEMMs and FlashAttention-2 on an H100 reach about half of theirs at these sizes.
    "attainment": {"relation": 0.3, "mi": 0.3, "routed": 0.5, "kd": 0.5, "vocab": 0.3, "sdpa": 0.4, "gemm3": 0.6,
                   "dense": 0.6, "peers": 0.5, "gemm4": 0.6},
    # Host time of one fwd + bwd call (ms): the old H100 run's smallest cases, whose floors are a few
    # microseconds (relation L=128: 0.72 ms; MI n=1024: 1.18 ms; routed 128 tokens: 0.64-0.78 ms,
    # dense F.linear 0.22-0.28 ms); SDPA and the bare GEMMs are a few launches.
    # vocab: the value checks read the labels back (one sync) before its three launches.
    "host_ms": {"relation": 0.7, "mi": 1.0, "routed": 0.7, "kd": 20.0, "vocab": 1.0, "sdpa": 0.25, "gemm3": 0.05,
                "dense": 0.25, "peers": 25.0, "gemm4": 0.05},
}

OLD_FIGURES = {"relation": "bench/results/gpu_check_h100.json", "mi": "bench/results/gpu_check_h100.json",
               "routed": "bench/results/gpu_check_h100_routed.json"}
# What changed in each kernel family after its old H100 figures (commit b50f2c8) was measured.
OLD_FIGURES_PREDATE = {
    "relation": "masked padding loads (0b425cc), custom ops (0b425cc), launch table with 16-bit operands "
                "straight into tl.dot, per-kernel tiles/warps/stages, no spills (issue 17)",
    "mi": "exact leave-one-out forms (23aafbd), one-exp shares (17806c3), custom ops (0b425cc), launch table "
          "with 16-bit operands, per-kernel tiles, no spills (issue 17)",
    "routed": "custom ops (0b425cc), launch table with 16-bit operands (the mixed W rounded to bf16), larger "
              "tiles, no spills (issue 17); the figures are after the dW split",
}


def old_measurement(case: Case, root: Path = ROOT) -> float | None:
    """The old H100 figure (ms) of the case, if that run had it."""
    path = root / OLD_FIGURES.get(case.op, "")
    if case.op not in OLD_FIGURES or not path.is_file():
        return None
    dtype = {"fp32": "torch.float32", "bf16": "torch.bfloat16", "fp16": "torch.float16"}[case.dtype]
    for row in json.loads(path.read_text()):
        if row.get("dtype") != dtype or "triton_ms" not in row:
            continue
        if case.op == "relation" and row["op"] == "attention_relation_timing" and case.params[:3] == (8, 12, 64) \
                and row["L"] == case.params[3]:
            return row["triton_ms"]
        if case.op == "mi" and row["op"] == "mi_bound_timing" and (row["n"], row["e"]) == case.params:
            return row["triton_ms"]
        if case.op == "routed" and row["op"] == "routed_linear_timing" and case.params[1:4] == (768, 3072, 2) \
                and (row["tokens"], int(row["neuron_wise"])) == (case.params[0], case.params[4]):
            return row["triton_ms"]
    return None


SMS = 132  # H100 and H200 SXM


def grid_fill(case: Case) -> float:
    """The share of the SMs the case's forward grid occupies under the sm_90 launch table (1 when
    there is at least a program per SM): the MI kernels parallelise over row blocks only."""
    if case.op == "kd":
        return 1.0
    sys.path.insert(0, str(ROOT))
    from kernels import attention_relation, mi_bound, routed_linear, vocab_kd
    from kernels.configs import DTYPE_CLASSES

    cls = case.dtype if case.dtype in DTYPE_CLASSES else "fp32"
    if case.op == "relation":
        batch, heads, head_dim, length = case.params
        chosen = attention_relation.CONFIGS["fwd", cls, "sm_90", attention_relation.head_size_bucket(head_dim)]
        programs = math.ceil(length / chosen.block("BLOCK_M")) * batch * heads
    elif case.op == "mi":
        n, embed = case.params
        chosen = mi_bound.CONFIGS["fwd", cls, "sm_90", mi_bound.width_bucket(embed)]
        programs = math.ceil(n / chosen.block("BLOCK_M"))
    elif case.op == "vocab":  # the forward and dh grids run over row blocks only
        chosen = vocab_kd.CONFIGS["fwd", cls, "sm_90", None]
        programs = math.ceil(case.params[0] / chosen.block("BLOCK_M"))
    else:
        tokens, _, f, experts, _ = case.params
        chosen = routed_linear.CONFIGS["fwd", cls, "sm_90", routed_linear.expert_bucket(experts)]
        programs = math.ceil(tokens / chosen.block("BLOCK_M")) * math.ceil(f / chosen.block("BLOCK_N"))
    return min(1.0, programs / SMS)


def predicted_kernel_ms(work: Work, kind: str, fill: float = 1.0, gpu: Gpu = H100) -> float:
    """GPU time of one fwd+bwd: floor / (attainment x grid fill)."""
    floor, _ = floor_seconds(work, gpu)
    return 1e3 * floor / (ASSUMPTIONS["attainment"][kind] * fill)


def predicted_ms(work: Work, kind: str, fill: float = 1.0, gpu: Gpu = H100) -> float:
    """One measured fwd+bwd call, host included: max(host overhead, GPU time)."""
    return max(ASSUMPTIONS["host_ms"][kind], predicted_kernel_ms(work, kind, fill, gpu))


def case_row(case: Case) -> dict:
    work, anchor = case_work(case)
    row = {"case": case.label, "op": case.op, "params": list(case.params), "dtype": case.dtype, "anchor": case.anchor,
           "target": case.target, "work": asdict(work), "anchor_work": asdict(anchor), "grid_fill": grid_fill(case)}
    for gpu in GPUS:
        key = gpu.name.split()[0]
        floor, bound = floor_seconds(work, gpu)
        anchor_floor, anchor_bound = floor_seconds(anchor, gpu)
        row[f"{key}_floor_us"], row[f"{key}_bound"] = 1e6 * floor, bound
        row[f"{key}_anchor_floor_us"], row[f"{key}_anchor_bound"] = 1e6 * anchor_floor, anchor_bound
    row["floor_ratio"] = row["H100_floor_us"] / row["H100_anchor_floor_us"]
    row["predicted_kernel_ms"] = predicted_kernel_ms(work, case.op, row["grid_fill"])
    row["predicted_anchor_kernel_ms"] = predicted_kernel_ms(anchor, case.anchor)
    row["predicted_kernel_ratio"] = row["predicted_kernel_ms"] / row["predicted_anchor_kernel_ms"]
    row["predicted_ms"] = predicted_ms(work, case.op, row["grid_fill"])
    row["predicted_anchor_ms"] = predicted_ms(anchor, case.anchor)
    row["predicted_ratio"] = row["predicted_ms"] / row["predicted_anchor_ms"]
    row["old_ms"] = old_measurement(case)
    return row


def markdown(rows: list[dict]) -> str:
    lines = [
        "# GPU roofline of the benchmarked cases (tools/gpu_roofline.py)", "",
        f"Peaks: {H100.name} bf16 {H100.flops_16 / 1e12:.0f}, tf32 {H100.flops_tf32 / 1e12:.0f}, fp32 "
        f"{H100.flops_fp32 / 1e12:.0f} TFLOP/s; MUFU {H100.mufu / 1e12:.2f} T results/s; fp32 instructions "
        f"{H100.alu / 1e12:.1f} T/s; HBM {H100.hbm / 1e12:.2f} TB/s ({H200.name}: {H200.hbm / 1e12:.1f} TB/s, same "
        "compute). Floor: the largest ceiling, kernel time only (the one that binds in brackets: tensor, hbm, "
        "mufu, alu). Predicted kernel: floor / (attainment x grid fill), to compare with gpu_check's CUDA-graph "
        "time; predicted call: max(host overhead, kernel), to compare with its do_bench time. Ratios: case / "
        "anchor (the issue's target in brackets). Old: the H100 call time of bench/results/gpu_check_h100*.json, "
        "before the kernel changes listed under the table.", "",
        "| case | anchor | H100 floor us | H200 floor us | anchor H100 floor us | floor ratio | grid fill | "
        "predicted kernel ms (ratio) | predicted call ms (ratio, target) | old H100 call ms |", "|" + "---|" * 10]
    for r in rows:
        target = f", {r['target']:g}x" if r["target"] else ""
        old = f"{r['old_ms']:.2f}" if r["old_ms"] is not None else "-"
        lines.append(f"| {r['case']} | {r['anchor']} | {r['H100_floor_us']:.1f} [{r['H100_bound']}] | "
                     f"{r['H200_floor_us']:.1f} [{r['H200_bound']}] | {r['H100_anchor_floor_us']:.1f} "
                     f"[{r['H100_anchor_bound']}] | {r['floor_ratio']:.2f} | {r['grid_fill']:.2f} | "
                     f"{r['predicted_kernel_ms']:.3f} ({r['predicted_kernel_ratio']:.2f}x) | "
                     f"{r['predicted_ms']:.3f} ({r['predicted_ratio']:.2f}x{target}) | {old} |")
    lines += ["", "Assumptions: attainment (fraction of the floor) "
              + ", ".join(f"{k} {v:g}" for k, v in ASSUMPTIONS["attainment"].items())
              + "; host ms per call " + ", ".join(f"{k} {v:g}" for k, v in ASSUMPTIONS["host_ms"].items()) + ".", "",
              "Old figures predate:"]
    lines += [f"- {op}: {what}" for op, what in OLD_FIGURES_PREDATE.items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    rows = [case_row(case) for case in TIMING_CASES]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_roofline.json").write_text(json.dumps(rows, indent=1))
    (args.out / "gpu_roofline.md").write_text(markdown(rows))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
