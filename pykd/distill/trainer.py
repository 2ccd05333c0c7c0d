"""The training loop for fine-tuning a teacher and for distilling a student.

One loop serves both (and pykd.nas's SuperLM training): a step module (pykd.distill.steps) turns a
batch into named loss terms and a total, and the loop around it does the optimiser with linear
warmup/decay (pykd.distill.optim), gradient accumulation and clipping, autocast, evaluation, logs
and checkpoints (pykd.distill.checkpoint) that resume exactly. Callbacks (pykd.distill.callbacks)
hook into the run without subclassing: the JSONL log and the console's evaluation lines are two,
HPO's pruning and the SuperLM's sandwich draws others.

Data order: epoch e visits the training set in the permutation drawn from seed + e. Each
optimiser step consumes batch_size * grad_accum * world examples in order; rank r of a
`torchrun` job takes its slice of each micro-batch, so a job with W ranks and batch size b sees
the same examples per step as one process with batch size W b. The data position is therefore
just the step number, and a checkpoint (models, objective, optimiser, scheduler, RNG states,
step) resumes the run bit for bit on CPU.

Nothing is lost to an interruption: SIGINT or SIGTERM lets the step in flight finish, writes a
checkpoint at that step boundary and raises `TrainingInterrupted` (the CLI exits 130 / 143); a
resumed run truncates log.jsonl to the checkpoint's step, so each step is logged once. A
checkpoint holds tensors and plain values only and is read with `torch.load(weights_only=True)`:
reading one runs no code. Resuming with a config that differs in a key the checkpoint depends on
(anything outside config.RESUMABLE_KEYS) is refused, naming the keys.
"""

from __future__ import annotations

import contextlib
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from . import data as data_module
from .augment import WordEmbeddingMixup
from .cache import DirectoryLock
from .callbacks import LOG, ConsoleLog, NonFiniteStop, TrainerCallback, read_log, reporters
from .checkpoint import CHECKPOINT, read_checkpoint, rng_state, seed_everything, set_rng_state, write_checkpoint
from .config import RunConfig, resume_conflicts, to_dict
from .distributed import average_gradients, max_over_ranks, world
from .losses import DistillationObjective, ModelShape
from .masking import Masking
from .metrics import task_metrics
from .model_card import ModelCardLog
from .models import build_student, load_pretrained, load_tokenizer, resolve_model_path
from .optim import autocast, build_optimizer, linear_schedule
from .steps import DistillStep, FinetuneStep, TrainingStep, model_inputs
from .stopping import StopRequests, TrainingInterrupted

# Model families whose position ids start after the padding index (RoBERTa's 514 positions hold 512 tokens).
POSITIONS_AFTER_PADDING = frozenset({"roberta", "xlm-roberta", "camembert", "longformer"})


