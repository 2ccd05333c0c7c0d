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
from torch import Tensor

from .._extension import cpu_extension
from ._backends import autocast_off, no_limits, select_backend
from ._checks import check_nonempty, check_same_device, check_tensor, int_arg


def routed_linear(x: Tensor, experts_w: Tensor, alpha: Tensor, experts_b: Tensor | None = None,
                  out_features: int | None = None, *, backend: str = "auto") -> Tensor:
    """y = x W^T + bias with W and bias mixed from the experts by alpha (see the module docstring).

    Args:
        x: input features; its last dimension d (at most D_max) is the active input width.
        experts_w: the E expert weights.
        alpha: mixing coefficients, layer-wise (one per expert) or neuron-wise (one per output
            feature and expert), e.g. from ArchRouter.
        experts_b: the expert biases, or None.
        out_features: active output width f (default: F_max layer-wise, alpha's rows neuron-wise).
        backend: "auto" (C++ for CPU tensors, Triton for CUDA ones), "reference", "cpp" or
            "triton"; a forced backend that cannot take the inputs raises ValueError saying why.
    Shapes:
        x (..., d), experts_w (E, F_max, D_max), alpha (E,) or (f, E), experts_b (E, F_max)
        -> y (..., f). Zero tokens (x of shape (0, d)) give an empty y, as nn.Linear does.
    Returns:
        y in x's dtype, accumulated in fp32 on the fused paths (in float64 by the reference when
        an input is float64). Inside an autocast region x is first cast to the autocast dtype, so
        y comes out in it as nn.Linear's output does; the experts are read in their own dtype.
        Gradients reach x, experts_w, alpha and experts_b.
    """
    f = validate_routed_args(x, experts_w, alpha, experts_b, out_features)
    x = _autocast_input(x)
    path = select_backend(backend, "x", x, no_limits)
    if path == "reference":
        return _reference(x, experts_w, alpha, experts_b, f)
    op = torch.ops.pykd.routed_linear_cpp if path == "cpp" else torch.ops.pykd.routed_linear_triton
    return op(x.reshape(-1, x.shape[-1]), experts_w, alpha, experts_b, f).reshape(*x.shape[:-1], f)


def routed_linear_reference(x: Tensor, experts_w: Tensor, alpha: Tensor, experts_b: Tensor | None = None,
                            out_features: int | None = None) -> Tensor:
    """Plain PyTorch routed linear: materialises W and the bias, then F.linear.

    Args:
        x, experts_w, alpha, experts_b, out_features: as in routed_linear.
    Shapes:
        as in routed_linear.
    Returns:
        y (..., f) in x's dtype, computed in float64 when any of x, experts_w, alpha is float64,
        else in float32 (with autocast off).
    """
    f = validate_routed_args(x, experts_w, alpha, experts_b, out_features)
    return _reference(x, experts_w, alpha, experts_b, f)


def mixed_weight(experts_w: Tensor, alpha: Tensor, experts_b: Tensor | None, out_features: int, in_features: int):
    """The dense (W, bias) the experts and alpha give for the active shape (materialised).

    Args:
        experts_w, alpha, experts_b: as in routed_linear.
        out_features, in_features: the active shape (f, d).
    Shapes:
        W (f, d), bias (f,).
    Returns:
        (W, bias) in the experts' dtypes; bias is None without experts_b.
    """
    w = experts_w[:, :out_features, :in_features]
    b = experts_b[:, :out_features] if experts_b is not None else None
    if alpha.dim() == 1:
        weight = torch.einsum("e,efd->fd", alpha.to(w.dtype), w)
        bias = torch.einsum("e,ef->f", alpha.to(b.dtype), b) if b is not None else None
    else:
        weight = torch.einsum("fe,efd->fd", alpha.to(w.dtype), w)
        bias = torch.einsum("fe,ef->f", alpha.to(b.dtype), b) if b is not None else None
    return weight, bias


def _reference(x, experts_w, alpha, experts_b, f: int) -> Tensor:
    dtype = torch.float64 if torch.float64 in (x.dtype, experts_w.dtype, alpha.dtype) else torch.float32
    with autocast_off(x):
        weight, bias = mixed_weight(experts_w.to(dtype), alpha.to(dtype),
                                    experts_b.to(dtype) if experts_b is not None else None, f, x.shape[-1])
        out = torch.nn.functional.linear(x.to(dtype), weight, bias)
    return out if x.dtype == torch.float64 else out.to(x.dtype)


