"""Forward+backward steps of SuperLMs on the packaged MiniLM-L6 teacher, for the SuperLM benchmarks.

Variants of `superlm_step(variant, batch, length)` (all eval mode, so no dropout; gradients on):
- "hf":             the plain teacher (BertModel).
- "superlm_full":   a SuperLM with the teacher's shape active.
- "superlm_mid":    the SuperLM with MID_ARCH active.
- "exported_mid":   MID_ARCH exported from the SuperLM as a plain BertModel.
The loss is the mean square of the last hidden state plus that of the pooler output.
"""
import functools

import torch

from pykd.distill.models import load_pretrained
from pykd.nas import Architecture, SearchSpace, SuperLM

MID_ARCH = Architecture(layers=4, hidden=288, ffn_ratio=3.0, heads=9)  # the MiniLM "base" sub-space's middle


@functools.lru_cache(maxsize=1)
def teacher():
    return load_pretrained("minilm-l6", "unlabeled").eval()


@functools.lru_cache(maxsize=None)
def supernet(experts: int = 1, routing: str = "layer"):
    model = teacher()
    options = {} if experts == 1 else {"experts": experts, "routing": routing}
    return SuperLM.from_teacher(model, SearchSpace.autodistil(model), **options).eval()


def encoder_loss(out) -> torch.Tensor:
    return out.last_hidden_state.pow(2).mean() + out.pooler_output.pow(2).mean()


def model_for(variant: str):
    if variant == "hf":
        return teacher()
    if variant == "superlm_full":
        net = supernet()
        net.set_active(net.space.teacher_architecture())
        return net
    if variant == "superlm_mid":
        net = supernet()
        net.set_active(MID_ARCH)
        return net
    if variant == "exported_mid":
        return supernet().export(MID_ARCH)
    raise ValueError(f"unknown SuperLM benchmark variant {variant!r}")


def superlm_step(variant: str, batch: int, length: int):
    """The fwd+bwd callable of one variant on a real-text batch (see the module docstring)."""
    from kd_step import kd_batch

    inputs = kd_batch(batch, length)
    model = model_for(variant)

    def step():
        model.zero_grad(set_to_none=True)
        loss = encoder_loss(model(**inputs))
        loss.backward()
        return float(loss.detach())

    return step
