r"""Triton kernels of the routed (mixture-of-experts) linear layer (math: pykd/ops/routed_linear.py).

Forward: a blocked GEMM y = x W^T whose K-loop loads the E expert tiles W_e[n-block, k-block],
mixes them with alpha (one coefficient per expert, or per expert and output neuron) and feeds
the mixture to tl.dot, so W never exists in memory. dx = dy W mixes the same way. The weight
gradient kernel owns one (feature block, input block) tile: it forms dW = dy^T x over all tokens
once, writes every expert's gradient as alpha-scaled copies and the tile's part of
d alpha = <dW, W_e>; those partials are summed on the host, so no atomics are needed.
Loads are upcast to fp32; accumulation is fp32.
"""
import torch
import triton
import triton.language as tl

from .attention_relation import dot_precision, interpreting

NUM_WARPS = 4


def block_sizes() -> tuple[int, int, int]:
    """(tokens, features, inputs) per tile."""
    return (16, 16, 16) if interpreting() else (64, 64, 32)


@triton.jit
def _coefficients(ALPHA, feats, f, e, E: tl.constexpr, NEURON: tl.constexpr):
    if NEURON:
        return tl.load(ALPHA + feats * E + e, mask=feats < f, other=0.0).to(tl.float32)
    return tl.load(ALPHA + e).to(tl.float32) + tl.zeros_like(feats).to(tl.float32)


