"""transformers' Trainer distilling with pykd: `DistillationTrainer` (needs `pip install 'pykd-distill[transformers]'`).

    trainer = DistillationTrainer(model=student, teacher=teacher, losses={"hidden": {"type": "mse"}},
                                  args=TrainingArguments("runs/kd", ...), train_dataset=..., eval_dataset=...,
                                  data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer)
    trainer.train()

What it changes of transformers.Trainer, through the Trainer's public methods:

    compute_loss      pykd.KDLoss on (teacher, the model the Trainer runs as the student): the weighted total;
                      at evaluation the student's logits go to compute_metrics, eval_loss is the KD total
    create_optimizer  the Trainer's own optimiser, over the student and the loss module's learned parts
                      (projections, critics, baselines) with the Trainer's weight-decay rule for both
    log               each loss term (prediction, hidden, relation, mi, hard_label), averaged over the
                      micro-batches since the last log, beside `loss`: report_to then carries them to
                      TensorBoard, W&B, MLflow, ...
    save_model        the student only (save_pretrained, as the Trainer does), plus pykd_objective.pt (the
                      learned parts, as `pykd distill` writes it) and a model card (README.md)
    train             resuming from a checkpoint also restores the learned parts from its pykd_objective.pt, and
                      load_best_model_at_end those of the best checkpoint (the card then shows its figures)

The Trainer divides the returned loss by gradient_accumulation_steps itself (loss_is_scaled_for_ga
False: the KD terms are per-batch means, not sums over items). Under torchrun DDP the learned parts
are not inside the Trainer's DDP wrapper: a callback averages their gradients over the ranks before
each optimiser step, as pykd's own trainer does for modules it does not wrap. max_grad_norm clips the
student's gradients (the Trainer's rule); pykd's trainer clips student and learned parts together.
"""
from __future__ import annotations

from pathlib import Path

try:
    import accelerate  # noqa: F401  (transformers' Trainer needs it; fail here with the extra's name)
    import transformers
except ModuleNotFoundError as error:
    raise ModuleNotFoundError(f"pykd.integrations.transformers needs `pip install 'pykd-distill[transformers]'` "
                              f"(module {error.name!r} is missing)", name=error.name) from error
import torch
from torch import nn

from ..distill.config import to_dict
from ..distill.distributed import average_gradients, world
from ..distill.kd_loss import KDLoss
from ..distill.model_card import write_model_card
from ..distill.steps import OBJECTIVE_FILE


class _AverageLearnedPartGradients(transformers.TrainerCallback):
    """Under DDP: the loss module's gradients become their mean over the ranks before each optimiser step."""

    def __init__(self, module: nn.Module):
        self.module = module

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if world()[1] > 1:
            average_gradients(self.module)


