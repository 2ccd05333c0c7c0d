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

mse_prob's gradient without cancellation. Take one row, d = q - p, and m the student's peak (the
first argmax of s). Since sum_k q_k = 1, G_j = 2 w q_j D_j with D_j = sum_k q_k (d_j - d_k):
differences of d only, and that is the size of the error any evaluation must make. Written as
d_j - sum_k q_k d_k at a peaked row (q_m = 1 - eps), two pieces subtract a dominant term:

  - d_m = q_m - p_m takes two numbers within eps of 1 apart when the teacher peaks at m too (an
    absolute error of u where eps is needed). Every path forms it from the complements instead,
    1 - q_m = sum_{k != m} q_k and 1 - p_m = sum_{k != m} p_k, sums of positive terms
    exp(s_k - s_max) / Z that are exact to a few ulps:
        d_m = (1 - p_m) - (1 - q_m)   if q_m + p_m > 1,   else q_m - p_m
    (each form errs in proportion to its own terms, and the condition picks the smaller).
  - D_m = d_m - sum_k q_k d_k takes two numbers of size eps apart to leave one of size eps^2.
    With R = sum_{k != m} q_k d_k it is formed as D_m = (1 - q_m) d_m - R.

The other keys take D_j = d_j - Delta with Delta = q_m d_m + R: d_j, q_m d_m and R are each no
larger than the terms of sum_k q_k (d_j - d_k), so nothing dominant is subtracted. Where the
peaks differ, no key has both q and p near 1, and q_m - p_m (near 1 - p_m) and the teacher's
peak's d (near -1) are formed without cancellation. Every quantity is then a short sum of terms
good to a few ulps, and G_j errs by at most (12 L + 152) u 2 w q_j M_j, where
M_j = sum_{k != j} q_k (|d_j - d_k| + a_j + a_k) is the size of D_j's terms, a_k = q_k + p_k and
a_m the smaller of q_m + p_m and (1 - q_m) + (1 - p_m) (the derivation and the test against a
100-digit evaluation: tests/test_attention_relation_peaked.py). The loss sums d_k^2 over
k != m and adds d_m^2 from the same d_m. Per row the fused paths keep m, Delta and D_m.

