"""Training steps: what the Trainer runs on a batch, and what it saves and prepares for it.

A step module (`TrainingStep`) turns a batch into named loss terms and a total; the Trainer around
it does the optimisation, evaluation, logs and checkpoints. What differs between runs is said by
the step:

    forward(batch) -> (terms, total)   terms: {name: detached scalar}, total: the scalar to minimise
    owns_backward                      True when forward runs its own backward passes (scaled by
                                       1 / grad_accum): the Trainer then calls no backward and does not
                                       wrap the step in DDP, but averages its gradients over the ranks
    trained_model()                    the model that trains, is evaluated and saved
    models()                           every model the step runs (data.max_length must fit each)
    prepare_train_set(train_set, trainer)   the training set the step trains on (augmentation and the
                                       teacher-logit cache of a distillation)
    save_model(directory, tokenizer)   what `pykd distill` & co. leave in output_dir/model

`DistillStep` (teacher and student, the distillation objective) and `FinetuneStep` (a model's own
task loss) are the KD engine's; pykd.nas.sandwich.SandwichStep trains a SuperLM.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from ..capture import capture
from .augment import augmented_train_set
from .losses import DistillationObjective, ForwardView
from .models import decoder_inputs
from .teacher_cache import with_teacher_logits

# Batch entries that are targets, not model inputs (the last two come from an augmented or teacher-cached set).
TARGET_KEYS = frozenset({"labels", "teacher_logits", "gold"})
OBJECTIVE_FILE = "pykd_objective.pt"


def model_inputs(batch: dict) -> dict:
    """The entries of a collated batch a transformers model takes (TARGET_KEYS left out)."""
    return {k: v for k, v in batch.items() if k not in TARGET_KEYS}


class TrainingStep(nn.Module):
    """Base class of the Trainer's step modules (see the module docstring); subclasses implement forward
    and trained_model, and override the rest where they differ."""

    owns_backward = False

    def trained_model(self) -> nn.Module:
        raise NotImplementedError

    def models(self) -> list[nn.Module]:
        return [self.trained_model()]

    def prepare_train_set(self, train_set, trainer):
        """The training set this step trains on; the trainer's config, collate, device and rank are read."""
        return train_set

    def save_model(self, directory: Path, tokenizer) -> None:
        """A plain Hugging Face model directory: the trained model and the tokenizer."""
        self.trained_model().save_pretrained(directory)
        tokenizer.save_pretrained(directory)


def forward_view(model_output, recorded, mask: torch.Tensor) -> ForwardView:
    """What the losses read of a transformers forward (and of its pykd.capture record, if any)."""
    return ForwardView(logits=getattr(model_output, "logits", None), hidden_states=model_output.hidden_states,
                       layers=list(recorded.layers) if recorded is not None else [], mask=mask)


