r"""AutoDistil's SuperLM (arXiv 2201.12507): one copy of a teacher's weights, any sub-network of it.

`SuperLM.from_teacher(teacher, space)` deep-copies a BERT-layout encoder (a bare encoder or a
*ForSequenceClassification model) and turns its layers into elastic ones (pykd.nas.elastic): a
sub-network is the bottom-left extraction

- depth: student layer i runs teacher layer floor(i * L_t / L) (layers kept evenly, as
  pykd.distill.models cuts students);
- width: the top-left slice of every matrix: embeddings and LayerNorms [:hidden], Q/K/V
  [:hidden, :hidden] (the attention width is hidden, split into `heads` heads of size
  hidden / heads, see pykd.nas.space), the attention output [:hidden, :hidden], the FFN
  [:ffn, :hidden] and [:hidden, :ffn], the pooler [:hidden, :hidden], the classification head's
  input columns [:, :hidden].

The wrapped transformers model is `supernet.model` and runs its own forward: attention stays on
the model's AttentionInterface (SDPA), each attention module's head count, head size and scaling
are set per `set_active`, and the model's config describes the active sub-network (layers,
hidden, heads, FFN width). `pykd.capture(supernet)` (or of `supernet.model`) therefore records the
active sub-network's Q/K/V, of shape (B, heads, L, hidden / heads), one entry per active layer.

`export(arch)` builds a stock model of the teacher's class with the sub-network's weights; its
outputs equal the sub-network's. `save_student` writes it with the teacher's tokenizer.
"""
from __future__ import annotations

import copy
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .elastic import ActiveLayers, ElasticEmbedding, ElasticLayerNorm, ElasticLinear
from .space import Architecture, SearchSpace, TeacherShape

_LAYER_INDEX = re.compile(r"(^|\.)layer\.(\d+)\.")
# Linear layers whose output width is not the hidden size: the FFN's first layer and the
# classification heads' output projections (which keep all their labels).
_FFN_IN = "intermediate.dense"
_LABEL_OUTPUTS = ("classifier", "out_proj")


def teacher_layer(index: int, layers: int, teacher_layers: int) -> int:
    """The teacher layer that student layer `index` of `layers` runs: floor(index * L_t / layers)."""
    return index * teacher_layers // layers


def _check_teacher(teacher: nn.Module) -> None:
    name = type(teacher).__name__
    if not (name.endswith("Model") or name.endswith("ForSequenceClassification")):
        raise ValueError(f"SuperLM.from_teacher takes a bare encoder (AutoModel) or a *ForSequenceClassification "
                         f"model, got {name}")
    encoder = getattr(teacher, "base_model", teacher)
    if not hasattr(encoder, "encoder") or not hasattr(encoder.encoder, "layer"):
        raise ValueError(f"SuperLM needs a BERT-layout encoder (embeddings, encoder.layer[i] with attention, "
                         f"intermediate and output), got {name}")
    if getattr(teacher.config, "is_decoder", False) or getattr(teacher.config, "add_cross_attention", False):
        raise ValueError(f"SuperLM takes encoders only; {name} is configured as a decoder")


