"""Argument checks shared by the ops: every error names the argument and what it got.

Scalar arguments (heads, scales, alpha, out_features) take Python numbers and NumPy scalars,
converted with int() / float(); tensors are refused with a TypeError even when 0-d, since the
value is baked into the kernel launch (a tensor would be read back from the device, and a
gradient with respect to it would silently be dropped). bool is refused where a number is meant.
"""
import numbers
import sys

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(name: str, x, ndim: int | None = None) -> None:
    """x is a floating tensor with data (not on the meta device), with ndim dimensions if given."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {x.dtype}; supported: float32, float16, bfloat16, float64")
    check_has_data(name, x)
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")


def check_has_data(name: str, x: torch.Tensor) -> None:
    if x.device.type == "meta":
        raise ValueError(f"{name} is on device meta (shape {tuple(x.shape)}): the ops compute values, so they need "
                         f"tensors with data (cpu or cuda)")


def check_nonempty(name: str, x: torch.Tensor, dims: str) -> None:
    """Every dimension of x (named by dims, e.g. "(batch, length, width)") is at least 1."""
    if x.numel() == 0:
        raise ValueError(f"{name} has an empty dimension: shape {tuple(x.shape)} for {dims}, each must be at least 1")


def int_arg(name: str, value) -> int:
    """A Python or NumPy integer as int; anything else is a TypeError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a Python int (or NumPy integer), got {_describe(value)}")
    return int(value)


def real_arg(name: str, value) -> float:
    """A Python or NumPy real number as float; anything else is a TypeError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a Python float (or NumPy scalar), got {_describe(value)}")
    return float(value)


def is_finite(value) -> bool:
    """math.isfinite for a real number, written as a comparison that torch.compile traces when the
    number is symbolic (a SymFloat under dynamic=True, which math.isfinite cannot take). Compiled,
    it becomes a guard checked on every call: -inf < x < inf would not, since the compiler takes a
    symbolic float to be finite and drops that comparison as always true."""
    return abs(value) <= sys.float_info.max


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a torch.Tensor of shape {tuple(value.shape)}; pass a number (e.g. tensor.item())"
    return f"{type(value).__name__} {value!r}"


def check_same_device(**tensors) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listed}")


def check_token_mask(mask, batch: int, length: int) -> None:
    """A (B, L) bool padding mask with data; whether every example keeps a token is checked when
    the op runs (valid_token_counts), since it depends on the mask's values."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a bool torch.Tensor of shape ({batch}, {length}), got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must have dtype torch.bool (True for real tokens), got {mask.dtype}")
    check_has_data("mask", mask)
    if tuple(mask.shape) != (batch, length):
        raise ValueError(f"mask must have shape ({batch}, {length}), got {tuple(mask.shape)}")


def valid_token_counts(mask: torch.Tensor) -> torch.Tensor:
    """Valid tokens per example of a (B, L) mask; an example without any is a ValueError."""
    counts = mask.sum(dim=1)
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"mask has no valid token in example(s) {empty}; every example needs at least one")
    return counts


def check_finite_where_valid(mask: torch.Tensor | None, **tensors) -> None:
    """No NaN/Inf in the (B, L, D) tensors at valid tokens; padded positions may hold anything."""
    for name, t in tensors.items():
        finite = torch.isfinite(t).all(dim=-1)
        if mask is not None:
            finite = finite | ~mask
        if not bool(finite.all()):
            raise ValueError(f"{name} contains NaN or Inf at a valid token (shape {tuple(t.shape)})")
