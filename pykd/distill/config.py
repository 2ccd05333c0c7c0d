"""Run configuration: nested dataclasses read from YAML, with `--set key=value` overrides.

Unknown keys, wrong types, unknown choices and values out of range are errors that name the key,
raised when the configuration loads (before any data or model): each key's type, choices and range
are declared beside it (pykd.distill.options), the choices being the tuples the implementations
export; `_validate` adds what depends on several keys. Nothing is silently ignored. `DEFAULT` below
is the embedded default run (`make demo`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from ..loading import read_yaml
from ..nas.config import SEARCH_KEYS as NAS_SEARCH_KEYS
from ..nas.config import NasConfig
from ..nas.config import validate as validate_nas
from ..ops.attention_relation import LOSSES as RELATION_LOSSES
from .augment import OPERATIONS
from .cache import replace_atomically
from .callbacks import REPORTERS
from .data import TASK_KINDS
from .losses import HIDDEN_TYPES, MI_BOUND_CHOICES, MI_SAMPLES, MLM_POSITIONS, PREDICTION_TYPES, RELATIONS, \
    VOCAB_ONLY_TYPES
from .mapping import MAPPINGS
from .models import STUDENT_INITS
from .optim import AUTOCAST, OPTIMIZERS
from .options import above, at_least, build, check_ranges, option, within

# A loss term's weight: 0 turns the term off; negative weights would maximise a distance.
LOSS_WEIGHT = at_least(0)
# What NumPy's and torch's generators take (train.seed + epoch seeds an epoch's order: torch takes any int64).
SEED = within(0, 2**32 - 1)


@dataclass
class TeacherConfig:
    path: str = "minilm-l6"  # "minilm-l6" (the packaged all-MiniLM-L6-v2), a hub name or a local directory
    finetuned: str | None = None  # a directory written by `pykd finetune`; task-specific KD needs one
    # Compute the teacher's logits over the training set once, cache them on disk (pykd.distill.teacher_cache)
    # and skip the teacher forward when the objective needs only its logits (no hidden/relation/MI term).
    cache_logits: bool = False


@dataclass
class StudentConfig:
    init: Literal[STUDENT_INITS] = "teacher"
    checkpoint: str | None = None
    num_hidden_layers: int = option(3, at_least(1))
    hidden_size: int = option(192, at_least(1))
    num_attention_heads: int = option(6, at_least(1))  # a divisor of hidden_size (head size >= 1)
    intermediate_size: int = option(768, at_least(1))
    dropout: float = option(0.1, within(0, 1, high_open=True))  # a probability; 1 would drop everything


@dataclass
class MaskingConfig:
    """data.kind mlm: BERT's masking (pykd.distill.masking), seeded by train.seed."""
    probability: float = option(0.15, within(0, 1, low_open=True))  # share of a row's tokens to predict
    mask_fraction: float = option(0.8, within(0, 1))  # of those, replaced by the mask token
    random_fraction: float = option(0.1, within(0, 1))  # by a random word (the rest stay as they are)
    whole_word: bool = False  # a word's tokens are chosen together


@dataclass
class DataConfig:
    # a built-in corpus (pykd.distill.corpora.CORPORA) | a local csv/json/jsonl/txt file | a hub name
    dataset: str = "rotten_tomatoes"
    kind: Literal[TASK_KINDS] = "classification"
    max_length: int = option(64, at_least(1))
    # not used by data with its own split (the built-in corpora but rotten_tomatoes and pydocs)
    eval_fraction: float = option(0.1, within(0, 1, low_open=True, high_open=True))
    max_train_examples: int | None = option(None, at_least(1))  # null: all
    max_eval_examples: int | None = option(None, at_least(1))
    masking: MaskingConfig = field(default_factory=MaskingConfig)


@dataclass
class PredictionLoss:
    type: Literal[PREDICTION_TYPES] = "soft_ce"
    temperature: float = option(2.0, above(0))
    t_squared: bool = False  # Distiller's code does not multiply by T^2
    weight: float = option(1.0, LOSS_WEIGHT)
    hard_weight: float = option(0.0, LOSS_WEIGHT)
    # data.kind mlm (pykd.vocab_kd_loss on the MLM heads): jsd's teacher weight, and the positions distilled:
    # masked (the masked positions, DistilBERT's restrict_ce_to_mask) or all (every non-padding token); the
    # hard-label term (the student's MLM cross-entropy) is always on the masked positions.
    beta: float = option(0.5, within(0, 1))
    positions: Literal[MLM_POSITIONS] = "masked"


@dataclass
class HiddenLoss:
    type: Literal[HIDDEN_TYPES] = "mse"
    weight: float = option(1.0, LOSS_WEIGHT)
    mapping: Literal[MAPPINGS] = "skip"  # emd: BERT-EMD many-to-many
    pairs: list | None = None  # [[student, teacher], ...] hidden-state indices, with mapping pairs
    include_embeddings: bool = False
    emd_temperature: float = option(1.0, above(0))  # tau of the EMD layer-weight update (mapping emd)


