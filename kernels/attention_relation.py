r"""Triton kernels of the attention-relation loss (math: pykd/ops/attention_relation.py).

Forward, one program per (row block, example x head), streaming over key tiles:
teacher and student rows keep running maxima m, sums Z = sum_j e^{x_j - m} and a cross term
C, rescaled whenever a maximum grows (FlashAttention's online softmax, run for two maps):

    KL: C = sum_j e^{t_j - m_t} ((t_j - m_t) - (s_j - m_s)),  row = C/Z_t - log Z_t + log Z_s
    CE: C = sum_j e^{t_j - m_t} (s_j - m_s),                  row = -C/Z_t + log Z_s

Keeping C in max-shifted form avoids the cancellation of large scores. When the maxima move
by (dm_t, dm_s), every shifted difference moves by a constant, so C <- e^{-dm_t}(C - shift Z_t).
mse_prob needs the finished log-sum-exps, so it takes a second sweep over the keys; mse_logit
needs no softmax. The per-row log-sum-exps are saved, and for mse_prob the statistics of its
stable gradient (Delta = q_m d_m + R, D_m and the student's peak m) in the three planes of DELTA.

Backward recomputes each score tile from the saved statistics and forms G = dL/ds.
dX_S is row-parallel (a program owns rows, loops over keys) and dY_S column-parallel (a program
owns keys, loops over rows), so no two programs write the same output and no atomics are needed.
Every load is upcast to fp32 and statistics are fp32 whatever the input dtype. The score dots take
their operands in the dtype class's dtype (kernels/configs.py): 16-bit inputs go to the tensor
cores as they are (exact products, fp32 accumulation), fp32 ones run tf32x3. The dots with the
score gradient G keep G in fp32 (tf32 for 16-bit inputs, tf32x3 for fp32): G = w (q - p) carries the
row weight w = 1/(B A n_b), which underflows fp16 (for B=8, A=12, n_b=512, w ~ 2e-5 and G ~ 1e-8),
and these kernels are bound by their exponentials, not their dots (bench/results/gpu_roofline.md).
Launch configurations: CONFIGS below, one entry per kernel, dtype class, architecture and
head-size bucket.
"""
import torch
import triton
import triton.language as tl

from .configs import AotKernel, as_operand, dtype_class, lookup, operand_meta, table
from .ids import RELATION_LOSS_IDS

KL, CE, MSE_PROB, MSE_LOGIT = (RELATION_LOSS_IDS[name] for name in ("kl", "ce", "mse_prob", "mse_logit"))
MAX_HEAD_DIM = 256
# The same ids as seen inside kernels, where only constexpr globals may be read.
_KL = tl.constexpr(KL)
_MSE_PROB = tl.constexpr(MSE_PROB)
_MSE_LOGIT = tl.constexpr(MSE_LOGIT)
_NEG_BIG = tl.constexpr(-1.0e30)  # finite start for running maxima: e^{m_old - m_new} stays defined


