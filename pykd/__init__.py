"""pykd: fused kernels for knowledge distillation and architecture search of transformer encoders.

The rooms, each importing only those below it:

    pykd.cli                    the command line (pykd finetune | distill | demo | nas | hpo | recommend)
    pykd.integrations           pykd inside other frameworks (transformers' Trainer: DistillationTrainer)
    pykd.distiller              Distiller's meta layer: the pipeline vocabulary, HPO, AutoDistiller
    pykd.nas                    architecture search: spaces, SuperLM, sandwich training, search
    pykd.distill                the KD engine: config, data, losses, trainer
    pykd.capture, pykd.moe      Q/K/V capture of HF encoders; routed linear layers
    pykd.ops                    the fused ops (torch custom ops, each with a reference)
    pykd.kernels, pykd._C       Triton kernels (kernels/ in a checkout), C++ kernels (csrc/)

This module exports the ops, capture and the MoS layers, and (imported on first use, it needs the
`pykd-distill[kd]` extra) the KD engine's loss module for any training loop, `KDLoss` (pykd.distill.kd_loss).
"""
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
_ENGINE_EXPORTS = ("KDLoss", "KDLossOutput")  # from pykd.distill.kd_loss, imported when first asked for
__all__ = [
    "ArchRouter",
    "KDLoss",
    "KDLossOutput",
    "RoutedLinear",
    "attention_relation_loss",
    "attention_relation_loss_reference",
    "capture",
    "mi_lower_bound",
    "mi_lower_bound_reference",
    "routed_linear",
    "routed_linear_reference",
    "vocab_kd_loss",
    "vocab_kd_loss_reference",
]


def __getattr__(name: str):
    """KDLoss and KDLossOutput, imported on first use (the KD engine needs transformers; the ops do not)."""
    if name in _ENGINE_EXPORTS:
        from .distill import kd_loss

        return getattr(kd_loss, name)
    raise AttributeError(f"module 'pykd' has no attribute {name!r}")
