"""Argument checks shared by the ops: every error names the argument and what it got."""
import os

import torch

BACKENDS = ("auto", "reference", "cpp", "triton")

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(name: str, x, ndim: int | None = None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {x.dtype}; supported: float32, float16, bfloat16, float64")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")


def check_same_device(**tensors) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listed}")


def check_finite(**tensors) -> None:
    for name, t in tensors.items():
        if t is not None and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or Inf (shape {tuple(t.shape)})")


def check_token_mask(mask, batch: int, length: int):
    """Validates a (B, L) bool padding mask; returns the number of valid tokens per example."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a bool torch.Tensor of shape ({batch}, {length}), got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must have dtype torch.bool (True for real tokens), got {mask.dtype}")
    if tuple(mask.shape) != (batch, length):
        raise ValueError(f"mask must have shape ({batch}, {length}), got {tuple(mask.shape)}")
    counts = mask.sum(dim=1)
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"mask has no valid token in example(s) {empty}; every example needs at least one")
    return counts


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """"auto" sends CUDA tensors to Triton and CPU tensors to C++; a forced path must fit the device."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if x.is_cuda else "cpp"
    if backend == "cpp" and x.device.type != "cpu":
        raise ValueError(f"backend='cpp' needs CPU tensors, got tensors on {x.device}")
    if backend == "triton" and not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got {x.device}")
    return backend
