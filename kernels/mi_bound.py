r"""Triton kernels of the MI lower bounds (math and gradient formulas: pykd/ops/mi_bound.py).

Forward, one program per block of rows, streaming over column tiles of S = scale a b^T:
pass 1 keeps, per row, the largest negative (score and column) and the sum of e^{S_ik - top}
over the other negatives, which give LSE'_i and, for alpha, every leave-one-out sum without a
subtraction that could cancel; for alpha, pass 2 recomputes the tiles to sum the value's terms,
N dI/dS_ii, N dI/dq_i and V_i. Each row stores what its gradient needs (STAT_NAMES).
Backward recomputes G tile by tile from those statistics: dA row-parallel, dB column-parallel,
so no atomics. Loads are upcast to fp32; statistics are fp32. Score dots take their operands in the
dtype class's dtype (kernels/configs.py: 16-bit inputs straight to the tensor cores, fp32 ones in
tf32x3); the dots with G keep it fp32 (G ~ 1/(n (n - 1)) underflows fp16 for n in the thousands).
Launch configurations: CONFIGS below, one entry per kernel, dtype class, architecture and
embedding-width bucket.
"""
import math

import torch
import triton
import triton.language as tl

from .configs import AotKernel, as_operand, dtype_class, lookup, operand_meta, table
from .ids import MI_BOUND_IDS

INFONCE, NWJ, TUBA, JS, ALPHA = (MI_BOUND_IDS[name] for name in ("infonce", "nwj", "tuba", "js", "alpha"))
MAX_EMBED = 256
_INFONCE = tl.constexpr(INFONCE)
_JS = tl.constexpr(JS)
_ALPHA = tl.constexpr(ALPHA)
_TUBA = tl.constexpr(TUBA)
_NEG_BIG = tl.constexpr(-1.0e30)
# Alpha at an endpoint takes one branch of the interpolation exactly (no log 0).
ALPHA_ZERO, ALPHA_ONE, ALPHA_INTERIOR = 0, 1, 2
_ALPHA_ZERO = tl.constexpr(ALPHA_ZERO)
_ALPHA_ONE = tl.constexpr(ALPHA_ONE)
# Rows of the per-row statistics buffer (n_rows wide): the value's parts, dI/dq and what the
# backward needs. The top negative's column is stored as fp32, exact below 2^24 columns.
STAT_NAMES = ("joint", "log_marg", "grad_q", "g_diag", "lse", "base", "top", "top_col", "rest", "s_diag",
              "log_first", "log_second", "v_sum")
MAX_COLUMNS = 2**24
_JOINT, _LOG_MARG, _GRAD_Q, _G_DIAG, _LSE, _BASE, _TOP, _TOP_COL, _REST, _S_DIAG = (
    tl.constexpr(k) for k in range(10))
_LOG_FIRST, _LOG_SECOND, _V_SUM = (tl.constexpr(k) for k in range(10, 13))

