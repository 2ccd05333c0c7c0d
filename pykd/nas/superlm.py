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

With experts > 1 (Mixture-of-Supernets, pykd.nas.mos) the FFN linears of every layer (and
optionally the attention projections) hold E routed experts mixed by a per-layer router fed the
active layer's architecture; export collapses them into dense weights. Per-layer architectures
(pykd.nas.space.LayerwiseArchitecture) run layer by layer.
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
from .mos import ENCODING, ROUTINGS, LayerRouter, RoutedElasticLinear, arch_encoding
from .architecture import Architecture, LayerwiseArchitecture
from .space import SearchSpace, TeacherShape

SUPERNET_FILE = "supernet.pt"  # a trained SuperLM in its run's model directory: config, sub-space, weights
_LAYER_INDEX = re.compile(r"(^|\.)layer\.(\d+)\.")
# A layer's linears are hidden -> hidden except the FFN's (hidden -> ffn -> hidden); the
# classification heads' output projections keep all their labels.
_FFN_IN = "intermediate.dense"
_FFN_OUT = "output.dense"
_LABEL_OUTPUTS = ("classifier", "out_proj")
# The routed linears of a layer, by router key: the FFN always, attention with route_attention.
_ROUTED_FFN = {"ffn_in": _FFN_IN, "ffn_out": _FFN_OUT}
_ROUTED_ATTENTION = {"query": "attention.self.query", "key": "attention.self.key",
                     "value": "attention.self.value", "attention_out": "attention.output.dense"}


def teacher_layer(index: int, layers: int, teacher_layers: int) -> int:
    """The teacher layer that student layer `index` of `layers` runs: floor(index * L_t / layers)."""
    return index * teacher_layers // layers


