r"""Triton kernels of the routed (mixture-of-experts) linear layer (math: pykd/ops/routed_linear.py).

Forward: a blocked GEMM y = x W^T whose K-loop loads the E expert tiles W_e[n-block, k-block],
mixes them with alpha (one coefficient per expert, or per expert and output neuron) and feeds
the mixture to tl.dot, so W never exists in memory. dx = dy W mixes the same way. The weight
gradient kernel owns one (feature block, input block) tile: it forms dW = dy^T x over all tokens
once, writes every expert's gradient as alpha-scaled copies and the tile's part of
d alpha = <dW, W_e>; those partials are summed on the host, so no atomics are needed.
Loads are upcast to fp32, the experts are mixed and accumulation is done in fp32. Every dot takes
its operands in the dtype class's dtype (kernels/configs.py): for 16-bit inputs the mixed weight
tile is rounded to that dtype before its dot (unit roundoff 2^-8 for bf16, as a dense layer of
that dtype stores its W), x and dy go in as loaded; fp32 inputs run tf32x3.
Launch configurations: CONFIGS below, one entry per kernel, dtype class and architecture.
"""
import torch
import triton
import triton.language as tl

from .configs import AotKernel, as_operand, dtype_class, lookup, operand_meta, table

ROUTED_KERNELS = ("fwd", "bwd_dx", "bwd_dw")
# Buckets of the expert count E: the K-loops load and mix E tiles, so registers grow with E.
EXPERT_BUCKETS = (2, 4, 8)
# Chosen by the AOT search (bench/NOTES.md): spill-free, on sm_90 16-bit dots as warp-group MMA
# where a tile fits, then the largest tile; the mixing's E tile loads per K-step cost registers.
CONFIGS = table(("BLOCK_M", "BLOCK_N", "BLOCK_K"), [
    *[(kernel, "any", "interpreter", None, 16, 16, 16, 4, 1) for kernel in ROUTED_KERNELS],
    # kernel   class  arch     E   BLOCK_M BLOCK_N BLOCK_K warps stages
    *[row for cls in ("bf16", "fp16") for row in (
        ("fwd", cls, "sm_90", 2, 64, 64, 32, 4, 3),
        ("fwd", cls, "sm_90", 4, 64, 32, 32, 4, 2),
        ("fwd", cls, "sm_90", 8, 32, 32, 32, 4, 2),
        ("fwd", cls, "sm_80", 2, 128, 128, 32, 8, 3),
        ("fwd", cls, "sm_80", 4, 64, 32, 32, 4, 2),
        ("fwd", cls, "sm_80", 8, 32, 32, 16, 4, 1),
        ("bwd_dx", cls, "sm_90", 2, 128, 128, 32, 8, 3),
        ("bwd_dx", cls, "sm_90", 4, 64, 64, 32, 4, 3),
        ("bwd_dx", cls, "sm_90", 8, 64, 64, 32, 4, 3),
        ("bwd_dx", cls, "sm_80", 2, 64, 64, 32, 4, 3),
        ("bwd_dx", cls, "sm_80", 4, 64, 64, 32, 4, 3),
        ("bwd_dx", cls, "sm_80", 8, 64, 32, 32, 4, 2),
        ("bwd_dw", cls, "sm_90", 2, 128, 128, 64, 8, 3),
        ("bwd_dw", cls, "sm_90", 4, 128, 128, 64, 8, 3),
        ("bwd_dw", cls, "sm_90", 8, 128, 128, 32, 8, 3),
        ("bwd_dw", cls, "sm_80", 2, 128, 128, 32, 8, 3),
        ("bwd_dw", cls, "sm_80", 4, 64, 128, 32, 4, 3),
        ("bwd_dw", cls, "sm_80", 8, 64, 128, 32, 4, 3),
    )],
    ("fwd", "fp32", "sm_90", 2, 64, 32, 32, 4, 2),
    ("fwd", "fp32", "sm_90", 4, 32, 32, 16, 4, 2),
    ("fwd", "fp32", "sm_90", 8, 32, 32, 16, 4, 1),
    ("fwd", "fp32", "sm_80", 2, 64, 32, 32, 4, 2),
    ("fwd", "fp32", "sm_80", 4, 32, 32, 16, 4, 1),
    ("fwd", "fp32", "sm_80", 8, 32, 32, 16, 4, 1),
    ("bwd_dx", "fp32", "sm_90", 2, 64, 64, 32, 4, 2),
    ("bwd_dx", "fp32", "sm_90", 4, 64, 64, 32, 4, 2),
    ("bwd_dx", "fp32", "sm_90", 8, 64, 64, 32, 4, 2),
    ("bwd_dx", "fp32", "sm_80", 2, 64, 32, 32, 4, 2),
    ("bwd_dx", "fp32", "sm_80", 4, 32, 32, 16, 4, 1),
    ("bwd_dx", "fp32", "sm_80", 8, 32, 32, 16, 4, 1),
    *[("bwd_dw", "fp32", "sm_90", experts, 64, 64, 32, 4, 2) for experts in EXPERT_BUCKETS],
    ("bwd_dw", "fp32", "sm_80", 2, 64, 64, 32, 4, 2),
    ("bwd_dw", "fp32", "sm_80", 4, 64, 64, 32, 4, 2),
    ("bwd_dw", "fp32", "sm_80", 8, 32, 32, 32, 4, 2),
])