RELATION_KERNELS = ("fwd", "bwd_dx", "bwd_dy")
WIDTH_BUCKETS = (64, 128, 256)  # the larger padded head size of teacher and student, at least 64
# fp32 inputs run tf32x3: each row tile stays in every warp's registers as hi and lo parts, for both
# maps (16 rows x d x 2 parts x 2 maps / 32 lanes = 256 registers at d = 128), more than a thread
# has: at head sizes 128 and 256 some kernels have no spill-free tile. Those entries keep the
# least-spilling one; 16-bit inputs are spill-free at every width (bench/NOTES.md, issue 17).
_FP32_WIDE = "fp32 (tf32x3) at head size >= 128: the row tiles' hi/lo parts exceed the register file"
# Chosen by the AOT search (bench/NOTES.md): spill-free; on sm_90, 16-bit dots as warp-group MMA
# (64-row tiles per warp group) where one fits; then the largest tile (fewer passes over the keys).
CONFIGS = table(("BLOCK_M", "BLOCK_N"), [
    *[(kernel, "any", "interpreter", None, 16, 16, 4, 1) for kernel in RELATION_KERNELS],
    # kernel   class  arch     width  BLOCK_M BLOCK_N warps stages
    *[row for cls in ("bf16", "fp16") for row in (
        ("fwd", cls, "sm_90", 64, 128, 64, 8, 2),
        ("fwd", cls, "sm_90", 128, 128, 64, 8, 2),
        ("fwd", cls, "sm_90", 256, 128, 32, 8, 2),
        ("fwd", cls, "sm_80", 64, 128, 64, 8, 2),
        ("fwd", cls, "sm_80", 128, 128, 32, 8, 2),
        ("fwd", cls, "sm_80", 256, 16, 64, 4, 2),
        ("bwd_dx", cls, "sm_90", 64, 128, 64, 8, 2),
        ("bwd_dx", cls, "sm_90", 128, 64, 64, 4, 2),
        ("bwd_dx", cls, "sm_90", 256, 16, 32, 4, 1),
        ("bwd_dx", cls, "sm_80", 64, 128, 32, 8, 2),
        ("bwd_dx", cls, "sm_80", 128, 32, 32, 4, 2),
        ("bwd_dx", cls, "sm_80", 256, 16, 32, 4, 1),
        ("bwd_dy", cls, "sm_90", 64, 128, 64, 8, 2),
        ("bwd_dy", cls, "sm_90", 128, 32, 32, 4, 2),
        ("bwd_dy", cls, "sm_90", 256, 128, 32, 8, 2),
        ("bwd_dy", cls, "sm_80", 64, 128, 32, 8, 2),
        ("bwd_dy", cls, "sm_80", 128, 32, 64, 4, 2),
        ("bwd_dy", cls, "sm_80", 256, 32, 32, 4, 2),
    )],
    ("fwd", "fp32", "sm_90", 64, 128, 64, 8, 1),
    ("fwd", "fp32", "sm_90", 128, 16, 16, 4, 1, _FP32_WIDE),
    ("fwd", "fp32", "sm_90", 256, 16, 32, 4, 1, _FP32_WIDE),
    ("fwd", "fp32", "sm_80", 64, 16, 32, 4, 1),
    ("fwd", "fp32", "sm_80", 128, 16, 16, 4, 1, _FP32_WIDE),
    ("fwd", "fp32", "sm_80", 256, 16, 16, 8, 1, _FP32_WIDE),
    ("bwd_dx", "fp32", "sm_90", 64, 16, 32, 4, 1),
    ("bwd_dx", "fp32", "sm_90", 128, 16, 32, 4, 1, _FP32_WIDE),
    ("bwd_dx", "fp32", "sm_90", 256, 16, 16, 8, 1, _FP32_WIDE),
    ("bwd_dx", "fp32", "sm_80", 64, 16, 32, 4, 1),
    ("bwd_dx", "fp32", "sm_80", 128, 16, 16, 4, 1),
    ("bwd_dx", "fp32", "sm_80", 256, 16, 16, 8, 1, _FP32_WIDE),
    ("bwd_dy", "fp32", "sm_90", 64, 32, 32, 4, 1),
    ("bwd_dy", "fp32", "sm_90", 128, 16, 32, 4, 1),
    ("bwd_dy", "fp32", "sm_90", 256, 16, 16, 8, 1, _FP32_WIDE),
    ("bwd_dy", "fp32", "sm_80", 64, 16, 32, 4, 1),
    ("bwd_dy", "fp32", "sm_80", 128, 16, 32, 4, 1),
    ("bwd_dy", "fp32", "sm_80", 256, 16, 16, 8, 1, _FP32_WIDE),
])


@triton.jit
def _tokens_valid(KEY_VALID, batch, tokens, length):
    """True for the mask's real tokens, False for padding and past the end."""
    return tl.load(KEY_VALID + batch * length + tokens, mask=tokens < length, other=0) != 0