class DistillStep(TrainingStep):
    """Teacher (eval, no_grad) and student forwards under capture, then the objective.

    With `mixup` (augment.mixup) a training forward doubles the batch with mixed word embeddings
    (pykd.distill.augment.WordEmbeddingMixup); the teacher's logits label the mixed rows. Rows of an
    augmented training set bring the teacher's cached logits (their soft labels) and a gold flag: only
    gold rows enter the hard-label loss. With a masked-LM objective (data.kind mlm) both forwards run inside
    pykd.distill.models.decoder_inputs: the heads' logits are never formed, ForwardView.decoder carries what
    the fused vocabulary term projects.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, objective: DistillationObjective, mixup=None):
        super().__init__()
        self.student = student
        self.objective = objective
        self.mixup = mixup
        self._teacher = [teacher.eval().requires_grad_(False)]  # a list keeps it out of DDP and the state dict

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    def _run(self, model: nn.Module, inputs: dict, captured: nn.Module | None = None) -> ForwardView:
        """model's forward as the objective reads it; captured: the transformers model inside `model` when
        model is a wrapper (DDP, torch.compile), which pykd.capture records."""
        mask = inputs["attention_mask"].bool()
        inner = model if captured is None else captured
        with contextlib.ExitStack() as stack:
            recorded = stack.enter_context(capture(inner)) if self.objective.needs_capture else None
            head = stack.enter_context(decoder_inputs(inner)) if self.objective.needs_decoder_inputs else None
            output = model(**inputs, output_hidden_states=True)
        view = forward_view(output, recorded, mask)
        if head is not None:  # masked-LM KD: the head's logits were never formed (models.decoder_inputs)
            view.logits, view.decoder = None, head.view()
        return view

    def forward(self, batch: dict):
        return self.objective(*self.views(batch))

    def views(self, batch: dict, student: nn.Module | None = None):
        """(teacher view, student view, labels, label_rows): what the objective reads of the batch's forwards.

        student: the module to run as the student (default self.student), e.g. its DDP wrapper (the
            capture records self.student inside it)."""
        student_model = self.student if student is None else student
        self.teacher.eval()
        teacher_inputs = student_inputs = model_inputs(batch)
        rows = len(batch["attention_mask"])
        if self.mixup is not None and torch.is_grad_enabled():
            lam, perm = self.mixup.draw(rows)
            with torch.no_grad():
                teacher_inputs = self.mixup.inputs(self.teacher, batch, lam, perm)
            student_inputs = self.mixup.inputs(self.student, batch, lam, perm)
        if self.cached_logits_suffice(batch):  # pykd.distill.teacher_cache: no teacher forward at all
            teacher = ForwardView(logits=batch["teacher_logits"].float(), hidden_states=(), layers=[],
                                  mask=teacher_inputs["attention_mask"].bool())
        else:
            with torch.no_grad():
                teacher = self._run(self.teacher, teacher_inputs)
        student = self._run(student_model, student_inputs, captured=self.student)
        if "teacher_logits" in batch:  # the soft labels cached with an augmented training set
            teacher.logits = torch.cat([batch["teacher_logits"].float(), teacher.logits[rows:].float()])
        labels, label_rows = _gold_labels(batch, len(student.mask))
        return teacher, student, labels, label_rows

    def cached_logits_suffice(self, batch: dict) -> bool:
        """The batch carries the teacher's cached logits, and the objective reads nothing else of the
        teacher's forward (no hidden, relation or MI term, no mixup rows to label)."""
        objective = self.objective
        return ("teacher_logits" in batch and self.mixup is None and objective.hidden is None
                and objective.relation is None and objective.mi is None)

    def trained_model(self) -> nn.Module:
        return self.student

    def models(self) -> list[nn.Module]:
        return [self.student, self.teacher]

    def prepare_train_set(self, train_set, trainer):
        """Distiller's augmentation stage (augment.policy: the set extended by teacher-labelled augmented
        copies), then teacher.cache_logits (the teacher's logits over the set, computed once per (teacher,
        data, max_length) and cached on disk; an augmented set already carries them)."""
        config = trainer.config

        def log(line: str) -> None:
            if trainer.rank == 0:
                print(line, flush=True)

        if config.augment.policy:
            train_set = augmented_train_set(train_set, config.augment, self.teacher, trainer.collate,
                                            config.data.kind, trainer.device, log)
        if config.teacher.cache_logits:
            train_set = with_teacher_logits(train_set, self.teacher, trainer.collate, trainer.device,
                                            log=print if trainer.rank == 0 else None)
        return train_set

    def save_model(self, directory: Path, tokenizer) -> None:
        """The student as a plain Hugging Face model directory, plus pykd_objective.pt (critics, projections,
        EMD layer weights)."""
        super().save_model(directory, tokenizer)
        torch.save(self.objective.state_dict(), Path(directory) / OBJECTIVE_FILE)


def _gold_labels(batch: dict, rows: int):
    """(labels, label_rows): labels padded to `rows` (a mixup-doubled batch) and the rows whose label is gold."""
    labels = batch.get("labels")
    if labels is None:
        return None, None
    gold = batch["gold"].bool() if "gold" in batch else torch.ones(len(labels), dtype=torch.bool, device=labels.device)
    if rows == len(labels) and "gold" not in batch:
        return labels, None
    padding = rows - len(labels)
    return (torch.cat([labels, labels.new_zeros(padding)]),
            torch.cat([gold, gold.new_zeros(padding)]))


class FinetuneStep(TrainingStep):
    """A model trained on its own task loss (transformers computes it from the batch's labels)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict):
        loss = self.model(**batch).loss
        return {"task": loss.detach()}, loss

    def trained_model(self) -> nn.Module:
        return self.model
