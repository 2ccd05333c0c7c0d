r"""Attention-relation distillation loss (MiniLM, MiniLMv2, AutoDistil).

Inputs are teacher tensors X_T, Y_T of shape (B, L, D_t) and student tensors X_S, Y_S of shape
(B, L, D_s), e.g. the query and key projections of one layer with the heads concatenated.
Each vector is re-split into A relation heads of size d = D / A (MiniLMv2), so teacher and
student head counts need not match. For head a and example b the relation over valid tokens is

    t_ij = c_t <X_T,a,i , Y_T,a,j>,   s_ij = c_s <X_S,a,i , Y_S,a,j>,   c = 1/sqrt(d) unless given
    p_i = softmax_j(t_i),             q_i = softmax_j(s_i)

(Q, K) gives the attention map (MiniLM); (Q, Q), (K, K), (V, V) the self-relations of
MiniLMv2 and AutoDistil. Padded keys are left out of every softmax and padded rows add nothing.
With n_b valid tokens in example b and N = A * sum_b n_b^2 valid entries, the losses are

    kl        (1/B) sum_b 1/(A n_b) sum_{a,i} sum_j p_ij (log p_ij - log q_ij)
    ce        (1/B) sum_b 1/(A n_b) sum_{a,i} -sum_j p_ij log q_ij         (kl + teacher entropy)
    mse_prob  (1/N) sum_{b,a,i,j} (p_ij - q_ij)^2                           (AutoDistil, Eq. 4)
    mse_logit (1/N) sum_{b,a,i,j} (s_ij - t_ij)^2                           (AutoDistil's code)

With w the row's weight above, G = dL/ds has the row-wise closed forms

    kl, ce     G_ij = w (q_ij - p_ij)
    mse_prob   G_ij = q_ij (g_ij - sum_k g_ik q_ik),   g = 2 w (q - p)
    mse_logit  G_ij = 2 w (s_ij - t_ij)

and dX_S = c_s G Y_S, dY_S = c_s G^T X_S per head (a self-relation, X_S = Y_S, receives both).
The fused paths never hold an L x L map: they stream over key tiles with an online
log-sum-exp (Triton) or walk row blocks of the exact scores (C++), and keep per-row statistics.

The teacher is a constant: no gradient reaches t_a or t_b even when they require grad.
"""
import math
from dataclasses import dataclass

import torch

from .._extension import cpu_extension
from ._checks import check_finite, check_same_device, check_tensor, check_token_mask, resolve_backend

LOSSES = ("kl", "ce", "mse_prob", "mse_logit")


@dataclass(frozen=True)
class RelationSpec:
    heads: int
    loss: str
    scale_t: float
    scale_s: float

    @property
    def loss_id(self) -> int:
        return LOSSES.index(self.loss)


def attention_relation_loss(
    t_a: torch.Tensor,
    t_b: torch.Tensor,
    s_a: torch.Tensor,
    s_b: torch.Tensor,
    num_relation_heads: int,
    mask: torch.Tensor | None = None,
    loss: str = "kl",
    scale_t: float | None = None,
    scale_s: float | None = None,
    *,
    backend: str = "auto",
    check_inputs_finite: bool = False,
) -> torch.Tensor:
    """Teacher-student attention-relation loss; returns an fp32 scalar (see the module docstring).

    backend: "auto" sends CUDA tensors to Triton and CPU tensors to C++; "reference" runs the
    plain PyTorch version that materialises the maps; "cpp" and "triton" force a fused path.
    check_inputs_finite: raise on NaN/Inf in any input (costs one pass over the inputs).
    """
    spec = validate_relation_args(t_a, t_b, s_a, s_b, num_relation_heads, mask, loss, scale_t, scale_s)
    if check_inputs_finite:
        check_finite(t_a=t_a, t_b=t_b, s_a=s_a, s_b=s_b)
    path = resolve_backend(backend, s_a)
    if path == "reference":
        return _reference(t_a, t_b, s_a, s_b, mask, spec)
    function = _CppRelationLoss if path == "cpp" else _TritonRelationLoss
    return function.apply(t_a.detach(), t_b.detach(), s_a, s_b, mask, spec)


def attention_relation_loss_reference(t_a, t_b, s_a, s_b, num_relation_heads, mask=None, loss="kl",
                                      scale_t=None, scale_s=None) -> torch.Tensor:
    """Plain PyTorch version that materialises the (B, A, L, L) maps; computes and returns float64
    when any input is float64, else float32."""
    spec = validate_relation_args(t_a, t_b, s_a, s_b, num_relation_heads, mask, loss, scale_t, scale_s)
    return _reference(t_a, t_b, s_a, s_b, mask, spec)


