"""The `nas` section of a run configuration (`pykd nas train | search | export | demo`), and what it builds.

The section lives in the same YAML as the KD engine's (pykd.distill.config.RunConfig.nas); its
choices come from the modules that implement them (the search methods of pykd.nas.algorithms, the
sandwich objectives of pykd.nas.sandwich, the routings of pykd.nas.mos, the spaces and costs of
pykd.nas.space, the relations of pykd.distill.losses and the relation losses of the op), its ranges
sit beside its fields, and `validate` checks what depends on several keys.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..distill.losses import RELATIONS
from ..distill.options import Range, above, at_least, option, within
from ..ops.attention_relation import LOSSES
from .algorithms import SEARCH_METHODS
from .mos import ROUTINGS
from .sandwich import INPLACE_TARGETS, OBJECTIVES
from .space import COSTS, SPACES


@dataclass(frozen=True)
class FiniteRange(Range):
    """A Range whose values must also be finite: a budget of .inf would lift its constraint silently (null
    is how a budget says "none"; NaN lies in no range)."""

    def contains(self, value) -> bool:
        return math.isfinite(value) and super().contains(value)

    def describe(self) -> str:
        return "be finite and " + super().describe().removeprefix("be ")


BUDGET = FiniteRange(low=0, low_open=True, or_null=True)


@dataclass
class NasBudget:
    """Search constraints. A value in (0, 1] is a fraction of the teacher's cost, a larger one absolute
    (parameters, FLOPs at nas.seq_len, milliseconds); null means unconstrained."""
    params: float | None = option(None, BUDGET)
    flops: float | None = option(None, BUDGET)
    latency: float | None = option(None, BUDGET)
    min_params: float | None = option(None, BUDGET)  # lower end of a parameter window (MoS)


@dataclass
class NasLatency:
    batch_size: int = option(8, at_least(1))
    seq_len: int = option(128, at_least(1))
    repeats: int = option(5, at_least(1))  # the median of this many timed forwards (after one warm-up)


@dataclass
class NasEvolution:
    """HAT / Mixture-of-Supernets defaults."""
    population: int = option(125, at_least(2))
    parents: int = option(25, at_least(1))
    mutations: int = option(50, at_least(0))
    crossovers: int = option(50, at_least(0))
    mutation_prob: float = option(0.3, within(0, 1))
    generations: int = option(10, at_least(1))


@dataclass
class NasNsga2:
    trials: int = option(200, at_least(1))
    population: int = option(50, at_least(2))
    objective: Literal[COSTS] = "flops"  # the cost traded against the loss


@dataclass
class NasProxy:
    """Task-proxy search: fine-tune the top_k candidates briefly and pick by accuracy vs FLOPs."""
    top_k: int = option(0, at_least(0))  # 0: off
    dataset: str = "rotten_tomatoes"
    steps: int = option(100, at_least(1))
    lr: float = option(1e-4, above(0))


@dataclass
class NasConfig:
    space: Literal[SPACES] = "autodistil"  # autodistil (K sub-spaces scaled to the teacher) | custom (nas.custom_space)
    k: int = option(3, at_least(1))  # sub-spaces of the autodistil space; 1 = one-shot, one SuperLM over the union
    layerwise: bool = False  # per-layer heads and FFN ratios (HAT / MoS spaces; search with evolution or nsga2)
    custom_space: dict | None = None  # SearchSpace.from_dict form, used when space is custom
    sandwich_random: int = option(2, at_least(0))  # M: random sub-networks per step beside the largest and smallest
    relations: list[Literal[RELATIONS]] = option(factory=lambda: ["qq", "kk", "vv"], noun="relations", non_empty=True)
    relation_heads: int | None = option(None, at_least(1, or_null=True))  # null: the teacher's head count (Eq. 4)
    relation_loss: Literal[LOSSES] = "mse_prob"  # AutoDistil Eq. 4: MSE of the relation probabilities
    objective: Literal[OBJECTIVES] = "relation"  # relation (teacher's relations) | inplace (from the largest)
    inplace_target: Literal[INPLACE_TARGETS] = "hidden"  # inplace: hidden (last hidden state, MSE) | logits (soft CE)
    experts: int = option(1, at_least(1))  # Mixture-of-Supernets FFN experts; 1 = plain weight sharing
    routing: Literal[ROUTINGS] = "layer"
    noise: float = option(1e-3, at_least(0))  # relative noise added to the expert copies (experts > 1)
    route_attention: bool = False
    seq_len: int = option(128, at_least(1))  # FLOPs are counted at this sequence length
    latency: NasLatency = field(default_factory=NasLatency)
    budget: NasBudget = field(default_factory=NasBudget)
    search: Literal[SEARCH_METHODS] = "enumerate"
    evolution: NasEvolution = field(default_factory=NasEvolution)
    nsga2: NasNsga2 = field(default_factory=NasNsga2)
    proxy: NasProxy = field(default_factory=NasProxy)
    # held-out batches scored per candidate (null: the whole eval split)
    eval_batches: int | None = option(None, at_least(1, or_null=True))
    output: str = "runs/nas"  # supernet-<sub-space>/ training runs and search/ results go here


# The nas keys only `pykd nas search` (or where runs are written) depends on: a SuperLM's training never
# reads them, so a resumed SuperLM run may change them (pykd.distill.config.RESUMABLE_KEYS).
SEARCH_KEYS = frozenset({"nas.search", "nas.seq_len", "nas.eval_batches", "nas.output"} | {
    f"nas.{section}.{f.name}" for section, cls in (("budget", NasBudget), ("latency", NasLatency),
                                                   ("evolution", NasEvolution), ("nsga2", NasNsga2),
                                                   ("proxy", NasProxy)) for f in dataclasses.fields(cls)})


def validate(nas: NasConfig) -> None:
    """What depends on several keys of the section (each key's own type and range is checked when it loads)."""
    if nas.space == "custom" and not nas.custom_space:
        raise ValueError("config key nas.space is 'custom' but nas.custom_space is not set")
    if nas.space != "custom" and nas.custom_space:
        raise ValueError("config key nas.custom_space is set but nas.space is not 'custom'")
    per_layer = nas.layerwise if nas.space != "custom" else any(
        isinstance(s, dict) and s.get("layerwise") for s in (nas.custom_space or {}).get("subspaces", []))
    if nas.proxy.top_k and per_layer:
        raise ValueError("config key nas.proxy.top_k fine-tunes exported candidates, but a per-layer space's "
                         "(nas.layerwise or a sub-space with layerwise: true) may differ in heads per layer, which no "
                         "stock model holds: set nas.proxy.top_k to 0 or search a uniform space")
    if nas.evolution.parents > nas.evolution.population:
        raise ValueError(f"config key nas.evolution.parents ({nas.evolution.parents}) may not exceed "
                         f"nas.evolution.population ({nas.evolution.population})")


def build_space(nas: NasConfig, teacher_config):
    """The search space the section describes, scaled to (or checked against) the teacher."""
    from .space import SearchSpace

    if nas.space == "custom":
        return SearchSpace.from_dict(nas.custom_space, teacher_config)
    return SearchSpace.autodistil(teacher_config, k=nas.k, layerwise=nas.layerwise)


def supernet_options(nas: NasConfig) -> dict:
    """SuperLM.from_teacher's keyword arguments from the section (none for plain sharing)."""
    if nas.experts == 1 and not nas.route_attention:
        return {}
    return {"experts": nas.experts, "routing": nas.routing, "noise": nas.noise,
            "route_attention": nas.route_attention}


def supernet_dir(nas: NasConfig, subspace: str) -> Path:
    """Where the SuperLM of sub-space `subspace` trains: nas.output/supernet-<name>."""
    return Path(nas.output) / f"supernet-{subspace}"
