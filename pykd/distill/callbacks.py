"""Hooks into a training run (pykd.distill.trainer.Trainer), in the spirit of transformers' TrainerCallback.

A callback subclasses `TrainerCallback` and overrides the events it needs; each receives the
Trainer (its config, step, history, rank, output_dir, step_module, ...) first. They fire on every
rank, in the order the callbacks were given (the Trainer's defaults, JsonlLog and ConsoleLog,
first), at these points of `Trainer.train`:

    on_train_begin(trainer)              after resuming (trainer.step is the checkpoint's step), before any step
    on_step_begin(trainer, step)         before optimiser step `step` (0-based) runs
    on_before_optimizer_step(trainer, terms, grad_norm)
                                         the step's gradients are summed (and averaged over the ranks), not yet
                                         clipped nor applied: terms = its loss terms so far, grad_norm = their
                                         total 2-norm before clipping (a float)
    on_step_end(trainer, terms)          after it: trainer.step counts it, terms = its loss terms (grad_accum mean)
    on_log(trainer, record)              a record joined trainer.history: {"step", "lr", terms...} averaged over
                                         the steps since the last one, or {"step", "eval": metrics (, "final")}
    on_evaluate(trainer, metrics, final) after an evaluation's record was logged (final: the run's last)
    on_save(trainer, path, what)         rank 0 wrote `path`: what = "checkpoint" (the checkpoint file) or
                                         "model" (the directory of the trained model, plus its tokenizer)
    on_train_end(trainer)                the run ended: finished, stopped at `stop_after`, or stopped by a signal
                                         with its checkpoint written (not when an exception ends it)

An exception raised by a callback ends the run (HPO's pruning raises optuna.TrialPruned from
on_evaluate; NonFiniteStop, one of the Trainer's defaults, raises NonFiniteTraining before a NaN step is
applied). Writers of other reports are callbacks too: `train.report_to` picks the trackers each
log record goes to (REPORTERS: jsonl, tensorboard; `reporters` builds their callbacks), and
pykd.distill.model_card.ModelCardLog writes a model card on "model" saves. `report_summary` sends the
summary of an HPO study or a NAS search to the same trackers.
"""
from __future__ import annotations

import importlib.util
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

from ..loading import reading
from .cache import replace_atomically
from .stopping import NonFiniteTraining

LOG = "log.jsonl"
TENSORBOARD_DIR = "tensorboard"
REPORTERS = ("jsonl", "tensorboard")  # train.report_to


class TrainerCallback:
    """Base class: every event does nothing (see the module docstring for when each fires)."""

    def on_train_begin(self, trainer) -> None:
        pass

    def on_step_begin(self, trainer, step: int) -> None:
        pass

    def on_before_optimizer_step(self, trainer, terms: dict, grad_norm: float) -> None:
        pass

    def on_step_end(self, trainer, terms: dict) -> None:
        pass

    def on_log(self, trainer, record: dict) -> None:
        pass

    def on_evaluate(self, trainer, metrics: dict, final: bool) -> None:
        pass

    def on_save(self, trainer, path: Path, what: str) -> None:
        pass

    def on_train_end(self, trainer) -> None:
        pass


def read_log(path: Path, until_step: int) -> list[dict]:
    """The records of a log.jsonl with step <= until_step, in order; a line that does not parse (torn by a
    kill mid-write) is skipped, a missing file reads as no records."""
    path = Path(path)
    if not path.exists():
        return []
    kept = []
    with reading(path, "training log", "delete it (the run's log then restarts; its checkpoint is kept)"):
        text = path.read_text(encoding="utf-8")
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= until_step:
            kept.append(record)
    return kept


class JsonlLog(TrainerCallback):
    """output_dir/log.jsonl, one JSON record per line (rank 0 writes).

    When the run starts, the file keeps only the records of steps <= the checkpoint's step: a run resumed
    there logs the steps it replays once more, so they must go (as must a previous run's log when it
    starts afresh); every step is then in the file once.
    """

    def on_train_begin(self, trainer) -> None:
        path = trainer.output_dir / LOG
        if trainer.rank != 0 or not path.exists():
            return
        kept = read_log(path, trainer.step)
        replace_atomically(path, lambda partial: partial.write_text("".join(json.dumps(r) + "\n" for r in kept)))

    def on_log(self, trainer, record: dict) -> None:
        if trainer.rank != 0:
            return
        trainer.output_dir.mkdir(parents=True, exist_ok=True)
        with open(trainer.output_dir / LOG, "a") as handle:
            handle.write(json.dumps(record) + "\n")


class ConsoleLog(TrainerCallback):
    """Every evaluation as one line on stdout (rank 0): "[mode] step N: metric value, ..."."""

    def on_evaluate(self, trainer, metrics: dict, final: bool) -> None:
        if trainer.rank == 0:
            print(f"[{trainer.mode}] step {trainer.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()),
                  flush=True)


