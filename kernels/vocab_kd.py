r"""Triton kernels of the vocabulary KD loss (math: pykd/ops/vocab_kd.py).

Forward: one program per block of BLOCK_M selected rows streams the vocabulary in tiles of
BLOCK_V words. A tile's logits are a K-loop of tl.dot over the hidden width (the student's and a
projected teacher's; a dense teacher's are loaded, a top-k one's built from its k words). Both
distributions keep a running maximum m, top word and the sum of the other words' exponentials
(the top split, online, in units of 1/T):

    the tile holds a new maximum:  rest <- (rest + 1) e^{(m_old - m)/T} + sum_{tile, v != top} e^{(x_v - m)/T}
    otherwise:                     rest <- rest + sum_tile e^{(x_v - m)/T}

The value's cross sum stays max-shifted (as in the relation kernel), rescaled when a maximum
moves: for kl, C = sum_v e^{a_v - m_a}((a_v - m_a) - (b_v - m_b)) and C <- e^{-da}(C - (da - db)
Z_a) + the tile's terms, da and db the maxima's moves and Z_a = 1 + rest_a, so that at the end
KL = C / Z_a - log1p(rest_a) + log1p(rest_b); soft_ce and reverse_kl alike. jsd's log-ratios to the
mixture need both finished normalisers, so it sweeps the tiles a second time. The hard-label term keeps the student's
rest at T = 1 and picks up the label's logit. Saved per row: the maxima, log1p of the rests, R or
K, the row's loss, and the student's top word.

Backward, recomputing the logit tiles from those statistics:
- dh kernel, one program per row block over the whole vocabulary: G tiles with the top word at 0,
  their row sums, and dh += G W_s[tile]. The dh accumulator (BLOCK_M x d_s) does not fit in
  registers for d_s in the hundreds, so it lives in an fp32 buffer whose rows only this program
  touches (read-modify-write, a barrier per tile). Then G_sigma = -(row sum) is added as
  G_sigma W_s[sigma] and saved per row.
- dW kernel, one program per vocabulary tile over all row blocks: G tiles with each row's saved
  G_sigma at its top word, dW_s[tile] += G^T h_s (the program's own rows of an fp32 buffer) and
  db_s[tile] += column sums.
No two programs write the same memory: no atomics.

Every dot takes its operands in the dtype class's dtype (kernels/configs.py), one class for the
student's and the projected teacher's dots: when h_s, w_s (and h_t, w_t) share one 16-bit dtype
they go to tl.dot as they are, accumulating in fp32, and G is rounded to that dtype for the
gradient dots; any other mix is "fp32": loads upcast, every dot tf32x3.
Launch configurations: CONFIGS below, one entry per kernel, dtype class and architecture (no
bucket: the hidden width is a K-loop, so registers and shared memory do not grow with it).
"""
import contextlib
import math

import numpy as np

import torch
import triton
import triton.language as tl

from .configs import AotKernel, as_operand, dtype_class, interpreting, lookup, operand_meta, table
from .ids import VOCAB_DIVERGENCE_IDS, VOCAB_TEACHER_IDS

KL, SOFT_CE, REVERSE_KL, JSD = (VOCAB_DIVERGENCE_IDS[name] for name in ("kl", "soft_ce", "reverse_kl", "jsd"))
PROJECTED, LOGITS, TOPK = (VOCAB_TEACHER_IDS[name] for name in ("projected", "logits", "topk"))
# The same ids as seen inside kernels, where only constexpr globals may be read.
_KL = tl.constexpr(KL)
_SOFT_CE = tl.constexpr(SOFT_CE)
_REVERSE_KL = tl.constexpr(REVERSE_KL)
_PROJECTED = tl.constexpr(PROJECTED)
_LOGITS = tl.constexpr(LOGITS)
_NEG_INF = tl.constexpr(float("-inf"))
_MIXTURE_SWITCH = tl.constexpr(30.0)  # h_c's large-x form from here (pykd/ops/vocab_kd.py)

# Rows of the saved statistics (stats[i] is a (N,) fp32 row).
STAT_NAMES = ("max_s", "log_zs", "log_z1", "max_t", "log_zt", "aux", "row_loss")
_MAX_S, _LOG_ZS, _LOG_Z1, _MAX_T, _LOG_ZT, _AUX, _ROW_LOSS = (tl.constexpr(i) for i in range(len(STAT_NAMES)))
ROW_LOSS = STAT_NAMES.index("row_loss")


