"""Fused ops: autograd Functions over the C++ (CPU) and Triton (GPU) kernels, each with a reference."""
from .attention_relation import attention_relation_loss, attention_relation_loss_reference

__all__ = ["attention_relation_loss", "attention_relation_loss_reference"]