def expert_bucket(experts: int) -> int:
    """The CONFIGS bucket of E experts (past 8 experts, the 8-expert entry: see bench/NOTES.md)."""
    return next((bucket for bucket in EXPERT_BUCKETS if experts <= bucket), EXPERT_BUCKETS[-1])


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
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr, ROUND: tl.constexpr,
    PRECISION: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    feats = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, d, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + rows[:, None] * d + ks[None, :], mask=(rows[:, None] < n_tokens) & (ks[None, :] < d),
                    other=0.0).to(tl.float32)
        w = _mixed_tile(W, ALPHA, feats, ks, f, d, stride_we, stride_wf, E, NEURON, BLOCK_N, BLOCK_K)
        acc += tl.dot(as_operand(x, DOT, ROUND), tl.trans(as_operand(w, DOT, ROUND)), input_precision=PRECISION)
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
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr, ROUND: tl.constexpr,
    PRECISION: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
    for n0 in range(0, f, BLOCK_N):
        feats = n0 + tl.arange(0, BLOCK_N)
        dy = tl.load(DY + rows[:, None] * f + feats[None, :], mask=(rows[:, None] < n_tokens) & (feats[None, :] < f),
                     other=0.0).to(tl.float32)
        w = _mixed_tile(W, ALPHA, feats, ks, f, d, stride_we, stride_wf, E, NEURON, BLOCK_N, BLOCK_K)
        acc += tl.dot(as_operand(dy, DOT, ROUND), as_operand(w, DOT, ROUND), input_precision=PRECISION)
    tl.store(DX + rows[:, None] * d + ks[None, :], acc.to(DX.dtype.element_ty),
             mask=(rows[:, None] < n_tokens) & (ks[None, :] < d))


@triton.jit
def _routed_bwd_dw_kernel(
    DY, X, W, ALPHA, GRAD_W, GRAD_ALPHA, n_tokens, f, d, stride_we, stride_wf,
    E: tl.constexpr, NEURON: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr, ROUND: tl.constexpr,
    PRECISION: tl.constexpr,
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
        grad += tl.dot(tl.trans(as_operand(dy, DOT, ROUND)), as_operand(x, DOT, ROUND), input_precision=PRECISION)
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


def _meta(kernel, operands, experts_w, alpha):
    """Constexprs and launch configuration of `kernel`, whose dots read the tensors `operands`."""
    cls = dtype_class(*operands)
    chosen = lookup(CONFIGS, kernel, cls, experts_w.device, expert_bucket(experts_w.shape[0]))
    return dict(E=experts_w.shape[0], NEURON=alpha.dim() == 2, **operand_meta(cls), **chosen.meta())


def routed_forward(x, experts_w, alpha, experts_b, f):
    """y (N, f) in x's dtype for x (N, d)."""
    x, experts_w, alpha = x.contiguous(), experts_w.contiguous(), alpha.contiguous()
    n_tokens, d = x.shape
    y = torch.empty(n_tokens, f, device=x.device, dtype=x.dtype)
    meta = _meta("fwd", (x, experts_w), experts_w, alpha)
    bias = experts_b.contiguous() if experts_b is not None else alpha  # unread without HAS_BIAS
    grid = (triton.cdiv(n_tokens, meta["BLOCK_M"]), triton.cdiv(f, meta["BLOCK_N"]))
    _routed_fwd_kernel[grid](x, experts_w, alpha, bias, y, n_tokens, f, d, experts_w.stride(0), experts_w.stride(1),
                             bias.stride(0) if experts_b is not None else 0, HAS_BIAS=experts_b is not None, **meta)
    return y


def routed_backward(grad_y, x, experts_w, alpha, experts_b, f, need_x):
    """(dx, d experts_w, d alpha, d experts_b) in the inputs' dtypes (dx None unless need_x)."""
    grad_y, x, experts_w, alpha = (t.contiguous() for t in (grad_y, x, experts_w, alpha))
    n_tokens, d = x.shape
    neuron_wise = alpha.dim() == 2
    grad_x = None
    if need_x:
        grad_x = torch.empty_like(x)
        meta = _meta("bwd_dx", (grad_y, experts_w), experts_w, alpha)
        grid = (triton.cdiv(n_tokens, meta["BLOCK_M"]), triton.cdiv(d, meta["BLOCK_K"]))
        _routed_bwd_dx_kernel[grid](grad_y, experts_w, alpha, grad_x, n_tokens, f, d, experts_w.stride(0),
                                    experts_w.stride(1), **meta)
    meta = _meta("bwd_dw", (grad_y, x), experts_w, alpha)
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


# tools/triton_aot.py compiles every CONFIGS entry of these kernels with as many experts as the
# bucket, neuron-wise mixing and biases (the most loads per tile), and at the other mixings.
_POINTERS = {"X": "in", "W": "in", "ALPHA": "in", "BIAS": "in", "Y": "in", "DY": "in", "DX": "in",
             "GRAD_W": "*fp32", "GRAD_ALPHA": "*fp32"}
_OTHER_MIXINGS = (("layer", {"NEURON": False}), ("neuron,no bias", {"HAS_BIAS": False}),
                  ("one expert fewer", {"E": lambda bucket: bucket - 1}))
AOT_KERNELS = [
    AotKernel(fn=fn, table_key=key, label="neuron", pointers=_POINTERS, scalars={}, bucket_label="E",
              variant_meta={"NEURON": True, "HAS_BIAS": True},
              bucket_meta={experts: {"E": experts} for experts in EXPERT_BUCKETS}, variants=_OTHER_MIXINGS)
    for fn, key in ((_routed_fwd_kernel, "fwd"), (_routed_bwd_dx_kernel, "bwd_dx"), (_routed_bwd_dw_kernel, "bwd_dw"))
]