VOCAB_KERNELS = ("fwd", "bwd_dh", "bwd_dw")
# Chosen by the AOT search (bench/NOTES.md): spill-free in every variant the dispatch launches (a
# dense or top-k teacher with jsd holds the most registers, not the projected one); on sm_90 16-bit
# dots as warp-group MMA, which needs 64-row tiles (the dW kernel's G^T h_s dot: 64 words). There the
# forward takes 32-word tiles (64 x 64 x 32 spills 88-236 B with a dense or top-k teacher, or without
# biases) and dh 16-wide K chunks (K = 32 spills 84 B with a top-k teacher). The row-parallel
# forward and dh then run N / 64 programs: below N = 8448 rows an H100's 132 SMs are not all busy
# (the sm_80 entries' 32-row mma.sync tiles give twice the programs). fp32 runs tf32x3 (three
# products per dot live): K chunks of 16, one stage in the forward and dh (two spill 8-24 B there).
CONFIGS = table(("BLOCK_M", "BLOCK_V", "BLOCK_K"), [
    # Small tiles under the interpreter, so the tests cross several tiles and chunks quickly.
    *[(kernel, "any", "interpreter", None, 16, 16, 16, 4, 1) for kernel in VOCAB_KERNELS],
    # kernel   class  arch   bucket  BLOCK_M BLOCK_V BLOCK_K warps stages
    *[row for cls in ("bf16", "fp16") for row in (
        ("fwd", cls, "sm_90", None, 64, 32, 32, 8, 2),
        ("bwd_dh", cls, "sm_90", None, 64, 64, 16, 8, 2),
        ("bwd_dw", cls, "sm_90", None, 64, 64, 32, 8, 2),
        *[(kernel, cls, "sm_80", None, 32, 64, 32, 8, 2) for kernel in VOCAB_KERNELS],
    )],
    *[row for arch in ("sm_80", "sm_90") for row in (
        ("fwd", "fp32", arch, None, 32, 64, 16, 8, 1),
        ("bwd_dh", "fp32", arch, None, 32, 32, 16, 8, 1),
        ("bwd_dw", "fp32", arch, None, 32, 64, 16, 8, 2),
    )],
])


def _quiet_masked_lanes():
    """Under the interpreter (numpy), lanes that tl.where discards compute -inf - -inf past the
    vocabulary and x / log(1) = x / 0 in expm1's exact branch; numpy would warn on every launch."""
    return np.errstate(invalid="ignore", divide="ignore") if interpreting() else contextlib.nullcontext()


@triton.jit
def _log1p(x):
    """log(1 + x) for x > -1, exact to rounding for tiny x (log(u) x / (u - 1), u = 1 + x)."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / (u - 1.0)))


@triton.jit
def _expm1(x):
    """e^x - 1 for finite x or -inf, exact to rounding for tiny x (Kahan: (u - 1) x / log u, u = e^x)."""
    u = tl.exp(x)
    return tl.where(u == 1.0, x, tl.where(u == 0.0, -1.0, (u - 1.0) * (x / tl.log(u))))


@triton.jit
def _log_mix(x, c, log_c):
    """h_c(x) = log(c e^x + 1 - c), each branch free of cancellation (pykd/ops/vocab_kd.py)."""
    large = tl.maximum(x, _MIXTURE_SWITCH)
    below = _log1p(c * _expm1(tl.minimum(x, _MIXTURE_SWITCH)))
    above = large + log_c + _log1p((1.0 - c) / c * tl.exp(-large))
    return tl.where(x <= _MIXTURE_SWITCH, below, above)


@triton.jit
def _mixture_ratios(log_p, log_q, beta, log_beta, log_1m_beta):
    """(log p - log m, log q - log m) of jsd's mixture m = beta p + (1 - beta) q, without log m."""
    x = log_p - log_q
    return -_log_mix(-x, 1.0 - beta, log_1m_beta), -_log_mix(x, beta, log_beta)


@triton.jit
def _dot(a, b, DOT: tl.constexpr, ROUND: tl.constexpr, PRECISION: tl.constexpr):
    """a @ b of loaded tiles as tensor-core operands of the dtype class (kernels/configs.py)."""
    return tl.dot(as_operand(a, DOT, ROUND), as_operand(b, DOT, ROUND), input_precision=PRECISION)


@triton.jit
def _grad_dot(g, x, DOT: tl.constexpr, ROUND: tl.constexpr, PRECISION: tl.constexpr):
    """g (fp32) @ x, g rounded to the class dtype first (a no-op for fp32)."""
    return tl.dot(as_operand(g, DOT, ROUND), as_operand(x, DOT, ROUND), input_precision=PRECISION)


