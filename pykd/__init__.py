"""pykd: fused kernels for knowledge distillation and architecture search of transformer encoders."""
from .capture import capture
from .moe import ArchRouter, RoutedLinear
from .ops import (
    attention_relation_loss,
    attention_relation_loss_reference,
    mi_lower_bound,
    mi_lower_bound_reference,
    routed_linear,
    routed_linear_reference,
    vocab_kd_loss,
    vocab_kd_loss_reference,
)

__version__ = "0.1.0"
__all__ = [
    "ArchRouter",
    "RoutedLinear",
    "capture",
    "attention_relation_loss",
    "attention_relation_loss_reference",
    "mi_lower_bound",
    "mi_lower_bound_reference",
    "routed_linear",
    "routed_linear_reference",
    "vocab_kd_loss",
    "vocab_kd_loss_reference",
]
