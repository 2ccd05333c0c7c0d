"""pykd: fused kernels for knowledge distillation and architecture search of transformer encoders."""
from .ops import attention_relation_loss, attention_relation_loss_reference, mi_lower_bound, mi_lower_bound_reference

__version__ = "0.1.0"
__all__ = ["attention_relation_loss", "attention_relation_loss_reference", "mi_lower_bound", "mi_lower_bound_reference"]