MI_KERNELS = ("fwd", "bwd_da", "bwd_db")
WIDTH_BUCKETS = (64, 128, 256)  # the padded embedding width, at least 64
# The grids run over row blocks (forward, dA) or column blocks (dB) only, so the parallel tile is
# at most 32 wide: n = 4096 then gives 128 programs for an H100's 132 SMs (64-row tiles, which
# Hopper's warp-group MMA needs, would leave half of them idle below n = 8448). The kernels are
# bound by their special functions, not their dots (bench/results/gpu_roofline.md), so mma.sync
# costs little. fp32 at e = 256: the row tile's tf32x3 hi/lo parts fill the registers (16 rows x
# 256 x 2 / 32 lanes = 256 per thread), so some entries keep the least-spilling tile.
_FP32_WIDE = "fp32 (tf32x3) at e = 256: the row tile's hi/lo parts exceed the register file"
CONFIGS = table(("BLOCK_M", "BLOCK_N"), [
    *[(kernel, "any", "interpreter", None, 16, 16, 4, 1) for kernel in MI_KERNELS],
    # kernel   class  arch     width  BLOCK_M BLOCK_N warps stages
    *[row for cls in ("bf16", "fp16") for row in (
        *[("fwd", cls, arch, width, 32, 64, 4, 2) for arch in ("sm_80", "sm_90") for width in WIDTH_BUCKETS],
        ("bwd_da", cls, "sm_90", 64, 32, 32, 4, 2),
        ("bwd_da", cls, "sm_90", 128, 32, 64, 4, 2),
        ("bwd_da", cls, "sm_90", 256, 32, 32, 4, 2),
        ("bwd_da", cls, "sm_80", 64, 32, 64, 4, 2),
        ("bwd_da", cls, "sm_80", 128, 32, 64, 4, 2),
        ("bwd_da", cls, "sm_80", 256, 16, 64, 4, 1),
        ("bwd_db", cls, "sm_90", 64, 64, 32, 4, 2),
        ("bwd_db", cls, "sm_90", 128, 64, 32, 4, 2),
        ("bwd_db", cls, "sm_90", 256, 32, 32, 4, 1),
        *[("bwd_db", cls, "sm_80", width, 64, 32, 4, 2) for width in WIDTH_BUCKETS],
    )],
    ("fwd", "fp32", "sm_90", 64, 32, 64, 4, 2),
    ("fwd", "fp32", "sm_90", 128, 16, 64, 4, 1),
    ("fwd", "fp32", "sm_90", 256, 16, 32, 4, 1),
    ("fwd", "fp32", "sm_80", 64, 32, 32, 4, 2),
    ("fwd", "fp32", "sm_80", 128, 16, 32, 4, 1),
    ("fwd", "fp32", "sm_80", 256, 16, 32, 4, 1, _FP32_WIDE),
    ("bwd_da", "fp32", "sm_90", 64, 32, 64, 4, 2),
    ("bwd_da", "fp32", "sm_90", 128, 16, 32, 4, 1),
    ("bwd_da", "fp32", "sm_90", 256, 16, 16, 8, 1, _FP32_WIDE),
    ("bwd_da", "fp32", "sm_80", 64, 32, 32, 4, 2),
    ("bwd_da", "fp32", "sm_80", 128, 16, 32, 4, 1),
    ("bwd_da", "fp32", "sm_80", 256, 16, 16, 8, 1, _FP32_WIDE),
    ("bwd_db", "fp32", "sm_90", 64, 64, 32, 4, 2),
    ("bwd_db", "fp32", "sm_90", 128, 32, 16, 4, 1),
    ("bwd_db", "fp32", "sm_90", 256, 16, 16, 8, 1, _FP32_WIDE),
    ("bwd_db", "fp32", "sm_80", 64, 64, 32, 4, 1),
    ("bwd_db", "fp32", "sm_80", 128, 32, 16, 4, 1),
    ("bwd_db", "fp32", "sm_80", 256, 16, 16, 8, 1, _FP32_WIDE),
])

@triton.jit
def _load_rows(ptr, rows, n, e, BLOCK_E: tl.constexpr):
    cols = tl.arange(0, BLOCK_E)
    inside = (rows[:, None] < n) & (cols[None, :] < e)
    return tl.load(ptr + rows[:, None] * e + cols[None, :], mask=inside, other=0.0).to(tl.float32)


@triton.jit
def _scores(a, b, scale, DOT: tl.constexpr, ROUND: tl.constexpr, PRECISION: tl.constexpr):
    """scale a b^T for fp32 tiles a (rows, e) and b (columns, e), as tensor-core operands of the class dtype."""
    return tl.dot(as_operand(a, DOT, ROUND), tl.trans(as_operand(b, DOT, ROUND)), input_precision=PRECISION) * scale


@triton.jit
def _logaddexp(x, y):
    hi = tl.maximum(x, y)
    return hi + tl.log(1.0 + tl.exp(tl.minimum(x, y) - hi))


@triton.jit
def _logaddexp_shares(x, y):
    """log(e^x + e^y) and the shares e^{x - log}, e^{y - log} from one exp: with e = e^{-|x - y|} the
    larger argument's share is 1/(1 + e), the smaller's e/(1 + e)."""
    hi = tl.maximum(x, y)
    e = tl.exp(tl.minimum(x, y) - hi)
    big = 1.0 / (1.0 + e)
    x_high = x >= y
    return hi + tl.log(1.0 + e), tl.where(x_high, big, e * big), tl.where(x_high, e * big, big)


