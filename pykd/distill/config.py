"""Run configuration: nested dataclasses read from YAML, with `--set key=value` overrides.

Unknown keys, wrong types and impossible values are errors that name the key; nothing is
silently ignored. `DEFAULT` below is the embedded default run (`make demo`).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field

import yaml


@dataclass
class TeacherConfig:
    path: str = "minilm-l6"  # "minilm-l6" (the packaged all-MiniLM-L6-v2), a hub name or a local directory
    finetuned: str | None = None  # a directory written by `pykd finetune`; task-specific KD needs one
    # Compute the teacher's logits over the training set once, cache them on disk (pykd.distill.teacher_cache)
    # and skip the teacher forward when the objective needs only its logits (no hidden/relation/MI term).
    cache_logits: bool = False


@dataclass
class StudentConfig:
    init: str = "teacher"  # teacher | random | checkpoint
    checkpoint: str | None = None
    num_hidden_layers: int = 3
    hidden_size: int = 192
    num_attention_heads: int = 6
    intermediate_size: int = 768
    dropout: float = 0.1


@dataclass
class DataConfig:
    # rotten_tomatoes | pydocs | healthtweets | wordnet_glosses | fortunes | reuters_grain | reuters_corn |
    # chatterbot_topics | lee_pairs (pykd.distill.corpora) | a local csv/json/jsonl/txt file | a hub name
    dataset: str = "rotten_tomatoes"
    kind: str = "classification"  # classification | regression | unlabeled
    max_length: int = 64
    eval_fraction: float = 0.1  # not used by data with its own split (the built-in corpora but rotten_tomatoes)
    max_train_examples: int | None = None
    max_eval_examples: int | None = None


@dataclass
class PredictionLoss:
    type: str = "soft_ce"  # soft_ce | mse | none
    temperature: float = 2.0
    t_squared: bool = False  # Distiller's code does not multiply by T^2
    weight: float = 1.0
    hard_weight: float = 0.0


@dataclass
class HiddenLoss:
    type: str = "mse"  # mse | cosine | pkd | none
    weight: float = 1.0
    mapping: str = "skip"  # skip | uniform | last | pairs | emd (BERT-EMD many-to-many)
    pairs: list | None = None
    include_embeddings: bool = False
    emd_temperature: float = 1.0  # tau of the EMD layer-weight update (mapping emd)


@dataclass
class RelationLoss:
    relations: list = field(default_factory=lambda: ["qk", "vv"])
    loss: str = "kl"
    relation_heads: int = 6
    mapping: str = "last"  # skip | uniform | last | pairs | emd
    pairs: list | None = None
    weight: float = 1.0
    emd_temperature: float = 1.0


@dataclass
class MILoss:
    bound: str = "none"  # alpha | infonce | nwj | tuba | js | none
    alpha: float = 0.9
    weight: float = 0.1
    mapping: str = "last"
    pairs: list | None = None
    samples: str = "examples"  # examples (masked-mean pooled) | tokens
    max_tokens: int = 512
    critic_hidden: int = 256
    critic_dim: int = 128
    baseline: bool = True
    gather: bool = True  # under torchrun, every rank's samples are negatives


@dataclass
class LossConfig:
    prediction: PredictionLoss = field(default_factory=PredictionLoss)
    hidden: HiddenLoss = field(default_factory=HiddenLoss)
    relation: RelationLoss = field(default_factory=RelationLoss)
    mi: MILoss = field(default_factory=MILoss)


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    grad_accum: int = 1
    optimizer: str = "adamw"  # adamw | sgd (plain SGD, no momentum; weight decay as an L2 term)
    clip_norm: float = 1.0
    autocast: str = "auto"  # auto (bf16 on CUDA, off on CPU) | bf16 | fp16 | none
    eval_every: int = 100
    log_every: int = 10
    checkpoint_every: int = 100
    seed: int = 0
    output_dir: str = "runs/distill"
    resume: bool = True
    progress: bool = True


@dataclass
class NasBudget:
    """Search constraints. A value in (0, 1] is a fraction of the teacher's cost, a larger one absolute
    (parameters, FLOPs at nas.seq_len, milliseconds); null means unconstrained."""
    params: float | None = None
    flops: float | None = None
    latency: float | None = None
    min_params: float | None = None  # lower end of a parameter window (Mixture-of-Supernets)


@dataclass
class NasLatency:
    batch_size: int = 8
    seq_len: int = 128
    repeats: int = 5  # the median of this many timed forwards (after one warm-up)


@dataclass
class NasEvolution:
    """HAT / Mixture-of-Supernets defaults."""
    population: int = 125
    parents: int = 25
    mutations: int = 50
    crossovers: int = 50
    mutation_prob: float = 0.3
    generations: int = 10


@dataclass
class NasNsga2:
    trials: int = 200
    population: int = 50
    objective: str = "flops"  # the cost traded against the loss: flops | params | latency


@dataclass
class NasProxy:
    """Task-proxy search: fine-tune the top_k candidates briefly and pick by accuracy vs FLOPs."""
    top_k: int = 0  # 0: off
    dataset: str = "rotten_tomatoes"
    steps: int = 100
    lr: float = 1e-4


@dataclass
class NasConfig:
    space: str = "autodistil"  # autodistil (K sub-spaces scaled to the teacher) | custom (nas.custom_space)
    k: int = 3  # sub-spaces of the autodistil space; 1 = one-shot, one SuperLM over the union
    layerwise: bool = False  # per-layer heads and FFN ratios (HAT / MoS spaces; search with evolution or nsga2)
    custom_space: dict | None = None  # SearchSpace.from_dict form, used when space is custom
    sandwich_random: int = 2  # M: random sub-networks per step beside the largest and the smallest
    relations: list = field(default_factory=lambda: ["qq", "kk", "vv"])
    relation_heads: int | None = None  # null: the teacher's head count (AutoDistil, Eq. 4)
    relation_loss: str = "mse_prob"  # AutoDistil Eq. 4: MSE of the relation probabilities
    objective: str = "relation"  # relation (teacher's self-attention relations) | inplace (from the largest)
    inplace_target: str = "hidden"  # inplace objective: hidden (last hidden state, MSE) | logits (soft CE)
    experts: int = 1  # Mixture-of-Supernets FFN experts; 1 = plain weight sharing
    routing: str = "layer"  # layer | neuron
    noise: float = 1e-3  # relative noise added to the expert copies (experts > 1)
    route_attention: bool = False
    seq_len: int = 128  # FLOPs are counted at this sequence length
    latency: NasLatency = field(default_factory=NasLatency)
    budget: NasBudget = field(default_factory=NasBudget)
    search: str = "enumerate"  # enumerate | evolution | nsga2
    evolution: NasEvolution = field(default_factory=NasEvolution)
    nsga2: NasNsga2 = field(default_factory=NasNsga2)
    proxy: NasProxy = field(default_factory=NasProxy)
    eval_batches: int | None = None  # held-out batches scored per candidate (null: the whole eval split)
    output: str = "runs/nas"  # supernet-<sub-space>/ training runs and search/ results go here


@dataclass
class AugmentConfig:
    """Distiller's augmentation stage (pykd.distill.augment); an empty policy and mixup false turn it off."""
    policy: list = field(default_factory=list)  # operations drawn per augmented copy: swap | delete | synonym | mlm
    copies: int = 1  # augmented versions of each training example
    word_fraction: float = 0.1  # share of an example's words an operation touches (at least one)
    mlm_model: str | None = None  # AutoModelForMaskedLM path or hub name; mlm needs one (no package ships one)
    mlm_top_k: int = 8
    seed: int = 0
    batch_size: int = 64  # examples per generation and teacher-labelling batch
    cache_dir: str | None = None  # where augmented sets are kept; null: <pykd cache>/augment
    mixup: bool = False  # mixup of word embeddings in the distillation step (batch doubled)
    mixup_alpha: float = 0.4  # lambda ~ Beta(alpha, alpha)