class DistillationTrainer(transformers.Trainer):
    """transformers.Trainer whose loss is pykd's distillation objective (see the module docstring).

    Args:
        model: the student (a transformers model; the Trainer trains and saves it).
        teacher: the teacher (frozen; moved to the Trainer's device).
        losses: the `losses` section of a pykd run config (a LossConfig or its dict), as pykd.KDLoss takes it.
        task_kind: classification | regression | unlabeled.
        kd_loss: a pykd.KDLoss built beforehand (then losses and task_kind are not given).
        teacher_name: the teacher's hub id or path for the model card (default: its config's _name_or_path).
        everything else: transformers.Trainer's arguments (args, train_dataset, data_collator, ...).
    """

    loss_is_scaled_for_ga = False

    def __init__(self, model: nn.Module, teacher: nn.Module, losses=None, *, task_kind: str = "classification",
                 kd_loss: KDLoss | None = None, teacher_name: str | None = None, **trainer_args):
        if kd_loss is not None and losses is not None:
            raise ValueError("DistillationTrainer takes either losses (and task_kind) or a ready kd_loss, not both")
        self.kd_loss = kd_loss if kd_loss is not None else KDLoss(teacher, model, losses, task_kind=task_kind)
        self.teacher_name = teacher_name or getattr(teacher.config, "_name_or_path", "") or "teacher"
        callbacks = [*(trainer_args.pop("callbacks", None) or []), _AverageLearnedPartGradients(self.kd_loss)]
        super().__init__(model=model, callbacks=callbacks, **trainer_args)
        self.kd_loss.to(self.args.device)
        teacher.to(self.args.device)
        self._term_sums: dict[str, torch.Tensor] = {}
        self._term_count = 0
        self._weights_step = None  # the step whose evaluation the student's weights had, when not the last

    # ---- loss and optimiser ----

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = self.kd_loss(inputs, student=model)
        if model.training:
            for name, value in out.terms.items():
                self._term_sums[name] = self._term_sums.get(name, 0.0) + value.float()
            self._term_count += 1
        return (out.loss, {"logits": out.logits}) if return_outputs else out.loss

    def create_optimizer(self, model=None):
        """The Trainer's optimiser over the student and the loss module's learned parts."""
        learned = [p for p in self.kd_loss.parameters() if p.requires_grad]
        if self.optimizer is not None:  # given through optimizers=(...): it must hold the learned parts
            held = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
            missing = sum(id(p) not in held for p in learned)
            if missing:
                raise ValueError(f"the optimizer given to DistillationTrainer lacks {missing} of the loss module's "
                                 f"{len(learned)} learned parameters: build it over "
                                 "[*student.parameters(), *trainer.kd_loss.parameters()]")
            return self.optimizer
        both = nn.ModuleDict({"student": self.model if model is None else model, "kd_loss": self.kd_loss})
        return super().create_optimizer(both)

    # ---- logging ----

    def log(self, logs: dict, start_time: float | None = None) -> None:
        """A training log (one with `loss`) gets the mean of each term since the last one."""
        if self._term_count and "loss" in logs:
            names = sorted(self._term_sums)
            means = torch.stack([self._term_sums[name] for name in names]) / self._term_count
            means = self.accelerator.reduce(means, reduction="mean")  # over the ranks, as the Trainer's loss
            logs = {**logs, **{name: float(value) for name, value in zip(names, means)}}
            self._term_sums, self._term_count = {}, 0
        super().log(logs, start_time)

    # ---- saving and resuming ----

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The student (the Trainer's save_pretrained), pykd_objective.pt and the model card."""
        super().save_model(output_dir, _internal_call)
        if not self.args.should_save:
            return
        directory = Path(output_dir if output_dir is not None else self.args.output_dir)
        torch.save(self.kd_loss.objective.state_dict(), directory / OBJECTIVE_FILE)
        write_model_card(directory, self.model, teacher=self.teacher_name, task_kind=self.kd_loss.task_kind,
                         sequence_length=self._card_sequence_length(),
                         made_by=f"Made by pykd.integrations.transformers.DistillationTrainer in "
                                 f"{self.state.global_step} steps; its losses section follows.",
                         config={"losses": to_dict(self.kd_loss.config)}, datasets=(), metrics=self._card_metrics(),
                         teacher_model=self.kd_loss.teacher)

    def _card_metrics(self) -> dict:
        """The evaluation of the weights the student holds now (the best checkpoint's once it was loaded)."""
        step = self._weights_step if self._weights_step is not None else self.state.global_step
        evaluations = [entry for entry in self.state.log_history
                       if entry.get("step") == step and any(k.startswith("eval_") for k in entry)]
        timings = ("_runtime", "_per_second")
        return {k.removeprefix("eval_"): v for k, v in (evaluations[-1] if evaluations else {}).items()
                if k.startswith("eval_") and isinstance(v, (int, float)) and not k.endswith(timings)}

    def _card_sequence_length(self) -> int:
        tokenizer = self.processing_class
        length = getattr(tokenizer, "model_max_length", None)
        positions = getattr(self.model.config, "max_position_embeddings", 128)
        return min(length, positions) if isinstance(length, int) and length > 0 else positions

    def train(self, resume_from_checkpoint=None, **kwargs):
        """transformers' train; a resumed run also loads the checkpoint's pykd_objective.pt."""
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = transformers.trainer_utils.get_last_checkpoint(self.args.output_dir)
        if checkpoint:
            self._load_learned_parts(checkpoint)
        self._weights_step = None
        output = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        if self.args.load_best_model_at_end and self.state.best_model_checkpoint is not None:
            # The Trainer loaded the best checkpoint's student: its learned parts come with it.
            self._weights_step = self.state.best_global_step
            self._load_learned_parts(self.state.best_model_checkpoint)
        return output

    def _load_learned_parts(self, checkpoint) -> None:
        path = Path(checkpoint) / OBJECTIVE_FILE
        if path.exists():
            self.kd_loss.objective.load_state_dict(torch.load(path, map_location=self.args.device, weights_only=True))
