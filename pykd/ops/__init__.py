"""Fused ops: custom ops (torch.library) over the C++ (CPU) and Triton (GPU) kernels, each with a reference.

One op per module (math in its docstring, input checks, the custom op, a plain PyTorch reference); each
exports the names of its choices (attention_relation.LOSSES, mi_bound.BOUNDS) that the configs take.
May import torch, pykd._extension (pykd._C) and pykd.kernels; knows nothing of models, configs or training.
"""
from .attention_relation import attention_relation_loss, attention_relation_loss_reference
from .mi_bound import mi_lower_bound, mi_lower_bound_reference
from .routed_linear import routed_linear, routed_linear_reference
from .vocab_kd import vocab_kd_loss, vocab_kd_loss_reference

__all__ = [
    "attention_relation_loss",
    "attention_relation_loss_reference",
    "mi_lower_bound",
    "mi_lower_bound_reference",
    "routed_linear",
    "routed_linear_reference",
    "vocab_kd_loss",
    "vocab_kd_loss_reference",
]
