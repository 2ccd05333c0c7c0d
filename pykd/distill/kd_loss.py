"""pykd's distillation objective as a loss module for any training loop (a plain loop, Accelerate,
torch.compile, or pykd.integrations.transformers.DistillationTrainer).

    kd = pykd.KDLoss(teacher, student, {"hidden": {"type": "mse"}, "relation": {"relation_heads": 4}})
    optimizer = torch.optim.AdamW([*student.parameters(), *kd.parameters()])
    out = kd(batch)              # batch: input_ids, attention_mask (, token_type_ids, labels)
    out.loss.backward()          # out.terms: {"prediction": ..., "hidden": ..., "relation": ...}

The module is the KD engine's own: the `losses` section (pykd.distill.config.LossConfig, the section
`pykd distill` reads, as a dataclass, a dict of its YAML, or keyword arguments per sub-section) builds a
DistillationObjective, and a DistillStep runs the teacher (eval, no_grad) and the student under
pykd.capture and hands both views to it, as a `pykd distill` step does. Its parameters are the
objective's learned parts only (hidden-state projections, MI critics and baselines; the EMD layer
weights are buffers), so the user's optimiser takes them beside the student's. The teacher and the
student are held outside the module (neither is in its parameters or state dict): move them to the
device yourself; `kd.to(device)` moves the learned parts.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .config import LossConfig, from_dict, to_dict
from .data import TASK_KINDS
from .losses import DistillationObjective, ModelShape
from .steps import DistillStep


class KDLossOutput(NamedTuple):
    loss: torch.Tensor  # the weighted total to minimise (fp32 scalar)
    terms: dict  # {term name: its unweighted value, detached}
    logits: torch.Tensor | None  # the student's logits (None for a bare encoder), for metrics


def loss_config(losses=None, task_kind: str = "classification", **sections) -> LossConfig:
    """The `losses` section, checked as `pykd distill` checks it.

    Args:
        losses: None (the defaults), a LossConfig, or the section as nested dicts (its YAML).
        task_kind: classification | regression | unlabeled (data.kind of a run).
        sections: prediction=, hidden=, relation=, mi= dicts whose keys override those of `losses`.
    """
    if task_kind not in TASK_KINDS:
        raise ValueError(f"KDLoss task_kind must be one of {TASK_KINDS}, got {task_kind!r}")
    values = to_dict(losses) if isinstance(losses, LossConfig) else dict(losses or {})
    if not isinstance(values, dict):
        raise ValueError(f"KDLoss losses takes a LossConfig or a dict of the losses section, got {type(losses)}")
    for name, entries in sections.items():
        if not isinstance(entries, dict):
            raise ValueError(f"KDLoss {name}= takes a dict of losses.{name} keys, got {entries!r}")
        values[name] = {**values.get(name, {}), **entries}
    return from_dict({"losses": values, "data": {"kind": task_kind}}).losses


class KDLoss(nn.Module):
    """Teacher-student distillation loss (see the module docstring).

    Args:
        teacher: a transformers encoder (frozen here: eval mode, requires_grad False).
        student: the transformers encoder that trains (same family, any depth and width).
        losses, task_kind, sections: as loss_config.

    forward(batch, student=None) -> KDLossOutput. batch: the tokenised batch (labels, teacher_logits of
    pykd's teacher cache and gold flags are read as targets, never fed to the models); student: the
    module to run as the student (default: the one given here), e.g. the DDP or Accelerate wrapper.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, losses=None, *, task_kind: str = "classification",
                 **sections):
        super().__init__()
        self.config = loss_config(losses, task_kind, **sections)
        self.task_kind = task_kind
        self.objective = DistillationObjective(self.config, ModelShape.of(teacher), ModelShape.of(student),
                                               task_kind)
        # In a list: the step (and so teacher and student) stays out of this module's parameters.
        self._step = [DistillStep(teacher, student, self.objective)]

    @property
    def teacher(self) -> nn.Module:
        return self._step[0].teacher

    @property
    def student(self) -> nn.Module:
        return self._step[0].student

    def forward(self, batch: dict, student: nn.Module | None = None) -> KDLossOutput:
        teacher_view, student_view, labels, label_rows = self._step[0].views(batch, student)
        terms, total = self.objective(teacher_view, student_view, labels, label_rows)
        return KDLossOutput(total, terms, student_view.logits)