The teacher is a constant: no gradient reaches t_a or t_b even when they require grad.
"""
import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .._extension import cpu_extension
from ..kernels.ids import RELATION_LOSS_IDS
from ._backends import autocast_off, select_backend
from ._checks import (check_finite_where_valid, check_nonempty, check_same_device, check_tensor, check_token_mask,
                      int_arg, is_finite, real_arg, valid_token_counts)

LOSSES = tuple(RELATION_LOSS_IDS)


@dataclass(frozen=True)
class RelationSpec:
    heads: int
    loss: str
    scale_t: float
    scale_s: float

    def op_args(self) -> tuple[int, int, float, float]:
        """(heads, loss id, scale_t, scale_s) as the kernels take them."""
        return self.heads, RELATION_LOSS_IDS[self.loss], self.scale_t, self.scale_s


def attention_relation_loss(
    t_a: Tensor,
    t_b: Tensor,
    s_a: Tensor,
    s_b: Tensor,
    num_relation_heads: int,
    mask: Tensor | None = None,
    loss: str = "kl",
    scale_t: float | None = None,
    scale_s: float | None = None,
    *,
    backend: str = "auto",
    check_inputs_finite: bool = False,
) -> Tensor:
    """Teacher-student attention-relation loss (the formulas are in the module docstring).

    Args:
        t_a, t_b: the teacher's two tensors of the relation, e.g. its queries and keys (a constant:
            no gradient reaches them).
        s_a, s_b: the student's; pass the same tensor twice for a self-relation.
        num_relation_heads: A; the widths D_t and D_s are split into A heads each.
        mask: True for real tokens, False for padding; None means every token is real. Padded
            positions may hold anything (NaN included): they add nothing and get zero gradient.
        loss: "kl", "ce", "mse_prob" or "mse_logit".
        scale_t, scale_s: score scales (default 1/sqrt of the head size).
        backend: "auto" (C++ for CPU tensors, Triton for CUDA ones, the reference when the fused
            path declines the inputs), "reference", "cpp" or "triton"; a forced backend that cannot
            take the inputs raises ValueError saying why.
        check_inputs_finite: raise ValueError on NaN/Inf at a valid token (one pass over the inputs).
    Shapes:
        t_a, t_b (B, L, D_t); s_a, s_b (B, L, D_s); mask (B, L) bool. B, L, D >= 1 and every example
        needs a valid token.
    Returns:
        The loss as an fp32 scalar tensor, computed in fp32 whatever the input dtypes and with
        autocast off (the reference path computes and returns float64 for float64 inputs);
        gradients reach s_a and s_b in their dtypes.
    """
    spec = validate_relation_args(t_a, t_b, s_a, s_b, num_relation_heads, mask, loss, scale_t, scale_s)
    path = select_backend(backend, "s_a", s_a, lambda chosen: _kernel_limits(chosen, t_a, s_a, spec.heads))
    if path == "reference":
        return _reference(t_a, t_b, s_a, s_b, mask, spec, check_inputs_finite)
    args = (t_a, t_b, s_a, s_b, mask, *spec.op_args(), check_inputs_finite)
    if path == "cpp":
        need_grad = torch.is_grad_enabled() and (s_a.requires_grad or s_b.requires_grad)
        return torch.ops.pykd.attention_relation_cpp(*args, need_grad)[0]
    return torch.ops.pykd.attention_relation_triton(*args)[0]


def attention_relation_loss_reference(t_a: Tensor, t_b: Tensor, s_a: Tensor, s_b: Tensor, num_relation_heads: int,
                                      mask: Tensor | None = None, loss: str = "kl", scale_t: float | None = None,
                                      scale_s: float | None = None) -> Tensor:
    """Plain PyTorch attention-relation loss that materialises the (B, A, L, L) maps.

    Args:
        as in attention_relation_loss.
    Shapes:
        as in attention_relation_loss.
    Returns:
        The loss as a scalar tensor, computed and returned in float64 when any input is float64,
        else in float32 (with autocast off).
    """
    spec = validate_relation_args(t_a, t_b, s_a, s_b, num_relation_heads, mask, loss, scale_t, scale_s)
    return _reference(t_a, t_b, s_a, s_b, mask, spec, check_finite=False)


def validate_relation_args(t_a, t_b, s_a, s_b, heads, mask, loss, scale_t, scale_s) -> RelationSpec:
    """Checks everything about the arguments that does not depend on the tensors' values."""
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
    check_nonempty("t_a", t_a, "(batch, length, width)")
    check_nonempty("s_a", s_a, "(batch, length, width)")
    heads = int_arg("num_relation_heads", heads)
    if heads < 1:
        raise ValueError(f"num_relation_heads must be a positive int, got {heads!r}")
    for name, x in (("t_a", t_a), ("s_a", s_a)):
        if x.shape[2] % heads:
            raise ValueError(
                f"{name} last dimension {x.shape[2]} (shape {tuple(x.shape)}) is not divisible by "
                f"num_relation_heads={heads}"
            )
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if mask is not None:
        check_token_mask(mask, t_a.shape[0], t_a.shape[1])
    check_same_device(t_a=t_a, t_b=t_b, s_a=s_a, s_b=s_b, mask=mask)
    return RelationSpec(
        heads=heads,
        loss=loss,
        scale_t=_scale("scale_t", scale_t, t_a.shape[2] // heads),
        scale_s=_scale("scale_s", scale_s, s_a.shape[2] // heads),
    )


def _scale(name: str, value, head_dim: int) -> float:
    if value is None:
        return 1.0 / math.sqrt(head_dim)
    value = real_arg(name, value)
    if not is_finite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return value


def _kernel_limits(backend: str, t_a: Tensor, s_a: Tensor, heads: int) -> list[str]:
    if backend != "triton":
        return []
    from ..kernels.attention_relation import MAX_HEAD_DIM

    return [f"relation head size {x.shape[2] // heads} of {name} (shape {tuple(x.shape)}, {heads} relation heads) "
            f"exceeds the kernel's maximum {MAX_HEAD_DIM}"
            for name, x in (("t_a", t_a), ("s_a", s_a)) if x.shape[2] // heads > MAX_HEAD_DIM]


def _checked_token_counts(t_a, t_b, s_a, s_b, mask, check_finite: bool) -> Tensor:
    """Valid tokens per example (B,) after the checks that read the inputs' values: every example
    keeps a token and, if asked, the inputs are finite at valid tokens. Every path runs it when
    the op runs, compiled or not."""
    counts = (valid_token_counts(mask) if mask is not None
              else torch.full((t_a.shape[0],), t_a.shape[1], dtype=torch.long, device=t_a.device))
    if check_finite:
        check_finite_where_valid(mask, t_a=t_a, t_b=t_b, s_a=s_a, s_b=s_b)
    return counts


@torch.library.custom_op("pykd::relation_token_counts", mutates_args=())
def _token_counts_op(t_a: Tensor, t_b: Tensor, s_a: Tensor, s_b: Tensor, mask: Tensor | None,
                     check_finite: bool) -> Tensor:
    # An op, so that torch.compile keeps the value-dependent checks of the reference path.
    return _checked_token_counts(t_a, t_b, s_a, s_b, mask, check_finite)


@_token_counts_op.register_fake
def _(t_a, t_b, s_a, s_b, mask, check_finite):
    return t_a.new_empty((t_a.shape[0],), dtype=torch.long)


def _relation_scores(x: Tensor, y: Tensor, heads: int, scale: float, dtype) -> Tensor:
    batch, length, width = x.shape
    xh = x.to(dtype).reshape(batch, length, heads, width // heads).transpose(1, 2)
    yh = y.to(dtype).reshape(batch, length, heads, width // heads).transpose(1, 2)
    return scale * (xh @ yh.transpose(-1, -2))


def _reference(t_a, t_b, s_a, s_b, mask, spec: RelationSpec, check_finite: bool) -> Tensor:
    dtype = torch.float64 if torch.float64 in (t_a.dtype, s_a.dtype) else torch.float32
    counts = _token_counts_op(*(x.detach() for x in (t_a, t_b, s_a, s_b)), mask, check_finite)
    t_a, t_b = t_a.detach(), t_b.detach()
    if mask is None:
        mask = torch.ones(s_a.shape[:2], dtype=torch.bool, device=s_a.device)
    else:  # zeroing the padding keeps whatever it holds (NaN included) out of the scores and their gradients
        t_a, t_b, s_a, s_b = (torch.where(mask[..., None], x, 0) for x in (t_a, t_b, s_a, s_b))
    with autocast_off(s_a):
        t = _relation_scores(t_a, t_b, spec.heads, spec.scale_t, dtype)
        s = _relation_scores(s_a, s_b, spec.heads, spec.scale_s, dtype)
        return _reference_loss(t, s, mask, counts, spec)


def _reference_loss(t: Tensor, s: Tensor, mask: Tensor, counts: Tensor, spec: RelationSpec) -> Tensor:
    valid_key = mask[:, None, None, :]
    valid = valid_key & mask[:, None, :, None]
    if spec.loss == "mse_logit":
        return torch.where(valid, s - t, 0.0).square().sum() / (spec.heads * counts.square().sum())
    if spec.loss == "mse_prob":
        return _MseProbLoss.apply(t, s, valid_key, mask[:, None, :, None], spec.heads * counts.square().sum())
    log_p = torch.log_softmax(t.masked_fill(~valid_key, float("-inf")), dim=-1).masked_fill(~valid_key, 0.0)
    log_q = torch.log_softmax(s.masked_fill(~valid_key, float("-inf")), dim=-1).masked_fill(~valid_key, 0.0)
    p = log_p.exp() * valid_key
    per_entry = p * (log_p - log_q) if spec.loss == "kl" else -p * log_q
    per_example = torch.where(valid, per_entry, 0.0).sum(dim=(1, 2, 3)) / (spec.heads * counts)
    return per_example.mean()


def _mse_prob_rows(t: Tensor, s: Tensor, valid_key: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """mse_prob in the module docstring's stable form, per row of the (B, A, L, L) maps.

    Returns (sum_k d_k^2 (B, A, L), D (B, A, L, L), q (B, A, L, L)); padded keys get D = q = 0.
    """
    p = torch.softmax(t.masked_fill(~valid_key, float("-inf")), dim=-1)
    s_valid = s.masked_fill(~valid_key, float("-inf"))
    q = torch.softmax(s_valid, dim=-1)
    peak = torch.nn.functional.one_hot(s_valid.argmax(dim=-1), s.shape[-1]).bool()
    off_peak = valid_key & ~peak
    q_peak, p_peak = (torch.where(peak, x, 0.0).sum(dim=-1) for x in (q, p))
    q_rest, p_rest = (torch.where(off_peak, x, 0.0).sum(dim=-1) for x in (q, p))  # 1 - q_m, 1 - p_m
    d = torch.where(off_peak, q - p, 0.0)
    d_peak = torch.where(q_peak + p_peak > 1, p_rest - q_rest, q_peak - p_peak)
    rest = (q * d).sum(dim=-1)  # R: d is zero at the peak
    big_d = torch.where(peak, (q_rest * d_peak - rest)[..., None], d - (q_peak * d_peak + rest)[..., None])
    return d.square().sum(dim=-1) + d_peak.square(), big_d, q


class _MseProbLoss(torch.autograd.Function):
    """mse_prob of the score maps with its gradient in the stable form (autograd of the plain
    form is q (g - sum q g), which cancels at peaked rows)."""

    @staticmethod
    def forward(ctx, t, s, valid_key, valid_row, entries):
        squares, big_d, q = _mse_prob_rows(t, s, valid_key)
        weight = 1.0 / entries.to(s.dtype)
        ctx.save_for_backward(torch.where(valid_row, 2.0 * weight * q * big_d, 0.0))
        return torch.where(valid_row[..., 0], squares, 0.0).sum() * weight

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        (grad_scores,) = ctx.saved_tensors
        return None, grad_scores * grad_loss, None, None, None


# ---- the fused paths as custom ops: one graph under torch.compile, autograd registered below ----

@torch.library.custom_op("pykd::attention_relation_cpp", mutates_args=())
def _cpp_loss(t_a: Tensor, t_b: Tensor, s_a: Tensor, s_b: Tensor, mask: Tensor | None, heads: int, loss_id: int,
              scale_t: float, scale_s: float, check_finite: bool, need_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, dL/ds_a, dL/ds_b) in one sweep; the gradients are fp32, and empty without need_grad."""
    _checked_token_counts(t_a, t_b, s_a, s_b, mask, check_finite)
    with autocast_off(s_a):
        loss, grad_a, grad_b = cpu_extension().attention_relation_forward(
            t_a, t_b, s_a, s_b, mask, heads, loss_id, scale_t, scale_s, need_grad)
    if not need_grad:
        return loss, s_a.new_empty(0, dtype=torch.float32), s_b.new_empty(0, dtype=torch.float32)
    return loss, grad_a, grad_b


@_cpp_loss.register_fake
def _(t_a, t_b, s_a, s_b, mask, heads, loss_id, scale_t, scale_s, check_finite, need_grad):
    grads = (s.new_empty(s.shape if need_grad else (0,), dtype=torch.float32) for s in (s_a, s_b))
    return (t_a.new_empty((), dtype=torch.float32), *grads)


def _cpp_setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1], output[2])
    ctx.dtypes = (inputs[2].dtype, inputs[3].dtype)


def _cpp_backward(ctx, grad_loss, _grad_a, _grad_b):
    # Always scaled: skipping the product when grad_loss == 1 would read a value, which tracing
    # (torch.compile, torch.export) cannot, and the product costs one pass over (B, L, D_s).
    grads = [(grad * grad_loss).to(dtype) if ctx.needs_input_grad[k] else None
             for k, grad, dtype in zip((2, 3), ctx.saved_tensors, ctx.dtypes)]
    return (None, None, *grads) + (None,) * 7


_cpp_loss.register_autograd(_cpp_backward, setup_context=_cpp_setup_context)


@torch.library.custom_op("pykd::attention_relation_triton", mutates_args=())
def _triton_loss(t_a: Tensor, t_b: Tensor, s_a: Tensor, s_b: Tensor, mask: Tensor | None, heads: int, loss_id: int,
                 scale_t: float, scale_s: float, check_finite: bool
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, key mask, row weights, teacher and student log-sum-exps, mse_prob's row statistics
    (3, B A, L): Delta, D_m and the peak's index)."""
    from ..kernels import attention_relation as kernel

    _checked_token_counts(t_a, t_b, s_a, s_b, mask, check_finite)
    with autocast_off(s_a):
        loss, saved = kernel.relation_forward(t_a, t_b, s_a, s_b, mask, heads, loss_id, scale_t, scale_s)
    return (loss, *saved)


@_triton_loss.register_fake
def _(t_a, t_b, s_a, s_b, mask, heads, loss_id, scale_t, scale_s, check_finite):
    batch, length = t_a.shape[:2]
    lse = (t_a.new_empty((batch * heads, length), dtype=torch.float32) for _ in range(2))
    return (t_a.new_empty((), dtype=torch.float32), t_a.new_empty((batch, length), dtype=torch.int8),
            t_a.new_empty((batch, length), dtype=torch.float32), *lse,
            t_a.new_empty((3, batch * heads, length), dtype=torch.float32))


@torch.library.custom_op("pykd::attention_relation_triton_backward", mutates_args=())
def _triton_grads(t_a: Tensor, t_b: Tensor, s_a: Tensor, s_b: Tensor, key_valid: Tensor, weight: Tensor,
                  lse_t: Tensor, lse_s: Tensor, delta: Tensor, grad_loss: Tensor, heads: int, loss_id: int,
                  scale_t: float, scale_s: float) -> tuple[Tensor, Tensor]:
    from ..kernels import attention_relation as kernel

    with autocast_off(s_a):
        return kernel.relation_backward(t_a, t_b, s_a, s_b, (key_valid, weight, lse_t, lse_s, delta), grad_loss,
                                        heads, loss_id, scale_t, scale_s)


@_triton_grads.register_fake
def _(t_a, t_b, s_a, s_b, key_valid, weight, lse_t, lse_s, delta, grad_loss, heads, loss_id, scale_t, scale_s):
    return torch.empty_like(s_a), torch.empty_like(s_b)


def _triton_setup_context(ctx, inputs, output):
    t_a, t_b, s_a, s_b, _mask, heads, loss_id, scale_t, scale_s, _check = inputs
    ctx.save_for_backward(t_a, t_b, s_a, s_b, *output[1:])
    ctx.kernel_args = (heads, loss_id, scale_t, scale_s)


def _triton_backward(ctx, grad_loss, *_saved_grads):
    grad_a, grad_b = _triton_grads(*ctx.saved_tensors, grad_loss, *ctx.kernel_args)
    need = ctx.needs_input_grad
    return (None, None, grad_a if need[2] else None, grad_b if need[3] else None) + (None,) * 6


_triton_loss.register_autograd(_triton_backward, setup_context=_triton_setup_context)
