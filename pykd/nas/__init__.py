"""Architecture search for transformer encoders: AutoDistil's SuperLM and Mixture-of-Supernets.

What it holds:

    architecture.py  Architecture / LayerwiseArchitecture: students and their string/dict forms
    space.py         TeacherShape, SubSpace / LayerwiseSubSpace, SearchSpace: spaces scaled to a teacher, exact costs
    elastic.py, superlm.py, mos.py   the SuperLM: one copy of the teacher's weights running any sub-network
                     (Mixture-of-Supernets: routed expert copies), exported as a stock transformers model
    config.py        the `nas` section of the run config
    sandwich.py      SandwichStep, the KD Trainer's step that trains a SuperLM (sandwich rule)
    train.py         the SuperLM training runs (one KD Trainer run per sub-space)
    evaluate.py      scoring candidates: held-out relation loss through a trained SuperLM, costs, budgets
    algorithms.py    enumerate, evolution (HAT / MoS) and NSGA-II over an evaluator; Pareto fronts
    search.py        `pykd nas search` and `pykd nas export`: the run, its outputs, the task proxy
    demo.py          `pykd nas demo`

What it may import: torch, transformers, pykd.ops, pykd.capture and the KD engine (pykd.distill: its
losses, steps, trainer, data and config); never Distiller's meta layer (pykd.distiller). The KD
engine imports only pykd.nas.config (and what that needs for its choices) of it.
"""
from .architecture import Architecture, LayerwiseArchitecture, architecture_from_dict, parse_architecture
from .space import LayerwiseSubSpace, SearchSpace, SubSpace, TeacherShape
from .superlm import SuperLM, save_student

__all__ = ["Architecture", "LayerwiseArchitecture", "LayerwiseSubSpace", "SearchSpace", "SubSpace", "SuperLM",
           "TeacherShape", "architecture_from_dict", "parse_architecture", "save_student"]
