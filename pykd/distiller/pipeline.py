"""Distiller's pipeline vocabulary: the stages of a KD pipeline, the choices of each, the named pipelines
of the KD runs table, and a pipeline written as run-config values and as the recommender's numbers.

A pipeline is a dict of dimension values (`params`), each dimension a named choice of a stage:

    augmentation       augment (none, or operations of pykd.distill.augment joined by '+'), augment_copies, mixup
    prediction loss    prediction (soft_ce | mse), temperature, prediction_weight, hard_weight
    intermediate loss  intermediate (exactly one of none, the hidden-state losses, relation, mi),
                       intermediate_weight, mi_bound, mi_alpha
    layer mapping      mapping (hidden-state and relation losses), mi_mapping (the MI loss: no emd)
    optimisation       lr

Conditional dimensions (`DIMENSIONS`: temperature needs soft_ce; mapping, mi_* and
intermediate_weight need an intermediate loss that reads them; mi_alpha the alpha bound) apply
only when their parent's value uses them. Every choice comes from the module that implements it
(the loss types of pykd.distill.losses, the mappings of pykd.distill.mapping, the bounds of
pykd.ops.mi_bound); `pipeline_values` turns a pipeline into run-config values, `encode_config`
reads a run config back as numbers. `pykd hpo` searches over these dimensions, `pykd recommend`
ranks the named PIPELINES, and the evidence tools (tools/kd_runs_table.py,
tools/distiller_findings.py) run and summarise them.
"""
from __future__ import annotations

import copy
import math

from ..distill import config as run_config
from ..distill.augment import OPERATIONS
from ..distill.losses import HIDDEN_TYPES, MI_MAPPINGS, PREDICTION_TYPES
from ..distill.mapping import MAPPINGS
from ..ops.mi_bound import BOUNDS

# The choices of each categorical dimension ("pairs" needs explicit layer indices, so no pipeline names it).
PREDICTION_LOSSES = tuple(t for t in PREDICTION_TYPES if t != "none")
HIDDEN_LOSSES = tuple(t for t in HIDDEN_TYPES if t != "none")
INTERMEDIATE = ("none", *HIDDEN_LOSSES, "relation", "mi")  # Distiller's single intermediate stage
LAYER_MAPPINGS = tuple(m for m in MAPPINGS if m != "pairs")
MI_LAYER_MAPPINGS = tuple(m for m in MI_MAPPINGS if m != "pairs")
CHOICES = {
    "prediction": PREDICTION_LOSSES,
    "intermediate": INTERMEDIATE,
    "mapping": LAYER_MAPPINGS,
    "mi_mapping": MI_LAYER_MAPPINGS,
    "mi_bound": BOUNDS,
    "mixup": (False, True),
}
AUGMENT_NONE = "none"  # the augment dimension's value without augmentation (others: operations joined by '+')

# name -> (parent dimension, the parent values under which it is drawn; None: any but "none"); None: always.
DIMENSIONS = {
    "augment": None,
    "augment_copies": ("augment", None),
    "mixup": None,
    "prediction": None,
    "temperature": ("prediction", ("soft_ce",)),
    "prediction_weight": None,
    "hard_weight": None,
    "intermediate": None,
    "intermediate_weight": ("intermediate", tuple(i for i in INTERMEDIATE if i != "none")),
    "mapping": ("intermediate", (*HIDDEN_LOSSES, "relation")),
    "mi_mapping": ("intermediate", ("mi",)),
    "mi_bound": ("intermediate", ("mi",)),
    "mi_alpha": ("mi_bound", ("alpha",)),
    "lr": None,
}
STAGES = {
    "augmentation": ("augment", "augment_copies", "mixup"),
    "prediction loss": ("prediction", "temperature", "prediction_weight", "hard_weight"),
    "intermediate loss": ("intermediate", "intermediate_weight", "mi_bound", "mi_alpha"),
    "layer mapping": ("mapping", "mi_mapping"),
    "optimisation": ("lr",),
}

# The KD runs table's pipelines, one per Distiller stage ({}: pykd's default, soft CE at T=2 with hidden
# MSE (skip mapping) plus QK/VV relations (last layer)).
PIPELINES = {
    "default": {},
    "prediction_only": {"intermediate": "none"},
    "logit_mse": {"prediction": "mse", "intermediate": "none"},
    "hidden_mse_skip": {"intermediate": "mse", "mapping": "skip"},
    "hidden_cosine_uniform": {"intermediate": "cosine", "mapping": "uniform"},
    "pkd_last": {"intermediate": "pkd", "mapping": "last"},
    "relation_last": {"intermediate": "relation", "mapping": "last"},
    "hidden_mse_emd": {"intermediate": "mse", "mapping": "emd"},
    "mi_alpha": {"intermediate": "mi", "mi_bound": "alpha", "mi_alpha": 0.9, "mi_mapping": "last"},
    "mi_infonce": {"intermediate": "mi", "mi_bound": "infonce", "mi_mapping": "last"},
    "augment_eda": {"augment": "swap+delete+synonym", "intermediate": "none"},
}
# The table's pipelines that differ from prediction_only by their intermediate loss alone (or not at all).
INTERMEDIATE_PIPELINES = ("prediction_only", "hidden_mse_skip", "hidden_cosine_uniform", "pkd_last",
                          "relation_last", "hidden_mse_emd", "mi_infonce", "mi_alpha")