class NonFiniteStop(TrainerCallback):
    """Stops a run whose loss or gradient norm turns NaN or infinite, before that step is applied.

    A NaN once ran to the end unnoticed (NaN losses logged, exit 0, a saved model of NaN weights). Now the
    step's update is never applied and nothing more is saved: the last checkpoint stays the last finite
    state, and the error (a ValueError: exit 2 on the command line) names the step, the term and that
    checkpoint. Under torchrun the ranks agree (any rank's NaN stops every rank at the same step).
    """

    def __init__(self):
        self.saved_step: int | None = None

    def on_train_begin(self, trainer) -> None:
        from .checkpoint import CHECKPOINT

        self.saved_step = trainer.step if (trainer.output_dir / CHECKPOINT).exists() else None

    def on_save(self, trainer, path: Path, what: str) -> None:
        if what == "checkpoint":
            self.saved_step = trainer.step

    def on_before_optimizer_step(self, trainer, terms: dict, grad_norm: float) -> None:
        from .checkpoint import CHECKPOINT
        from .distributed import max_over_ranks

        bad = {name: value for name, value in terms.items() if not math.isfinite(value)}
        if not math.isfinite(grad_norm):
            bad["gradient norm"] = grad_norm
        if not max_over_ranks(int(bool(bad)), trainer.device):
            return
        what = ", ".join(f"{name} {value}" for name, value in bad.items()) or "another rank's loss or gradient"
        kept = (f"the checkpoint {trainer.output_dir / CHECKPOINT} of step {self.saved_step} is kept"
                if self.saved_step is not None else "no checkpoint had been written yet")
        raise NonFiniteTraining(
            f"training stopped at step {trainer.step + 1}: not finite: {what}. The step was not applied and "
            f"{kept}. Lower train.lr, keep train.clip_norm > 0 or check the data and loss weights, then start "
            "afresh (train.resume=false or another train.output_dir)")


class TensorBoardLog(TrainerCallback):
    """output_dir/tensorboard: each log record as TensorBoard scalars (rank 0), at the record's step.

    train/<name> for every number of a step record (the loss terms, loss, lr), eval/<metric> for an
    evaluation, and train/examples_per_second: the examples of the optimiser steps since the previous
    record over their wall time (evaluations excluded). A resumed run purges the events after its
    checkpoint's step, as JsonlLog drops those records, so each step is in the file once.
    """

    def __init__(self):
        if importlib.util.find_spec("tensorboard") is None:
            raise ValueError("train.report_to has tensorboard, which needs the tensorboard package: "
                             "`pip install 'pykd-distill[tensorboard]'`")
        self.writer = None
        self._clock = (0.0, 0)  # (time, step) the throughput window started at

    def on_train_begin(self, trainer) -> None:
        if trainer.rank != 0:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(trainer.output_dir / TENSORBOARD_DIR), purge_step=trainer.step + 1)
        self._clock = (time.perf_counter(), trainer.step)

    def on_log(self, trainer, record: dict) -> None:
        if self.writer is None:
            return
        step = record["step"]
        if "eval" in record:
            for name, value in record["eval"].items():
                self.writer.add_scalar(f"eval/{name}", value, step)
            return
        for name, value in record.items():
            if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"train/{name}", value, step)
        now, (start, start_step) = time.perf_counter(), self._clock
        if step > start_step and now > start:
            train = trainer.config.train
            examples = (step - start_step) * train.batch_size * train.grad_accum * trainer.world
            self.writer.add_scalar("train/examples_per_second", examples / (now - start), step)
        self._clock = (now, step)

    def on_evaluate(self, trainer, metrics: dict, final: bool) -> None:
        if self.writer is not None:
            self.writer.flush()
            self._clock = (time.perf_counter(), trainer.step)

    def on_train_end(self, trainer) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


REPORTER_CALLBACKS = {"jsonl": JsonlLog, "tensorboard": TensorBoardLog}


def reporters(report_to) -> list[TrainerCallback]:
    """One callback per tracker of train.report_to (each once, in the order given)."""
    return [REPORTER_CALLBACKS[name]() for name in dict.fromkeys(report_to)]


SUMMARY_EVENTS = "events.out.tfevents.summary"  # TensorBoard reads any file whose name holds "tfevents"


def write_tensorboard_summary(directory, series: dict) -> Path:
    """directory/events.out.tfevents.summary holding series {tag: [(step, value), ...]} as scalars.

    Written atomically under one fixed name, so a later summary (another HPO worker's, a rerun search)
    replaces it instead of adding a second copy of every point."""
    from torch.utils.tensorboard import SummaryWriter

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".summary.") as staging:
        writer = SummaryWriter(staging)
        for tag, points in series.items():
            for step, value in points:
                writer.add_scalar(tag, value, step)
        writer.close()
        (written,) = Path(staging).glob("events.out.tfevents.*")
        target = directory / SUMMARY_EVENTS
        replace_atomically(target, lambda partial: shutil.copyfile(written, partial))
    return target


def report_summary(report_to, directory, series: dict) -> None:
    """A study's or a search's summary series to the trackers of train.report_to that take series
    (tensorboard: directory/tensorboard; the JSONL side is the summary's own CSV and JSON files)."""
    if "tensorboard" in report_to:
        write_tensorboard_summary(Path(directory) / TENSORBOARD_DIR, series)
