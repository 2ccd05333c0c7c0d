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
    dataset: str = "rotten_tomatoes"  # rotten_tomatoes | pydocs | a local csv/json/jsonl/txt file | a hub name
    kind: str = "classification"  # classification | regression | unlabeled
    max_length: int = 64
    eval_fraction: float = 0.1
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
    mapping: str = "skip"
    pairs: list | None = None
    include_embeddings: bool = False


@dataclass
class RelationLoss:
    relations: list = field(default_factory=lambda: ["qk", "vv"])
    loss: str = "kl"
    relation_heads: int = 6
    mapping: str = "last"
    pairs: list | None = None
    weight: float = 1.0


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
class RunConfig:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    losses: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


CHOICES = {
    "student.init": ("teacher", "random", "checkpoint"),
    "data.kind": ("classification", "regression", "unlabeled"),
    "losses.prediction.type": ("soft_ce", "mse", "none"),
    "losses.hidden.type": ("mse", "cosine", "pkd", "none"),
    "losses.relation.loss": ("kl", "ce", "mse_prob", "mse_logit"),
    "losses.mi.bound": ("alpha", "infonce", "nwj", "tuba", "js", "none"),
    "losses.mi.samples": ("examples", "tokens"),
    "train.autocast": ("auto", "bf16", "fp16", "none"),
}
RELATIONS = ("qk", "qq", "kk", "vv")


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
    for key in ("train.steps", "train.batch_size", "train.grad_accum", "data.max_length"):
        if _lookup(as_dict, key) < 1:
            raise ValueError(f"config key {key} must be >= 1, got {_lookup(as_dict, key)}")
    return config


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