class Trainer:
    """mode "finetune": train teacher.path on the task; mode "distill": distil into a student.

    Args:
        config: the run configuration.
        mode: "distill" or "finetune" (the default step of each), or the run's name when build_step is
            given (it prefixes the log lines and is recorded in checkpoints).
        build_step: builds the step module (a pykd.distill.steps.TrainingStep) from the trainer, after the
            data has loaded (trainer.tokenizer, num_labels and label_names are set); None: the mode's.
        callbacks: TrainerCallbacks, after the defaults: the reporters of train.report_to (JsonlLog,
            TensorBoardLog), ConsoleLog, NonFiniteStop and, for the mode's own step, ModelCardLog.

    One run per output directory: rank 0 holds train.output_dir's DirectoryLock from construction to
    the end of `train` (a second run on the directory is refused at once, naming it).

    A step module with `owns_backward = True` (pykd.nas's SandwichStep) runs its own backward
    passes inside forward, scaled by 1 / grad_accum; under DDP it is not wrapped (DDP allows one
    backward per forward) and the Trainer averages its gradients over the ranks once per step.
    """

    MODES = ("distill", "finetune")

    def __init__(self, config: RunConfig, mode: str = "distill", *, build_step=None,
                 callbacks: list[TrainerCallback] | tuple = ()):
        if build_step is None and mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        if mode == "finetune" and config.data.kind in data_module.TEXT_ONLY_KINDS:
            raise ValueError(f"fine-tuning needs a labeled task: data.kind is {config.data.kind!r}")
        self.config, self.mode = config, mode
        # A model card for the engine's own steps (distil, fine-tune); pykd.nas writes its own exports' cards.
        cards = [ModelCardLog()] if build_step is None else []
        self.callbacks: list[TrainerCallback] = [*reporters(config.train.report_to), ConsoleLog(), NonFiniteStop(),
                                                 *cards, *callbacks]
        self.rank, self.world = world()
        self.output_dir = Path(config.train.output_dir)
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else \
            torch.device("cpu")
        self._check_output_dir()
        self._lock = DirectoryLock(self.output_dir, "train.output_dir")
        self._hold_output_dir()
        try:
            self._build(build_step)
        except BaseException:
            self._lock.release()
            raise

    def _build(self, build_step) -> None:
        """Data, step module, optimiser and schedule (with the directory held: a refused run loads nothing)."""
        config = self.config
        seed_everything(config.train.seed)
        self._load_data()
        self.step_module: TrainingStep = (build_step or self._default_step)(self).to(self.device)
        self._check_models()
        self.train_set = self.step_module.prepare_train_set(self.train_set, self)
        # After prepare_train_set: augmentation and the teacher-logit cache read (and fingerprint) the text.
        if config.data.kind != "mlm":  # mlm batches are tokenized per batch (see data.Collator)
            self.train_set = data_module.pretokenize(self.train_set, self.tokenizer, config.data.max_length)
            self.eval_set = data_module.pretokenize(self.eval_set, self.tokenizer, config.data.max_length)
        self.model = self._wrap(self.step_module)
        self.optimizer = build_optimizer(self.step_module, config.train)
        self.scheduler = linear_schedule(self.optimizer, config.train)
        self.step = 0
        self.history: list[dict] = []
        self._window: dict[str, float] = {}  # loss terms summed since the last log line
        self._window_steps = 0
        self._order: tuple[int, list[int]] = (-1, [])
        self._batches = None  # the micro-batches from self.step on (_start_batches)
        self.input_wait_s = 0.0  # time the training thread waited for its batches (bench/NOTES.md, issue 17)

    # ---- construction ----

    def _check_output_dir(self) -> None:
        """A run that cannot write its checkpoints, logs or model must fail now, not after training."""
        if self.rank != 0:
            return
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.output_dir):
                pass
        except OSError as error:
            raise ValueError(f"train.output_dir {str(self.output_dir)!r} is not a writable directory: "
                             f"{error.strerror or error}") from None

    def _hold_output_dir(self) -> None:
        if self.rank == 0:
            self._lock.acquire()

    def _load_data(self) -> None:
        config = self.config.data
        self.tokenizer = load_tokenizer(self.config.teacher.finetuned or self.config.teacher.path)
        splits = data_module.load_splits(config, self.config.train.seed)
        if self.rank == 0:
            for note in splits.notes:
                print(f"[{self.mode}] data.dataset {config.dataset!r}: {note}", file=sys.stderr, flush=True)
        self.train_set, self.eval_set = splits.train, splits.eval
        # Pearson and Spearman correlations need two points.
        least_eval = 2 if config.kind == "regression" else 1
        if len(self.eval_set) < least_eval:
            raise ValueError(f"the eval split has {len(self.eval_set)} example(s), a {config.kind} evaluation needs "
                             f"{least_eval}: raise data.eval_fraction ({config.eval_fraction}) or "
                             f"data.max_eval_examples ({config.max_eval_examples})")
        masking = Masking.of(config.masking, self.tokenizer) if config.kind == "mlm" else None
        self.collate = data_module.Collator(self.tokenizer, config.max_length, config.kind, masking,
                                            self.config.train.seed)
        self.label_names = splits.label_names
        self.num_labels = 1 if config.kind == "regression" else (len(self.label_names) if self.label_names else None)

    def _check_models(self) -> None:
        """data.max_length within every model's positions; class names into the trained model's config."""
        for model in self.step_module.models():
            config = model.config
            positions = getattr(config, "max_position_embeddings", None)
            if positions is None:
                continue
            if config.model_type in POSITIONS_AFTER_PADDING:
                positions -= (config.pad_token_id or 0) + 1
            if self.config.data.max_length > positions:
                raise ValueError(f"data.max_length {self.config.data.max_length} exceeds the {positions} positions "
                                 f"of the {config.model_type} model {getattr(config, '_name_or_path', '')!r}")
        if self.label_names is not None:
            trained = self.step_module.trained_model().config
            trained.id2label = dict(enumerate(self.label_names))
            trained.label2id = {name: index for index, name in enumerate(self.label_names)}

    @staticmethod
    def _default_step(trainer: Trainer) -> TrainingStep:
        return trainer._finetune_step() if trainer.mode == "finetune" else trainer._distill_step()

    def _finetune_step(self) -> FinetuneStep:
        return FinetuneStep(load_pretrained(self.config.teacher.path, self.config.data.kind, self.num_labels))

    def _distill_step(self) -> DistillStep:
        kind = self.config.data.kind
        if kind not in data_module.TEXT_ONLY_KINDS and not self.config.teacher.finetuned:
            raise ValueError("task-specific KD needs a teacher fine-tuned on the task: run `pykd finetune` and set "
                             "teacher.finetuned to its output directory (or use data.kind unlabeled)")
        if kind == "classification":
            self._check_teacher_classes(self.config.teacher.finetuned)
        teacher = load_pretrained(self.config.teacher.finetuned or self.config.teacher.path, kind, self.num_labels)
        student = build_student(teacher, self.config.student)
        objective = DistillationObjective(self.config.losses, ModelShape.of(teacher), ModelShape.of(student), kind)
        mixup = WordEmbeddingMixup(self.config.augment.mixup_alpha) if self.config.augment.mixup else None
        return DistillStep(teacher, student, objective, mixup)

    def _check_teacher_classes(self, finetuned: str) -> None:
        """The fine-tuned teacher's classes must be the data's (pykd finetune saves their names; a
        teacher with transformers' default LABEL_i names is checked by count only)."""
        from transformers import AutoConfig

        names = AutoConfig.from_pretrained(resolve_model_path(finetuned)).id2label
        names = [names[i] for i in sorted(names)]
        generic = names == [f"LABEL_{i}" for i in range(len(names))]
        if len(names) != len(self.label_names) or not (generic or names == self.label_names):
            raise ValueError(f"teacher.finetuned {finetuned!r} predicts {len(names)} classes {names}, but "
                             f"data.dataset {self.config.data.dataset!r} has {len(self.label_names)} classes "
                             f"{self.label_names}: fine-tune the teacher on this data")

    def _wrap(self, module: nn.Module) -> nn.Module:
        if self.world == 1 or module.owns_backward:
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)

    # ---- data ----

    def _epoch_order(self, epoch: int) -> list[int]:
        """The permutation epoch `epoch` visits; drawn once per epoch, not per micro-batch."""
        if self._order[0] != epoch:
            generator = torch.Generator().manual_seed(self.config.train.seed + epoch)
            self._order = (epoch, torch.randperm(len(self.train_set), generator=generator).tolist())
        return self._order[1]

    def _micro_batch_indices(self, step: int, micro: int) -> tuple[list[int], int]:
        """The training rows of micro-batch `micro` of step `step` on this rank and the position of the first
        in the run's sample sequence: a function of the step, so a resumed run reads the rows the
        uninterrupted one would."""
        train = self.config.train
        per_step = train.batch_size * train.grad_accum * self.world
        start = step * per_step + (micro * self.world + self.rank) * train.batch_size
        epoch, offset = divmod(start, len(self.train_set))
        order = self._epoch_order(epoch)
        return [order[(offset + i) % len(order)] for i in range(train.batch_size)], start

    def micro_batch(self, step: int, micro: int = 0) -> dict:
        """The padded tensors of micro-batch `micro` of step `step` on this rank, on the trainer's device:
        what the training loop reads at that step (it reads them through a DataLoader, see _start_batches)."""
        indices, start = self._micro_batch_indices(step, micro)
        # mlm: a row's mask is keyed by its position in the run's sample sequence (pykd.distill.masking)
        batch = self.collate(data_module.rows_at(self.train_set, indices), mask_keys=range(start, start + len(indices)))
        return {k: v.to(self.device) for k, v in batch.items()}

    def _batch_plan(self, first_step: int, last_step: int):
        """(row index, sample position) lists of every micro-batch of steps first_step .. last_step - 1,
        in training order."""
        for step in range(first_step, last_step):
            for micro in range(self.config.train.grad_accum):
                indices, start = self._micro_batch_indices(step, micro)
                yield [(index, start + k) for k, index in enumerate(indices)]

    def _start_batches(self, last_step: int) -> None:
        """Micro-batches from self.step on, read and padded by train.num_workers processes ahead of the
        training thread (0: on it), in pinned memory when they go to a GPU."""
        workers = self.config.train.num_workers
        loader = torch.utils.data.DataLoader(
            _Rows(self.train_set), batch_sampler=self._batch_plan(self.step, last_step),
            collate_fn=_PlannedCollate(self.collate), num_workers=workers, pin_memory=self.device.type == "cuda",
            prefetch_factor=2 if workers else None,
            # its own generator: an iterator draws its workers' base seed from it, and a draw from the global
            # one (dropout's) would make a resumed run differ from the uninterrupted one
            generator=torch.Generator().manual_seed(self.config.train.seed))
        self._batches = iter(loader)

    def _next_micro_batch(self) -> dict:
        if self._batches is None:  # a step run outside train()
            self._start_batches(self.config.train.steps)
        started = time.perf_counter()
        batch = {k: v.to(self.device, non_blocking=True) for k, v in next(self._batches).items()}
        self.input_wait_s += time.perf_counter() - started
        return batch

    # ---- training ----

    def train(self, stop_after: int | None = None) -> list[dict]:
        """Runs to train.steps, resuming from output_dir's checkpoint when train.resume is set.

        Args:
            stop_after: stop, with a checkpoint, after this many steps in total (None: train.steps).

        Returns:
            The log records of the whole run (those of earlier runs it resumed included).

        Raises:
            TrainingInterrupted: SIGINT or SIGTERM arrived; the checkpoint holds the last finished step.
            ValueError: the checkpoint is unreadable, unsafe, or from a run with another configuration.
        """
        self._hold_output_dir()
        try:
            return self._train(stop_after)
        finally:
            self._lock.release()

    def _train(self, stop_after: int | None) -> list[dict]:
        train = self.config.train
        if train.resume and (self.output_dir / CHECKPOINT).exists():
            self.load_checkpoint(self.output_dir / CHECKPOINT)
        self.history = read_log(self.output_dir / LOG, self.step)
        self._fire("on_train_begin")
        if self.step >= train.steps:
            print(f"[{self.mode}] {self.output_dir} holds a finished run of {self.step} steps: nothing to do "
                  "(train.resume=false starts afresh)", flush=True)
            return self.history
        last = train.steps if stop_after is None else min(train.steps, stop_after)
        self._start_batches(last)
        progress = self._progress(last)
        with StopRequests() as requests:
            signum = 0
            while self.step < last and not signum:
                self._fire("on_step_begin", self.step)
                terms = self._train_step()
                self.step += 1
                self._fire("on_step_end", terms)
                self._after_step(terms, progress)
                # torchrun forwards a signal to each worker at a slightly different moment: the ranks
                # agree on the step to stop after.
                signum = max_over_ranks(requests.signum, self.device)
            if progress is not None:
                progress.close()
            self._batches = None  # its worker processes end with it
            if signum:
                self.save_checkpoint()
                self._fire("on_train_end")
                raise TrainingInterrupted(signum, self.step, self.output_dir / CHECKPOINT)
            if self.step < train.steps:
                self.save_checkpoint()
            else:
                self._finish()  # a signal now waits for the end of the run, a few moments away
        self._fire("on_train_end")
        return self.history

    def add_callback(self, callback: TrainerCallback) -> None:
        """Adds a callback after the others."""
        self.callbacks.append(callback)

    def _fire(self, event: str, *args) -> None:
        for callback in self.callbacks:
            getattr(callback, event)(self, *args)

    def _train_step(self) -> dict:
        train = self.config.train
        self.model.train()
        totals: dict[str, float] = {}
        for micro in range(train.grad_accum):
            batch = self._next_micro_batch()
            last_micro = micro == train.grad_accum - 1
            wrapped = self.model is not self.step_module
            sync = self.model.no_sync() if wrapped and not last_micro else contextlib.nullcontext()
            with sync:
                with autocast(train.autocast, self.device):
                    terms, loss = self.model(batch)
                if not self.step_module.owns_backward:
                    (loss / train.grad_accum).backward()
            for name, value in terms.items():
                totals[name] = totals.get(name, 0.0) + float(value) / train.grad_accum
            totals["loss"] = totals.get("loss", 0.0) + float(loss.detach()) / train.grad_accum
        if self.world > 1 and self.model is self.step_module:
            average_gradients(self.step_module)
        # The norm before clipping; an infinite max_norm measures it without clipping (a factor of 1).
        norm = torch.nn.utils.clip_grad_norm_(self.step_module.parameters(),
                                              train.clip_norm if train.clip_norm > 0 else math.inf)
        self._fire("on_before_optimizer_step", totals, float(norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return totals

    def _after_step(self, terms: dict, progress) -> None:
        """Progress bar, logs (terms averaged over the steps since the last log), eval, checkpoint."""
        train = self.config.train
        if progress is not None:
            progress.update(1)
            progress.set_postfix({k: f"{v:.4f}" for k, v in terms.items()})
        for name, value in terms.items():
            self._window[name] = self._window.get(name, 0.0) + value
        self._window_steps += 1
        if self.step % train.log_every == 0 or self.step == train.steps:
            means = {name: total / self._window_steps for name, total in self._window.items()}
            self.log({"step": self.step, "lr": self.scheduler.get_last_lr()[0], **means})
            self._window, self._window_steps = {}, 0
        if self.step % train.eval_every == 0 and self.step < train.steps:
            self._log_evaluation(self.evaluate(), final=False)
        if self.step % train.checkpoint_every == 0 and self.step < train.steps:
            self.save_checkpoint()

    def _progress(self, last: int):
        if not self.config.train.progress or self.rank != 0:
            return None
        from tqdm.auto import tqdm

        # Logs written to a file get a line every 10 s rather than a redraw per step.
        interval = 0.1 if sys.stderr.isatty() else 10.0
        return tqdm(total=last, initial=self.step, desc=self.mode, dynamic_ncols=True, mininterval=interval)

    def _finish(self) -> None:
        self._log_evaluation(self.evaluate(), final=True)
        if self.rank == 0:
            self.save_model(self.output_dir / "model")
        self.save_checkpoint()

    def _log_evaluation(self, metrics: dict, final: bool) -> None:
        self.log({"step": self.step, "eval": metrics, **({"final": True} if final else {})})
        self._fire("on_evaluate", metrics, final)

    # ---- evaluation ----

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Task metrics of the trained model (labeled data) or its mean loss terms (unlabeled)."""
        model = self.step_module.trained_model()
        model.eval()
        kind = self.config.data.kind
        batch_size = self.config.train.batch_size
        logits, labels, totals, batches = [], [], {}, 0
        for start in range(0, len(self.eval_set), batch_size):
            rows = data_module.rows_at(self.eval_set, list(range(start, min(start + batch_size, len(self.eval_set)))))
            collated = self.collate(rows, mask_keys=range(start, start + len(rows)), stream="eval")
            batch = {k: v.to(self.device) for k, v in collated.items()}
            if kind in data_module.TEXT_ONLY_KINDS:
                terms, loss = self.step_module(batch)
                for name, value in {**terms, "loss": loss}.items():
                    totals[name] = totals.get(name, 0.0) + float(value)
                batches += 1
            else:
                logits.append(model(**model_inputs(batch)).logits.float().cpu())
                labels.append(batch["labels"].cpu())
        if kind in data_module.TEXT_ONLY_KINDS:
            return {name: value / batches for name, value in totals.items()}
        return task_metrics(torch.cat(logits).numpy(), torch.cat(labels).numpy(), kind)

    # ---- persistence ----

    def log(self, record: dict) -> None:
        """Appends `record` to the history and hands it to the callbacks' on_log (JsonlLog writes it)."""
        self.history.append(record)
        self._fire("on_log", record)

    def save_checkpoint(self) -> None:
        """output_dir/checkpoint.pt (rank 0): everything the run needs to resume bit for bit."""
        if self.rank != 0:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        state = {"step": self.step, "mode": self.mode, "config": to_dict(self.config),
                 "world": self.world, "train_examples": len(self.train_set),
                 "model": self.step_module.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "rng": rng_state(),
                 "log_window": {"sums": dict(self._window), "steps": self._window_steps}}
        write_checkpoint(state, self.output_dir / CHECKPOINT)
        self._fire("on_save", self.output_dir / CHECKPOINT, "checkpoint")

    def load_checkpoint(self, path) -> None:
        """Restores a checkpoint of this run; refuses one whose run differs in what the state depends on."""
        state = read_checkpoint(path, self.device)
        if state["mode"] != self.mode:
            raise ValueError(f"{path} is a {state['mode']} checkpoint, not a {self.mode} one")
        conflicts = resume_conflicts(state["config"], to_dict(self.config))
        if state["world"] != self.world:
            conflicts.append(f"torchrun ranks ({state['world']} -> {self.world})")
        if state["train_examples"] != len(self.train_set):
            conflicts.append(f"training examples read from data.dataset ({state['train_examples']} -> "
                             f"{len(self.train_set)})")
        if conflicts:
            raise ValueError(f"cannot resume from {path}: this run differs from the one that wrote it in "
                             f"{', '.join(conflicts)}. Resume with the original values, or start afresh with "
                             "train.resume=false or another train.output_dir")
        self.step_module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        self._window, self._window_steps = dict(state["log_window"]["sums"]), state["log_window"]["steps"]
        self.step = state["step"]

    def save_model(self, directory: Path) -> None:
        """What the step saves of the trained model (TrainingStep.save_model: a plain Hugging Face model
        directory; a distillation adds pykd_objective.pt with critics and projections)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.step_module.save_model(directory, self.tokenizer)
        self._fire("on_save", directory, "model")


class _Rows(torch.utils.data.Dataset):
    """A datasets.Dataset as DataLoader reads it with the batch plan: (row index, sample position) pairs in,
    (rows, positions) out."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, planned: list[tuple[int, int]]) -> tuple[list[dict], list[int]]:
        # DataLoader's fetcher calls this with the whole micro-batch (no per-row __getitem__ is needed)
        return data_module.rows_at(self.dataset, [index for index, _ in planned]), [key for _, key in planned]


class _PlannedCollate:
    """The run's Collator over what _Rows returns (picklable: a worker process gets a copy)."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, rows_and_keys) -> dict:
        rows, keys = rows_and_keys
        return self.collate(rows, mask_keys=keys)