@triton.jit
def _load_head_rows(ptr, batch, rows, rows_valid, head, stride_b, stride_l, head_dim, BLOCK_D: tl.constexpr):
    """One head's slice of the rows, fp32; padded tokens load as zeros, so whatever they hold (NaN
    included) never reaches a score or a gradient."""
    cols = tl.arange(0, BLOCK_D)
    offsets = batch * stride_b + rows[:, None] * stride_l + head * head_dim + cols[None, :]
    inside = rows_valid[:, None] & (cols[None, :] < head_dim)
    return tl.load(ptr + offsets, mask=inside, other=0.0).to(tl.float32)


@triton.jit
def _scores(x, y, scale, DOT: tl.constexpr, ROUND: tl.constexpr, PRECISION: tl.constexpr):
    """scale x y^T for fp32 tiles x (rows, d) and y (keys, d), as tensor-core operands of the class dtype."""
    return tl.dot(as_operand(x, DOT, ROUND), tl.trans(as_operand(y, DOT, ROUND)), input_precision=PRECISION) * scale


@triton.jit
def _score_grad(t, s, keys, valid, lse_t, lse_s, delta, peak_d, peak, weight, LOSS: tl.constexpr):
    """G = dL/ds for one tile; zero on padded keys and on rows of weight 0. mse_prob: 2 w q_j D_j with
    D_j = d_j - Delta off the peak and the saved D_m on it (the op's docstring)."""
    if LOSS == _MSE_LOGIT:
        return tl.where(valid, 2.0 * weight[:, None] * (s - t), 0.0)
    p = tl.where(valid, tl.exp(t - lse_t[:, None]), 0.0)
    q = tl.where(valid, tl.exp(s - lse_s[:, None]), 0.0)
    if LOSS == _MSE_PROB:
        big_d = tl.where(keys[None, :] == peak[:, None], peak_d[:, None], (q - p) - delta[:, None])
        return 2.0 * weight[:, None] * q * big_d
    return weight[:, None] * (q - p)