@dataclass
class RelationLoss:
    relations: list[Literal[RELATIONS]] = option(factory=lambda: ["qk", "vv"], noun="relations")
    loss: Literal[RELATION_LOSSES] = "kl"
    relation_heads: int = option(6, at_least(1))  # a divisor of both models' widths (checked when they load)
    mapping: Literal[MAPPINGS] = "last"
    pairs: list | None = None  # [[student, teacher], ...] attention-layer indices, with mapping pairs
    weight: float = option(1.0, LOSS_WEIGHT)
    emd_temperature: float = option(1.0, above(0))


@dataclass
class MILoss:
    bound: Literal[MI_BOUND_CHOICES] = "none"
    alpha: float = option(0.9, within(0, 1))  # 1: leave-one-out InfoNCE family, 0: TUBA (pykd.mi_lower_bound)
    weight: float = option(0.1, LOSS_WEIGHT)
    mapping: Literal[MAPPINGS] = "last"  # not emd (the critics train per layer pair)
    pairs: list | None = None
    samples: Literal[MI_SAMPLES] = "examples"  # examples (masked-mean pooled) | tokens
    max_tokens: int = option(512, at_least(2))  # a bound contrasts each sample with at least one other
    critic_hidden: int = option(256, at_least(1))
    critic_dim: int = option(128, at_least(1))
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
    steps: int = option(300, at_least(1))
    batch_size: int = option(32, at_least(1))
    lr: float = option(1e-4, above(0))
    weight_decay: float = option(0.01, at_least(0))
    warmup_fraction: float = option(0.1, within(0, 1))
    grad_accum: int = option(1, at_least(1))
    optimizer: Literal[OPTIMIZERS] = "adamw"  # sgd: plain SGD, no momentum; weight decay as an L2 term
    clip_norm: float = option(1.0, at_least(0))
    autocast: Literal[AUTOCAST] = "auto"  # auto: bf16 on CUDA, off on CPU
    # processes reading and padding batches ahead of the step (0: the training thread does it); a GPU wants 1-2,
    # a CPU run gains nothing from taking cores from the step (bench/NOTES.md, "Data feeding")
    num_workers: int = option(0, at_least(0))
    eval_every: int = option(100, at_least(1))
    log_every: int = option(10, at_least(1))
    checkpoint_every: int = option(100, at_least(1))
    seed: int = option(0, SEED)
    output_dir: str = "runs/distill"
    resume: bool = True
    progress: bool = True
    # where each log record goes: jsonl (output_dir/log.jsonl), tensorboard (output_dir/tensorboard)
    report_to: list[Literal[REPORTERS]] = option(factory=lambda: ["jsonl"], noun="reporters")


@dataclass
class AugmentConfig:
    """Distiller's augmentation stage (pykd.distill.augment); an empty policy and mixup false turn it off."""
    # operations drawn per augmented copy
    policy: list[Literal[OPERATIONS]] = option(factory=list, noun="operations")
    copies: int = option(1, at_least(1))  # augmented versions of each training example
    word_fraction: float = option(0.1, within(0, 1, low_open=True))  # share of an example's words an operation touches
    mlm_model: str | None = None  # AutoModelForMaskedLM path or hub name; mlm needs one (no package ships one)
    mlm_top_k: int = option(8, at_least(1))
    seed: int = option(0, SEED)
    batch_size: int = option(64, at_least(1))  # examples per generation and teacher-labelling batch
    cache_dir: str | None = None  # where augmented sets are kept; null: <pykd cache>/augment
    mixup: bool = False  # mixup of word embeddings in the distillation step (batch doubled)
    mixup_alpha: float = option(0.4, above(0))  # lambda ~ Beta(alpha, alpha)


