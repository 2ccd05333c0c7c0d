r"""Search spaces of AutoDistil (arXiv 2201.12507): sub-spaces of architectures over a teacher, exact costs.

A space holds architectures (pykd.nas.architecture: every candidate has ``hidden`` divisible by
``heads``, so it exports to a stock model).

Sub-spaces for a 12-layer/768-hidden/12-head/3072-FFN teacher (BERT-base) are the paper's Table 2
grids exactly (those pairs of hidden and heads that divide):

    tiny:  layers 4-7,  hidden 128-224 step 32, ffn_ratio 2.0-3.5 step 0.5, heads 7-10
    small: layers 9-12, hidden 256-352 step 32, ffn_ratio 2.5-4.0 step 0.5, heads 7-10
    base:  layers 9-12, hidden 544-640 step 32, ffn_ratio 2.5-4.0 step 0.5, heads 9-12

Scaling rule for other teachers (:func:`scale_factor`). Each factor's four paper values ``v`` map
to ``round_half_up(v * s / grid) * grid``, clipped to [grid, teacher's value], duplicates dropped;
if fewer than four values remain, the next grid values below the smallest (while >= grid) and then
above the largest (while <= the teacher's value) are added until there are four. The scale ``s``
and grid per factor: layers ``L_t / 12`` on integers; hidden ``d_t / 768`` on multiples of 8;
FFN ratio ``(I_t / d_t) / 4`` on multiples of 0.5; heads ``H_t / 12`` on integers (the teacher's
head count caps them). For BERT-base every scale is 1 and Table 2 comes out unchanged. For
all-MiniLM-L6-v2 (6 layers, 384 hidden, 12 heads, FFN 1536):

    tiny:  layers 1-4, hidden 64-112 step 16,  ffn_ratio 2.0-3.5, heads 7-10
    small: layers 3-6, hidden 128-176 step 16, ffn_ratio 2.5-4.0, heads 7-10
    base:  layers 3-6, hidden 272-320 step 16, ffn_ratio 2.5-4.0, heads 9-12

K = 1 (one-shot) is one sub-space, "all", over the union of the K = 3 sub-spaces' values.

Per-layer spaces (HAT, Mixture-of-Supernets): :class:`LayerwiseSubSpace` lets each layer of a
LayerwiseArchitecture pick its heads and FFN ratio from the sub-space's values
(``SearchSpace.autodistil(teacher, layerwise=True)``). Costs sum over layers.

Costs. ``params(arch)`` counts exactly the parameters of the exported model (embeddings, every
layer, the pooler when the teacher has one, the classification head when it has one).
``flops(arch, seq_len)`` counts one sequence of ``seq_len`` tokens, multiply-add = 2 FLOPs: every
linear layer (2 n d_in d_out; the pooler and head on the first token only), the attention scores
``Q K^T`` and the context ``A V`` (2 n^2 hidden each, per layer); embeddings, LayerNorm, softmax,
activations and biases are not counted (as torch's FlopCounterMode does not count them).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
from dataclasses import dataclass

import torch

from .architecture import FACTORS, Architecture, LayerwiseArchitecture, _is_int, parse_architecture

SPACES = ("autodistil", "custom")  # nas.space: AutoDistil's scaled to the teacher, or nas.custom_space
COSTS = ("params", "flops", "latency")  # what a candidate costs (the search measures latency)
SUPPORTED_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "electra")

# AutoDistil Table 2 (arXiv 2201.12507): the BERT-base teacher's K = 3 sub-spaces.
PAPER_TEACHER = {"layers": 12, "hidden": 768, "ffn_ratio": 4.0, "heads": 12}
PAPER_SUBSPACES = {
    "tiny": {"layers": (4, 5, 6, 7), "hidden": (128, 160, 192, 224), "ffn_ratio": (2.0, 2.5, 3.0, 3.5),
             "heads": (7, 8, 9, 10)},
    "small": {"layers": (9, 10, 11, 12), "hidden": (256, 288, 320, 352), "ffn_ratio": (2.5, 3.0, 3.5, 4.0),
              "heads": (7, 8, 9, 10)},
    "base": {"layers": (9, 10, 11, 12), "hidden": (544, 576, 608, 640), "ffn_ratio": (2.5, 3.0, 3.5, 4.0),
             "heads": (9, 10, 11, 12)},
}
GRID = {"layers": 1, "hidden": 8, "ffn_ratio": 0.5, "heads": 1}


def format_cost(value: float) -> str:
    """A cost as the messages and summaries print it (4 significant digits)."""
    return f"{value:.4g}"


@dataclass(frozen=True)
class TeacherShape:
    """What of the teacher fixes the space and the costs: its sizes, pooler and classification head."""

    model_type: str
    layers: int
    hidden: int
    heads: int
    intermediate: int
    vocab_size: int
    max_position_embeddings: int
    type_vocab_size: int
    pooler: bool = True
    num_labels: int | None = None
    head_dense: bool = False  # the classification head has a hidden x hidden layer first (RoBERTa, ELECTRA)

    @classmethod
    def from_config(cls, config, pooler: bool = True, num_labels: int | None = None,
                    head_dense: bool = False) -> TeacherShape:
        """From a transformers config of a BERT-layout encoder (as `AutoModel` builds it: with a pooler)."""
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"pykd.nas supports BERT-layout encoders with model_type in {SUPPORTED_MODEL_TYPES}, "
                             f"got model_type {model_type!r} ({type(config).__name__})")
        embedding_size = getattr(config, "embedding_size", config.hidden_size)
        if embedding_size != config.hidden_size:
            raise ValueError(f"pykd.nas needs embedding_size == hidden_size (no embedding projection), got "
                             f"embedding_size={embedding_size}, hidden_size={config.hidden_size}")
        return cls(model_type, config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
                   config.intermediate_size, config.vocab_size, config.max_position_embeddings,
                   config.type_vocab_size, pooler, num_labels, head_dense)

    @classmethod
    def from_model(cls, model) -> TeacherShape:
        """From a bare encoder (AutoModel) or a *ForSequenceClassification model."""
        config = getattr(model, "config", None)
        if config is None:
            raise TypeError(f"teacher must be a transformers model, got {type(model).__name__}")
        encoder = getattr(model, "base_model", model)
        pooler = getattr(encoder, "pooler", None) is not None
        head = getattr(model, "classifier", None)
        if head is None:
            return cls.from_config(config, pooler)
        return cls.from_config(config, pooler, config.num_labels, head_dense=hasattr(head, "dense"))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def ffn_ratio(self) -> float:
        return self.intermediate / self.hidden


def _teacher_shape(teacher) -> TeacherShape:
    if isinstance(teacher, TeacherShape):
        return teacher
    if hasattr(teacher, "state_dict"):
        return TeacherShape.from_model(teacher)
    return TeacherShape.from_config(teacher)


@dataclass(frozen=True)
class SubSpace:
    """A grid of factor values; its candidates are the combinations with hidden divisible by heads."""

    name: str
    layers: tuple
    hidden: tuple
    ffn_ratio: tuple
    heads: tuple

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"sub-space name must be a non-empty string, got {self.name!r}")
        for factor in FACTORS:
            values = getattr(self, factor)
            if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__") or not list(values):
                raise ValueError(f"sub-space {self.name!r}: {factor} must be a non-empty list of values, "
                                 f"got {values!r}")
            cast = float if factor == "ffn_ratio" else int
            for value in values:
                if factor != "ffn_ratio" and not _is_int(value):
                    raise ValueError(f"sub-space {self.name!r}: {factor} values must be ints, got {value!r}")
            object.__setattr__(self, factor, tuple(sorted({cast(v) for v in values})))
        candidates = []
        for layers, hidden, ratio, heads in itertools.product(self.layers, self.hidden, self.ffn_ratio, self.heads):
            if hidden % heads == 0:
                candidates.append(Architecture(layers, hidden, ratio, heads))
        if not candidates:
            raise ValueError(f"sub-space {self.name!r} has no candidate: no hidden size in {self.hidden} is "
                             f"divisible by a head count in {self.heads}")
        object.__setattr__(self, "_candidates", tuple(sorted(candidates)))

    def candidates(self) -> list[Architecture]:
        """Every architecture of the grid with hidden divisible by heads, sorted."""
        return list(self._candidates)

    def contains(self, arch: Architecture) -> bool:
        return arch in self._candidates

    def __contains__(self, arch) -> bool:
        return self.contains(arch)

    def largest(self) -> Architecture:
        """The most layers, hidden units and FFN ratio (so the most params and FLOPs); the most heads for it."""
        return max(self._candidates, key=lambda a: (a.layers, a.hidden, a.ffn_ratio, a.heads))

    def smallest(self) -> Architecture:
        """The fewest layers, hidden units and FFN ratio; the fewest heads for it."""
        return min(self._candidates, key=lambda a: (a.layers, a.hidden, a.ffn_ratio, a.heads))

    def sample(self, generator: torch.Generator | random.Random) -> Architecture:
        """One candidate drawn uniformly; deterministic given the generator's state."""
        if isinstance(generator, random.Random):
            index = generator.randrange(len(self._candidates))
        elif isinstance(generator, torch.Generator):
            index = int(torch.randint(len(self._candidates), (1,), generator=generator))
        else:
            raise TypeError(f"generator must be a torch.Generator or random.Random, got {type(generator).__name__}")
        return self._candidates[index]

    def genes(self) -> dict:
        """{gene: choices} for evolutionary search: the four factors."""
        return {factor: getattr(self, factor) for factor in FACTORS}

    def genes_of(self, arch: Architecture) -> dict:
        return arch.to_dict()

    def from_genes(self, genes: dict) -> Architecture | None:
        """The architecture the genes spell, or None when they spell none (hidden not divisible by heads)."""
        try:
            return Architecture(**{factor: genes[factor] for factor in FACTORS})
        except ValueError:
            return None

    @staticmethod
    def parse(text: str) -> Architecture:
        """Either form; a per-layer one whose layers are alike is its uniform equivalent (str() of a per-layer
        candidate is what a search over a per-layer space writes)."""
        arch = parse_architecture(text)
        if isinstance(arch, LayerwiseArchitecture):
            if not arch.is_uniform():
                raise ValueError(f"architecture {text!r} gives its layers different heads or FFN ratios, but the "
                                 f"search space is not per-layer (nas.layerwise / a sub-space's layerwise)")
            return arch.uniform()
        return arch

    def to_dict(self) -> dict:
        return {"name": self.name, **{factor: list(getattr(self, factor)) for factor in FACTORS}}

    @classmethod
    def from_dict(cls, values: dict) -> SubSpace:
        """A SubSpace, or a LayerwiseSubSpace when values has "layerwise": true."""
        if not isinstance(values, dict):
            raise TypeError(f"a sub-space must be a dict, got {type(values).__name__}")
        values = dict(values)
        layerwise = values.pop("layerwise", False)
        if layerwise not in (True, False):
            raise ValueError(f"sub-space {values.get('name', '?')!r}: layerwise must be true or false, got "
                             f"{layerwise!r}")
        keys = {"name", *FACTORS}
        unknown, missing = sorted(set(values) - keys), sorted(keys - set(values))
        if unknown or missing:
            raise ValueError(f"sub-space {values.get('name', '?')!r} keys must be name, {', '.join(FACTORS)} "
                             f"(and layerwise): unknown {unknown}, missing {missing}")
        return (LayerwiseSubSpace if layerwise else SubSpace)(**values)