@triton.jit
def _interpolate(m, q, log_alpha, log_one_minus_alpha, ALPHA_MODE: tl.constexpr):
    """u = log(alpha e^m + (1-alpha) e^q), w = du/dm and 1 - w, each formed as e^{. - u}."""
    if ALPHA_MODE == _ALPHA_ZERO:
        u = q + 0.0 * m
        w = 0.0 * m
        one_minus_w = 1.0 + 0.0 * m
    elif ALPHA_MODE == _ALPHA_ONE:
        u = m
        w = 1.0 + 0.0 * m
        one_minus_w = 0.0 * m
    else:
        u, w, one_minus_w = _logaddexp_shares(m + log_alpha, q + log_one_minus_alpha)
    return u, w, one_minus_w


@triton.jit
def _without(s, top, rest):
    """R_j = log sum_{k != i, j} e^{S_ik} for a negative j other than the row's top: the sum keeps
    e^{S_top}, so it never cancels."""
    return top + tl.log(1.0 + tl.maximum(rest - tl.exp(s - top), 0.0))


@triton.jit
def _loo_entry(without, s_diag, q, log_n1, log_alpha, log_one_minus_alpha, ALPHA_MODE: tl.constexpr):
    """u_j, w_j, 1 - w_j and e^{R_j - log A_j}, log A_j = log sum_{k != j} e^{S_ik} = logaddexp(S_ii, R_j)."""
    log_a, _, without_share = _logaddexp_shares(s_diag, without)
    u, w, one_minus_w = _interpolate(log_a - log_n1, q, log_alpha, log_one_minus_alpha, ALPHA_MODE)
    return u, w, one_minus_w, without_share


@triton.jit
def _grad_tile(s, cols, diag_cols, valid, STATS, rows, n_rows, q, n, log_n1, log_alpha, log_one_minus_alpha,
               BOUND: tl.constexpr, ALPHA_MODE: tl.constexpr):
    """G = dI/dS for one tile from the rows' statistics; zero outside the matrix."""
    inside = rows < n_rows
    g_diag = tl.load(STATS + _G_DIAG * n_rows + rows, mask=inside, other=0.0)
    pairs = n * (n - 1.0)
    if BOUND == _INFONCE:
        lse = tl.load(STATS + _LSE * n_rows + rows, mask=inside, other=0.0)
        g = -tl.exp(s - lse[:, None]) / n
    elif BOUND == _JS:
        g = -1.0 / (1.0 + tl.exp(-s)) / pairs
    elif BOUND == _ALPHA:
        top = tl.load(STATS + _TOP * n_rows + rows, mask=inside, other=0.0)[:, None]
        top_col = tl.load(STATS + _TOP_COL * n_rows + rows, mask=inside, other=-1.0).to(tl.int32)
        log_second = tl.load(STATS + _LOG_SECOND * n_rows + rows, mask=inside, other=0.0)[:, None]
        g = 0.0 * s
        g_top = 0.0 * top
        if ALPHA_MODE != _ALPHA_ZERO:
            rest = tl.load(STATS + _REST * n_rows + rows, mask=inside, other=0.0)[:, None]
            s_diag = tl.load(STATS + _S_DIAG * n_rows + rows, mask=inside, other=0.0)[:, None]
            log_first = tl.load(STATS + _LOG_FIRST * n_rows + rows, mask=inside, other=0.0)[:, None]
            v_sum = tl.load(STATS + _V_SUM * n_rows + rows, mask=inside, other=0.0)[:, None]
            u, w, one_minus_w, _ = _loo_entry(_without(s, top, rest), s_diag, q[:, None], log_n1, log_alpha,
                                              log_one_minus_alpha, ALPHA_MODE)
            t = tl.exp(top + (log_alpha - log_n1) - u)
            g = tl.exp(s + log_first) + tl.exp(s - top) * tl.maximum(v_sum - t, 0.0)
            g_top = v_sum
        if ALPHA_MODE != _ALPHA_ONE:
            g += tl.exp(s + log_second)
            g_top += tl.exp(top + log_second)
        g = -tl.where(cols[None, :] == top_col[:, None], g_top, g) / pairs
    else:
        c = tl.load(STATS + _BASE * n_rows + rows, mask=inside, other=0.0)
        g = -tl.exp(s - c[:, None]) / pairs
    return tl.where(valid, tl.where(cols[None, :] == diag_cols[:, None], g_diag[:, None], g), 0.0)


