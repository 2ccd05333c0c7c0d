"""The optimiser, its learning-rate schedule and the autocast precision of a training run (`train` section).

    adamw   torch.optim.AdamW; weight decay on matrices (parameters of 2+ dimensions), none on vectors
    sgd     plain SGD (no momentum); weight decay as an L2 term on the same matrices

The learning rate rises linearly over the first max(1, warmup_fraction * steps) steps and falls
linearly to 0 at `steps`. Autocast: auto (bf16 on CUDA, none on CPU), bf16, fp16 or none.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

OPTIMIZERS = ("adamw", "sgd")  # train.optimizer
AUTOCAST = ("auto", "bf16", "fp16", "none")  # train.autocast


def build_optimizer(module: nn.Module, train) -> torch.optim.Optimizer:
    """The optimiser of `module`'s trainable parameters.

    Args:
        module: what trains (its parameters that require grad).
        train: the `train` section (optimizer, lr, weight_decay).
    """
    decay, no_decay = [], []
    for parameter in module.parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim < 2 else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=train.lr)
    return torch.optim.AdamW(groups, lr=train.lr)


def linear_schedule(optimizer: torch.optim.Optimizer, train) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over max(1, warmup_fraction * steps) steps, then linear decay to 0 at train.steps."""
    total = train.steps
    warmup = max(1, int(train.warmup_fraction * total))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def autocast(choice: str, device: torch.device):
    """The autocast context of train.autocast `choice` on `device`."""
    if choice == "auto":
        choice = "bf16" if device.type == "cuda" else "none"
    if choice == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if choice == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)
