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

A capture belongs to the thread that opened it: forwards of the same model on other threads are
not recorded (and may be captured there independently). Captures nest: every capture open on a
model records each of its forwards, whatever model is captured inside or around it, and the
model's attention implementation comes back when the last capture of it closes, in any order.
"""
from __future__ import annotations

import threading
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
    """The layers recorded during one forward call of a model, on the thread that opened the capture."""

    def __init__(self, model: nn.Module):
        self.layers: list[LayerCapture] = []
        self._mask: torch.Tensor | None = None
        self._thread = threading.get_ident()
        # Ids of the model's modules: the attention function is handed its module and records
        # into the open captures whose model holds it (the caller keeps the model alive).
        self._module_ids = frozenset(id(module) for module in model.modules())

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

    def _owns_this_thread(self) -> bool:
        return threading.get_ident() == self._thread

    def _open(self):
        """Forward pre-hook of the model: a new forward call starts a new record."""
        if not self._owns_this_thread():
            return
        self.layers, self._mask = [], None
        recording = _recording_on_this_thread()
        if self not in recording:
            recording.append(self)

    def _close(self):
        """Forward hook of the model (also when the forward raised), and the end of the block."""
        if not self._owns_this_thread():
            return
        recording = _recording_on_this_thread()
        if self in recording:
            recording.remove(self)

    def _record(self, module, query, key, value, mask):
        if id(module) not in self._module_ids:
            return
        self.layers.append(LayerCapture(query, key, value))
        if self._mask is None and mask is not None:
            self._mask = _key_padding_mask(mask, query.shape[0], key.shape[2])


_thread_state = threading.local()


def _recording_on_this_thread() -> list[Capture]:
    """The captures whose model's forward is running on this thread."""
    if not hasattr(_thread_state, "recording"):
        _thread_state.recording = []
    return _thread_state.recording


def _key_padding_mask(mask: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """Reduces SDPA's (B, 1|H, L_q, L_k) mask (bool: True = attend; float: 0 = attend) to (B, L_k)."""
    allowed = mask if mask.dtype == torch.bool else mask == 0
    # A bidirectional padding mask allows a key for every query or for none; any() keeps
    # a key that some query sees.
    return allowed.expand(batch, -1, -1, length).any(dim=(1, 2))


def _capturing_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    for recorder in _recording_on_this_thread():
        recorder._record(module, query, key, value, attention_mask)
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


# The attention implementation each captured config had before its first open capture, and how
# many captures hold it; the last one to close restores it, whatever the order of closing.
_held_configs: dict[int, list] = {}
_held_configs_lock = threading.Lock()


def _hold_configs(configs) -> None:
    with _held_configs_lock:
        for config in configs:
            held = _held_configs.get(id(config))
            if held is None:
                # the entry keeps the config alive, so its id cannot be reused while held
                _held_configs[id(config)] = [config, config._attn_implementation, 1]
                config._attn_implementation = IMPLEMENTATION
            else:
                held[2] += 1


def _release_configs(configs) -> None:
    with _held_configs_lock:
        for config in configs:
            held = _held_configs[id(config)]
            held[2] -= 1
            if held[2] == 0:
                config._attn_implementation = held[1]
                del _held_configs[id(config)]


@contextmanager
def capture(model: nn.Module):
    """Records the attention inputs of every forward call of `model` within the block.

    Args:
        model: a Hugging Face encoder of a family in SUPPORTED_FAMILIES (or a task model around one).

    Shapes:
        cap[i].query, .key, .value (B, H, L, d) for layer i; cap.attention_mask (B, L) bool.

    Returns:
        a context manager yielding a `Capture`: after each forward inside the block, `cap[i].query`,
        `.key`, `.value` are layer i's (B, H, L, d) inputs and `cap.attention_mask` is (B, L) bool.
        Only forwards on the thread that entered the block are recorded; captures may nest (each
        records the forwards of its own model) and restore the model's attention implementation
        when the last one exits.
    """
    check_supported(model)
    _register()
    recorder = Capture(model)
    configs = _configs(model)
    hooks = [model.register_forward_pre_hook(lambda *_: recorder._open()),
             model.register_forward_hook(lambda *_: recorder._close(), always_call=True)]
    _hold_configs(configs)
    try:
        yield recorder
    finally:
        _release_configs(configs)
        for hook in hooks:
            hook.remove()
        recorder._close()