@triton.jit
def _relation_fwd_kernel(
    XT, YT, XS, YS, KEY_VALID, ROW_WEIGHT, ROW_LOSS, LSE_T, LSE_S, DELTA,
    stride_tb, stride_tl, stride_sb, stride_sl,
    length, heads, dt, ds, scale_t, scale_s,
    LOSS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DT: tl.constexpr, BLOCK_DS: tl.constexpr, DOT: tl.constexpr, ROUND: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // heads
    head = pid_bh % heads
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_valid = _tokens_valid(KEY_VALID, batch, rows, length)
    xt = _load_head_rows(XT, batch, rows, rows_valid, head, stride_tb, stride_tl, dt, BLOCK_DT)
    xs = _load_head_rows(XS, batch, rows, rows_valid, head, stride_sb, stride_sl, ds, BLOCK_DS)
    weight = tl.load(ROW_WEIGHT + batch * length + rows, mask=rows < length, other=0.0)

    m_t = tl.full([BLOCK_M], _NEG_BIG, tl.float32)
    m_s = tl.full([BLOCK_M], _NEG_BIG, tl.float32)
    z_t = tl.zeros([BLOCK_M], tl.float32)
    z_s = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M], tl.float32)  # C for KL/CE, sum of squares for mse_logit
    peak = tl.zeros([BLOCK_M], tl.int32)  # mse_prob: the first key holding the student's row maximum
    for start in range(0, length, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        keys_valid = _tokens_valid(KEY_VALID, batch, keys, length)
        valid = keys_valid[None, :]
        yt = _load_head_rows(YT, batch, keys, keys_valid, head, stride_tb, stride_tl, dt, BLOCK_DT)
        ys = _load_head_rows(YS, batch, keys, keys_valid, head, stride_sb, stride_sl, ds, BLOCK_DS)
        t = _scores(xt, yt, scale_t, DOT, ROUND, PRECISION)
        s = _scores(xs, ys, scale_s, DOT, ROUND, PRECISION)
        if LOSS == _MSE_LOGIT:
            diff = tl.where(valid, s - t, 0.0)
            acc += tl.sum(diff * diff, axis=1)
        else:
            m_t_new = tl.maximum(m_t, tl.max(tl.where(valid, t, _NEG_BIG), axis=1))
            tile_max_s = tl.max(tl.where(valid, s, _NEG_BIG), axis=1)
            m_s_new = tl.maximum(m_s, tile_max_s)
            if LOSS == _MSE_PROB:  # the tile's first key at its maximum, kept if it beats the earlier tiles'
                first = tl.min(tl.where(valid & (s == tile_max_s[:, None]), keys[None, :], length), axis=1)
                peak = tl.where(tile_max_s > m_s, first, peak)
            shifted_t = t - m_t_new[:, None]
            shifted_s = s - m_s_new[:, None]
            e_t = tl.where(valid, tl.exp(shifted_t), 0.0)
            e_s = tl.where(valid, tl.exp(shifted_s), 0.0)
            if LOSS == _KL:
                shift = (m_t_new - m_t) - (m_s_new - m_s)
                term = shifted_t - shifted_s
            else:
                shift = m_s_new - m_s
                term = shifted_s
            rescale_t = tl.exp(m_t - m_t_new)
            acc = rescale_t * (acc - shift * z_t) + tl.sum(tl.where(valid, e_t * term, 0.0), axis=1)
            z_t = rescale_t * z_t + tl.sum(e_t, axis=1)
            z_s = tl.exp(m_s - m_s_new) * z_s + tl.sum(e_s, axis=1)
            m_t = m_t_new
            m_s = m_s_new

    delta = tl.zeros([BLOCK_M], tl.float32)
    peak_d = tl.zeros([BLOCK_M], tl.float32)
    if LOSS == _MSE_LOGIT:  # no softmax: the statistics are unused
        lse_t = delta
        lse_s = delta
    else:
        lse_t = m_t + tl.log(z_t)
        lse_s = m_s + tl.log(z_s)
    if LOSS == _KL:
        row_loss = acc / z_t - tl.log(z_t) + tl.log(z_s)
    elif LOSS == _MSE_LOGIT:
        row_loss = acc
    elif LOSS != _MSE_PROB:
        row_loss = -acc / z_t + tl.log(z_s)
    else:  # mse_prob: sums over the keys other than the peak, then the peak's d from the complements
        sq = tl.zeros([BLOCK_M], tl.float32)
        rest = tl.zeros([BLOCK_M], tl.float32)
        q_rest = tl.zeros([BLOCK_M], tl.float32)
        p_rest = tl.zeros([BLOCK_M], tl.float32)
        p_peak = tl.zeros([BLOCK_M], tl.float32)
        for start in range(0, length, BLOCK_N):
            keys = start + tl.arange(0, BLOCK_N)
            keys_valid = _tokens_valid(KEY_VALID, batch, keys, length)
            valid = keys_valid[None, :]
            yt = _load_head_rows(YT, batch, keys, keys_valid, head, stride_tb, stride_tl, dt, BLOCK_DT)
            ys = _load_head_rows(YS, batch, keys, keys_valid, head, stride_sb, stride_sl, ds, BLOCK_DS)
            p = tl.where(valid, tl.exp(_scores(xt, yt, scale_t, DOT, ROUND, PRECISION) - lse_t[:, None]), 0.0)
            q = tl.where(valid, tl.exp(_scores(xs, ys, scale_s, DOT, ROUND, PRECISION) - lse_s[:, None]), 0.0)
            is_peak = keys[None, :] == peak[:, None]
            d = tl.where(is_peak, 0.0, q - p)
            sq += tl.sum(d * d, axis=1)
            rest += tl.sum(q * d, axis=1)
            q_rest += tl.sum(tl.where(is_peak, 0.0, q), axis=1)
            p_rest += tl.sum(tl.where(is_peak, 0.0, p), axis=1)
            p_peak += tl.sum(tl.where(is_peak, p, 0.0), axis=1)
        q_peak = tl.exp(m_s - lse_s)  # the peak's score is the row maximum
        d_peak = tl.where(q_peak + p_peak > 1.0, p_rest - q_rest, q_peak - p_peak)
        row_loss = sq + d_peak * d_peak
        delta = q_peak * d_peak + rest
        peak_d = q_rest * d_peak - rest

    out = pid_bh * length + rows
    inside = rows < length
    tl.store(ROW_LOSS + out, weight * row_loss, mask=inside)
    tl.store(LSE_T + out, lse_t, mask=inside)
    tl.store(LSE_S + out, lse_s, mask=inside)
    planes = tl.num_programs(1) * length
    tl.store(DELTA + out, delta, mask=inside)
    tl.store(DELTA + planes + out, peak_d, mask=inside)
    tl.store(DELTA + 2 * planes + out, peak.to(tl.float32), mask=inside)


@triton.jit
def _load_row_stats(ROW_WEIGHT, LSE_T, LSE_S, DELTA, batch, pid_bh, rows, length):
    """A row block's weight and the statistics the forward saved for it (zero past the end)."""
    inside = rows < length
    weight = tl.load(ROW_WEIGHT + batch * length + rows, mask=inside, other=0.0)
    stat = pid_bh * length + rows
    lse_t = tl.load(LSE_T + stat, mask=inside, other=0.0)
    lse_s = tl.load(LSE_S + stat, mask=inside, other=0.0)
    planes = tl.num_programs(1) * length
    delta = tl.load(DELTA + stat, mask=inside, other=0.0)
    peak_d = tl.load(DELTA + planes + stat, mask=inside, other=0.0)
    peak = tl.load(DELTA + 2 * planes + stat, mask=inside, other=0.0).to(tl.int32)
    return weight, lse_t, lse_s, delta, peak_d, peak


@triton.jit
def _relation_bwd_dx_kernel(
    XT, YT, XS, YS, KEY_VALID, ROW_WEIGHT, LSE_T, LSE_S, DELTA, GRAD_OUT, DXS,
    stride_tb, stride_tl, stride_sb, stride_sl,
    length, heads, dt, ds, scale_t, scale_s,
    LOSS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DT: tl.constexpr, BLOCK_DS: tl.constexpr, DOT: tl.constexpr, ROUND: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // heads
    head = pid_bh % heads
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_valid = _tokens_valid(KEY_VALID, batch, rows, length)
    inside = rows < length
    xt = _load_head_rows(XT, batch, rows, rows_valid, head, stride_tb, stride_tl, dt, BLOCK_DT)
    xs = _load_head_rows(XS, batch, rows, rows_valid, head, stride_sb, stride_sl, ds, BLOCK_DS)
    weight, lse_t, lse_s, delta, peak_d, peak = _load_row_stats(ROW_WEIGHT, LSE_T, LSE_S, DELTA, batch, pid_bh,
                                                                rows, length)

    acc = tl.zeros([BLOCK_M, BLOCK_DS], tl.float32)
    for start in range(0, length, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        keys_valid = _tokens_valid(KEY_VALID, batch, keys, length)
        valid = keys_valid[None, :]
        yt = _load_head_rows(YT, batch, keys, keys_valid, head, stride_tb, stride_tl, dt, BLOCK_DT)
        ys = _load_head_rows(YS, batch, keys, keys_valid, head, stride_sb, stride_sl, ds, BLOCK_DS)
        grad = _score_grad(_scores(xt, yt, scale_t, DOT, ROUND, PRECISION),
                           _scores(xs, ys, scale_s, DOT, ROUND, PRECISION),
                           keys, valid, lse_t, lse_s, delta, peak_d, peak, weight, LOSS)
        acc += tl.dot(grad, ys, input_precision=PRECISION)

    acc = acc * (scale_s * tl.load(GRAD_OUT).to(tl.float32))
    cols = tl.arange(0, BLOCK_DS)
    out = DXS + batch * stride_sb + rows[:, None] * stride_sl + head * ds + cols[None, :]
    tl.store(out, acc.to(DXS.dtype.element_ty), mask=inside[:, None] & (cols[None, :] < ds))


@triton.jit
def _relation_bwd_dy_kernel(
    XT, YT, XS, YS, KEY_VALID, ROW_WEIGHT, LSE_T, LSE_S, DELTA, GRAD_OUT, DYS,
    stride_tb, stride_tl, stride_sb, stride_sl,
    length, heads, dt, ds, scale_t, scale_s,
    LOSS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DT: tl.constexpr, BLOCK_DS: tl.constexpr, DOT: tl.constexpr, ROUND: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // heads
    head = pid_bh % heads
    keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    keys_valid = _tokens_valid(KEY_VALID, batch, keys, length)
    valid = keys_valid[None, :]
    yt = _load_head_rows(YT, batch, keys, keys_valid, head, stride_tb, stride_tl, dt, BLOCK_DT)
    ys = _load_head_rows(YS, batch, keys, keys_valid, head, stride_sb, stride_sl, ds, BLOCK_DS)

    acc = tl.zeros([BLOCK_N, BLOCK_DS], tl.float32)
    for start in range(0, length, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        rows_valid = _tokens_valid(KEY_VALID, batch, rows, length)
        xt = _load_head_rows(XT, batch, rows, rows_valid, head, stride_tb, stride_tl, dt, BLOCK_DT)
        xs = _load_head_rows(XS, batch, rows, rows_valid, head, stride_sb, stride_sl, ds, BLOCK_DS)
        weight, lse_t, lse_s, delta, peak_d, peak = _load_row_stats(ROW_WEIGHT, LSE_T, LSE_S, DELTA, batch, pid_bh,
                                                                    rows, length)
        grad = _score_grad(_scores(xt, yt, scale_t, DOT, ROUND, PRECISION),
                           _scores(xs, ys, scale_s, DOT, ROUND, PRECISION),
                           keys, valid, lse_t, lse_s, delta, peak_d, peak, weight, LOSS)
        acc += tl.dot(tl.trans(grad), xs, input_precision=PRECISION)

    acc = acc * (scale_s * tl.load(GRAD_OUT).to(tl.float32))
    cols = tl.arange(0, BLOCK_DS)
    out = DYS + batch * stride_sb + keys[:, None] * stride_sl + head * ds + cols[None, :]
    tl.store(out, acc.to(DYS.dtype.element_ty), mask=(keys[:, None] < length) & (cols[None, :] < ds))


def _block_dim(head_dim: int) -> int:
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(
            f"the Triton path supports relation-head sizes up to {MAX_HEAD_DIM}, got {head_dim}; "
            "use more relation heads"
        )
    return max(16, triton.next_power_of_2(head_dim))


def row_weights(key_valid: torch.Tensor, heads: int, loss_id: int) -> torch.Tensor:
    """(B, L) fp32 weight of each row's loss: zero on padding, the reduction's constant elsewhere."""
    valid = key_valid.to(torch.float32)
    counts = valid.sum(dim=1, keepdim=True)
    if loss_id in (KL, CE):
        return valid / (key_valid.shape[0] * heads * counts)
    return valid / (heads * counts.square().sum())


def _launch_args(t_a, t_b, s_a, s_b, heads, scale_t, scale_s):
    batch, length, width_t = t_a.shape
    return dict(
        stride_tb=t_a.stride(0), stride_tl=t_a.stride(1), stride_sb=s_a.stride(0), stride_sl=s_a.stride(1),
        length=length, heads=heads, dt=width_t // heads, ds=s_a.shape[2] // heads,
        scale_t=scale_t, scale_s=scale_s,
    )


def head_size_bucket(head_dim: int) -> int:
    """The CONFIGS bucket of a relation head size: its padded size, at least 64."""
    return max(64, _block_dim(head_dim))


def width_bucket(t_a, s_a, heads) -> int:
    """The CONFIGS bucket of a launch: that of the larger head size, teacher's or student's."""
    return head_size_bucket(max(t_a.shape[2], s_a.shape[2]) // heads)


def _meta(kernel, t_a, t_b, s_a, s_b, heads, loss_id):
    cls = dtype_class(t_a, t_b, s_a, s_b)
    chosen = lookup(CONFIGS, kernel, cls, t_a.device, width_bucket(t_a, s_a, heads))
    return dict(
        LOSS=loss_id, BLOCK_DT=_block_dim(t_a.shape[2] // heads), BLOCK_DS=_block_dim(s_a.shape[2] // heads),
        **operand_meta(cls), **chosen.meta(),
    )


def relation_forward(t_a, t_b, s_a, s_b, mask, heads, loss_id, scale_t, scale_s):
    """Returns the fp32 loss and the tensors the backward needs (key mask, row weights, statistics)."""
    t_a, t_b, s_a, s_b = (x.contiguous() for x in (t_a, t_b, s_a, s_b))
    batch, length, _ = t_a.shape
    key_valid = (mask if mask is not None else torch.ones(batch, length, dtype=torch.bool, device=t_a.device))
    key_valid = key_valid.to(torch.int8).contiguous()
    weight = row_weights(key_valid, heads, loss_id)
    # Separate buffers: the statistics are outputs of a custom op, which may not alias one another.
    row_loss, lse_t, lse_s = (torch.empty(batch * heads, length, device=t_a.device, dtype=torch.float32)
                              for _ in range(3))
    delta = torch.empty(3, batch * heads, length, device=t_a.device, dtype=torch.float32)  # mse_prob's planes
    meta = _meta("fwd", t_a, t_b, s_a, s_b, heads, loss_id)
    grid = (triton.cdiv(length, meta["BLOCK_M"]), batch * heads)
    _relation_fwd_kernel[grid](
        t_a, t_b, s_a, s_b, key_valid, weight, row_loss, lse_t, lse_s, delta,
        **_launch_args(t_a, t_b, s_a, s_b, heads, scale_t, scale_s), **meta,
    )
    return row_loss.sum(), (key_valid, weight, lse_t, lse_s, delta)


def relation_backward(t_a, t_b, s_a, s_b, saved, grad_output, heads, loss_id, scale_t, scale_s):
    """Student gradients (dL/ds_a, dL/ds_b) in the students' dtypes."""
    t_a, t_b, s_a, s_b = (x.contiguous() for x in (t_a, t_b, s_a, s_b))
    key_valid, weight, lse_t, lse_s, delta = saved
    grad_output = grad_output.to(torch.float32).reshape(1).contiguous()
    grad_a, grad_b = torch.empty_like(s_a), torch.empty_like(s_b)
    args = _launch_args(t_a, t_b, s_a, s_b, heads, scale_t, scale_s)
    batch, length, _ = t_a.shape
    common = (t_a, t_b, s_a, s_b, key_valid, weight, lse_t, lse_s, delta, grad_output)
    meta = _meta("bwd_dx", t_a, t_b, s_a, s_b, heads, loss_id)
    _relation_bwd_dx_kernel[(triton.cdiv(length, meta["BLOCK_M"]), batch * heads)](*common, grad_a, **args, **meta)
    meta = _meta("bwd_dy", t_a, t_b, s_a, s_b, heads, loss_id)
    _relation_bwd_dy_kernel[(triton.cdiv(length, meta["BLOCK_N"]), batch * heads)](*common, grad_b, **args, **meta)
    return grad_a, grad_b


# tools/triton_aot.py compiles every CONFIGS entry of these kernels at their heaviest loss (mse_prob:
# a second sweep in the forward, the most live values in the backward) and at the other losses,
# teacher and student heads as wide as the bucket.
_POINTERS = {"XT": "in", "YT": "in", "XS": "in", "YS": "in", "KEY_VALID": "*i8", "DXS": "in", "DYS": "in"}
_SCALARS = {"scale_t": "fp32", "scale_s": "fp32"}
_OTHER_LOSSES = tuple((name, {"LOSS": RELATION_LOSS_IDS[name]}) for name in ("kl", "ce", "mse_logit"))
AOT_KERNELS = [
    AotKernel(fn=fn, table_key=key, label="mse_prob", pointers=_POINTERS, scalars=_SCALARS,
              variant_meta={"LOSS": MSE_PROB},
              bucket_meta={width: {"BLOCK_DT": width, "BLOCK_DS": width} for width in WIDTH_BUCKETS},
              variants=_OTHER_LOSSES)
    for fn, key in ((_relation_fwd_kernel, "fwd"), (_relation_bwd_dx_kernel, "bwd_dx"),
                    (_relation_bwd_dy_kernel, "bwd_dy"))
]