MAX_ENUMERATED = 100_000


class LayerwiseSubSpace(SubSpace):
    """Like SubSpace, but each layer picks its own heads (dividing hidden) and FFN ratio (HAT / MoS).

    Candidates are LayerwiseArchitectures: a layer count and a hidden size from the grid, then per
    layer a head count and an FFN ratio. Genes for search: layers, hidden, heads.i and ffn_ratio.i
    for i < max(layers) (genes past an architecture's layer count are ignored).
    """

    def __post_init__(self):
        super().__post_init__()
        # A uniform candidate per (layers, hidden) exists whenever a per-layer one does, so the
        # parent's check (some hidden has a dividing head count) is the right emptiness test.
        object.__setattr__(self, "_candidates", None)
        object.__setattr__(self, "_heads_for", {d: tuple(h for h in self.heads if d % h == 0) for d in self.hidden})

    def _hiddens(self) -> tuple:
        return tuple(d for d in self.hidden if self._heads_for[d])

    def count(self) -> int:
        """The number of candidates."""
        return sum((len(self._heads_for[d]) * len(self.ffn_ratio)) ** layers
                   for layers in self.layers for d in self._hiddens())

    def candidates(self) -> list[LayerwiseArchitecture]:
        """Every candidate, sorted; ValueError when there are more than MAX_ENUMERATED (use evolution/nsga2)."""
        count = self.count()
        if count > MAX_ENUMERATED:
            raise ValueError(f"per-layer sub-space {self.name!r} has {count} candidates, too many to enumerate "
                             f"(limit {MAX_ENUMERATED}); search it with evolution or nsga2")
        found = []
        for layers, hidden in itertools.product(self.layers, self._hiddens()):
            per_layer = list(itertools.product(self._heads_for[hidden], self.ffn_ratio))
            for choice in itertools.product(per_layer, repeat=layers):
                heads, ratios = zip(*choice)
                found.append(LayerwiseArchitecture(hidden, heads, ratios))
        return sorted(found)

    def contains(self, arch) -> bool:
        return (isinstance(arch, LayerwiseArchitecture) and arch.layers in self.layers and arch.hidden in self.hidden
                and all(h in self.heads for h in arch.heads) and all(r in self.ffn_ratio for r in arch.ffn_ratio))

    def largest(self) -> LayerwiseArchitecture:
        layers, hidden = max(self.layers), max(self._hiddens())
        return LayerwiseArchitecture(hidden, (max(self._heads_for[hidden]),) * layers, (max(self.ffn_ratio),) * layers)

    def smallest(self) -> LayerwiseArchitecture:
        layers, hidden = min(self.layers), min(self._hiddens())
        return LayerwiseArchitecture(hidden, (min(self._heads_for[hidden]),) * layers, (min(self.ffn_ratio),) * layers)

    def sample(self, generator: torch.Generator | random.Random) -> LayerwiseArchitecture:
        """Layers and hidden uniformly, then each layer's heads (among those dividing hidden) and ratio."""
        if isinstance(generator, random.Random):
            pick = generator.choice
        elif isinstance(generator, torch.Generator):
            def pick(options):
                return options[int(torch.randint(len(options), (1,), generator=generator))]
        else:
            raise TypeError(f"generator must be a torch.Generator or random.Random, got {type(generator).__name__}")
        layers, hidden = pick(self.layers), pick(self._hiddens())
        heads = tuple(pick(self._heads_for[hidden]) for _ in range(layers))
        ratios = tuple(pick(self.ffn_ratio) for _ in range(layers))
        return LayerwiseArchitecture(hidden, heads, ratios)

    def genes(self) -> dict:
        genes = {"layers": self.layers, "hidden": self.hidden}
        for index in range(max(self.layers)):
            genes[f"heads.{index}"], genes[f"ffn_ratio.{index}"] = self.heads, self.ffn_ratio
        return genes

    def genes_of(self, arch: LayerwiseArchitecture) -> dict:
        """The genes of arch; layers past its depth repeat its last layer's values."""
        genes = {"layers": arch.layers, "hidden": arch.hidden}
        for index in range(max(self.layers)):
            layer = min(index, arch.layers - 1)
            genes[f"heads.{index}"], genes[f"ffn_ratio.{index}"] = arch.heads[layer], arch.ffn_ratio[layer]
        return genes

    def from_genes(self, genes: dict) -> LayerwiseArchitecture | None:
        layers = genes["layers"]
        try:
            return LayerwiseArchitecture(genes["hidden"], tuple(genes[f"heads.{i}"] for i in range(layers)),
                                         tuple(genes[f"ffn_ratio.{i}"] for i in range(layers)))
        except (ValueError, KeyError):
            return None

    @staticmethod
    def parse(text: str) -> LayerwiseArchitecture:
        """Either form; a uniform one is the per-layer architecture with every layer alike."""
        arch = parse_architecture(text)
        if isinstance(arch, Architecture):
            return LayerwiseArchitecture(arch.hidden, arch.layer_heads, (arch.ffn_ratio,) * arch.layers)
        return arch

    def to_dict(self) -> dict:
        return {**super().to_dict(), "layerwise": True}