@dataclass
class RunConfig:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    losses: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    nas: NasConfig = field(default_factory=NasConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


CHOICES = {
    "student.init": ("teacher", "random", "checkpoint"),
    "data.kind": ("classification", "regression", "unlabeled"),
    "losses.prediction.type": ("soft_ce", "mse", "none"),
    "losses.hidden.type": ("mse", "cosine", "pkd", "none"),
    "losses.relation.loss": ("kl", "ce", "mse_prob", "mse_logit"),
    "losses.mi.bound": ("alpha", "infonce", "nwj", "tuba", "js", "none"),
    "losses.mi.samples": ("examples", "tokens"),
    "train.autocast": ("auto", "bf16", "fp16", "none"),
    "train.optimizer": ("adamw", "sgd"),
    "nas.space": ("autodistil", "custom"),
    "nas.relation_loss": ("kl", "ce", "mse_prob", "mse_logit"),
    "nas.objective": ("relation", "inplace"),
    "nas.inplace_target": ("hidden", "logits"),
    "nas.routing": ("layer", "neuron"),
    "nas.search": ("enumerate", "evolution", "nsga2"),
    "nas.nsga2.objective": ("flops", "params", "latency"),
}
RELATIONS = ("qk", "qq", "kk", "vv")
# Counts and periods; a null max_*_examples means "all".
AT_LEAST_ONE = ("train.steps", "train.batch_size", "train.grad_accum", "train.eval_every", "train.log_every",
                "train.checkpoint_every", "data.max_length", "data.max_train_examples", "data.max_eval_examples")
POSITIVE = ("train.lr", "losses.prediction.temperature")
NON_NEGATIVE = ("train.weight_decay", "train.clip_norm")
# Keys a resumed run may change: they decide how long the run goes on and what is logged, evaluated and
# saved when, never what an optimiser step computes. Every other key is part of what a checkpoint
# depends on (see resume_conflicts). train.steps is here because the learning-rate schedule is a function
# of it: a run resumed with more steps continues the same weights on a stretched schedule, as asked.
# The nas keys only `pykd nas search` (or where runs are written) depends on: a SuperLM's training never reads them.
NAS_SEARCH_KEYS = frozenset({"nas.search", "nas.seq_len", "nas.eval_batches", "nas.output"} | {
    f"nas.{section}.{f.name}" for section, cls in (("budget", NasBudget), ("latency", NasLatency),
                                                   ("evolution", NasEvolution), ("nsga2", NasNsga2),
                                                   ("proxy", NasProxy)) for f in dataclasses.fields(cls)})
RESUMABLE_KEYS = frozenset({"train.steps", "train.log_every", "train.eval_every", "train.checkpoint_every",
                            "train.progress", "train.output_dir", "train.resume"}) | NAS_SEARCH_KEYS


def _convert(value, hint, key: str):
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if value is None:
        if type(None) in typing.get_args(hint):
            return None
        raise ValueError(f"config key {key} may not be null")
    target = args[0] if origin in (typing.Union, types.UnionType) else hint
    if target is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"config key {key} must be true or false, got {value!r}")
    if target in (int, float):
        if isinstance(value, str):
            value = _number(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (target is int and value != int(value)):
            raise ValueError(f"config key {key} must be {target.__name__}, got {value!r}")
        return target(value)
    if target is str:
        if not isinstance(value, str):
            raise ValueError(f"config key {key} must be a string, got {value!r}")
        return value
    if (typing.get_origin(target) or target) is list:
        if not isinstance(value, list):
            raise ValueError(f"config key {key} must be a list, got {value!r}")
        return value
    if (typing.get_origin(target) or target) is dict:
        if not isinstance(value, dict):
            raise ValueError(f"config key {key} must be a mapping, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint} for {key}")


def _number(text: str):
    """YAML 1.1 reads 5e-5 as a string; numbers written that way are still numbers."""
    try:
        return float(text)
    except ValueError:
        return text


def _build(cls, values: dict, prefix: str):
    if not isinstance(values, dict):
        raise ValueError(f"config section {prefix.rstrip('.') or '<root>'} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown config key(s) {[prefix + k for k in unknown]}; "
                         f"{prefix.rstrip('.') or 'the root'} accepts {sorted(known)}")
    built = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            built[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            built[name] = _convert(value, hint, prefix + name)
    return cls(**built)


def _validate(config: RunConfig) -> RunConfig:
    as_dict = to_dict(config)
    for key, choices in CHOICES.items():
        value = _lookup(as_dict, key)
        if value not in choices:
            raise ValueError(f"config key {key} must be one of {choices}, got {value!r}")
    bad = [r for r in config.losses.relation.relations if r not in RELATIONS]
    if bad:
        raise ValueError(f"config key losses.relation.relations takes {RELATIONS}, got {bad}")
    if config.student.init == "checkpoint" and not config.student.checkpoint:
        raise ValueError("student.init is 'checkpoint' but student.checkpoint is not set")
    if config.data.kind == "unlabeled" and config.losses.prediction.type != "none":
        raise ValueError("task-agnostic KD (data.kind unlabeled) has no prediction layer: "
                         "set losses.prediction.type to none")
    if config.data.kind == "unlabeled" and config.teacher.cache_logits:
        raise ValueError("teacher.cache_logits caches the teacher's task logits, which task-agnostic KD "
                         "(data.kind unlabeled) does not have: set it to false")
    _validate_ranges(config, as_dict)
    _validate_nas(config.nas, as_dict)
    _validate_augment(config)
    return config


NAS_AT_LEAST = {"nas.k": 1, "nas.sandwich_random": 0, "nas.experts": 1, "nas.seq_len": 1,
                "nas.latency.batch_size": 1, "nas.latency.seq_len": 1, "nas.latency.repeats": 1,
                "nas.evolution.population": 2, "nas.evolution.parents": 1, "nas.evolution.mutations": 0,
                "nas.evolution.crossovers": 0, "nas.evolution.generations": 1, "nas.nsga2.trials": 1,
                "nas.nsga2.population": 2, "nas.proxy.top_k": 0, "nas.proxy.steps": 1}


def _validate_nas(nas: NasConfig, as_dict: dict) -> None:
    for key, least in NAS_AT_LEAST.items():
        if _lookup(as_dict, key) < least:
            raise ValueError(f"config key {key} must be >= {least}, got {_lookup(as_dict, key)}")
    bad = [r for r in nas.relations if r not in RELATIONS]
    if bad or not nas.relations:
        raise ValueError(f"config key nas.relations takes a non-empty list of {RELATIONS}, got {nas.relations}")
    if nas.relation_heads is not None and nas.relation_heads < 1:
        raise ValueError(f"config key nas.relation_heads must be >= 1 or null, got {nas.relation_heads}")
    if nas.space == "custom" and not nas.custom_space:
        raise ValueError("config key nas.space is 'custom' but nas.custom_space is not set")
    if nas.space != "custom" and nas.custom_space:
        raise ValueError("config key nas.custom_space is set but nas.space is not 'custom'")
    for name in ("params", "flops", "latency", "min_params"):
        value = getattr(nas.budget, name)
        if value is not None and value <= 0:
            raise ValueError(f"config key nas.budget.{name} must be > 0 or null, got {value}")
    if not 0.0 <= nas.evolution.mutation_prob <= 1.0:
        raise ValueError(f"config key nas.evolution.mutation_prob must be in [0, 1], got {nas.evolution.mutation_prob}")
    if nas.evolution.parents > nas.evolution.population:
        raise ValueError(f"config key nas.evolution.parents ({nas.evolution.parents}) may not exceed "
                         f"nas.evolution.population ({nas.evolution.population})")
    if nas.noise < 0:
        raise ValueError(f"config key nas.noise must be >= 0, got {nas.noise}")


def _validate_augment(config: RunConfig) -> None:
    from .augment import OPERATIONS

    augment = config.augment
    unknown = [name for name in augment.policy if name not in OPERATIONS]
    if unknown:
        raise ValueError(f"config key augment.policy takes operations from {OPERATIONS}, got {unknown}")
    if "mlm" in augment.policy and not augment.mlm_model:
        raise ValueError("augment.policy has mlm but augment.mlm_model is not set: no package ships a pretrained "
                         "masked-LM head, so give the path (or hub name) of an AutoModelForMaskedLM")
    if (augment.policy or augment.mixup) and config.data.kind == "unlabeled":
        raise ValueError("augmentation needs a labelled task (the teacher labels the augmented examples): "
                         "data.kind is 'unlabeled'")
    for key in ("copies", "mlm_top_k", "batch_size"):
        if getattr(augment, key) < 1:
            raise ValueError(f"config key augment.{key} must be >= 1, got {getattr(augment, key)}")
    if not 0 < augment.word_fraction <= 1:
        raise ValueError(f"config key augment.word_fraction must lie in (0, 1], got {augment.word_fraction}")
    if not augment.mixup_alpha > 0:
        raise ValueError(f"config key augment.mixup_alpha must be > 0, got {augment.mixup_alpha}")


def _validate_ranges(config: RunConfig, as_dict: dict) -> None:
    for key in AT_LEAST_ONE:
        value = _lookup(as_dict, key)
        if value is not None and value < 1:
            raise ValueError(f"config key {key} must be >= 1, got {value}")
    for key in POSITIVE:
        if not _lookup(as_dict, key) > 0:
            raise ValueError(f"config key {key} must be > 0, got {_lookup(as_dict, key)}")
    for key in NON_NEGATIVE:
        if not _lookup(as_dict, key) >= 0:
            raise ValueError(f"config key {key} must be >= 0, got {_lookup(as_dict, key)}")
    if not 0 < config.data.eval_fraction < 1:
        raise ValueError(f"config key data.eval_fraction must lie strictly between 0 and 1, "
                         f"got {config.data.eval_fraction}")
    if not 0 <= config.train.warmup_fraction <= 1:
        raise ValueError(f"config key train.warmup_fraction must lie in [0, 1], got {config.train.warmup_fraction}")


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    flat = {}
    for name, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{name}."))
        else:
            flat[prefix + name] = value
    return flat


def resume_conflicts(saved: dict, current: dict) -> list[str]:
    """What a resumed run changes that its checkpoint depends on.

    Args:
        saved: the config dict stored in the checkpoint (to_dict of the run that wrote it).
        current: to_dict of this run's config.

    Returns:
        "key (saved -> current)" for every key outside RESUMABLE_KEYS whose values differ, sorted;
        a key only one side has counts as differing.
    """
    before, after = flatten(saved), flatten(current)
    keys = sorted(key for key in set(before) | set(after)
                  if key not in RESUMABLE_KEYS and (key not in before or key not in after or before[key] != after[key]))
    return [f"{key} ({before.get(key, '<absent>')!r} -> {after.get(key, '<absent>')!r})" for key in keys]


def _lookup(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def from_dict(values: dict) -> RunConfig:
    return _validate(_build(RunConfig, values or {}, ""))


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """`a.b.c=value` sets values['a']['b']['c'] to the YAML reading of value."""
    for override in overrides:
        if "=" not in override:
            raise ValueError(f"--set takes key=value, got {override!r}")
        dotted, raw = override.split("=", 1)
        parts = dotted.strip().split(".")
        node = values
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {dotted}: {part} is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return values


def load(path: str | None, overrides: list[str] = ()) -> RunConfig:
    values = {}
    if path is not None:
        with open(path) as handle:
            values = yaml.safe_load(handle) or {}
    return from_dict(apply_overrides(values, list(overrides)))


DEFAULT = RunConfig()
