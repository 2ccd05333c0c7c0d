r"""Routed linear layer of a Mixture-of-Supernets: weights generated from E experts per architecture.

Experts W_e (F_max x D_max) with optional biases b_e (F_max), e = 1..E. The active sub-network
uses the top-left f x d slice (f <= F_max outputs, d <= D_max inputs, d = x.shape[-1]):

    layer-wise   alpha (E,):    W = sum_e alpha_e W_e[:f, :d],          bias = sum_e alpha_e b_e[:f]
    neuron-wise  alpha (f, E):  W[j] = sum_e alpha_je W_e[j, :d],       bias[j] = sum_e alpha_je b_e[j]
    y = x W^T + bias

With dW = dy^T x and db = sum over tokens of dy (computed once, whatever E is):

    dx = dy W
    layer-wise   dW_e[:f, :d] = alpha_e dW,     db_e[:f] = alpha_e db,     dalpha_e = <dW, W_e> + <db, b_e>
    neuron-wise  dW_e[j, :d] = alpha_je dW[j],  db_e[j] = alpha_je db[j],  dalpha_je = <dW[j], W_e[j]> + db[j] b_e[j]

and zero gradient outside the active slice. The fused paths never materialise W: they mix
expert tiles on the fly inside a blocked GEMM (C++: a tile of output features at a time; Triton:
the experts are combined in the K-loop before each tl.dot).
"""

import torch

from .._extension import cpu_extension
from ._checks import check_same_device, check_tensor, resolve_backend



def routed_linear(x: torch.Tensor, experts_w: torch.Tensor, alpha: torch.Tensor,
                  experts_b: torch.Tensor | None = None, out_features: int | None = None, *,
                  backend: str = "auto") -> torch.Tensor:
    """y = x W^T + bias with W, bias mixed from the experts by alpha (see the module docstring).

    x (..., d); experts_w (E, F_max, D_max); alpha (E,) layer-wise or (f, E) neuron-wise;
    experts_b (E, F_max) or None; out_features f (default: F_max, or alpha's rows when
    neuron-wise). Returns (..., f) in x's dtype.
    """
    f = validate_routed_args(x, experts_w, alpha, experts_b, out_features)
    path = resolve_backend(backend, x)
    if path == "reference":
        return routed_linear_reference(x, experts_w, alpha, experts_b, f)
    function = _CppRoutedLinear if path == "cpp" else _TritonRoutedLinear
    return function.apply(x, experts_w, alpha, experts_b, f)


def mixed_weight(experts_w, alpha, experts_b, out_features: int, in_features: int):
    """The dense (W, bias) the experts and alpha give for the active shape (materialised)."""
    w = experts_w[:, :out_features, :in_features]
    b = experts_b[:, :out_features] if experts_b is not None else None
    if alpha.dim() == 1:
        weight = torch.einsum("e,efd->fd", alpha.to(w.dtype), w)
        bias = torch.einsum("e,ef->f", alpha.to(b.dtype), b) if b is not None else None
    else:
        weight = torch.einsum("fe,efd->fd", alpha.to(w.dtype), w)
        bias = torch.einsum("fe,ef->f", alpha.to(b.dtype), b) if b is not None else None
    return weight, bias


def routed_linear_reference(x, experts_w, alpha, experts_b=None, out_features=None) -> torch.Tensor:
    """Materialise W (and the bias), then F.linear; computes in float64 when any input is."""
    f = validate_routed_args(x, experts_w, alpha, experts_b, out_features)
    dtype = torch.float64 if torch.float64 in (x.dtype, experts_w.dtype, alpha.dtype) else torch.float32
    weight, bias = mixed_weight(experts_w.to(dtype), alpha.to(dtype),
                                experts_b.to(dtype) if experts_b is not None else None, f, x.shape[-1])
    out = torch.nn.functional.linear(x.to(dtype), weight, bias)
    return out if x.dtype == torch.float64 else out.to(x.dtype)