@triton.jit
def _off_diagonal_stats(a, B, rows, diag_cols, n, e, scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_E: tl.constexpr, DOT: tl.constexpr, ROUND: tl.constexpr, PRECISION: tl.constexpr):
    """Per row: the largest negative (score and column) and the sum of e^{S_ik - top} over the
    other negatives, streamed over column tiles."""
    top = tl.full([BLOCK_M], _NEG_BIG, tl.float32)
    top_col = tl.zeros([BLOCK_M], tl.int32)
    rest = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, n, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        s = _scores(a, _load_rows(B, cols, n, e, BLOCK_E), scale, DOT, ROUND, PRECISION)
        s_off = tl.where((cols < n)[None, :] & (cols[None, :] != diag_cols[:, None]), s, float("-inf"))
        tile_top = tl.max(s_off, axis=1)
        tile_col = start + tl.argmax(s_off, axis=1)
        new_top = tl.maximum(top, tile_top)
        tile_rest = tl.sum(tl.where(cols[None, :] == tile_col[:, None], 0.0, tl.exp(s_off - new_top[:, None])), axis=1)
        # The loser of the old top and the tile's top joins the rest.
        rest = rest * tl.exp(top - new_top) + tile_rest + tl.exp(tl.minimum(top, tile_top) - new_top)
        top_col = tl.where(tile_top > top, tile_col, top_col)
        top = new_top
    return top, top_col, rest