def augment_operations(policy: str) -> list[str]:
    """The operations of an augment value ("none" or operations joined by '+')."""
    return [] if policy == AUGMENT_NONE else str(policy).split("+")


def applies(name: str, params: dict) -> bool:
    """Dimension `name` is drawn (and means something) given the dimension values drawn before it."""
    parent = DIMENSIONS.get(name)
    if parent is None:
        return True
    value = params.get(parent[0])
    if parent[1] is None:
        return value not in (None, AUGMENT_NONE)
    return value in parent[1]


# ---- a pipeline as run-config values ----

def pipeline_values(base: dict, params: dict) -> dict:
    """The run-config values of `base` with the pipeline `params` ({dimension: value}) applied.

    `intermediate` picks exactly one intermediate loss (Distiller's single intermediate stage):
    the others are switched off; relation keeps the base config's relations (qk, vv by default).
    A dimension written with dots (`train.batch_size`) sets that run-config key.
    """
    values = copy.deepcopy(base)
    for name, value in params.items():
        if "." in name:
            *path, key = name.split(".")
            _section(values, path)[key] = value
    if "augment" in params:
        _section(values, ("augment",))["policy"] = augment_operations(params["augment"])
    simple = {"augment_copies": ("augment", "copies"), "mixup": ("augment", "mixup"),
              "prediction": ("losses", "prediction", "type"), "temperature": ("losses", "prediction", "temperature"),
              "prediction_weight": ("losses", "prediction", "weight"),
              "hard_weight": ("losses", "prediction", "hard_weight"), "lr": ("train", "lr")}
    for name, (*path, key) in simple.items():
        if name in params:
            _section(values, path)[key] = params[name]
    if "intermediate" in params:
        _set_intermediate(values, params)
    return values


def _set_intermediate(values: dict, params: dict) -> None:
    choice = params["intermediate"]
    hidden, relation, mi = (_section(values, ("losses", name)) for name in ("hidden", "relation", "mi"))
    hidden["type"] = choice if choice in HIDDEN_LOSSES else "none"
    if choice != "relation":
        relation["relations"] = []
    elif not relation.get("relations"):
        relation["relations"] = list(run_config.DEFAULT.losses.relation.relations)
    mi["bound"] = params.get("mi_bound", "alpha") if choice == "mi" else "none"
    term = {**dict.fromkeys(HIDDEN_LOSSES, hidden), "relation": relation, "mi": mi}.get(choice)
    if term is None:
        return
    if "intermediate_weight" in params:
        term["weight"] = params["intermediate_weight"]
    if choice == "mi":
        if "mi_mapping" in params:
            mi["mapping"] = params["mi_mapping"]
        if "mi_alpha" in params:
            mi["alpha"] = params["mi_alpha"]
    elif "mapping" in params:
        term["mapping"] = params["mapping"]


def _section(values: dict, path) -> dict:
    node = values
    for part in path:
        node = node.setdefault(part, {})
    return node


# ---- a run config as the recommender's numbers ----

def encode_config(config) -> dict:
    """The pipeline part of a run config as numbers, read off the config the pipeline produces (so the
    default pipeline, hidden MSE and relations together, is encoded like any other): augmentation flags
    and copies, mixup, prediction type, log temperature, prediction and hard-label weights, one-hot hidden
    type, relation on, one-hot MI bound and alpha, one-hot mapping of the active intermediate term, log10
    of the intermediate weight and of the learning rate."""
    losses, augment = config.losses, config.augment
    features = {f"augment_{op}": float(op in augment.policy) for op in OPERATIONS}
    features["augment_copies"] = float(augment.copies if augment.policy else 0)
    features["mixup"] = float(augment.mixup)
    prediction = losses.prediction
    features["prediction_mse"] = float(prediction.type == "mse")
    features["log_temperature"] = math.log(prediction.temperature) if prediction.type == "soft_ce" else 0.0
    features["prediction_weight"], features["hard_weight"] = prediction.weight, prediction.hard_weight
    for kind in HIDDEN_LOSSES:
        features[f"hidden_{kind}"] = float(losses.hidden.type == kind)
    relation_on = bool(losses.relation.relations)
    features["relation"] = float(relation_on)
    for bound in BOUNDS:
        features[f"mi_{bound}"] = float(losses.mi.bound == bound)
    features["mi_alpha"] = losses.mi.alpha if losses.mi.bound == "alpha" else 0.0
    active = [(losses.hidden.type != "none", losses.hidden), (relation_on, losses.relation),
              (losses.mi.bound != "none", losses.mi)]
    for mapping in LAYER_MAPPINGS:
        features[f"mapping_{mapping}"] = float(sum(on and term.mapping == mapping for on, term in active))
    weights = [term.weight for on, term in active if on]
    features["log_intermediate_weight"] = math.log10(sum(weights)) if weights and sum(weights) > 0 else -3.0
    features["log_lr"] = math.log10(config.train.lr)
    return features
