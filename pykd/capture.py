"""Record each attention layer's query, key, value and padding mask of a Hugging Face encoder.

pykd registers an attention implementation named ``pykd_capture`` with transformers'
AttentionInterface: it hands Q, K, V and the mask to the active recorder and then calls the
ordinary SDPA function, so teacher and student keep fast attention and nobody needs
``output_attentions=True`` (which forces the eager path and materialises every L x L map).
The same name is registered with AttentionMaskInterface as SDPA's mask builder; without it
transformers would build no padding mask for an unknown implementation.

    with pykd.capture(model) as cap:
        out = model(**batch)
    cap[i].query, cap[i].key, cap[i].value     # (B, H, L, d), exactly as layer i's attention saw them
    cap.attention_mask                         # (B, L) bool, True for real tokens

Recording is per forward call: entering the model's forward clears the record, leaving it closes
the record, so the recomputation of gradient checkpointing (which runs the layers again during
backward) adds nothing. Layers are numbered in call order, which also handles ALBERT's single
shared layer.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

IMPLEMENTATION = "pykd_capture"
SUPPORTED_FAMILIES = ("bert", "roberta", "xlm-roberta", "camembert", "distilbert", "electra", "albert")


@dataclass(frozen=True)
class LayerCapture:
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor


class Capture:
    """The layers recorded during one forward call of a model."""

    def __init__(self):
        self.layers: list[LayerCapture] = []
        self._mask: torch.Tensor | None = None
        self._recording = False

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, index: int) -> LayerCapture:
        if not self.layers:
            raise IndexError("nothing was captured: run the model's forward inside `with pykd.capture(model)`")
        return self.layers[index]

    @property
    def attention_mask(self) -> torch.Tensor:
        """(B, L) bool, True for tokens every query may attend to."""
        query = self[0].query
        if self._mask is None:
            return torch.ones(query.shape[0], query.shape[2], dtype=torch.bool, device=query.device)
        return self._mask

    def _open(self):
        self.layers, self._mask, self._recording = [], None, True

    def _close(self):
        self._recording = False

    def _record(self, query, key, value, mask):
        if not self._recording:
            return
        self.layers.append(LayerCapture(query, key, value))
        if self._mask is None and mask is not None:
            self._mask = _key_padding_mask(mask, query.shape[0], key.shape[2])


def _key_padding_mask(mask: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """Reduces SDPA's (B, 1|H, L_q, L_k) mask (bool: True = attend; float: 0 = attend) to (B, L_k)."""
    allowed = mask if mask.dtype == torch.bool else mask == 0
    # A bidirectional padding mask allows a key for every query or for none; any() keeps
    # a key that some query sees.
    return allowed.expand(batch, -1, -1, length).any(dim=(1, 2))


def _capturing_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    recorder = getattr(module, "_pykd_recorder", None)
    if recorder is not None:
        recorder._record(query, key, value, attention_mask)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


_registered = False


def _register():
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, _capturing_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
    _registered = True


def check_supported(model: nn.Module) -> None:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_FAMILIES:
        raise ValueError(f"pykd.capture supports the encoder families {SUPPORTED_FAMILIES} (models that run "
                         f"attention through transformers' AttentionInterface), got model_type {model_type!r} "
                         f"({type(model).__name__})")


def _configs(model: nn.Module):
    """Every distinct config inside the model (a task head and its base model share one)."""
    seen = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            seen[id(config)] = config
    return list(seen.values())


@contextmanager
def capture(model: nn.Module):
    """Within the block every forward call of `model` records its attention inputs (see module docs)."""
    check_supported(model)
    _register()
    recorder = Capture()
    configs = _configs(model)
    previous = [config._attn_implementation for config in configs]
    tagged = [m for m in model.modules() if hasattr(m, "config")]
    for module in tagged:
        module._pykd_recorder = recorder
    hooks = [model.register_forward_pre_hook(lambda *_: recorder._open()),
             model.register_forward_hook(lambda *_: recorder._close())]
    for config in configs:
        config._attn_implementation = IMPLEMENTATION
    try:
        yield recorder
    finally:
        for config, implementation in zip(configs, previous):
            config._attn_implementation = implementation
        for hook in hooks:
            hook.remove()
        for module in tagged:
            del module._pykd_recorder