def _autocast_input(x: Tensor) -> Tensor:
    device = x.device.type
    return x.to(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else x


def validate_routed_args(x, experts_w, alpha, experts_b, out_features) -> int:
    """Checks the arguments of routed_linear; returns the active output width f."""
    check_tensor("x", x)
    check_tensor("experts_w", experts_w, ndim=3)
    check_tensor("alpha", alpha)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have shape (..., in_features) with in_features >= 1, got shape {tuple(x.shape)}")
    check_nonempty("experts_w", experts_w, "(experts, max out_features, max in_features)")
    num_experts, f_max, d_max = experts_w.shape
    d = x.shape[-1]
    if d > d_max:
        raise ValueError(f"x has {d} input features (shape {tuple(x.shape)}) but the experts have only "
                         f"{d_max} (experts_w shape {tuple(experts_w.shape)})")
    if out_features is not None:
        out_features = int_arg("out_features", out_features)
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
    if not 1 <= f <= f_max:
        raise ValueError(f"out_features must be an int in [1, {f_max}] (experts_w shape {tuple(experts_w.shape)}), "
                         f"got {f!r}")
    if experts_b is not None:
        check_tensor("experts_b", experts_b, ndim=2)
        if tuple(experts_b.shape) != (num_experts, f_max):
            raise ValueError(f"experts_b must have shape ({num_experts}, {f_max}), got {tuple(experts_b.shape)}")
    check_same_device(x=x, experts_w=experts_w, alpha=alpha, experts_b=experts_b)
    return f


# ---- the fused paths as custom ops: one graph under torch.compile, autograd registered below ----
# Each takes x flattened to (N, d). Backward ops return an empty tensor for a gradient not asked for.

@torch.library.custom_op("pykd::routed_linear_cpp", mutates_args=())
def _cpp_forward(x: Tensor, experts_w: Tensor, alpha: Tensor, experts_b: Tensor | None, f: int) -> Tensor:
    with autocast_off(x):
        return cpu_extension().routed_linear_forward(x, experts_w, alpha, experts_b, f).to(x.dtype)


@torch.library.custom_op("pykd::routed_linear_cpp_backward", mutates_args=())
def _cpp_backward(grad_y: Tensor, x: Tensor, experts_w: Tensor, alpha: Tensor, experts_b: Tensor | None, f: int,
                  needs: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    with autocast_off(x):
        grads = cpu_extension().routed_linear_backward(grad_y, x, experts_w, alpha, experts_b, f, *needs)
    return _in_dtypes(grads, (x, experts_w, alpha, experts_b), needs)


@torch.library.custom_op("pykd::routed_linear_triton", mutates_args=())
def _triton_forward(x: Tensor, experts_w: Tensor, alpha: Tensor, experts_b: Tensor | None, f: int) -> Tensor:
    from ..kernels import routed_linear as kernel

    with autocast_off(x):
        return kernel.routed_forward(x, experts_w, alpha, experts_b, f)


@torch.library.custom_op("pykd::routed_linear_triton_backward", mutates_args=())
def _triton_backward(grad_y: Tensor, x: Tensor, experts_w: Tensor, alpha: Tensor, experts_b: Tensor | None, f: int,
                     needs: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from ..kernels import routed_linear as kernel

    with autocast_off(x):
        grads = kernel.routed_backward(grad_y.contiguous(), x, experts_w, alpha, experts_b, f, needs[0])
    return _in_dtypes(grads, (x, experts_w, alpha, experts_b), needs)


def _in_dtypes(grads, inputs, needs) -> tuple[Tensor, ...]:
    """Each asked-for gradient in its input's dtype, an empty tensor for the others."""
    return tuple(grad.to(inp.dtype) if need else inputs[0].new_empty(0)
                 for grad, inp, need in zip(grads, inputs, needs))


@_cpp_forward.register_fake
@_triton_forward.register_fake
def _forward_fake(x, experts_w, alpha, experts_b, f):
    return x.new_empty((x.shape[0], f))


@_cpp_backward.register_fake
@_triton_backward.register_fake
def _backward_fake(grad_y, x, experts_w, alpha, experts_b, f, needs):
    return tuple(torch.empty_like(inp) if need else x.new_empty(0)
                 for inp, need in zip((x, experts_w, alpha, experts_b), needs))


def _setup_context(ctx, inputs, output):
    x, experts_w, alpha, experts_b, f = inputs
    ctx.save_for_backward(x, experts_w, alpha, experts_b)
    ctx.f = f


def _autograd_through(backward_op):
    def backward(ctx, grad_y):
        x, experts_w, alpha, experts_b = ctx.saved_tensors
        needs = list(ctx.needs_input_grad[:4])
        grads = backward_op(grad_y, x, experts_w, alpha, experts_b, ctx.f, needs)
        return (*(grad if need else None for grad, need in zip(grads, needs)), None)

    return backward


_cpp_forward.register_autograd(_autograd_through(_cpp_backward), setup_context=_setup_context)
_triton_forward.register_autograd(_autograd_through(_triton_backward), setup_context=_setup_context)