def _check_teacher(teacher: nn.Module) -> None:
    name = type(teacher).__name__
    bare = getattr(teacher, "base_model", teacher) is teacher
    if not (bare or name.endswith("ForSequenceClassification")):
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

    def __init__(self, model: nn.Module, space: SearchSpace, teacher_class: type, teacher_config, experts: int,
                 routing: str, route_attention: bool, router_hidden: int):
        super().__init__()
        self.model = model
        self.space = space
        self.teacher_class = teacher_class
        self._teacher_config = teacher_config
        self.experts, self.routing = experts, routing
        self.route_attention, self.router_hidden = route_attention, router_hidden
        base = getattr(model, "base_model", model)
        self._layers: ActiveLayers = base.encoder.layer
        # Elastic modules outside the layers (embeddings, pooler, head): set once per architecture.
        self._outer = [(name, module) for name, module in model.named_modules()
                       if isinstance(module, (ElasticEmbedding, ElasticLinear)) and not _LAYER_INDEX.search(name)]
        self._active = None
        self.set_active(space.teacher_architecture())

    @classmethod
    def from_teacher(cls, teacher: nn.Module, space: SearchSpace, experts: int = 1, routing: str = "layer",
                     noise: float = 1e-3, route_attention: bool = False, router_hidden: int = 128) -> SuperLM:
        """A SuperLM holding a deep copy of the teacher's weights (the teacher stays untouched).

        Args:
            teacher: a BERT-layout transformers encoder (BERT, RoBERTa, ELECTRA with embedding_size ==
                hidden_size), bare or *ForSequenceClassification.
            space: the SearchSpace built for this teacher (its TeacherShape must match the teacher's).
            experts: E; 1 is plain weight sharing (AutoDistil), > 1 routes both FFN linears of every layer
                (Mixture-of-Supernets, pykd.nas.mos).
            routing: "layer" or "neuron" (MoS's layer-wise or neuron-wise mixing; used when experts > 1).
            noise: std of the Gaussian noise added to each expert's copy of the teacher's weights.
            route_attention: also route Q, K, V and the attention output (beyond the paper; off by default).
            router_hidden: width of each router's hidden layer (MoS: 128).
        """
        if not isinstance(space, SearchSpace):
            raise TypeError(f"space must be a pykd.nas.SearchSpace, got {type(space).__name__}")
        _check_mos_options(experts, routing, noise, route_attention, router_hidden)
        shape = TeacherShape.from_model(teacher)  # the family first: its error names the model_type
        _check_teacher(teacher)
        if shape != space.teacher:
            raise ValueError(f"the search space was built for teacher {space.teacher}, but this teacher is {shape}; "
                             f"build it with SearchSpace.autodistil(teacher) or from this teacher")
        model = copy.deepcopy(teacher)
        model.config._attn_implementation = "sdpa"
        _make_elastic(model)
        if experts > 1:
            routed = {**_ROUTED_FFN, **(_ROUTED_ATTENTION if route_attention else {})}
            for layer in getattr(model, "base_model", model).encoder.layer._modules.values():
                _route_layer(layer, routed, experts, routing, noise, router_hidden)
        return cls(model, space, type(teacher), copy.deepcopy(teacher.config), experts, routing, route_attention,
                   router_hidden)

    @property
    def config(self):
        """The wrapped model's config, describing the active sub-network (pykd.capture reads it)."""
        return self.model.config

    @property
    def active(self) -> Architecture:
        return self._active

    def set_active(self, arch: Architecture | LayerwiseArchitecture) -> None:
        """Run `arch` from now on: any architecture (uniform or per-layer) that fits inside the teacher.

        The wrapped model's config then describes it (for a per-layer architecture: the largest heads and
        FFN width of its layers). ValueError when arch is larger than the teacher.
        """
        self.space.check_fits_teacher(arch)
        teacher = self.space.teacher
        self._layers.active = [teacher_layer(i, arch.layers, teacher.layers) for i in range(arch.layers)]
        for index, heads, ffn in zip(self._layers.active, arch.layer_heads, arch.layer_ffn):
            self._set_layer(self._layers[index], arch.hidden, heads, ffn)
        for name, module in self._outer:
            if isinstance(module, ElasticEmbedding):
                module.set_active(arch.hidden)
            else:
                out = module.max_out_features if name.split(".")[-1] in _LABEL_OUTPUTS else arch.hidden
                module.set_active(out, arch.hidden)
        config = self.model.config
        config.num_hidden_layers, config.hidden_size = arch.layers, arch.hidden
        config.num_attention_heads, config.intermediate_size = max(arch.layer_heads), max(arch.layer_ffn)
        self._active = arch

    def _set_layer(self, layer: nn.Module, hidden: int, heads: int, ffn: int) -> None:
        teacher = self.space.teacher
        encoding = arch_encoding(hidden, heads, ffn, (teacher.hidden, teacher.heads, teacher.intermediate))
        for name, module in layer.named_modules():
            if isinstance(module, (ElasticLinear, RoutedElasticLinear)):
                out = ffn if name.endswith(_FFN_IN) else hidden
                module.set_active(out, ffn if name == _FFN_OUT else hidden, encoding)
            elif hasattr(module, "attention_head_size") and hasattr(module, "num_attention_heads"):
                module.num_attention_heads, module.attention_head_size = heads, hidden // heads
                module.all_head_size, module.scaling = hidden, (hidden // heads) ** -0.5

    def forward(self, *args, **kwargs):
        """The wrapped model's forward (same arguments and outputs) on the active sub-network."""
        return self.model(*args, **kwargs)

    def config_dict(self) -> dict:
        """What a checkpoint of this SuperLM must match: space (with the teacher's shape), experts, routing,
        routed attention, router width, router encoding and the teacher's class."""
        return {"space": self.space.to_dict(), "experts": self.experts, "routing": self.routing,
                "route_attention": self.route_attention, "router_hidden": self.router_hidden,
                "encoding": list(ENCODING), "teacher_class": self.teacher_class.__name__}

    def check_config_dict(self, saved: dict) -> None:
        """ValueError naming the first difference when a checkpoint's config_dict is not this SuperLM's."""
        mine = self.config_dict()
        for key in mine:
            if saved.get(key) != mine[key]:
                raise ValueError(f"the SuperLM checkpoint differs in {key!r}: checkpoint {saved.get(key)!r}, this "
                                 f"SuperLM {mine[key]!r}")

    def student_config(self, arch: Architecture | LayerwiseArchitecture):
        """The teacher's config with the architecture's sizes (what the exported model is built from);
        a per-layer architecture (of equal heads) gets its widest FFN."""
        config = copy.deepcopy(self._teacher_config)
        config.num_hidden_layers, config.hidden_size = arch.layers, arch.hidden
        config.num_attention_heads, config.intermediate_size = arch.layer_heads[0], max(arch.layer_ffn)
        if hasattr(config, "embedding_size"):  # ELECTRA: embeddings as wide as hidden, so no projection
            config.embedding_size = arch.hidden
        config._attn_implementation = "sdpa"
        return config

    def _exportable(self, arch: LayerwiseArchitecture, pad_ffn: bool):
        """The uniform equivalent, the per-layer arch itself when it may be zero-padded, or ValueError."""
        if arch.is_uniform():
            return arch.uniform()
        if len(set(arch.heads)) > 1:
            raise ValueError(f"per-layer architecture {arch} has different head counts per layer {arch.heads}: a "
                             f"stock transformers config has one num_attention_heads (head size hidden / heads), so "
                             f"it cannot be exported as a stock model; search a space with one head count per "
                             f"architecture or keep using the SuperLM")
        if not pad_ffn:
            raise ValueError(f"per-layer architecture {arch} has different FFN widths per layer {arch.layer_ffn}: a "
                             f"stock transformers config has one intermediate_size, so it cannot be a stock model "
                             f"of exactly this size; export(arch, pad_ffn=True) (`pykd nas export --pad-ffn`) "
                             f"zero-pads every layer to {max(arch.layer_ffn)} units (equal outputs, more parameters)")
        activation = _activation(self._teacher_config)
        if float(activation(torch.zeros(1))) != 0.0:
            raise ValueError(f"pad_ffn needs an FFN activation with act(0) = 0, the teacher's hidden_act is "
                             f"{self._teacher_config.hidden_act!r}")
        return arch

    @torch.no_grad()
    def export(self, arch: Architecture | LayerwiseArchitecture, pad_ffn: bool = False) -> nn.Module:
        """A stock model of the teacher's class holding the sub-network's weights (experts collapsed), eval mode.

        Its outputs equal the SuperLM's with `arch` active. `save_pretrained` + `AutoModel.from_pretrained`
        load it without pykd. The SuperLM's active architecture is left as it was.

        A per-layer architecture whose layers are alike exports as its uniform equivalent. One whose head
        counts differ cannot be a stock model (a stock config has one num_attention_heads and head size
        hidden / heads): ValueError. One whose FFN widths differ is refused too, unless pad_ffn=True: the
        model then gets the widest layer's FFN width everywhere, the extra units with zero weights and
        biases (their activation is act(0) = 0 and they add nothing), so outputs are equal but the model
        holds more parameters and FLOPs than the architecture.
        """
        self.space.check_fits_teacher(arch)
        if isinstance(arch, LayerwiseArchitecture):
            arch = self._exportable(arch, pad_ffn)
        previous = self._active
        self.set_active(arch)
        try:
            student = self.teacher_class(self.student_config(arch))
            student.load_state_dict(self._student_state(student, arch, isinstance(arch, LayerwiseArchitecture)))
        finally:
            self.set_active(previous)
        param = next(self.model.parameters())
        return student.to(device=param.device, dtype=param.dtype).eval()

    def _student_state(self, student: nn.Module, arch, padded: bool) -> dict:
        state = {}
        for key, target in student.state_dict().items():
            module_name, _, param_name = key.rpartition(".")
            source = self.model.get_submodule(self._teacher_module_name(module_name, arch.layers))
            if hasattr(source, "dense"):  # an elastic or routed linear: its active (collapsed) weight
                weight, bias = source.dense(source.out_features, source.in_features)
                tensor = weight if param_name == "weight" else bias
            else:
                tensor = getattr(source, param_name)
                tensor = tensor[tuple(slice(0, size) for size in target.shape)]
            if tuple(tensor.shape) != tuple(target.shape):
                if not padded or any(have > need for have, need in zip(tensor.shape, target.shape)):
                    raise RuntimeError(f"export: {key} has shape {tuple(tensor.shape)} in the SuperLM, the student "
                                       f"needs {tuple(target.shape)}")
                tensor = _zero_padded(tensor, target.shape)
            state[key] = tensor.detach().clone()
        return state

    def _teacher_module_name(self, name: str, layers: int) -> str:
        teacher_layers = self.space.teacher.layers
        return _LAYER_INDEX.sub(lambda m: f"{m[1]}layer.{teacher_layer(int(m[2]), layers, teacher_layers)}.", name)



def _check_mos_options(experts, routing, noise, route_attention, router_hidden) -> None:
    if isinstance(experts, bool) or not isinstance(experts, int) or experts < 1:
        raise ValueError(f"experts must be an int >= 1 (1 = plain weight sharing), got {experts!r}")
    if routing not in ROUTINGS:
        raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not noise >= 0:
        raise ValueError(f"noise must be a number >= 0, got {noise!r}")
    if not isinstance(route_attention, bool):
        raise ValueError(f"route_attention must be True or False, got {route_attention!r}")
    if isinstance(router_hidden, bool) or not isinstance(router_hidden, int) or router_hidden < 1:
        raise ValueError(f"router_hidden must be a positive int, got {router_hidden!r}")


def _route_layer(layer: nn.Module, routed: dict[str, str], experts: int, routing: str, noise: float,
                 router_hidden: int) -> None:
    """Replaces the layer's elastic linears named in `routed` by routed ones sharing one new LayerRouter."""
    linears = {key: layer.get_submodule(path) for key, path in routed.items()}
    router = LayerRouter(experts, routing, {key: m.max_out_features for key, m in linears.items()}, router_hidden)
    layer.mos_router = router
    for key, path in routed.items():
        parent, _, child = path.rpartition(".")
        linear = linears[key]
        setattr(layer.get_submodule(parent), child,
                RoutedElasticLinear(linear.weight, linear.bias, experts, noise, router, key))


def _activation(config):
    from transformers.activations import ACT2FN

    return ACT2FN[config.hidden_act] if isinstance(config.hidden_act, str) else config.hidden_act


def _zero_padded(tensor: torch.Tensor, shape) -> torch.Tensor:
    padded = tensor.new_zeros(shape)
    padded[tuple(slice(0, size) for size in tensor.shape)] = tensor
    return padded


def _make_elastic(model: nn.Module) -> None:
    """Replaces every Linear, Embedding and LayerNorm of the model by its elastic version, in place."""
    for _name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, child_name, ElasticLinear(child))
            elif isinstance(child, nn.Embedding):
                setattr(module, child_name, ElasticEmbedding(child))
            elif isinstance(child, nn.LayerNorm):
                setattr(module, child_name, ElasticLayerNorm(child))
    encoder = getattr(model, "base_model", model).encoder
    encoder.layer = ActiveLayers(list(encoder.layer))