def validate_relation_args(t_a, t_b, s_a, s_b, heads, mask, loss, scale_t, scale_s) -> RelationSpec:
    for name, x in (("t_a", t_a), ("t_b", t_b), ("s_a", s_a), ("s_b", s_b)):
        check_tensor(name, x, ndim=3)
    if t_a.shape != t_b.shape:
        raise ValueError(f"t_a and t_b must have the same shape, got {tuple(t_a.shape)} and {tuple(t_b.shape)}")
    if s_a.shape != s_b.shape:
        raise ValueError(f"s_a and s_b must have the same shape, got {tuple(s_a.shape)} and {tuple(s_b.shape)}")
    if t_a.shape[:2] != s_a.shape[:2]:
        raise ValueError(
            f"teacher and student must agree on (batch, length): t_a has shape {tuple(t_a.shape)}, "
            f"s_a has shape {tuple(s_a.shape)}"
        )
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise ValueError(f"num_relation_heads must be a positive int, got {heads!r}")
    for name, x in (("t_a", t_a), ("s_a", s_a)):
        if x.shape[2] % heads:
            raise ValueError(
                f"{name} last dimension {x.shape[2]} (shape {tuple(x.shape)}) is not divisible by "
                f"num_relation_heads={heads}"
            )
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    check_same_device(t_a=t_a, t_b=t_b, s_a=s_a, s_b=s_b, mask=mask)
    if mask is not None:
        check_token_mask(mask, t_a.shape[0], t_a.shape[1])
    return RelationSpec(
        heads=heads,
        loss=loss,
        scale_t=_scale("scale_t", scale_t, t_a.shape[2] // heads),
        scale_s=_scale("scale_s", scale_s, s_a.shape[2] // heads),
    )


def _scale(name: str, value, head_dim: int) -> float:
    if value is None:
        return 1.0 / math.sqrt(head_dim)
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _relation_scores(x: torch.Tensor, y: torch.Tensor, heads: int, scale: float, dtype) -> torch.Tensor:
    batch, length, width = x.shape
    xh = x.to(dtype).reshape(batch, length, heads, width // heads).transpose(1, 2)
    yh = y.to(dtype).reshape(batch, length, heads, width // heads).transpose(1, 2)
    return scale * (xh @ yh.transpose(-1, -2))


def _reference(t_a, t_b, s_a, s_b, mask, spec: RelationSpec) -> torch.Tensor:
    dtype = torch.float64 if torch.float64 in (t_a.dtype, s_a.dtype) else torch.float32
    batch, length = s_a.shape[:2]
    if mask is None:
        mask = torch.ones(batch, length, dtype=torch.bool, device=s_a.device)
    t = _relation_scores(t_a.detach(), t_b.detach(), spec.heads, spec.scale_t, dtype)
    s = _relation_scores(s_a, s_b, spec.heads, spec.scale_s, dtype)
    valid_key = mask[:, None, None, :]
    valid = valid_key & mask[:, None, :, None]
    if spec.loss == "mse_logit":
        return torch.where(valid, s - t, 0.0).square().sum() / (spec.heads * valid.sum())
    log_p = torch.log_softmax(t.masked_fill(~valid_key, float("-inf")), dim=-1).masked_fill(~valid_key, 0.0)
    log_q = torch.log_softmax(s.masked_fill(~valid_key, float("-inf")), dim=-1).masked_fill(~valid_key, 0.0)
    p = log_p.exp() * valid_key
    if spec.loss == "mse_prob":
        diff = torch.where(valid, p - log_q.exp() * valid_key, 0.0)
        return diff.square().sum() / (spec.heads * valid.sum())
    per_entry = p * (log_p - log_q) if spec.loss == "kl" else -p * log_q
    per_example = torch.where(valid, per_entry, 0.0).sum(dim=(1, 2, 3)) / (spec.heads * mask.sum(dim=1))
    return per_example.mean()


class _CppRelationLoss(torch.autograd.Function):
    """CPU path: the C++ kernel returns the loss and the student gradients in one sweep."""

    @staticmethod
    def forward(ctx, t_a, t_b, s_a, s_b, mask, spec: RelationSpec):
        need_grad = bool(ctx.needs_input_grad[2] or ctx.needs_input_grad[3])
        loss, grad_a, grad_b = cpu_extension().attention_relation_forward(
            t_a, t_b, s_a, s_b, mask, spec.heads, spec.loss_id, spec.scale_t, spec.scale_s, need_grad
        )
        if need_grad:
            ctx.save_for_backward(grad_a, grad_b)
            ctx.dtypes = (s_a.dtype, s_b.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grad_a, grad_b = ctx.saved_tensors
        # loss.backward() passes 1: hand over the saved gradients without another copy of them.
        unit = bool(grad_output == 1)
        return (
            None,
            None,
            _scaled(grad_a, grad_output, unit, ctx.dtypes[0]) if ctx.needs_input_grad[2] else None,
            _scaled(grad_b, grad_output, unit, ctx.dtypes[1]) if ctx.needs_input_grad[3] else None,
            None,
            None,
        )


def _scaled(grad: torch.Tensor, grad_output: torch.Tensor, unit: bool, dtype) -> torch.Tensor:
    return (grad if unit else grad * grad_output).to(dtype)


class _TritonRelationLoss(torch.autograd.Function):
    """GPU path: flash-style forward keeps per-row statistics; backward recomputes the tiles."""

    @staticmethod
    def forward(ctx, t_a, t_b, s_a, s_b, mask, spec: RelationSpec):
        from ..kernels import attention_relation as kernel

        loss, saved = kernel.relation_forward(t_a, t_b, s_a, s_b, mask, spec.heads, spec.loss_id,
                                              spec.scale_t, spec.scale_s)
        ctx.save_for_backward(t_a, t_b, s_a, s_b, *saved)
        ctx.spec = spec
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        from ..kernels import attention_relation as kernel

        t_a, t_b, s_a, s_b, *saved = ctx.saved_tensors
        spec = ctx.spec
        grad_a, grad_b = kernel.relation_backward(t_a, t_b, s_a, s_b, saved, grad_output, spec.heads,
                                                  spec.loss_id, spec.scale_t, spec.scale_s)
        return None, None, grad_a, grad_b, None, None
