r"""Triton kernels of the MI lower bounds (math and gradient formulas: pykd/ops/mi_bound.py).

Forward, one program per block of rows, streaming over column tiles of S = scale a b^T:
pass 1 keeps online log-sum-exps of each row over all columns and over the off-diagonal ones;
for alpha, pass 2 recomputes the tiles to sum the leave-one-out terms u_ij, w_ij r_ij and
1 - w_ij. Each row then stores what its gradient needs: LSE_i, the coefficient of p_ik in
G_ik, the diagonal entry G_ii and the baseline c_i, plus its parts of the value and dI/dq_i.
Backward recomputes G tile by tile from those statistics: dA row-parallel, dB column-parallel,
so no atomics. Loads are upcast to fp32; products and statistics are fp32.
"""
import math

import torch
import triton
import triton.language as tl

from .attention_relation import NUM_WARPS, block_sizes, dot_precision

INFONCE, NWJ, TUBA, JS, ALPHA = 0, 1, 2, 3, 4
MAX_EMBED = 256
_INFONCE = tl.constexpr(INFONCE)
_JS = tl.constexpr(JS)
_ALPHA = tl.constexpr(ALPHA)
_TUBA = tl.constexpr(TUBA)
_NEG_BIG = tl.constexpr(-1.0e30)
_LOG_E_MINUS_1 = tl.constexpr(math.log(math.e - 1.0))
# Alpha at an endpoint takes one branch of the interpolation exactly (no log 0).
ALPHA_ZERO, ALPHA_ONE, ALPHA_INTERIOR = 0, 1, 2
_ALPHA_ZERO = tl.constexpr(ALPHA_ZERO)
_ALPHA_ONE = tl.constexpr(ALPHA_ONE)


@triton.jit
def _load_rows(ptr, rows, n, e, BLOCK_E: tl.constexpr):
    cols = tl.arange(0, BLOCK_E)
    inside = (rows[:, None] < n) & (cols[None, :] < e)
    return tl.load(ptr + rows[:, None] * e + cols[None, :], mask=inside, other=0.0).to(tl.float32)


@triton.jit
def _one_minus_exp_neg(d):
    """1 - e^{-d} = -expm1(-d), with a series where the subtraction would cancel."""
    series = d * (1.0 - d * (0.5 - d * (1.0 / 6.0 - d * (1.0 / 24.0))))
    return tl.where(d < 1.0e-2, series, 1.0 - tl.exp(-d))


@triton.jit
def _loo_terms(s, lse, q, log_n1, log_alpha, log_one_minus_alpha, ALPHA_MODE: tl.constexpr):
    """u = log(alpha e^m + (1-alpha) e^q), w = du/dm, r = 1/(1-p) (0 where d = 0), for entries s."""
    # d >= 0 in exact arithmetic; the diagonal's score comes from a row-wise sum, not the tile's
    # dot, so rounding can leave it a hair above LSE.
    d = tl.maximum(lse - s, 0.0)
    one_minus_p = _one_minus_exp_neg(d)
    guard = d == 0.0
    m = tl.where(guard, s + _LOG_E_MINUS_1 - log_n1, lse - log_n1 + tl.log(tl.where(guard, 1.0, one_minus_p)))
    r = tl.where(guard, 0.0, 1.0 / tl.where(guard, 1.0, one_minus_p))
    if ALPHA_MODE == _ALPHA_ZERO:
        u = q + 0.0 * s
        w = 0.0 * s
    elif ALPHA_MODE == _ALPHA_ONE:
        u = m
        w = 1.0 + 0.0 * s
    else:
        z = m + log_alpha
        y = q + log_one_minus_alpha
        hi = tl.maximum(z, y)
        u = hi + tl.log(1.0 + tl.exp(tl.minimum(z, y) - hi))
        w = 1.0 / (1.0 + tl.exp(y - z))
    return u, w, r