def validate_routed_args(x, experts_w, alpha, experts_b, out_features) -> int:
    check_tensor("x", x)
    check_tensor("experts_w", experts_w, ndim=3)
    check_tensor("alpha", alpha)
    if x.dim() < 1:
        raise ValueError(f"x must have at least one dimension (..., in_features), got shape {tuple(x.shape)}")
    num_experts, f_max, d_max = experts_w.shape
    d = x.shape[-1]
    if d > d_max:
        raise ValueError(f"x has {d} input features (shape {tuple(x.shape)}) but the experts have only "
                         f"{d_max} (experts_w shape {tuple(experts_w.shape)})")
    if alpha.dim() == 1:
        f = f_max if out_features is None else out_features
        if alpha.shape[0] != num_experts:
            raise ValueError(f"layer-wise alpha must have shape ({num_experts},) for {num_experts} experts, got "
                             f"{tuple(alpha.shape)}")
    elif alpha.dim() == 2:
        f = alpha.shape[0] if out_features is None else out_features
        if tuple(alpha.shape) != (f, num_experts):
            raise ValueError(f"neuron-wise alpha must have shape (out_features, E) = ({f}, {num_experts}), got "
                             f"{tuple(alpha.shape)}")
    else:
        raise ValueError(f"alpha must be (E,) layer-wise or (out_features, E) neuron-wise, got shape "
                         f"{tuple(alpha.shape)}")
    if isinstance(f, bool) or not isinstance(f, int) or not 1 <= f <= f_max:
        raise ValueError(f"out_features must be an int in [1, {f_max}] (experts_w shape {tuple(experts_w.shape)}), "
                         f"got {f!r}")
    if experts_b is not None:
        check_tensor("experts_b", experts_b, ndim=2)
        if tuple(experts_b.shape) != (num_experts, f_max):
            raise ValueError(f"experts_b must have shape ({num_experts}, {f_max}), got {tuple(experts_b.shape)}")
    check_same_device(x=x, experts_w=experts_w, alpha=alpha, experts_b=experts_b)
    return f


def _flatten_tokens(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


class _CppRoutedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, experts_w, alpha, experts_b, f):
        x2 = _flatten_tokens(x)
        y = cpu_extension().routed_linear_forward(x2, experts_w, alpha, experts_b, f)
        ctx.save_for_backward(x2, experts_w, alpha, experts_b)
        ctx.meta = (x.shape, f)
        return y.reshape(*x.shape[:-1], f).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        x2, experts_w, alpha, experts_b = ctx.saved_tensors
        x_shape, f = ctx.meta
        need = ctx.needs_input_grad
        grad_x, grad_w, grad_alpha, grad_b = cpu_extension().routed_linear_backward(
            _flatten_tokens(grad_y), x2, experts_w, alpha, experts_b, f, need[0], need[1], need[2], need[3])
        return (
            grad_x.reshape(x_shape).to(x2.dtype) if need[0] else None,
            grad_w.to(experts_w.dtype) if need[1] else None,
            grad_alpha.to(alpha.dtype) if need[2] else None,
            grad_b.to(experts_b.dtype) if need[3] else None,
            None,
        )


class _TritonRoutedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, experts_w, alpha, experts_b, f):
        from ..kernels import routed_linear as kernel

        x2 = _flatten_tokens(x)
        y = kernel.routed_forward(x2, experts_w, alpha, experts_b, f)
        ctx.save_for_backward(x2, experts_w, alpha, experts_b)
        ctx.meta = (x.shape, f)
        return y.reshape(*x.shape[:-1], f)

    @staticmethod
    def backward(ctx, grad_y):
        from ..kernels import routed_linear as kernel

        x2, experts_w, alpha, experts_b = ctx.saved_tensors
        x_shape, f = ctx.meta
        need = ctx.needs_input_grad
        grad_x, grad_w, grad_alpha, grad_b = kernel.routed_backward(
            _flatten_tokens(grad_y), x2, experts_w, alpha, experts_b, f, need[0])
        return (
            grad_x.reshape(x_shape) if need[0] else None,
            grad_w if need[1] else None,
            grad_alpha if need[2] else None,
            grad_b if need[3] else None,
            None,
        )
