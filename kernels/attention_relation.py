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
Every load is upcast to fp32: products and statistics are fp32 whatever the input dtype.
"""
import os

import torch
import triton
import triton.language as tl

from .ids import RELATION_LOSS_IDS

KL, CE, MSE_PROB, MSE_LOGIT = (RELATION_LOSS_IDS[name] for name in ("kl", "ce", "mse_prob", "mse_logit"))
MAX_HEAD_DIM = 256
# The same ids as seen inside kernels, where only constexpr globals may be read.
_KL = tl.constexpr(KL)
_MSE_PROB = tl.constexpr(MSE_PROB)
_MSE_LOGIT = tl.constexpr(MSE_LOGIT)
_NEG_BIG = tl.constexpr(-1.0e30)  # finite start for running maxima: e^{m_old - m_new} stays defined


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


NUM_WARPS = 8


def block_sizes() -> tuple[int, int]:
    """(rows, keys) per tile; small under the interpreter so tests cross several tiles quickly.

    On the GPU, 32 x 64 tiles with 8 warps keep bf16 spill-free and fp32 (tf32x3) within a few
    hundred bytes of spills on sm_80/sm_90; 64 x 64 with 4 warps spilled kilobytes.
    """
    return (16, 16) if interpreting() else (32, 64)


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
def _scores(x, y, scale, PRECISION: tl.constexpr):
    return tl.dot(x, tl.trans(y), input_precision=PRECISION) * scale


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
    BLOCK_DT: tl.constexpr, BLOCK_DS: tl.constexpr, PRECISION: tl.constexpr,
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
        t = _scores(xt, yt, scale_t, PRECISION)
        s = _scores(xs, ys, scale_s, PRECISION)
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
            p = tl.where(valid, tl.exp(_scores(xt, yt, scale_t, PRECISION) - lse_t[:, None]), 0.0)
            q = tl.where(valid, tl.exp(_scores(xs, ys, scale_s, PRECISION) - lse_s[:, None]), 0.0)
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
    BLOCK_DT: tl.constexpr, BLOCK_DS: tl.constexpr, PRECISION: tl.constexpr,
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
        grad = _score_grad(_scores(xt, yt, scale_t, PRECISION), _scores(xs, ys, scale_s, PRECISION),
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
    BLOCK_DT: tl.constexpr, BLOCK_DS: tl.constexpr, PRECISION: tl.constexpr,
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
        grad = _score_grad(_scores(xt, yt, scale_t, PRECISION), _scores(xs, ys, scale_s, PRECISION),
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


def dot_precision(*tensors: torch.Tensor) -> str:
    """tf32x3 keeps fp32 accuracy on tensor cores (an FMA "ieee" dot spills at these tiles);
    a single tf32 pass is exact for bf16 inputs and near-exact for fp16."""
    return "tf32x3" if any(t.dtype in (torch.float32, torch.float64) for t in tensors) else "tf32"


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


def _meta(t_a, s_a, heads, loss_id):
    block_m, block_n = block_sizes()
    return dict(
        LOSS=loss_id, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_DT=_block_dim(t_a.shape[2] // heads), BLOCK_DS=_block_dim(s_a.shape[2] // heads),
        PRECISION=dot_precision(t_a, s_a), num_warps=NUM_WARPS,
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
    meta = _meta(t_a, s_a, heads, loss_id)
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
    meta = _meta(t_a, s_a, heads, loss_id)
    args = _launch_args(t_a, t_b, s_a, s_b, heads, scale_t, scale_s)
    batch, length, _ = t_a.shape
    common = (t_a, t_b, s_a, s_b, key_valid, weight, lse_t, lse_s, delta, grad_output)
    _relation_bwd_dx_kernel[(triton.cdiv(length, meta["BLOCK_M"]), batch * heads)](*common, grad_a, **args, **meta)
    _relation_bwd_dy_kernel[(triton.cdiv(length, meta["BLOCK_N"]), batch * heads)](*common, grad_b, **args, **meta)
    return grad_a, grad_b