def _round_half_up(value: float) -> int:
    return math.floor(value + 0.5)


def scale_factor(values, scale: float, grid: float, maximum: float) -> tuple:
    """The module docstring's scaling rule for one factor's paper values.

    Args:
        values: the paper's values of the factor (BERT-base teacher).
        scale: teacher's value over the paper teacher's.
        grid: values are multiples of grid, at least grid.
        maximum: the teacher's value (upper bound).
    Returns:
        Sorted tuple of up to len(values) distinct values.
    """
    top = math.floor(maximum / grid + 1e-9)  # the largest grid index inside the teacher
    if top < 1:
        raise ValueError(f"the teacher's value {maximum} is below the grid step {grid}")
    indices = sorted({min(max(_round_half_up(v * scale / grid), 1), top) for v in values})
    while len(indices) < len(values) and indices[0] > 1:
        indices.insert(0, indices[0] - 1)
    while len(indices) < len(values) and indices[-1] < top:
        indices.append(indices[-1] + 1)
    return tuple(i * grid if grid != 1 else i for i in indices)


class SearchSpace:
    """Sub-spaces over one teacher, with exact parameter and FLOP counts.

    Args:
        subspaces: the sub-spaces (distinct names).
        teacher: the teacher's TeacherShape, a transformers config, or the teacher model itself.
    """

    def __init__(self, subspaces: list[SubSpace], teacher):
        self.teacher = _teacher_shape(teacher)
        if not subspaces:
            raise ValueError("a search space needs at least one sub-space")
        names = [s.name for s in subspaces]
        if len(set(names)) != len(names):
            raise ValueError(f"sub-space names must be distinct, got {names}")
        self.subspaces = list(subspaces)
        for subspace in self.subspaces:
            self._check_subspace_fits(subspace)

    def _check_subspace_fits(self, subspace: SubSpace) -> None:
        """ValueError naming the factor when some candidate of the sub-space is larger than the teacher."""
        t = self.teacher
        # Only (hidden, heads) pairs that divide make candidates.
        hiddens = [d for d in subspace.hidden if any(d % h == 0 for h in subspace.heads)]
        heads = [h for h in subspace.heads if any(d % h == 0 for d in subspace.hidden)]
        widest_ffn = max(math.floor(d * r + 0.5) for d in hiddens for r in subspace.ffn_ratio)
        for name, value, limit in (("layers", max(subspace.layers), t.layers), ("hidden", max(hiddens), t.hidden),
                                   ("heads", max(heads), t.heads),
                                   ("FFN width (hidden * ffn_ratio)", widest_ffn, t.intermediate)):
            if value > limit:
                raise ValueError(f"sub-space {subspace.name!r} is larger than the teacher: {name} {value} > the "
                                 f"teacher's {limit}")

    @classmethod
    def autodistil(cls, teacher, k: int = 3, layerwise: bool = False) -> SearchSpace:
        """AutoDistil's K = 3 sub-spaces (tiny, small, base) scaled to the teacher, or K = 1 over their union.

        Args:
            teacher: a transformers config (a bare encoder with a pooler is assumed), the teacher model, or
                a TeacherShape.
            k: 3 (few-shot, one SuperLM per sub-space) or 1 (one-shot, a single sub-space "all").
            layerwise: per-layer sub-spaces (LayerwiseSubSpace: each layer picks its heads and FFN ratio
                from the same values), as HAT and Mixture-of-Supernets search.
        """
        shape = _teacher_shape(teacher)
        if k not in (1, 3):
            raise ValueError(f"k must be 1 (one sub-space over the union) or 3 (tiny, small, base), got {k!r}")
        teacher_values = {"layers": shape.layers, "hidden": shape.hidden, "ffn_ratio": shape.ffn_ratio,
                          "heads": shape.heads}
        kind = LayerwiseSubSpace if layerwise else SubSpace
        subspaces = []
        for name, grid_values in PAPER_SUBSPACES.items():
            scaled = {factor: scale_factor(grid_values[factor], teacher_values[factor] / PAPER_TEACHER[factor],
                                           GRID[factor], teacher_values[factor]) for factor in FACTORS}
            subspaces.append(kind(name, **scaled))
        if k == 1:
            union = {factor: tuple(sorted({v for s in subspaces for v in getattr(s, factor)})) for factor in FACTORS}
            subspaces = [kind("all", **union)]
        return cls(subspaces, shape)

    @classmethod
    def from_dict(cls, values: dict, teacher) -> SearchSpace:
        """A user space: {"subspaces": [{"name", "layers", "hidden", "ffn_ratio", "heads"}, ...]} (a
        "teacher" entry, as to_dict writes, must match the given teacher)."""
        if not isinstance(values, dict) or "subspaces" not in values:
            raise ValueError(f"a search space must be a dict with a 'subspaces' list, got {values!r}")
        unknown = sorted(set(values) - {"subspaces", "teacher"})
        if unknown:
            raise ValueError(f"unknown search space keys {unknown} (expected 'subspaces', optional 'teacher')")
        space = cls([SubSpace.from_dict(s) for s in values["subspaces"]], teacher)
        if "teacher" in values and values["teacher"] != space.teacher.to_dict():
            raise ValueError(f"the search space was made for teacher {values['teacher']}, but the teacher is "
                             f"{space.teacher.to_dict()}")
        return space

    def to_dict(self) -> dict:
        return {"teacher": self.teacher.to_dict(), "subspaces": [s.to_dict() for s in self.subspaces]}

    def __eq__(self, other) -> bool:
        return isinstance(other, SearchSpace) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"SearchSpace({[s.name for s in self.subspaces]}, teacher={self.teacher})"

    def subspace(self, name: str) -> SubSpace:
        for subspace in self.subspaces:
            if subspace.name == name:
                return subspace
        raise ValueError(f"no sub-space named {name!r}; the space has {[s.name for s in self.subspaces]}")

    def candidates(self) -> list:
        """Every architecture of every sub-space (each once), uniform ones first, sorted."""
        found = {arch for subspace in self.subspaces for arch in subspace.candidates()}
        return sorted(found, key=lambda a: (isinstance(a, LayerwiseArchitecture), a.to_dict()["layers"], a))

    def parse(self, text: str):
        """The architecture `text` spells in this space's form (per-layer for a per-layer space), as str() writes it."""
        return self.subspaces[0].parse(text)

    def subspace_of(self, arch: Architecture) -> SubSpace:
        """The first sub-space containing arch; ValueError if none does."""
        for subspace in self.subspaces:
            if subspace.contains(arch):
                return subspace
        raise ValueError(f"architecture {arch} is in none of the sub-spaces {[s.name for s in self.subspaces]}")

    def check_fits_teacher(self, arch, context: str = "") -> None:
        """ValueError naming the factor when arch is larger than the teacher in any dimension."""
        if not isinstance(arch, (Architecture, LayerwiseArchitecture)):
            raise TypeError(f"{context}expected an Architecture or LayerwiseArchitecture, got {type(arch).__name__}")
        t = self.teacher
        for name, value, limit in (("layers", arch.layers, t.layers), ("hidden", arch.hidden, t.hidden),
                                   ("heads", max(arch.layer_heads), t.heads),
                                   ("FFN width (hidden * ffn_ratio)", max(arch.layer_ffn), t.intermediate)):
            if value > limit:
                raise ValueError(f"{context}architecture {arch} is larger than the teacher: {name} {value} > "
                                 f"the teacher's {limit}")

    def validate(self, arch: Architecture) -> Architecture:
        """arch if it fits in the teacher and lies in a sub-space; otherwise ValueError naming why."""
        self.check_fits_teacher(arch)
        self.subspace_of(arch)
        return arch

    def params(self, arch: Architecture) -> int:
        """Exact parameter count of the exported model (embeddings, layers, pooler and head as the teacher has)."""
        self.check_fits_teacher(arch)
        t, d = self.teacher, arch.hidden
        embeddings = (t.vocab_size + t.max_position_embeddings + t.type_vocab_size) * d + 2 * d
        attention = 4 * (d * d + d) + 2 * d
        ffn = sum(d * f + f + f * d + d + 2 * d for f in arch.layer_ffn)
        pooler = d * d + d if t.pooler else 0
        head = (d * t.num_labels + t.num_labels + (d * d + d if t.head_dense else 0)) if t.num_labels else 0
        return embeddings + arch.layers * attention + ffn + pooler + head

    def flops(self, arch: Architecture, seq_len: int) -> int:
        """Analytic FLOPs of one sequence of seq_len tokens (module docstring; multiply-add = 2)."""
        if not _is_int(seq_len) or seq_len < 1:
            raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
        self.check_fits_teacher(arch)
        t, n, d = self.teacher, seq_len, arch.hidden
        per_layer = 2 * n * 4 * d * d + 2 * (2 * n * n * d)  # Q, K, V, output; Q K^T and A V over all heads
        ffn = sum(2 * n * 2 * d * f for f in arch.layer_ffn)
        pooler = 2 * d * d if t.pooler else 0
        head = (2 * d * t.num_labels + (2 * d * d if t.head_dense else 0)) if t.num_labels else 0
        return arch.layers * per_layer + ffn + pooler + head

    def teacher_architecture(self) -> Architecture:
        t = self.teacher
        return Architecture(t.layers, t.hidden, t.intermediate / t.hidden, t.heads)

    def teacher_params(self) -> int:
        return self.params(self.teacher_architecture())

    def teacher_flops(self, seq_len: int) -> int:
        return self.flops(self.teacher_architecture(), seq_len)