@triton.jit
def _mi_fwd_kernel(
    A, B, LOG_Q, STATS,
    n_rows, n, diag_offset, e, scale, log_n1, log_alpha, log_one_minus_alpha,
    BOUND: tl.constexpr, ALPHA_MODE: tl.constexpr, HAS_Q: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, DOT: tl.constexpr, ROUND: tl.constexpr,
    PRECISION: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = rows < n_rows
    diag_cols = rows + diag_offset
    a = _load_rows(A, rows, n_rows, e, BLOCK_E)
    s_diag = tl.sum(a * _load_rows(B, diag_cols, n, e, BLOCK_E), axis=1) * scale
    if HAS_Q:
        q = tl.load(LOG_Q + rows, mask=row_in, other=0.0).to(tl.float32)
    else:
        q = tl.zeros([BLOCK_M], tl.float32)

    top, top_col, rest = _off_diagonal_stats(a, B, rows, diag_cols, n, e, scale, BLOCK_M, BLOCK_N, BLOCK_E, DOT, ROUND,
                                             PRECISION)
    log_off = top + tl.log(1.0 + rest)  # LSE'_i
    lse = _logaddexp(s_diag, log_off)

    count = n * 1.0
    pairs = count * (count - 1.0)
    zero = tl.zeros([BLOCK_M], tl.float32)
    c = zero
    log_first = zero
    log_second = zero
    v_sum = zero
    if BOUND == _INFONCE:
        # S_ii - LSE_i = -softplus(LSE'_i - S_ii); dI/dS_ii = (1 - p_ii)/n = e^{LSE' - LSE}/n.
        x = log_off - s_diag
        joint = -(tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x))))
        log_marg = zero
        grad_q = zero
        g_diag = tl.exp(log_off - lse) / count
    elif BOUND == _ALPHA:
        log_scale = log_alpha - log_n1
        sum_joint = zero
        sum_g_diag = zero
        sum_one_minus_w = zero
        for start in range(0, n, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            s = _scores(a, _load_rows(B, cols, n, e, BLOCK_E), scale, DOT, ROUND, PRECISION)
            others = (cols < n)[None, :] & (cols[None, :] != diag_cols[:, None]) & (cols[None, :] != top_col[:, None])
            without = _without(s, top[:, None], rest[:, None])
            u, w, one_minus_w, without_share = _loo_entry(without, s_diag[:, None], q[:, None], log_n1, log_alpha,
                                                          log_one_minus_alpha, ALPHA_MODE)
            sum_joint += tl.sum(tl.where(others, s_diag[:, None] - u, 0.0), axis=1)
            sum_g_diag += tl.sum(tl.where(others, one_minus_w + w * without_share, 0.0), axis=1)
            sum_one_minus_w += tl.sum(tl.where(others, one_minus_w, 0.0), axis=1)
            if ALPHA_MODE != _ALPHA_ZERO:
                v_sum += tl.sum(tl.where(others, tl.exp(top[:, None] + log_scale - u), 0.0), axis=1)
        without_top = top + tl.log(rest)  # -inf when the top is the only negative
        u_top, w_top, one_minus_w_top, without_share_top = _loo_entry(without_top, s_diag, q, log_n1, log_alpha,
                                                                       log_one_minus_alpha, ALPHA_MODE)
        u_own, w_own, one_minus_w_own = _interpolate(log_off - log_n1, q, log_alpha, log_one_minus_alpha,
                                                     ALPHA_MODE)
        log_first = log_scale - u_top
        log_second = log_one_minus_alpha + q - 2.0 * u_own
        g_diag = (sum_g_diag + one_minus_w_top + w_top * without_share_top) / pairs
        joint = sum_joint + (s_diag - u_top)
        log_marg = log_off - u_own
        if ALPHA_MODE == _ALPHA_ONE:
            marginal_q = zero
        else:
            marginal_q = tl.exp(log_off + log_second)  # M_i (1 - w_ii)
        grad_q = (marginal_q - sum_one_minus_w - one_minus_w_top) / pairs
    else:
        if BOUND == _TUBA:
            c = q
        else:
            c = 1.0 + zero
        joint = s_diag - c
        log_marg = log_off - c
        grad_q = -1.0 / count + tl.exp(log_marg) / pairs
        if BOUND == _JS:
            g_diag = 1.0 / (1.0 + tl.exp(s_diag)) / count
        else:
            g_diag = 1.0 / count + zero

    tl.store(STATS + _JOINT * n_rows + rows, joint, mask=row_in)
    tl.store(STATS + _LOG_MARG * n_rows + rows, log_marg, mask=row_in)
    tl.store(STATS + _GRAD_Q * n_rows + rows, grad_q, mask=row_in)
    tl.store(STATS + _G_DIAG * n_rows + rows, g_diag, mask=row_in)
    tl.store(STATS + _LSE * n_rows + rows, lse, mask=row_in)
    tl.store(STATS + _BASE * n_rows + rows, c, mask=row_in)
    tl.store(STATS + _TOP * n_rows + rows, top, mask=row_in)
    tl.store(STATS + _TOP_COL * n_rows + rows, top_col.to(tl.float32), mask=row_in)
    tl.store(STATS + _REST * n_rows + rows, rest, mask=row_in)
    tl.store(STATS + _S_DIAG * n_rows + rows, s_diag, mask=row_in)
    tl.store(STATS + _LOG_FIRST * n_rows + rows, log_first, mask=row_in)
    tl.store(STATS + _LOG_SECOND * n_rows + rows, log_second, mask=row_in)
    tl.store(STATS + _V_SUM * n_rows + rows, v_sum, mask=row_in)


@triton.jit
def _load_q(LOG_Q, rows, n_rows, HAS_Q: tl.constexpr):
    if HAS_Q:
        q = tl.load(LOG_Q + rows, mask=rows < n_rows, other=0.0).to(tl.float32)
    else:
        q = tl.zeros(rows.shape, tl.float32)
    return q


@triton.jit
def _mi_bwd_da_kernel(
    A, B, LOG_Q, STATS, GRAD_OUT, DA,
    n_rows, n, diag_offset, e, scale, log_n1, log_alpha, log_one_minus_alpha,
    BOUND: tl.constexpr, ALPHA_MODE: tl.constexpr, HAS_Q: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, DOT: tl.constexpr, ROUND: tl.constexpr,
    PRECISION: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    a = _load_rows(A, rows, n_rows, e, BLOCK_E)
    q = _load_q(LOG_Q, rows, n_rows, HAS_Q)
    acc = tl.zeros([BLOCK_M, BLOCK_E], tl.float32)
    for start in range(0, n, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        b = _load_rows(B, cols, n, e, BLOCK_E)
        s = _scores(a, b, scale, DOT, ROUND, PRECISION)
        valid = (rows[:, None] < n_rows) & (cols[None, :] < n)
        g = _grad_tile(s, cols, rows + diag_offset, valid, STATS, rows, n_rows, q, n * 1.0, log_n1, log_alpha,
                       log_one_minus_alpha, BOUND, ALPHA_MODE)
        acc += tl.dot(g, b, input_precision=PRECISION)
    acc = acc * (scale * tl.load(GRAD_OUT).to(tl.float32))
    cols_e = tl.arange(0, BLOCK_E)
    tl.store(DA + rows[:, None] * e + cols_e[None, :], acc.to(DA.dtype.element_ty),
             mask=(rows[:, None] < n_rows) & (cols_e[None, :] < e))


@triton.jit
def _mi_bwd_db_kernel(
    A, B, LOG_Q, STATS, GRAD_OUT, DB,
    n_rows, n, diag_offset, e, scale, log_n1, log_alpha, log_one_minus_alpha,
    BOUND: tl.constexpr, ALPHA_MODE: tl.constexpr, HAS_Q: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, DOT: tl.constexpr, ROUND: tl.constexpr,
    PRECISION: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    b = _load_rows(B, cols, n, e, BLOCK_E)
    acc = tl.zeros([BLOCK_N, BLOCK_E], tl.float32)
    for start in range(0, n_rows, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        a = _load_rows(A, rows, n_rows, e, BLOCK_E)
        q = _load_q(LOG_Q, rows, n_rows, HAS_Q)
        s = _scores(a, b, scale, DOT, ROUND, PRECISION)
        valid = (rows[:, None] < n_rows) & (cols[None, :] < n)
        g = _grad_tile(s, cols, rows + diag_offset, valid, STATS, rows, n_rows, q, n * 1.0, log_n1, log_alpha,
                       log_one_minus_alpha, BOUND, ALPHA_MODE)
        acc += tl.dot(tl.trans(g), a, input_precision=PRECISION)
    acc = acc * (scale * tl.load(GRAD_OUT).to(tl.float32))
    cols_e = tl.arange(0, BLOCK_E)
    tl.store(DB + cols[:, None] * e + cols_e[None, :], acc.to(DB.dtype.element_ty),
             mask=(cols[:, None] < n) & (cols_e[None, :] < e))


def _alpha_mode(alpha: float) -> int:
    return ALPHA_ZERO if alpha == 0.0 else ALPHA_ONE if alpha == 1.0 else ALPHA_INTERIOR


def _scalars(n_rows, n, diag_offset, scale, alpha):
    return dict(
        n_rows=n_rows, n=n, diag_offset=diag_offset, scale=scale, log_n1=math.log(n - 1),
        log_alpha=math.log(alpha) if alpha > 0 else 0.0,
        log_one_minus_alpha=math.log1p(-alpha) if alpha < 1 else 0.0,
    )


def width_bucket(embed: int) -> int:
    """The CONFIGS bucket of an embedding width: its padded width, at least 64."""
    return max(64, triton.next_power_of_2(embed))


def _meta(kernel, a, b, log_q, bound_id, alpha):
    embed = a.shape[1]
    if embed > MAX_EMBED:
        raise ValueError(f"the Triton path supports embeddings up to {MAX_EMBED} wide, got a of shape "
                         f"{tuple(a.shape)}")
    if b.shape[0] >= MAX_COLUMNS:
        raise ValueError(f"the Triton path supports fewer than {MAX_COLUMNS} columns, got b of shape "
                         f"{tuple(b.shape)}")
    cls = dtype_class(a, b)
    chosen = lookup(CONFIGS, kernel, cls, a.device, width_bucket(embed))
    return dict(BOUND=bound_id, ALPHA_MODE=_alpha_mode(alpha), HAS_Q=log_q is not None,
                BLOCK_E=max(16, triton.next_power_of_2(embed)), **operand_meta(cls), **chosen.meta())


def bound_forward(a, b, log_q, bound_id, alpha, scale, diag_offset=0):
    """Rows a (n_rows, e) against columns b (n, e), row r's positive in column diag_offset + r.

    Returns the block's parts of the value (float64 joint sum, per-row log marginal terms) and the
    (len(STAT_NAMES), n_rows) statistics the backward reads (dI/dq among them).
    """
    a, b = a.contiguous(), b.contiguous()
    n_rows, embed = a.shape
    stats = torch.empty(len(STAT_NAMES), n_rows, device=a.device, dtype=torch.float32)
    meta = _meta("fwd", a, b, log_q, bound_id, alpha)
    q = log_q.contiguous() if log_q is not None else stats  # any pointer: unread without HAS_Q
    _mi_fwd_kernel[(triton.cdiv(n_rows, meta["BLOCK_M"]),)](
        a, b, q, stats, e=embed, **_scalars(n_rows, b.shape[0], diag_offset, scale, alpha), **meta)
    return stats[STAT_NAMES.index("joint")].double().sum(), stats[STAT_NAMES.index("log_marg")], stats


def bound_backward(a, b, log_q, stats, grad_output, bound_id, alpha, scale, diag_offset=0):
    """(dI/da, dI/db, dI/dlog_q) in the inputs' dtypes; dI/dlog_q is None without log_q."""
    a, b = a.contiguous(), b.contiguous()
    n_rows, embed = a.shape
    grad_output = grad_output.to(torch.float32).reshape(1).contiguous()
    grad_a, grad_b = torch.empty_like(a), torch.empty_like(b)
    q = log_q.contiguous() if log_q is not None else stats
    common = (a, b, q, stats.contiguous(), grad_output)
    scalars = dict(e=embed, **_scalars(n_rows, b.shape[0], diag_offset, scale, alpha))
    meta = _meta("bwd_da", a, b, log_q, bound_id, alpha)
    _mi_bwd_da_kernel[(triton.cdiv(n_rows, meta["BLOCK_M"]),)](*common, grad_a, **scalars, **meta)
    meta = _meta("bwd_db", a, b, log_q, bound_id, alpha)
    _mi_bwd_db_kernel[(triton.cdiv(b.shape[0], meta["BLOCK_N"]),)](*common, grad_b, **scalars, **meta)
    grad_q = stats[STAT_NAMES.index("grad_q")]
    grad_log_q = (grad_q * grad_output).to(log_q.dtype) if log_q is not None else None
    return grad_a, grad_b, grad_log_q


# tools/triton_aot.py compiles every CONFIGS entry of these kernels at their heaviest bound (alpha
# strictly inside (0, 1) with a log-baseline) and at the other bounds, embeddings as wide as the bucket.
_POINTERS = {"A": "in", "B": "in", "LOG_Q": "in", "DA": "in", "DB": "in"}
_SCALARS = {"scale": "fp32", "log_n1": "fp32", "log_alpha": "fp32", "log_one_minus_alpha": "fp32"}
_OTHER_BOUNDS = (
    *[(name, {"BOUND": MI_BOUND_IDS[name], "ALPHA_MODE": ALPHA_INTERIOR, "HAS_Q": False})
      for name in ("infonce", "nwj", "js")],
    ("tuba,q", {"BOUND": TUBA, "ALPHA_MODE": ALPHA_INTERIOR, "HAS_Q": True}),
    ("alpha=0,q", {"BOUND": ALPHA, "ALPHA_MODE": ALPHA_ZERO, "HAS_Q": True}),
    ("alpha=1", {"BOUND": ALPHA, "ALPHA_MODE": ALPHA_ONE, "HAS_Q": False}),
    ("alpha", {"BOUND": ALPHA, "ALPHA_MODE": ALPHA_INTERIOR, "HAS_Q": False}),
)
AOT_KERNELS = [
    AotKernel(fn=fn, table_key=key, label="alpha,q", pointers=_POINTERS, scalars=_SCALARS,
              variant_meta={"BOUND": ALPHA, "ALPHA_MODE": ALPHA_INTERIOR, "HAS_Q": True},
              bucket_meta={width: {"BLOCK_E": width} for width in WIDTH_BUCKETS}, variants=_OTHER_BOUNDS)
    for fn, key in ((_mi_fwd_kernel, "fwd"), (_mi_bwd_da_kernel, "bwd_da"), (_mi_bwd_db_kernel, "bwd_db"))
]