@triton.jit
def _logits_tile(H, W, B, rows64, rows_in, cols64, cols_in, width, stride_h, stride_w, HAS_BIAS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr,
                 ROUND: tl.constexpr, PRECISION: tl.constexpr):
    """h[rows] W[cols]^T (+ b[cols]) as a (BLOCK_M, BLOCK_V) fp32 tile."""
    acc = tl.zeros([BLOCK_M, BLOCK_V], tl.float32)
    for k0 in range(0, width, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_in = ks < width
        h = tl.load(H + rows64[:, None] * stride_h + ks[None, :], mask=rows_in[:, None] & k_in[None, :], other=0.0)
        w = tl.load(W + cols64[:, None] * stride_w + ks[None, :], mask=cols_in[:, None] & k_in[None, :], other=0.0)
        acc += _dot(h, tl.trans(w), DOT, ROUND, PRECISION)
    if HAS_BIAS:
        acc += tl.load(B + cols64, mask=cols_in, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _student_tile(H_S, W_S, B_S, rows64, rows_in, cols64, cols_in, width_s, stride_hs, stride_ws,
                  HAS_BIAS_S: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                  DOT: tl.constexpr, ROUND: tl.constexpr, PRECISION: tl.constexpr):
    z = _logits_tile(H_S, W_S, B_S, rows64, rows_in, cols64, cols_in, width_s, stride_hs, stride_ws, HAS_BIAS_S,
                     BLOCK_M, BLOCK_V, BLOCK_K, DOT, ROUND, PRECISION)
    return tl.where(cols_in[None, :], z, _NEG_INF)


@triton.jit
def _teacher_tile(H_T, W_T, B_T, T_LOGITS, TOPK_VAL, TOPK_IDX, FILL, rows64, rows_in, cols, cols64, cols_in, width_t,
                  k, stride_ht, stride_wt, stride_tl, TEACHER: tl.constexpr, HAS_BIAS_T: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr,
                  ROUND: tl.constexpr, PRECISION: tl.constexpr):
    """The teacher's logits on a tile (fp32, -inf past the vocabulary)."""
    if TEACHER == _PROJECTED:
        z = _logits_tile(H_T, W_T, B_T, rows64, rows_in, cols64, cols_in, width_t, stride_ht, stride_wt, HAS_BIAS_T,
                         BLOCK_M, BLOCK_V, BLOCK_K, DOT, ROUND, PRECISION)
    elif TEACHER == _LOGITS:
        z = tl.load(T_LOGITS + rows64[:, None] * stride_tl + cols64[None, :],
                    mask=rows_in[:, None] & cols_in[None, :], other=0.0).to(tl.float32)
    else:  # top-k: the row's fill logit everywhere, then its k words
        z = tl.load(FILL + rows64, mask=rows_in, other=0.0)[:, None] + tl.zeros([BLOCK_M, BLOCK_V], tl.float32)
        for j in range(k):
            word = tl.load(TOPK_IDX + rows64 * k + j, mask=rows_in, other=-1)
            value = tl.load(TOPK_VAL + rows64 * k + j, mask=rows_in, other=0.0).to(tl.float32)
            z = tl.where(cols[None, :] == word[:, None], value[:, None], z)
    return tl.where(cols_in[None, :], z, _NEG_INF)


@triton.jit
def _top_split_step(m, rest, top, x, cols, start, scale):
    """One tile's step of a row's running (maximum, rest, top word) of raw logits x; also returns
    the rescale factor of the old sums, the maximum's move in units of 1/scale and e^{(x - m) scale}."""
    tile_max, tile_arg = tl.max(x, axis=1, return_indices=True)
    new = tile_max > m
    m_new = tl.where(new, tile_max, m)
    alpha = tl.where(new, tl.exp((m - m_new) * scale), 1.0)  # a first maximum (m = -inf) rescales by 0
    moved = tl.where(new, (m_new - m) * scale, 0.0)
    e = tl.where(x == _NEG_INF, 0.0, tl.exp((x - m_new[:, None]) * scale))
    is_new_top = new[:, None] & ((cols - start)[None, :] == tile_arg[:, None])
    rest = (rest + tl.where(new, 1.0, 0.0)) * alpha + tl.sum(tl.where(is_new_top, 0.0, e), axis=1)
    top = tl.where(new, start + tile_arg, top)
    return m_new, rest, top, alpha, moved, e


@triton.jit
def _rows_of_block(ROW_IDX, n_sel, start, BLOCK_M: tl.constexpr):
    ridx = start + tl.arange(0, BLOCK_M)
    rows_in = ridx < n_sel
    rows = tl.load(ROW_IDX + ridx, mask=rows_in, other=0)
    return rows.to(tl.int64), rows_in


@triton.jit
def _vocab_fwd_kernel(
    H_S, W_S, B_S, H_T, W_T, B_T, T_LOGITS, TOPK_VAL, TOPK_IDX, FILL, LABELS, ROW_IDX, STATS, TOP,
    n_sel, n_rows, vocab, width_s, width_t, k, stride_hs, stride_ws, stride_ht, stride_wt, stride_tl,
    inv_t, beta, log_beta, log_1m_beta, kd_value, hard_value,
    DIV: tl.constexpr, TEACHER: tl.constexpr, HAS_BIAS_S: tl.constexpr, HAS_BIAS_T: tl.constexpr,
    HARD: tl.constexpr, SEPARATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr, DOT: tl.constexpr, ROUND: tl.constexpr, PRECISION: tl.constexpr,
):
    rows64, rows_in = _rows_of_block(ROW_IDX, n_sel, tl.program_id(0) * BLOCK_M, BLOCK_M)
    if HARD:
        labels = tl.load(LABELS + rows64, mask=rows_in, other=-1)
    m_s = tl.full([BLOCK_M], _NEG_INF, tl.float32)
    m_t = tl.full([BLOCK_M], _NEG_INF, tl.float32)
    rest_s = tl.zeros([BLOCK_M], tl.float32)
    rest_t = tl.zeros([BLOCK_M], tl.float32)
    rest_1 = tl.zeros([BLOCK_M], tl.float32)
    top_s = tl.zeros([BLOCK_M], tl.int32)
    top_t = tl.zeros([BLOCK_M], tl.int32)
    cross = tl.zeros([BLOCK_M], tl.float32)
    label_logit = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        cols_in = cols < vocab
        cols64 = cols.to(tl.int64)
        zs = _student_tile(H_S, W_S, B_S, rows64, rows_in, cols64, cols_in, width_s, stride_hs, stride_ws, HAS_BIAS_S,
                           BLOCK_M, BLOCK_V, BLOCK_K, DOT, ROUND, PRECISION)
        zt = _teacher_tile(H_T, W_T, B_T, T_LOGITS, TOPK_VAL, TOPK_IDX, FILL, rows64, rows_in, cols, cols64, cols_in,
                           width_t, k, stride_ht, stride_wt, stride_tl, TEACHER, HAS_BIAS_T, BLOCK_M, BLOCK_V,
                           BLOCK_K, DOT, ROUND, PRECISION)
        had_t = m_t > _NEG_INF
        had_s = m_s > _NEG_INF
        z_t_old = 1.0 + rest_t  # the old sums' full mass, top word included
        z_s_old = 1.0 + rest_s
        if HARD:
            label_logit += tl.sum(tl.where(cols[None, :] == labels[:, None], zs, 0.0), axis=1)
            if SEPARATE:  # the student's rest at T = 1: same maxima and top word, scale 1
                rest_1 = _top_split_step(m_s, rest_1, top_s, zs, cols, start, 1.0)[1]
        m_s, rest_s, top_s, alpha_s, moved_s, e_s = _top_split_step(m_s, rest_s, top_s, zs, cols, start, inv_t)
        m_t, rest_t, top_t, alpha_t, moved_t, e_t = _top_split_step(m_t, rest_t, top_t, zt, cols, start, inv_t)
        shifted_s = (zs - m_s[:, None]) * inv_t
        shifted_t = (zt - m_t[:, None]) * inv_t
        if DIV == _KL:  # C = sum e_t ((a - m_a) - (b - m_b))
            old = tl.where(had_t, alpha_t * (cross - (moved_t - moved_s) * z_t_old), 0.0)
            cross = old + tl.sum(tl.where(e_t > 0.0, e_t * (shifted_t - shifted_s), 0.0), axis=1)
        elif DIV == _SOFT_CE:  # C = sum e_t (b - m_b)
            old = tl.where(had_t, alpha_t * (cross - moved_s * z_t_old), 0.0)
            cross = old + tl.sum(tl.where(e_t > 0.0, e_t * shifted_s, 0.0), axis=1)
        elif DIV == _REVERSE_KL:  # C = sum e_s ((b - m_b) - (a - m_a))
            old = tl.where(had_s, alpha_s * (cross - (moved_s - moved_t) * z_s_old), 0.0)
            cross = old + tl.sum(tl.where(e_s > 0.0, e_s * (shifted_s - shifted_t), 0.0), axis=1)

    log_zs = _log1p(rest_s)
    log_zt = _log1p(rest_t)
    if SEPARATE:
        log_z1 = _log1p(rest_1)
    else:
        log_z1 = log_zs
    aux = tl.zeros([BLOCK_M], tl.float32)
    if DIV == _KL:
        value = cross / (1.0 + rest_t) - log_zt + log_zs
    elif DIV == _SOFT_CE:
        value = -cross / (1.0 + rest_t) + log_zs
    elif DIV == _REVERSE_KL:
        value = cross / (1.0 + rest_s) - log_zs + log_zt
        aux = value
    else:  # jsd: a second sweep with both normalisers finished
        value = tl.zeros([BLOCK_M], tl.float32)
        for start in range(0, vocab, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            cols_in = cols < vocab
            cols64 = cols.to(tl.int64)
            zs = _student_tile(H_S, W_S, B_S, rows64, rows_in, cols64, cols_in, width_s, stride_hs, stride_ws,
                               HAS_BIAS_S, BLOCK_M, BLOCK_V, BLOCK_K, DOT, ROUND, PRECISION)
            zt = _teacher_tile(H_T, W_T, B_T, T_LOGITS, TOPK_VAL, TOPK_IDX, FILL, rows64, rows_in, cols, cols64,
                               cols_in, width_t, k, stride_ht, stride_wt, stride_tl, TEACHER, HAS_BIAS_T, BLOCK_M,
                               BLOCK_V, BLOCK_K, DOT, ROUND, PRECISION)
            log_q = (zs - m_s[:, None]) * inv_t - log_zs[:, None]
            log_p = (zt - m_t[:, None]) * inv_t - log_zt[:, None]
            q = tl.exp(log_q)
            p = tl.exp(log_p)
            ratio_p, ratio_q = _mixture_ratios(log_p, log_q, beta, log_beta, log_1m_beta)
            kl_qm = tl.where(cols_in[None, :], q * ratio_q, 0.0)
            kl_pm = tl.where(cols_in[None, :] & (p > 0.0), p * ratio_p, 0.0)
            value += tl.sum(beta * kl_pm + (1.0 - beta) * kl_qm, axis=1)
            aux += tl.sum(kl_qm, axis=1)
    row_loss = kd_value * value
    if HARD:
        row_loss += hard_value * (m_s - label_logit + log_z1)
    tl.store(STATS + _MAX_S * n_rows + rows64, m_s, mask=rows_in)
    tl.store(STATS + _LOG_ZS * n_rows + rows64, log_zs, mask=rows_in)
    tl.store(STATS + _LOG_Z1 * n_rows + rows64, log_z1, mask=rows_in)
    tl.store(STATS + _MAX_T * n_rows + rows64, m_t, mask=rows_in)
    tl.store(STATS + _LOG_ZT * n_rows + rows64, log_zt, mask=rows_in)
    tl.store(STATS + _AUX * n_rows + rows64, aux, mask=rows_in)
    tl.store(STATS + _ROW_LOSS * n_rows + rows64, row_loss, mask=rows_in)
    tl.store(TOP + rows64, top_s, mask=rows_in)


@triton.jit
def _load_row_stats(STATS, TOP, rows64, rows_in, n_rows):
    """A row block's saved statistics (zero past the selected rows)."""
    m_s = tl.load(STATS + _MAX_S * n_rows + rows64, mask=rows_in, other=0.0)
    log_zs = tl.load(STATS + _LOG_ZS * n_rows + rows64, mask=rows_in, other=0.0)
    log_z1 = tl.load(STATS + _LOG_Z1 * n_rows + rows64, mask=rows_in, other=0.0)
    m_t = tl.load(STATS + _MAX_T * n_rows + rows64, mask=rows_in, other=0.0)
    log_zt = tl.load(STATS + _LOG_ZT * n_rows + rows64, mask=rows_in, other=0.0)
    aux = tl.load(STATS + _AUX * n_rows + rows64, mask=rows_in, other=0.0)
    top = tl.load(TOP + rows64, mask=rows_in, other=-1)
    return m_s, log_zs, log_z1, m_t, log_zt, aux, top


@triton.jit
def _grad_tile(zs, zt, cols, cols_in, rows_in, m_s, log_zs, log_z1, m_t, log_zt, aux, top, labels, coef_kd,
               coef_hard, inv_t, beta, log_beta, log_1m_beta, DIV: tl.constexpr, HARD: tl.constexpr,
               SEPARATE: tl.constexpr):
    """G = dL/dz_s on a tile from the closed forms; 0 at each row's top word, past the vocabulary and
    on rows past the selected ones."""
    log_q = (zs - m_s[:, None]) * inv_t - log_zs[:, None]
    log_p = (zt - m_t[:, None]) * inv_t - log_zt[:, None]
    q = tl.exp(log_q)
    if DIV == _KL or DIV == _SOFT_CE:  # the same gradient: soft_ce = kl + the teacher's entropy
        g = q - tl.exp(log_p)
    elif DIV == _REVERSE_KL:
        g = q * (log_q - log_p - aux[:, None])
    else:
        g = (1.0 - beta) * q * (_mixture_ratios(log_p, log_q, beta, log_beta, log_1m_beta)[1] - aux[:, None])
    grad = coef_kd * g
    if HARD:
        if SEPARATE:
            q1 = tl.exp(zs - (m_s + log_z1)[:, None])
        else:
            q1 = q
        grad += coef_hard * (q1 - tl.where(cols[None, :] == labels[:, None], 1.0, 0.0))
    keep = rows_in[:, None] & cols_in[None, :] & (cols[None, :] != top[:, None])
    return tl.where(keep, grad, 0.0)


@triton.jit
def _vocab_bwd_dh_kernel(
    H_S, W_S, B_S, H_T, W_T, B_T, T_LOGITS, TOPK_VAL, TOPK_IDX, FILL, LABELS, ROW_IDX, STATS, TOP,
    COEF, DH, G_TOP,
    n_sel, n_rows, vocab, width_s, width_t, k, stride_hs, stride_ws, stride_ht, stride_wt, stride_tl,
    inv_t, beta, log_beta, log_1m_beta, kd_value, hard_value,
    DIV: tl.constexpr, TEACHER: tl.constexpr, HAS_BIAS_S: tl.constexpr, HAS_BIAS_T: tl.constexpr,
    HARD: tl.constexpr, SEPARATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr, DOT: tl.constexpr, ROUND: tl.constexpr, PRECISION: tl.constexpr,
    NEED_DH: tl.constexpr,
):
    rows64, rows_in = _rows_of_block(ROW_IDX, n_sel, tl.program_id(0) * BLOCK_M, BLOCK_M)
    m_s, log_zs, log_z1, m_t, log_zt, aux, top = _load_row_stats(STATS, TOP, rows64, rows_in, n_rows)
    labels = top
    if HARD:
        labels = tl.load(LABELS + rows64, mask=rows_in, other=-1)
    coef_kd = tl.load(COEF)
    coef_hard = tl.load(COEF + 1)
    others = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        cols_in = cols < vocab
        cols64 = cols.to(tl.int64)
        zs = _student_tile(H_S, W_S, B_S, rows64, rows_in, cols64, cols_in, width_s, stride_hs, stride_ws, HAS_BIAS_S,
                           BLOCK_M, BLOCK_V, BLOCK_K, DOT, ROUND, PRECISION)
        zt = _teacher_tile(H_T, W_T, B_T, T_LOGITS, TOPK_VAL, TOPK_IDX, FILL, rows64, rows_in, cols, cols64, cols_in,
                           width_t, k, stride_ht, stride_wt, stride_tl, TEACHER, HAS_BIAS_T, BLOCK_M, BLOCK_V,
                           BLOCK_K, DOT, ROUND, PRECISION)
        grad = _grad_tile(zs, zt, cols, cols_in, rows_in, m_s, log_zs, log_z1, m_t, log_zt, aux, top, labels, coef_kd,
                          coef_hard, inv_t, beta, log_beta, log_1m_beta, DIV, HARD, SEPARATE)
        others += tl.sum(grad, axis=1)
        if NEED_DH:
            for k0 in range(0, width_s, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_in = ks < width_s
                w = tl.load(W_S + cols64[:, None] * stride_ws + ks[None, :], mask=cols_in[:, None] & k_in[None, :],
                            other=0.0)
                inside = rows_in[:, None] & k_in[None, :]
                out = DH + rows64[:, None] * width_s + ks[None, :]
                tl.store(out, tl.load(out, mask=inside, other=0.0) + _grad_dot(grad, w, DOT, ROUND, PRECISION),
                         mask=inside)
            tl.debug_barrier()  # this tile's dh writes are seen by the next tile's reads
    g_top = -others  # every row of G sums to zero
    if NEED_DH:
        top64 = tl.where(rows_in, top, 0).to(tl.int64)
        for k0 in range(0, width_s, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            inside = rows_in[:, None] & (ks < width_s)[None, :]
            w_top = tl.load(W_S + top64[:, None] * stride_ws + ks[None, :], mask=inside, other=0.0).to(tl.float32)
            out = DH + rows64[:, None] * width_s + ks[None, :]
            tl.store(out, tl.load(out, mask=inside, other=0.0) + g_top[:, None] * w_top, mask=inside)
    tl.store(G_TOP + rows64, g_top, mask=rows_in)


@triton.jit
def _vocab_bwd_dw_kernel(
    H_S, W_S, B_S, H_T, W_T, B_T, T_LOGITS, TOPK_VAL, TOPK_IDX, FILL, LABELS, ROW_IDX, STATS, TOP,
    COEF, G_TOP, DW, DB,
    n_sel, n_rows, vocab, width_s, width_t, k, stride_hs, stride_ws, stride_ht, stride_wt, stride_tl,
    inv_t, beta, log_beta, log_1m_beta, kd_value, hard_value,
    DIV: tl.constexpr, TEACHER: tl.constexpr, HAS_BIAS_S: tl.constexpr, HAS_BIAS_T: tl.constexpr,
    HARD: tl.constexpr, SEPARATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr, DOT: tl.constexpr, ROUND: tl.constexpr, PRECISION: tl.constexpr,
    NEED_DW: tl.constexpr,
):
    start = tl.program_id(0) * BLOCK_V
    cols = start + tl.arange(0, BLOCK_V)
    cols_in = cols < vocab
    cols64 = cols.to(tl.int64)
    coef_kd = tl.load(COEF)
    coef_hard = tl.load(COEF + 1)
    bias_grad = tl.zeros([BLOCK_V], tl.float32)
    for m0 in range(0, n_sel, BLOCK_M):
        rows64, rows_in = _rows_of_block(ROW_IDX, n_sel, m0, BLOCK_M)
        m_s, log_zs, log_z1, m_t, log_zt, aux, top = _load_row_stats(STATS, TOP, rows64, rows_in, n_rows)
        labels = top
        if HARD:
            labels = tl.load(LABELS + rows64, mask=rows_in, other=-1)
        zs = _student_tile(H_S, W_S, B_S, rows64, rows_in, cols64, cols_in, width_s, stride_hs, stride_ws, HAS_BIAS_S,
                           BLOCK_M, BLOCK_V, BLOCK_K, DOT, ROUND, PRECISION)
        zt = _teacher_tile(H_T, W_T, B_T, T_LOGITS, TOPK_VAL, TOPK_IDX, FILL, rows64, rows_in, cols, cols64, cols_in,
                           width_t, k, stride_ht, stride_wt, stride_tl, TEACHER, HAS_BIAS_T, BLOCK_M, BLOCK_V,
                           BLOCK_K, DOT, ROUND, PRECISION)
        grad = _grad_tile(zs, zt, cols, cols_in, rows_in, m_s, log_zs, log_z1, m_t, log_zt, aux, top, labels, coef_kd,
                          coef_hard, inv_t, beta, log_beta, log_1m_beta, DIV, HARD, SEPARATE)
        g_top = tl.load(G_TOP + rows64, mask=rows_in, other=0.0)
        grad = tl.where(rows_in[:, None] & (cols[None, :] == top[:, None]), g_top[:, None], grad)
        bias_grad += tl.sum(grad, axis=0)
        if NEED_DW:
            for k0 in range(0, width_s, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_in = ks < width_s
                h = tl.load(H_S + rows64[:, None] * stride_hs + ks[None, :], mask=rows_in[:, None] & k_in[None, :],
                            other=0.0)
                inside = cols_in[:, None] & k_in[None, :]
                out = DW + cols64[:, None] * width_s + ks[None, :]
                partial = _grad_dot(tl.trans(grad), h, DOT, ROUND, PRECISION)
                tl.store(out, tl.load(out, mask=inside, other=0.0) + partial, mask=inside)
            tl.debug_barrier()  # this row block's dW writes are seen by the next one's reads
    tl.store(DB + cols64, bias_grad, mask=cols_in)


# ---- host side ----

def _dot_class(h_s, w_s, h_t, w_t) -> str:
    """The dtype class of the kernels' dot operands: the student's, and a projected teacher's."""
    return dtype_class(*(x for x in (h_s, w_s, h_t, w_t) if x is not None))


def _contiguous(x):
    return x.contiguous() if x is not None else None


def _launch(h_s, w_s, b_s, teacher, rows, labels, stats, top, teacher_id, divergence_id, beta, temperature,
            kd_value, hard_value):
    """The pointer and size arguments the three kernels share, and a function of a kernel's CONFIGS
    name giving its constexprs and launch configuration."""
    h_t, w_t, b_t, logits, topk_values, topk_indices, fill = (_contiguous(x) for x in teacher)
    h_s, w_s, b_s = (_contiguous(x) for x in (h_s, w_s, b_s))
    dummy = rows  # any pointer: never read when its constexpr flag is off
    cls = _dot_class(h_s, w_s, h_t, w_t)
    interior_beta = 0.0 < beta < 1.0
    pointers = (h_s, w_s, b_s if b_s is not None else dummy, h_t if h_t is not None else dummy,
                w_t if w_t is not None else dummy, b_t if b_t is not None else dummy,
                logits if logits is not None else dummy, topk_values if topk_values is not None else dummy,
                topk_indices if topk_indices is not None else dummy, fill if fill is not None else dummy,
                labels.contiguous() if labels is not None else dummy, rows, stats, top)
    sizes = (rows.numel(), h_s.shape[0], w_s.shape[0], h_s.shape[1], h_t.shape[1] if h_t is not None else 0,
             topk_indices.shape[1] if topk_indices is not None else 0, h_s.stride(0), w_s.stride(0),
             h_t.stride(0) if h_t is not None else 0, w_t.stride(0) if w_t is not None else 0,
             logits.stride(0) if logits is not None else 0,
             1.0 / temperature, beta, math.log(beta) if interior_beta else 0.0,
             math.log1p(-beta) if interior_beta else 0.0, kd_value, hard_value)
    meta = dict(DIV=divergence_id, TEACHER=teacher_id, HAS_BIAS_S=b_s is not None, HAS_BIAS_T=b_t is not None,
                HARD=hard_value != 0.0, SEPARATE=hard_value != 0.0 and temperature != 1.0,
                **operand_meta(cls))

    def meta_of(kernel: str) -> dict:
        return dict(meta, **lookup(CONFIGS, kernel, cls, h_s.device).meta())

    return pointers, sizes, meta_of


def vocab_forward(h_s, w_s, b_s, teacher, rows, labels, teacher_id, divergence_id, beta, temperature, kd_value,
                  hard_value):
    """(loss fp32 scalar, statistics (len(STAT_NAMES), N) fp32, each row's student top word (N,) int32).

    teacher: (h_t, w_t, b_t, logits, topk_values, topk_indices, fill), None where not given;
    rows: the selected rows (n,) int64."""
    n_rows = h_s.shape[0]
    stats = torch.zeros(len(STAT_NAMES), n_rows, device=h_s.device, dtype=torch.float32)
    top = torch.zeros(n_rows, device=h_s.device, dtype=torch.int32)
    if rows.numel() == 0:
        return stats.new_zeros(()), stats, top
    pointers, sizes, meta_of = _launch(h_s, w_s, b_s, teacher, rows, labels, stats, top, teacher_id, divergence_id,
                                       beta, temperature, kd_value, hard_value)
    meta = meta_of("fwd")
    with _quiet_masked_lanes():
        _vocab_fwd_kernel[(triton.cdiv(rows.numel(), meta["BLOCK_M"]),)](*pointers, *sizes, **meta)
    return stats[ROW_LOSS].sum() / rows.numel(), stats, top


def vocab_backward(h_s, w_s, b_s, teacher, rows, labels, stats, top, grad_loss, teacher_id, divergence_id, beta,
                   temperature, kd_value, hard_value, needs):
    """(dL/dh_s, dL/dw_s, dL/db_s) fp32 (zeros where not needed) from the forward's statistics."""
    device = h_s.device
    n_rows, width_s = h_s.shape
    vocab = w_s.shape[0]
    grad_h = torch.zeros(n_rows, width_s, device=device, dtype=torch.float32)
    grad_w = torch.zeros(vocab, width_s, device=device, dtype=torch.float32) if needs[1] else grad_h
    grad_b = torch.zeros(vocab, device=device, dtype=torch.float32)
    n_sel = rows.numel()
    if n_sel == 0 or not any(needs):
        return grad_h, grad_w, grad_b
    # G's coefficients on the device (no read-back of grad_loss): kd_value / (n T) and hard_value / n.
    coef = grad_loss.to(torch.float32).reshape(1) * torch.tensor(
        [kd_value / (n_sel * temperature), hard_value / n_sel], device=device, dtype=torch.float32)
    g_top = torch.zeros(n_rows, device=device, dtype=torch.float32)
    pointers, sizes, meta_of = _launch(h_s, w_s, b_s, teacher, rows, labels, stats, top, teacher_id, divergence_id,
                                       beta, temperature, kd_value, hard_value)
    with _quiet_masked_lanes():
        meta = meta_of("bwd_dh")
        _vocab_bwd_dh_kernel[(triton.cdiv(n_sel, meta["BLOCK_M"]),)](
            *pointers, coef, grad_h, g_top, *sizes, **meta, NEED_DH=bool(needs[0]))
        if needs[1] or needs[2]:  # after the dh kernel: it reads the G_sigma that one saved
            meta = meta_of("bwd_dw")
            _vocab_bwd_dw_kernel[(triton.cdiv(vocab, meta["BLOCK_V"]),)](
                *pointers, coef, g_top, grad_w, grad_b, *sizes, **meta, NEED_DW=bool(needs[1]))
    return grad_h, grad_w, grad_b


# tools/triton_aot.py compiles every CONFIGS entry of these kernels at their heaviest variant (jsd: a
# second sweep in the forward and the most live values in the backward; a projected teacher: a second
# K-loop per tile; both biases; the hard term at T != 1: a third running sum) and at every other
# divergence, teacher kind, bias and hard-label setting the dispatch launches.
_POINTERS = {"H_S": "in", "W_S": "in", "B_S": "in", "H_T": "in", "W_T": "in", "B_T": "in", "T_LOGITS": "in",
             "TOPK_VAL": "in", "TOPK_IDX": "*i64", "LABELS": "*i64", "ROW_IDX": "*i64", "TOP": "*i32"}
_SCALARS = dict.fromkeys(("inv_t", "beta", "log_beta", "log_1m_beta", "kd_value", "hard_value"), "fp32")
_HEAVIEST = {"DIV": JSD, "TEACHER": PROJECTED, "HAS_BIAS_S": True, "HAS_BIAS_T": True, "HARD": True,
             "SEPARATE": True, "NEED_DH": True, "NEED_DW": True}
_OTHER_VARIANTS = (
    *[(name, {"DIV": VOCAB_DIVERGENCE_IDS[name]}) for name in ("kl", "soft_ce", "reverse_kl")],
    *[(f"jsd,{name}", {"TEACHER": VOCAB_TEACHER_IDS[name], "HAS_BIAS_T": False}) for name in ("logits", "topk")],
    ("no biases", {"HAS_BIAS_S": False, "HAS_BIAS_T": False}),
    ("hard at T=1", {"SEPARATE": False}),
    ("no hard term", {"HARD": False, "SEPARATE": False}),
)
# The backward kernels also run without their GEMM (only db_s, or only dW_s with db_s, wanted).
_WITHOUT_GEMM = {"bwd_dh": (("no dh", {"NEED_DH": False}),), "bwd_dw": (("no dW", {"NEED_DW": False}),)}
AOT_KERNELS = [
    AotKernel(fn=fn, table_key=key, label="jsd,projected,hard", pointers=_POINTERS, scalars=_SCALARS,
              variant_meta=_HEAVIEST, variants=_OTHER_VARIANTS + _WITHOUT_GEMM.get(key, ()))
    for fn, key in ((_vocab_fwd_kernel, "fwd"), (_vocab_bwd_dh_kernel, "bwd_dh"), (_vocab_bwd_dw_kernel, "bwd_dw"))
]
