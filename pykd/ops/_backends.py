"""Which backend runs an op: each says why it declines the inputs, "auto" takes the first that accepts.

A backend declines for its device (C++ takes CPU tensors, Triton CUDA ones, or CPU ones under
TRITON_INTERPRET=1; the reference takes any) or for a limit of its kernels, which each op states
in a `limits(backend) -> list of reasons` function. A forced backend that declines raises a
ValueError listing its reasons; "auto" tries the fused paths, then the reference, which runs
anything, and warns when a fused path for the inputs' device declined them (the reference
materialises what the fused paths stream).
"""
import contextlib
import importlib.util
import os
import warnings
from collections.abc import Callable

import torch

BACKENDS = ("auto", "reference", "cpp", "triton")
# "auto" tries these in order, then the reference (on CPU, C++ comes before the Triton interpreter).
FUSED = ("cpp", "triton")
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def device_reasons(backend: str, name: str, x: torch.Tensor) -> list[str]:
    """Why `backend` cannot run on x's device (empty when it can)."""
    if backend == "cpp" and x.device.type != "cpu":
        return [f"the C++ kernels take CPU tensors, got {name} on {x.device}"]
    if backend == "triton" and not (x.is_cuda or (x.device.type == "cpu" and interpreting())):
        return [f"the Triton kernels take CUDA tensors (CPU ones only under TRITON_INTERPRET=1), got {name} on "
                f"{x.device}"]
    return []


def _availability_reasons(backend: str) -> list[str]:
    if backend == "triton" and not _TRITON_INSTALLED:
        return ["triton is not installed (pip install triton)"]
    return []


def select_backend(requested: str, name: str, x: torch.Tensor, limits: Callable[[str], list[str]]) -> str:
    """The backend that runs an op on inputs whose device is x's (named `name` in messages).

    Args:
        requested: "auto", "reference", "cpp" or "triton".
        name, x: the input whose device decides (all inputs share it once validated).
        limits: the op's kernel limits, limits(backend) -> reasons it declines these inputs
            (asked for "cpp" and "triton"; the reference has none).
    Returns:
        The backend's name; a forced one that declines raises ValueError with its reasons.
    """
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {requested!r}")
    if requested != "auto":
        reasons = device_reasons(requested, name, x) or _availability_reasons(requested) or limits(requested)
        if reasons:
            raise ValueError(f"backend={requested!r} declined: {'; '.join(reasons)}")
        return requested
    declined = []
    for backend in FUSED:
        if device_reasons(backend, name, x):
            continue
        reasons = _availability_reasons(backend) or limits(backend)
        if not reasons:
            return backend
        declined.append(f"{backend} declined: {'; '.join(reasons)}")
    if declined and not torch.compiler.is_compiling():  # warnings.warn would break a compiled graph
        warnings.warn(f"backend='auto' runs the reference: {'; '.join(declined)}", stacklevel=3)
    return "reference"


def no_limits(backend: str) -> list[str]:
    """For ops whose kernels take any size their device holds."""
    return []


def autocast_off(x: torch.Tensor):
    """The fused paths run with autocast off: their kernels read every float dtype and accumulate in
    fp32 themselves, and autocast would otherwise lower the C++ path's internal GEMMs to fp16/bf16."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()  # entering torch.autocast costs ~10 us a call