class SuperLM(nn.Module):
    """A super-network over one teacher: `set_active(arch)`, then call it like the teacher.

    Build it with `SuperLM.from_teacher`; see the module docstring for the extraction rule.
    """

    def __init__(self, model: nn.Module, space: SearchSpace, teacher_class: type, teacher_config):
        super().__init__()
        self.model = model
        self.space = space
        self.teacher_class = teacher_class
        self._teacher_config = teacher_config
        self.experts, self.routing = 1, "layer"
        base = getattr(model, "base_model", model)
        self._layers: ActiveLayers = base.encoder.layer
        self._active: Architecture | None = None
        self.set_active(space.teacher_architecture())

    @classmethod
    def from_teacher(cls, teacher: nn.Module, space: SearchSpace) -> "SuperLM":
        """A SuperLM holding a deep copy of the teacher's weights (the teacher stays untouched).

        Args:
            teacher: a BERT-layout transformers encoder (BERT, RoBERTa, ELECTRA with embedding_size ==
                hidden_size), bare or *ForSequenceClassification.
            space: the SearchSpace built for this teacher (its TeacherShape must match the teacher's).
        """
        if not isinstance(space, SearchSpace):
            raise TypeError(f"space must be a pykd.nas.SearchSpace, got {type(space).__name__}")
        shape = TeacherShape.from_model(teacher)  # the family first: its error names the model_type
        _check_teacher(teacher)
        if shape != space.teacher:
            raise ValueError(f"the search space was built for teacher {space.teacher}, but this teacher is {shape}; "
                             f"build it with SearchSpace.autodistil(teacher) or from this teacher")
        model = copy.deepcopy(teacher)
        model.config._attn_implementation = "sdpa"
        _make_elastic(model)
        return cls(model, space, type(teacher), copy.deepcopy(teacher.config))

    @property
    def config(self):
        """The wrapped model's config, describing the active sub-network (pykd.capture reads it)."""
        return self.model.config

    @property
    def active(self) -> Architecture:
        return self._active

    def set_active(self, arch: Architecture) -> None:
        """Run `arch` from now on: any architecture that fits inside the teacher (ValueError otherwise)."""
        self.space.check_fits_teacher(arch)
        teacher_layers = self.space.teacher.layers
        self._layers.active = [teacher_layer(i, arch.layers, teacher_layers) for i in range(arch.layers)]
        for name, module in self.model.named_modules():
            if isinstance(module, ElasticEmbedding):
                module.set_active(arch.hidden)
            elif isinstance(module, ElasticLinear):
                module.set_active(_active_out(name, module, arch))
            elif hasattr(module, "attention_head_size") and hasattr(module, "num_attention_heads"):
                module.num_attention_heads = arch.heads
                module.attention_head_size = arch.head_size
                module.all_head_size = arch.hidden
                module.scaling = arch.head_size ** -0.5
        config = self.model.config
        config.num_hidden_layers, config.hidden_size = arch.layers, arch.hidden
        config.num_attention_heads, config.intermediate_size = arch.heads, arch.intermediate
        self._active = arch

    def forward(self, *args, **kwargs):
        """The wrapped model's forward (same arguments and outputs) on the active sub-network."""
        return self.model(*args, **kwargs)

    def config_dict(self) -> dict:
        """What a checkpoint of this SuperLM must match: space, experts, routing, teacher class and shape."""
        return {"space": self.space.to_dict(), "experts": self.experts, "routing": self.routing,
                "teacher_class": self.teacher_class.__name__}

    def check_config_dict(self, saved: dict) -> None:
        """ValueError naming the first difference when a checkpoint's config_dict is not this SuperLM's."""
        mine = self.config_dict()
        for key in mine:
            if saved.get(key) != mine[key]:
                raise ValueError(f"the SuperLM checkpoint differs in {key!r}: checkpoint {saved.get(key)!r}, this "
                                 f"SuperLM {mine[key]!r}")

    def student_config(self, arch: Architecture):
        """The teacher's config with the architecture's sizes (what the exported model is built from)."""
        config = copy.deepcopy(self._teacher_config)
        config.num_hidden_layers, config.hidden_size = arch.layers, arch.hidden
        config.num_attention_heads, config.intermediate_size = arch.heads, arch.intermediate
        config._attn_implementation = "sdpa"
        return config

    @torch.no_grad()
    def export(self, arch: Architecture) -> nn.Module:
        """A stock model of the teacher's class holding the sub-network's weights, in eval mode.

        Its outputs equal the SuperLM's with `arch` active. `save_pretrained` + `AutoModel.from_pretrained`
        load it without pykd. The SuperLM's active architecture is left as it was.
        """
        self.space.check_fits_teacher(arch)
        previous = self._active
        self.set_active(arch)
        try:
            student = self.teacher_class(self.student_config(arch))
            student.load_state_dict(self._student_state(student, arch))
        finally:
            self.set_active(previous)
        param = next(self.model.parameters())
        return student.to(device=param.device, dtype=param.dtype).eval()

    def _student_state(self, student: nn.Module, arch: Architecture) -> dict:
        state = {}
        modules = dict(student.named_modules())
        for key, target in student.state_dict().items():
            module_name, _, param_name = key.rpartition(".")
            source = self.model.get_submodule(self._teacher_module_name(module_name, arch))
            if isinstance(modules[module_name], nn.Linear) and hasattr(source, "dense"):
                weight, bias = source.dense(*target.shape[:1], modules[module_name].in_features)
                tensor = weight if param_name == "weight" else bias
            else:
                tensor = getattr(source, param_name)
                tensor = tensor[tuple(slice(0, size) for size in target.shape)]
            if tuple(tensor.shape) != tuple(target.shape):
                raise RuntimeError(f"export: {key} has shape {tuple(tensor.shape)} in the SuperLM, the student "
                                   f"needs {tuple(target.shape)}")
            state[key] = tensor.detach().clone()
        return state

    def _teacher_module_name(self, name: str, arch: Architecture) -> str:
        teacher_layers = self.space.teacher.layers
        return _LAYER_INDEX.sub(lambda m: f"{m[1]}layer.{teacher_layer(int(m[2]), arch.layers, teacher_layers)}.",
                                name)


def _active_out(name: str, module: ElasticLinear, arch: Architecture) -> int:
    if name.endswith(_FFN_IN):
        return arch.intermediate
    if name.split(".")[-1] in _LABEL_OUTPUTS:
        return module.max_out_features
    return arch.hidden


def _make_elastic(model: nn.Module) -> None:
    """Replaces every Linear, Embedding and LayerNorm of the model by its elastic version, in place."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, child_name, ElasticLinear(child))
            elif isinstance(child, nn.Embedding):
                setattr(module, child_name, ElasticEmbedding(child))
            elif isinstance(child, nn.LayerNorm):
                setattr(module, child_name, ElasticLayerNorm(child))
    encoder = getattr(model, "base_model", model).encoder
    encoder.layer = ActiveLayers(list(encoder.layer))


def save_student(model: nn.Module, tokenizer, path) -> Path:
    """Writes model (save_pretrained) and tokenizer into a new directory `path`, atomically.

    Refuses an existing path (ValueError). Everything is written to a temporary directory beside
    `path` and renamed into place, so a failure leaves nothing at `path`.

    Returns:
        The directory written.
    """
    path = Path(path)
    if path.exists():
        raise ValueError(f"export path {str(path)!r} already exists; choose a new directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if path.exists():
            raise ValueError(f"export path {str(path)!r} appeared while writing; nothing was written there")
        os.rename(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path