@dataclass
class RunConfig:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    losses: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    nas: NasConfig = field(default_factory=NasConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


# Keys a resumed run may change: they decide how long the run goes on, how batches are read and what is
# logged, evaluated and saved when, never what an optimiser step computes. Every other key is part of what a checkpoint
# depends on (see resume_conflicts). train.steps is here because the learning-rate schedule is a function
# of it: a run resumed with more steps continues the same weights on a stretched schedule, as asked.
# The nas keys only `pykd nas search` (or where runs are written) depends on: a SuperLM's training never reads them.
RESUMABLE_KEYS = frozenset({"train.steps", "train.log_every", "train.eval_every", "train.checkpoint_every",
                            "train.progress", "train.output_dir", "train.resume",
                            "train.num_workers", "train.report_to"}) | NAS_SEARCH_KEYS


def _validate(config: RunConfig) -> RunConfig:
    """What depends on several keys (every key's type, choices and range were checked as it was built)."""
    check_ranges(config)
    student = config.student
    if student.init != "checkpoint" and student.hidden_size % student.num_attention_heads:
        raise ValueError(f"config key student.num_attention_heads must divide student.hidden_size (head size "
                         f"hidden_size / heads >= 1), got {student.num_attention_heads} heads for "
                         f"{student.hidden_size}")
    if config.student.init == "checkpoint" and not config.student.checkpoint:
        raise ValueError("student.init is 'checkpoint' but student.checkpoint is not set")
    if config.data.kind == "unlabeled" and config.losses.prediction.type != "none":
        raise ValueError("task-agnostic KD (data.kind unlabeled) has no prediction layer: "
                         "set losses.prediction.type to none")
    if config.data.kind == "unlabeled" and config.teacher.cache_logits:
        raise ValueError("teacher.cache_logits caches the teacher's task logits, which task-agnostic KD "
                         "(data.kind unlabeled) does not have: set it to false")
    _validate_masked_lm(config)
    for name in ("hidden", "relation", "mi"):
        _check_layer_pairs(f"losses.{name}", getattr(config.losses, name))
    validate_nas(config.nas)
    _validate_augment(config)
    return config


def _validate_masked_lm(config: RunConfig) -> None:
    """Masked-LM KD (data.kind mlm) distils vocabulary distributions with the fused kernel; the other kinds
    distil task logits."""
    prediction, masking = config.losses.prediction, config.data.masking
    if masking.mask_fraction + masking.random_fraction > 1:
        raise ValueError(f"config keys data.masking.mask_fraction ({masking.mask_fraction}) and "
                         f"data.masking.random_fraction ({masking.random_fraction}) must sum to at most 1")
    if config.data.kind != "mlm":
        if prediction.type in VOCAB_ONLY_TYPES:
            raise ValueError(f"losses.prediction.type {prediction.type} is for masked-LM KD (data.kind mlm); "
                             f"a {config.data.kind} task takes soft_ce, mse or none")
        return
    if prediction.type == "mse":
        raise ValueError("losses.prediction.type mse needs the vocabulary logits, which masked-LM KD (data.kind "
                         "mlm) never forms: use soft_ce, kl, reverse_kl, jsd or none")
    if config.teacher.cache_logits:
        raise ValueError("teacher.cache_logits caches task logits; masked-LM KD (data.kind mlm) projects the "
                         "teacher's hidden states through its head instead: set it to false")
    if config.augment.policy or config.augment.mixup:
        raise ValueError("augmentation (augment.policy, augment.mixup) needs a labelled task; data.kind mlm "
                         "makes its labels by masking")


def _check_layer_pairs(prefix: str, term) -> None:
    """pairs exactly with mapping pairs, as [[student, teacher], ...] of layer indices (their range depends on
    the models, checked when they load)."""
    if (term.mapping == "pairs") != (term.pairs is not None):
        raise ValueError(f"config key {prefix}.pairs is given exactly when {prefix}.mapping is 'pairs' "
                         f"(mapping {term.mapping!r}, pairs {term.pairs!r})")
    for pair in term.pairs or []:
        if not (isinstance(pair, list) and len(pair) == 2
                and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in pair)):
            raise ValueError(f"config key {prefix}.pairs takes [[student, teacher], ...] layer indices (integers "
                             f">= 0), got {term.pairs!r}")


def _validate_augment(config: RunConfig) -> None:
    augment = config.augment
    if "mlm" in augment.policy and not augment.mlm_model:
        raise ValueError("augment.policy has mlm but augment.mlm_model is not set: no package ships a pretrained "
                         "masked-LM head, so give the path (or hub name) of an AutoModelForMaskedLM")
    if (augment.policy or augment.mixup) and config.data.kind == "unlabeled":
        raise ValueError("augmentation needs a labelled task (the teacher labels the augmented examples): "
                         "data.kind is 'unlabeled'")


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


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def from_dict(values: dict) -> RunConfig:
    """A RunConfig from nested dicts (YAML's reading), every key checked."""
    return _validate(build(RunConfig, values or {}, ""))


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


def load_values(path: str | None, overrides: list[str] = ()) -> dict:
    """The run config's values (the YAML file at `path`, None: the defaults, plus --set overrides) as
    nested dicts, checked as `load` checks them: what pykd hpo and pykd recommend build pipelines on."""
    values = {}
    if path is not None:  # an empty file is the defaults, as an empty mapping would be
        values = read_yaml(path, "run config", "give a YAML run configuration (`pykd config` prints the "
                           "default one)") or {}
    values = apply_overrides(values, list(overrides))
    from_dict(values)
    return values


def load(path: str | None, overrides: list[str] = ()) -> RunConfig:
    """The run config of the YAML file at `path` (None: the defaults) with --set overrides, checked."""
    return from_dict(load_values(path, overrides))


def write_run_config(values: dict, directory) -> Path:
    """directory/config.yaml: the full run config of `values` (checked), which `pykd distill` runs as is
    (written atomically: several workers may write one directory's)."""
    config = from_dict(values)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.yaml"
    replace_atomically(path, lambda partial: partial.write_text(yaml.safe_dump(to_dict(config), sort_keys=False)))
    return path


DEFAULT = RunConfig()
