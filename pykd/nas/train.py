r"""SuperLM training runs (AutoDistil, arXiv 2201.12507): one KD Trainer run per sub-space.

`train_supernets` trains one SuperLM per sub-space of the search space (K of them; K = 1 is
one-shot), sequentially, each in nas.output/supernet-<sub-space> with the KD engine's Trainer
driving a SandwichStep (pykd.nas.sandwich): progress, log.jsonl, checkpoints that resume bit for
bit, DDP under torchrun. The SandwichSchedule callback hands the step its optimiser step number,
from which the step draws its sandwich.
"""
from __future__ import annotations

import dataclasses
import random

from ..distill.callbacks import TrainerCallback
from ..distill.config import RunConfig
from ..distill.trainer import Trainer
from .config import build_space, supernet_dir, supernet_options
from .sandwich import SandwichStep


class SandwichSchedule(TrainerCallback):
    """Before each optimiser step, tells the SandwichStep which step it is (its draws depend on it)."""

    def on_step_begin(self, trainer, step: int) -> None:
        trainer.step_module.step = step


class SuperLMTrainer(Trainer):
    """The KD Trainer driving a SandwichStep for sub-space `subspace_index` (mode "nas"); output in
    train.output_dir (subspace_run_config: nas.output/supernet-<name>)."""

    def __init__(self, config: RunConfig, subspace_index: int = 0, callbacks=()):
        self.subspace_index = subspace_index
        super().__init__(config, mode="nas", build_step=_sandwich_step, callbacks=[SandwichSchedule(), *callbacks])


def _sandwich_step(trainer: SuperLMTrainer) -> SandwichStep:
    from ..distill.models import load_pretrained
    from .superlm import SuperLM

    config, index = trainer.config, trainer.subspace_index
    teacher = load_pretrained(config.teacher.finetuned or config.teacher.path, config.data.kind, trainer.num_labels)
    space = build_space(config.nas, teacher.config)
    if not 0 <= index < len(space.subspaces):
        raise ValueError(f"sub-space index {index} out of range: the space has {len(space.subspaces)} sub-space(s)")
    supernet = SuperLM.from_teacher(teacher, space, **supernet_options(config.nas))
    return SandwichStep(teacher, supernet, space.subspaces[index], config)


def subspace_run_config(config: RunConfig, name: str) -> RunConfig:
    """The config of one sub-space's training run: its own output directory under nas.output."""
    train = dataclasses.replace(config.train, output_dir=str(supernet_dir(config.nas, name)))
    return dataclasses.replace(config, train=train)


def train_supernets(config: RunConfig, stop_after: int | None = None) -> list[str]:
    """Trains one SuperLM per sub-space (sequentially); returns their run directories."""
    from ..distill.models import load_pretrained

    teacher = load_pretrained(config.teacher.finetuned or config.teacher.path, "unlabeled")
    space = build_space(config.nas, teacher.config)
    del teacher
    directories = []
    for index, subspace in enumerate(space.subspaces):
        run_config = subspace_run_config(config, subspace.name)
        print(f"[nas train] SuperLM {index + 1}/{len(space.subspaces)}: sub-space {subspace.name} "
              f"({len(subspace.candidates())} candidates) -> {run_config.train.output_dir}", flush=True)
        random.seed(config.train.seed)
        SuperLMTrainer(run_config, index).train(stop_after=stop_after)
        directories.append(run_config.train.output_dir)
    return directories