@triton.jit
def _grad_tile(s, is_diag, valid, lse, coef, g_diag, c, q, n, log_n1, log_alpha, log_one_minus_alpha,
               BOUND: tl.constexpr, ALPHA_MODE: tl.constexpr):
    """G = dI/dS for one tile from the rows' statistics; zero outside the matrix."""
    pairs = n * (n - 1.0)
    if BOUND == _INFONCE:
        g = -tl.exp(s - lse[:, None]) / n
    elif BOUND == _JS:
        g = -1.0 / (1.0 + tl.exp(-s)) / pairs
    elif BOUND == _ALPHA:
        u, w, r = _loo_terms(s, lse[:, None], q[:, None], log_n1, log_alpha, log_one_minus_alpha, ALPHA_MODE)
        g = -(w * (1.0 - r) + tl.exp(s - lse[:, None]) * coef[:, None]) / pairs
    else:
        g = -tl.exp(s - c[:, None]) / pairs
    return tl.where(valid, tl.where(is_diag, g_diag[:, None], g), 0.0)


@triton.jit
def _mi_fwd_kernel(
    A, B, LOG_Q, JOINT, LOG_MARG, GRAD_Q, LSE, COEF, G_DIAG, BASE,
    n_rows, n, diag_offset, e, scale, log_n1, log_alpha, log_one_minus_alpha,
    BOUND: tl.constexpr, ALPHA_MODE: tl.constexpr, HAS_Q: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, PRECISION: tl.constexpr,
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

    m_all = tl.full([BLOCK_M], _NEG_BIG, tl.float32)
    m_off = tl.full([BLOCK_M], _NEG_BIG, tl.float32)
    z_all = tl.zeros([BLOCK_M], tl.float32)
    z_off = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, n, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        s = tl.dot(a, tl.trans(_load_rows(B, cols, n, e, BLOCK_E)), input_precision=PRECISION) * scale
        s_all = tl.where((cols < n)[None, :], s, float("-inf"))
        s_off = tl.where(cols[None, :] == diag_cols[:, None], float("-inf"), s_all)
        m_all_new = tl.maximum(m_all, tl.max(s_all, axis=1))
        m_off_new = tl.maximum(m_off, tl.max(s_off, axis=1))
        z_all = z_all * tl.exp(m_all - m_all_new) + tl.sum(tl.exp(s_all - m_all_new[:, None]), axis=1)
        z_off = z_off * tl.exp(m_off - m_off_new) + tl.sum(tl.exp(s_off - m_off_new[:, None]), axis=1)
        m_all = m_all_new
        m_off = m_off_new
    lse = m_all + tl.log(z_all)
    log_off = m_off + tl.log(z_off)

    count = n * 1.0
    pairs = count * (count - 1.0)
    coef = tl.zeros([BLOCK_M], tl.float32)
    if BOUND == _INFONCE:
        c = coef
        joint = s_diag - lse
        log_marg = coef
        grad_q = coef
        g_diag = (1.0 - tl.exp(s_diag - lse)) / count
    elif BOUND == _ALPHA:
        c = coef
        sum_u = tl.zeros([BLOCK_M], tl.float32)
        sum_wr = tl.zeros([BLOCK_M], tl.float32)
        sum_one_minus_w = tl.zeros([BLOCK_M], tl.float32)
        for start in range(0, n, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            s = tl.dot(a, tl.trans(_load_rows(B, cols, n, e, BLOCK_E)), input_precision=PRECISION) * scale
            off = (cols < n)[None, :] & (cols[None, :] != diag_cols[:, None])
            u, w, r = _loo_terms(s, lse[:, None], q[:, None], log_n1, log_alpha, log_one_minus_alpha, ALPHA_MODE)
            sum_u += tl.sum(tl.where(off, u, 0.0), axis=1)
            sum_wr += tl.sum(tl.where(off, w * r, 0.0), axis=1)
            sum_one_minus_w += tl.sum(tl.where(off, 1.0 - w, 0.0), axis=1)
        u_ii, w_ii, r_ii = _loo_terms(s_diag, lse, q, log_n1, log_alpha, log_one_minus_alpha, ALPHA_MODE)
        marg = tl.exp(log_off - u_ii)
        big_k = marg * w_ii
        coef = sum_wr + tl.exp(lse - u_ii) - big_k * r_ii
        p_ii = tl.exp(s_diag - lse)
        g_diag = ((count - 1.0) - p_ii * sum_wr + big_k * (1.0 - r_ii + r_ii * p_ii)) / pairs
        joint = (count - 1.0) * s_diag - sum_u
        log_marg = log_off - u_ii
        grad_q = (-sum_one_minus_w + marg * (1.0 - w_ii)) / pairs
    else:
        if BOUND == _TUBA:
            c = q
        else:
            c = 1.0 + coef
        joint = s_diag - c
        log_marg = log_off - c
        grad_q = -1.0 / count + tl.exp(log_marg) / pairs
        if BOUND == _JS:
            g_diag = 1.0 / (1.0 + tl.exp(s_diag)) / count
        else:
            g_diag = 1.0 / count + coef

    tl.store(JOINT + rows, joint, mask=row_in)
    tl.store(LOG_MARG + rows, log_marg, mask=row_in)
    tl.store(GRAD_Q + rows, grad_q, mask=row_in)
    tl.store(LSE + rows, lse, mask=row_in)
    tl.store(COEF + rows, coef, mask=row_in)
    tl.store(G_DIAG + rows, g_diag, mask=row_in)
    tl.store(BASE + rows, c, mask=row_in)


@triton.jit
def _load_row_stats(LOG_Q, LSE, COEF, G_DIAG, BASE, rows, n_rows, HAS_Q: tl.constexpr):
    inside = rows < n_rows
    lse = tl.load(LSE + rows, mask=inside, other=0.0)
    coef = tl.load(COEF + rows, mask=inside, other=0.0)
    g_diag = tl.load(G_DIAG + rows, mask=inside, other=0.0)
    c = tl.load(BASE + rows, mask=inside, other=0.0)
    if HAS_Q:
        q = tl.load(LOG_Q + rows, mask=inside, other=0.0).to(tl.float32)
    else:
        q = tl.zeros_like(lse)
    return lse, coef, g_diag, c, q


@triton.jit
def _mi_bwd_da_kernel(
    A, B, LOG_Q, LSE, COEF, G_DIAG, BASE, GRAD_OUT, DA,
    n_rows, n, diag_offset, e, scale, log_n1, log_alpha, log_one_minus_alpha,
    BOUND: tl.constexpr, ALPHA_MODE: tl.constexpr, HAS_Q: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, PRECISION: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    a = _load_rows(A, rows, n_rows, e, BLOCK_E)
    lse, coef, g_diag, c, q = _load_row_stats(LOG_Q, LSE, COEF, G_DIAG, BASE, rows, n_rows, HAS_Q)
    acc = tl.zeros([BLOCK_M, BLOCK_E], tl.float32)
    for start in range(0, n, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        b = _load_rows(B, cols, n, e, BLOCK_E)
        s = tl.dot(a, tl.trans(b), input_precision=PRECISION) * scale
        valid = (rows[:, None] < n_rows) & (cols[None, :] < n)
        g = _grad_tile(s, cols[None, :] == (rows + diag_offset)[:, None], valid, lse, coef, g_diag, c, q, n * 1.0, log_n1,
                       log_alpha, log_one_minus_alpha, BOUND, ALPHA_MODE)
        acc += tl.dot(g, b, input_precision=PRECISION)
    acc = acc * (scale * tl.load(GRAD_OUT).to(tl.float32))
    cols_e = tl.arange(0, BLOCK_E)
    tl.store(DA + rows[:, None] * e + cols_e[None, :], acc.to(DA.dtype.element_ty),
             mask=(rows[:, None] < n_rows) & (cols_e[None, :] < e))


@triton.jit
def _mi_bwd_db_kernel(
    A, B, LOG_Q, LSE, COEF, G_DIAG, BASE, GRAD_OUT, DB,
    n_rows, n, diag_offset, e, scale, log_n1, log_alpha, log_one_minus_alpha,
    BOUND: tl.constexpr, ALPHA_MODE: tl.constexpr, HAS_Q: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, PRECISION: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    b = _load_rows(B, cols, n, e, BLOCK_E)
    acc = tl.zeros([BLOCK_N, BLOCK_E], tl.float32)
    for start in range(0, n_rows, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        a = _load_rows(A, rows, n_rows, e, BLOCK_E)
        lse, coef, g_diag, c, q = _load_row_stats(LOG_Q, LSE, COEF, G_DIAG, BASE, rows, n_rows, HAS_Q)
        s = tl.dot(a, tl.trans(b), input_precision=PRECISION) * scale
        valid = (rows[:, None] < n_rows) & (cols[None, :] < n)
        g = _grad_tile(s, cols[None, :] == (rows + diag_offset)[:, None], valid, lse, coef, g_diag, c, q, n * 1.0, log_n1,
                       log_alpha, log_one_minus_alpha, BOUND, ALPHA_MODE)
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


def _meta(a, b, log_q, bound_id, alpha):
    embed = a.shape[1]
    if embed > MAX_EMBED:
        raise ValueError(f"the Triton path supports embeddings up to {MAX_EMBED} wide, got a of shape "
                         f"{tuple(a.shape)}")
    block_m, block_n = block_sizes()
    return dict(BOUND=bound_id, ALPHA_MODE=_alpha_mode(alpha), HAS_Q=log_q is not None, BLOCK_M=block_m,
                BLOCK_N=block_n, BLOCK_E=max(16, triton.next_power_of_2(embed)),
                PRECISION=dot_precision(a, b), num_warps=NUM_WARPS)


def bound_forward(a, b, log_q, bound_id, alpha, scale, diag_offset=0):
    """Rows a (n_rows, e) against columns b (n, e), row r's positive in column diag_offset + r.

    Returns the block's parts of the value (float64 joint sum, per-row log marginal terms) and a
    (5, n_rows) tensor: dI/dq and the row statistics of the backward.
    """
    a, b = a.contiguous(), b.contiguous()
    n_rows, embed = a.shape
    joint, log_marg, grad_q, lse, coef, g_diag, base = torch.empty(7, n_rows, device=a.device, dtype=torch.float32)
    meta = _meta(a, b, log_q, bound_id, alpha)
    q = log_q.contiguous() if log_q is not None else lse  # any pointer: unread without HAS_Q
    _mi_fwd_kernel[(triton.cdiv(n_rows, meta["BLOCK_M"]),)](
        a, b, q, joint, log_marg, grad_q, lse, coef, g_diag, base, e=embed,
        **_scalars(n_rows, b.shape[0], diag_offset, scale, alpha), **meta)
    return joint.double().sum(), log_marg, torch.stack([grad_q, lse, coef, g_diag, base])


def bound_backward(a, b, log_q, stats, grad_output, bound_id, alpha, scale, diag_offset=0):
    """(dI/da, dI/db, dI/dlog_q) in the inputs' dtypes; dI/dlog_q is None without log_q."""
    a, b = a.contiguous(), b.contiguous()
    n_rows, embed = a.shape
    grad_q, lse, coef, g_diag, base = stats
    grad_output = grad_output.to(torch.float32).reshape(1).contiguous()
    grad_a, grad_b = torch.empty_like(a), torch.empty_like(b)
    meta = _meta(a, b, log_q, bound_id, alpha)
    q = log_q.contiguous() if log_q is not None else lse
    common = (a, b, q, lse.contiguous(), coef.contiguous(), g_diag.contiguous(), base.contiguous(), grad_output)
    args = dict(e=embed, **_scalars(n_rows, b.shape[0], diag_offset, scale, alpha), **meta)
    _mi_bwd_da_kernel[(triton.cdiv(n_rows, meta["BLOCK_M"]),)](*common, grad_a, **args)
    _mi_bwd_db_kernel[(triton.cdiv(b.shape[0], meta["BLOCK_N"]),)](*common, grad_b, **args)
    grad_log_q = (grad_q * grad_output).to(log_q.dtype) if log_q is not None else None
    return grad_a, grad_b, grad_log_q