@triton.jit
def _mixed_tile(W, ALPHA, feats, ks, f, d, stride_we, stride_wf, E: tl.constexpr, NEURON: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """sum_e alpha W_e[feats, ks] as a (BLOCK_N, BLOCK_K) fp32 tile; zero outside the active slice."""
    inside = (feats[:, None] < f) & (ks[None, :] < d)
    w = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for e in tl.static_range(E):
        coef = _coefficients(ALPHA, feats, f, e, E, NEURON)
        w_e = tl.load(W + e * stride_we + feats[:, None] * stride_wf + ks[None, :], mask=inside, other=0.0)
        w += coef[:, None] * w_e.to(tl.float32)
    return w


@triton.jit
def _routed_fwd_kernel(
    X, W, ALPHA, BIAS, Y, n_tokens, f, d, stride_we, stride_wf, stride_be,
    E: tl.constexpr, NEURON: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    feats = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, d, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + rows[:, None] * d + ks[None, :], mask=(rows[:, None] < n_tokens) & (ks[None, :] < d),
                    other=0.0).to(tl.float32)
        w = _mixed_tile(W, ALPHA, feats, ks, f, d, stride_we, stride_wf, E, NEURON, BLOCK_N, BLOCK_K)
        acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
    if HAS_BIAS:
        bias = tl.zeros([BLOCK_N], tl.float32)
        for e in tl.static_range(E):
            coef = _coefficients(ALPHA, feats, f, e, E, NEURON)
            bias += coef * tl.load(BIAS + e * stride_be + feats, mask=feats < f, other=0.0).to(tl.float32)
        acc += bias[None, :]
    tl.store(Y + rows[:, None] * f + feats[None, :], acc.to(Y.dtype.element_ty),
             mask=(rows[:, None] < n_tokens) & (feats[None, :] < f))


@triton.jit
def _routed_bwd_dx_kernel(
    DY, W, ALPHA, DX, n_tokens, f, d, stride_we, stride_wf,
    E: tl.constexpr, NEURON: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
    for n0 in range(0, f, BLOCK_N):
        feats = n0 + tl.arange(0, BLOCK_N)
        dy = tl.load(DY + rows[:, None] * f + feats[None, :], mask=(rows[:, None] < n_tokens) & (feats[None, :] < f),
                     other=0.0).to(tl.float32)
        w = _mixed_tile(W, ALPHA, feats, ks, f, d, stride_we, stride_wf, E, NEURON, BLOCK_N, BLOCK_K)
        acc += tl.dot(dy, w, input_precision=PRECISION)
    tl.store(DX + rows[:, None] * d + ks[None, :], acc.to(DX.dtype.element_ty),
             mask=(rows[:, None] < n_tokens) & (ks[None, :] < d))


@triton.jit
def _routed_bwd_dw_kernel(
    DY, X, W, ALPHA, GRAD_W, GRAD_ALPHA, n_tokens, f, d, stride_we, stride_wf,
    E: tl.constexpr, NEURON: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    feats = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    feat_in = feats < f
    grad = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for m0 in range(0, n_tokens, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        dy = tl.load(DY + rows[:, None] * f + feats[None, :], mask=(rows[:, None] < n_tokens) & feat_in[None, :],
                     other=0.0).to(tl.float32)
        x = tl.load(X + rows[:, None] * d + ks[None, :], mask=(rows[:, None] < n_tokens) & (ks[None, :] < d),
                    other=0.0).to(tl.float32)
        grad += tl.dot(tl.trans(dy), x, input_precision=PRECISION)
    inside = feat_in[:, None] & (ks[None, :] < d)
    for e in tl.static_range(E):
        coef = _coefficients(ALPHA, feats, f, e, E, NEURON)
        offsets = e * stride_we + feats[:, None] * stride_wf + ks[None, :]
        tl.store(GRAD_W + offsets, (coef[:, None] * grad).to(GRAD_W.dtype.element_ty), mask=inside)
        row_dots = tl.sum(grad * tl.load(W + offsets, mask=inside, other=0.0).to(tl.float32), axis=1)
        # d alpha partials per k-block (and, layer-wise, per feature block): summed on the host.
        if NEURON:
            tl.store(GRAD_ALPHA + (pid_k * f + feats) * E + e, row_dots, mask=feat_in)
        else:
            tl.store(GRAD_ALPHA + (pid_k * tl.num_programs(0) + pid_n) * E + e, tl.sum(row_dots, axis=0))


def _meta(x, experts_w, alpha, with_bias):
    block_m, block_n, block_k = block_sizes()
    return dict(E=experts_w.shape[0], NEURON=alpha.dim() == 2, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                PRECISION=dot_precision(x, experts_w), num_warps=NUM_WARPS)


def routed_forward(x, experts_w, alpha, experts_b, f):
    """y (N, f) in x's dtype for x (N, d)."""
    x, experts_w, alpha = x.contiguous(), experts_w.contiguous(), alpha.contiguous()
    n_tokens, d = x.shape
    y = torch.empty(n_tokens, f, device=x.device, dtype=x.dtype)
    meta = _meta(x, experts_w, alpha, experts_b is not None)
    bias = experts_b.contiguous() if experts_b is not None else alpha  # unread without HAS_BIAS
    grid = (triton.cdiv(n_tokens, meta["BLOCK_M"]), triton.cdiv(f, meta["BLOCK_N"]))
    _routed_fwd_kernel[grid](x, experts_w, alpha, bias, y, n_tokens, f, d, experts_w.stride(0), experts_w.stride(1),
                             bias.stride(0) if experts_b is not None else 0, HAS_BIAS=experts_b is not None, **meta)
    return y


def routed_backward(grad_y, x, experts_w, alpha, experts_b, f, need_x):
    """(dx, d experts_w, d alpha, d experts_b) in the inputs' dtypes (dx None unless need_x)."""
    grad_y, x, experts_w, alpha = (t.contiguous() for t in (grad_y, x, experts_w, alpha))
    n_tokens, d = x.shape
    meta = _meta(x, experts_w, alpha, experts_b is not None)
    neuron_wise = alpha.dim() == 2
    grad_x = None
    if need_x:
        grad_x = torch.empty_like(x)
        grid = (triton.cdiv(n_tokens, meta["BLOCK_M"]), triton.cdiv(d, meta["BLOCK_K"]))
        _routed_bwd_dx_kernel[grid](grad_y, experts_w, alpha, grad_x, n_tokens, f, d, experts_w.stride(0),
                                    experts_w.stride(1), **meta)
    feature_blocks, input_blocks = triton.cdiv(f, meta["BLOCK_N"]), triton.cdiv(d, meta["BLOCK_K"])
    grad_w = torch.zeros(experts_w.shape, device=x.device, dtype=torch.float32)
    num_experts = experts_w.shape[0]
    partial_rows = f if neuron_wise else feature_blocks
    grad_alpha = torch.empty(input_blocks, partial_rows, num_experts, device=x.device, dtype=torch.float32)
    _routed_bwd_dw_kernel[(feature_blocks, input_blocks)](grad_y, x, experts_w, alpha, grad_w, grad_alpha, n_tokens,
                                                          f, d, experts_w.stride(0), experts_w.stride(1), **meta)
    grad_alpha = grad_alpha.sum(0) if neuron_wise else grad_alpha.sum((0, 1))
    grad_b = None
    if experts_b is not None:
        db = grad_y.float().sum(0)  # (f): tiny next to the GEMMs
        coef = alpha.float() if neuron_wise else alpha.float()[None, :].expand(f, num_experts)
        grad_b = torch.zeros(experts_b.shape, device=x.device, dtype=torch.float32)
        grad_b[:, :f] = (coef * db[:, None]).T
        bias_dots = db[:, None] * experts_b[:, :f].float().T  # (f, E)
        grad_alpha = grad_alpha + (bias_dots if neuron_wise else bias_dots.sum(0))
        grad_b = grad_b.to(experts_b.dtype)
    return grad_x, grad_w.to(experts_w.dtype), grad_alpha.to(alpha.dtype), grad_b