def check_export_path(path) -> Path:
    """`path` as a new directory that can be made: ValueError naming it and why not (it exists, a parent is a
    file, or the nearest existing parent is not writable). Checked before any model is loaded or built."""
    path = Path(path)
    if path.exists():
        raise ValueError(f"export path {str(path)!r} already exists; choose a new directory")
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"export path {str(path)!r} cannot be created: its parent {str(parent)!r} is a file, "
                         f"not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"export path {str(path)!r} cannot be created: the directory {str(parent)!r} is not "
                         f"writable")
    return path


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _honour_umask(directory: Path) -> None:
    """mkdtemp makes a 0700 directory (and some writers 0600 files): give the export the modes an ordinary
    mkdir and open would, 0777 / 0666 less the umask, so the student is as readable as any other output."""
    mask = _current_umask()
    for root, folders, files in os.walk(directory):
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)
        for name in folders:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
    os.chmod(directory, 0o777 & ~mask)


def save_student(model: nn.Module, tokenizer, path, extra=None) -> Path:
    """Writes model (save_pretrained) and tokenizer into a new directory `path`, atomically.

    Refuses an existing path or one that cannot be made (ValueError). Everything is written to a
    temporary directory beside `path` and renamed into place, so a failure leaves nothing at `path`;
    the modes honour the umask. extra, optional: called with that temporary directory to write more
    files (a model card) before the rename.

    Returns:
        The directory written.
    """
    path = check_export_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if extra is not None:
            extra(staging)
        _honour_umask(staging)
        if path.exists():
            raise ValueError(f"export path {str(path)!r} appeared while writing; nothing was written there")
        os.rename(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path
