"""The training loop for fine-tuning a teacher and for distilling a student.

One loop serves both: a `Step` module turns a batch into named loss terms and a total, and the
loop around it does AdamW with linear warmup/decay, gradient accumulation and clipping,
autocast, evaluation, JSONL logs and checkpoints that resume exactly.

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
import json
import os
import pickle
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..capture import capture
from . import data as data_module
from .config import RunConfig, resume_conflicts, to_dict
from .augment import WordEmbeddingMixup
from .losses import DistillationObjective, ForwardView, ModelShape
from .metrics import task_metrics
from .models import build_student, load_pretrained, load_tokenizer, resolve_model_path
from .stopping import StopRequests, TrainingInterrupted

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = 2  # 2: tensors and plain values only (format 1 pickled NumPy and Python RNG objects)
LOG = "log.jsonl"
# Model families whose position ids start after the padding index (RoBERTa's 514 positions hold 512 tokens).
POSITIONS_AFTER_PADDING = frozenset({"roberta", "xlm-roberta", "camembert", "longformer"})


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> None:
    """Joins the process group `torchrun` describes in the environment (gloo on CPU, nccl on GPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def _shape(model: nn.Module) -> ModelShape:
    return ModelShape(layers=model.config.num_hidden_layers, hidden=model.config.hidden_size)


def _view(model_output, recorded, mask: torch.Tensor) -> ForwardView:
    return ForwardView(logits=getattr(model_output, "logits", None), hidden_states=model_output.hidden_states,
                       layers=list(recorded.layers) if recorded is not None else [], mask=mask)


# Batch entries that are targets, not model inputs (the last two come from an augmented training set).
TARGET_KEYS = frozenset({"labels", "teacher_logits", "gold"})


def _model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k not in TARGET_KEYS}


class DistillStep(nn.Module):
    """Teacher (eval, no_grad) and student forwards under capture, then the objective.

    With `mixup` (augment.mixup) a training forward doubles the batch with mixed word embeddings
    (pykd.distill.augment.WordEmbeddingMixup); the teacher's logits label the mixed rows. Rows of an
    augmented training set bring the teacher's cached logits (their soft labels) and a gold flag: only
    gold rows enter the hard-label loss.
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

    def _run(self, model: nn.Module, inputs: dict) -> ForwardView:
        mask = inputs["attention_mask"].bool()
        if not self.objective.needs_capture:
            return _view(model(**inputs, output_hidden_states=True), None, mask)
        with capture(model) as recorded:
            output = model(**inputs, output_hidden_states=True)
        return _view(output, recorded, mask)

    def forward(self, batch: dict):
        self.teacher.eval()
        teacher_inputs = student_inputs = _model_inputs(batch)
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
        student = self._run(self.student, student_inputs)
        if "teacher_logits" in batch:  # the soft labels cached with an augmented training set
            teacher.logits = torch.cat([batch["teacher_logits"].float(), teacher.logits[rows:].float()])
        labels, label_rows = _gold_labels(batch, len(student.mask))
        return self.objective(teacher, student, labels, label_rows)

    def cached_logits_suffice(self, batch: dict) -> bool:
        """The batch carries the teacher's cached logits, and the objective reads nothing else of the
        teacher's forward (no hidden, relation or MI term, no mixup rows to label)."""
        objective = self.objective
        return ("teacher_logits" in batch and self.mixup is None and objective.hidden is None
                and objective.relation is None and objective.mi is None)

    def trained_model(self) -> nn.Module:
        return self.student


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


class FinetuneStep(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict):
        loss = self.model(**batch).loss
        return {"task": loss.detach()}, loss

    def trained_model(self) -> nn.Module:
        return self.model


def _rng_state() -> dict:
    """Every generator's state as tensors and plain values (what torch.load(weights_only=True) reads)."""
    version, words, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "python": {"version": version, "words": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                       "has_gauss": int(has_gauss), "cached": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    python = state["python"]
    random.setstate((python["version"], tuple(python["words"].tolist()), python["gauss"]))
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].cpu().numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def read_checkpoint(path, device="cpu") -> dict:
    """A checkpoint written by `Trainer.save_checkpoint`, read with torch.load(weights_only=True).

    Only tensors and plain values are accepted, so reading a file from elsewhere (a shared output
    directory, a downloaded run) cannot run code.

    Args:
        path: the checkpoint file.
        device: where its tensors go (torch.load's map_location).

    Returns:
        The checkpoint's dict (format CHECKPOINT_FORMAT). Every failure (unreadable, truncated,
        unsafe, another format) is a ValueError naming the file and the way out.
    """
    way_out = "delete it (the run then starts from step 0) or set train.resume=false"
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" not in str(error):
            raise ValueError(f"checkpoint {path} is unreadable ({error}); {way_out}") from None
        reason = str(error).split("WeightsUnpickler error: ")[-1].split(". ")[0]
        raise ValueError(f"checkpoint {path} holds objects other than tensors and plain values ({reason}); "
                         f"pykd does not unpickle those, since that can run arbitrary code: {way_out}") from None
    except Exception as error:  # noqa: BLE001 - a truncated or foreign file fails as OSError, EOFError, KeyError...
        raise ValueError(f"checkpoint {path} is unreadable or truncated ({type(error).__name__}: {error}); "
                         f"{way_out}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a checkpoint of this pykd version (format {CHECKPOINT_FORMAT}); {way_out}")
    return state


def _average_gradients(module: nn.Module) -> None:
    """What DDP does for a module it does not wrap: every gradient becomes the mean over the ranks.
    Parameters without a gradient stay without one (every rank runs the same sub-networks)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
        offset += grad.numel()


class Trainer:
    """mode "finetune": train teacher.path on the task; mode "distill": distil into a student.

    A step module with `owns_backward = True` (pykd.nas's SandwichStep) runs its own backward
    passes inside forward, scaled by 1 / grad_accum; under DDP it is not wrapped (DDP allows one
    backward per forward) and the Trainer averages its gradients over the ranks once per step.
    """

    MODES = ("distill", "finetune")

    def __init__(self, config: RunConfig, mode: str = "distill"):
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        if mode == "finetune" and config.data.kind == "unlabeled":
            raise ValueError("fine-tuning needs a labeled task: data.kind is 'unlabeled'")
        self.config, self.mode = config, mode
        self.rank, self.world = _world()
        self.output_dir = Path(config.train.output_dir)
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else \
            torch.device("cpu")
        self._check_output_dir()
        _seed(config.train.seed)
        self._load_data()
        self.step_module = self._build_step().to(self.device)
        self._check_models()
        self._augment_train_set()
        self._cache_teacher_logits()
        self.model = self._wrap(self.step_module)
        self.optimizer = self._optimizer()
        self.scheduler = self._scheduler()
        self.step = 0
        self.history: list[dict] = []
        self._window: dict[str, float] = {}  # loss terms summed since the last log line
        self._window_steps = 0
        self._order: tuple[int, list[int]] = (-1, [])

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
        self.collate = data_module.Collator(self.tokenizer, config.max_length, config.kind)
        self.label_names = splits.label_names
        self.num_labels = 1 if config.kind == "regression" else (len(self.label_names) if self.label_names else None)

    def _augment_train_set(self) -> None:
        """Distiller's augmentation stage: the training set extended by teacher-labelled augmented copies."""
        if not isinstance(self.step_module, DistillStep) or not self.config.augment.policy:
            return
        from .augment import augmented_train_set

        def log(line: str) -> None:
            if self.rank == 0:
                print(line, flush=True)

        self.train_set = augmented_train_set(self.train_set, self.config.augment, self.step_module.teacher,
                                             self.collate, self.config.data.kind, self.device, log)

    def _cache_teacher_logits(self) -> None:
        """teacher.cache_logits: the teacher's logits over the training set, computed once per
        (teacher, data, max_length) and cached on disk (an augmented set already carries them)."""
        if not isinstance(self.step_module, DistillStep) or not self.config.teacher.cache_logits:
            return
        from .teacher_cache import with_teacher_logits

        self.train_set = with_teacher_logits(self.train_set, self.step_module.teacher, self.collate, self.device,
                                             log=print if self.rank == 0 else None)

    def _check_models(self) -> None:
        """data.max_length within every model's positions; class names into the trained model's config."""
        models = [self.step_module.trained_model(), getattr(self.step_module, "teacher", None)]
        for model in filter(None, models):
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

    def _build_step(self) -> nn.Module:
        kind = self.config.data.kind
        if self.mode == "finetune":
            return FinetuneStep(load_pretrained(self.config.teacher.path, kind, self.num_labels))
        if kind != "unlabeled" and not self.config.teacher.finetuned:
            raise ValueError("task-specific KD needs a teacher fine-tuned on the task: run `pykd finetune` and set "
                             "teacher.finetuned to its output directory (or use data.kind unlabeled)")
        if kind == "classification":
            self._check_teacher_classes(self.config.teacher.finetuned)
        teacher = load_pretrained(self.config.teacher.finetuned or self.config.teacher.path, kind, self.num_labels)
        student = build_student(teacher, self.config.student)
        objective = DistillationObjective(self.config.losses, _shape(teacher), _shape(student), kind)
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
        if self.world == 1 or getattr(module, "owns_backward", False):
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)

    def _optimizer(self) -> torch.optim.Optimizer:
        decay, no_decay = [], []
        for name, parameter in self.step_module.named_parameters():
            if parameter.requires_grad:
                (no_decay if parameter.ndim < 2 else decay).append(parameter)
        groups = [{"params": decay, "weight_decay": self.config.train.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        if self.config.train.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=self.config.train.lr)
        return torch.optim.AdamW(groups, lr=self.config.train.lr)

    def _scheduler(self):
        total = self.config.train.steps
        warmup = max(1, int(self.config.train.warmup_fraction * total))

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return max(0.0, (total - step) / max(1, total - warmup))

        return torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)

    # ---- data ----

    def _epoch_order(self, epoch: int) -> list[int]:
        """The permutation epoch `epoch` visits; drawn once per epoch, not per micro-batch."""
        if self._order[0] != epoch:
            generator = torch.Generator().manual_seed(self.config.train.seed + epoch)
            self._order = (epoch, torch.randperm(len(self.train_set), generator=generator).tolist())
        return self._order[1]

    def _micro_batch(self, step: int, micro: int) -> dict:
        train = self.config.train
        per_step = train.batch_size * train.grad_accum * self.world
        start = step * per_step + (micro * self.world + self.rank) * train.batch_size
        epoch, offset = divmod(start, len(self.train_set))
        order = self._epoch_order(epoch)
        indices = [order[(offset + i) % len(order)] for i in range(train.batch_size)]
        batch = self.collate([self.train_set[i] for i in indices])
        return {k: v.to(self.device) for k, v in batch.items()}

    def _autocast(self):
        choice = self.config.train.autocast
        if choice == "auto":
            choice = "bf16" if self.device.type == "cuda" else "none"
        if choice == "none":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if choice == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

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
        train = self.config.train
        if train.resume and (self.output_dir / CHECKPOINT).exists():
            self.load_checkpoint(self.output_dir / CHECKPOINT)
        self._keep_log_until(self.step)
        if self.step >= train.steps:
            print(f"[{self.mode}] {self.output_dir} holds a finished run of {self.step} steps: nothing to do "
                  "(train.resume=false starts afresh)", flush=True)
            return self.history
        last = train.steps if stop_after is None else min(train.steps, stop_after)
        progress = self._progress(last)
        with StopRequests() as requests:
            signum = 0
            while self.step < last and not signum:
                terms = self._train_step()
                self.step += 1
                self._after_step(terms, progress)
                signum = self._agreed_stop(requests.signum)
            if progress is not None:
                progress.close()
            if signum:
                self.save_checkpoint()
                raise TrainingInterrupted(signum, self.step, self.output_dir / CHECKPOINT)
            if self.step < train.steps:
                self.save_checkpoint()
            else:
                self._finish()  # a signal now waits for the end of the run, a few moments away
        return self.history

    def _agreed_stop(self, signum: int) -> int:
        """The signal that stops every rank at this step boundary (0: none). torchrun forwards a signal
        to each worker at a slightly different moment; the ranks must stop after the same step."""
        if self.world == 1:
            return signum
        flag = torch.tensor([signum], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag)

    def _keep_log_until(self, step: int) -> None:
        """log.jsonl keeps the records of steps <= `step`, the checkpoint's: a run resumed there logs the
        steps it replays once more, so they must go (as must a previous run's log when starting afresh).
        A line that does not parse was torn by a kill mid-write. The kept records become the history."""
        path = self.output_dir / LOG
        if not path.exists():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("step", 0) <= step:
                kept.append(record)
        self.history = kept
        if self.rank == 0:
            partial = path.with_name(LOG + ".partial")
            partial.write_text("".join(json.dumps(record) + "\n" for record in kept))
            os.replace(partial, path)

    def _train_step(self) -> dict:
        train = self.config.train
        self.model.train()
        totals: dict[str, float] = {}
        for micro in range(train.grad_accum):
            batch = self._micro_batch(self.step, micro)
            last_micro = micro == train.grad_accum - 1
            wrapped = self.model is not self.step_module
            sync = self.model.no_sync() if wrapped and not last_micro else contextlib.nullcontext()
            with sync:
                with self._autocast():
                    terms, loss = self.model(batch)
                if not getattr(self.step_module, "owns_backward", False):
                    (loss / train.grad_accum).backward()
            for name, value in terms.items():
                totals[name] = totals.get(name, 0.0) + float(value) / train.grad_accum
            totals["loss"] = totals.get("loss", 0.0) + float(loss.detach()) / train.grad_accum
        if self.world > 1 and self.model is self.step_module:
            _average_gradients(self.step_module)
        if train.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.step_module.parameters(), train.clip_norm)
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
            self._log({"step": self.step, "lr": self.scheduler.get_last_lr()[0], **means})
            self._window, self._window_steps = {}, 0
        if self.step % train.eval_every == 0 and self.step < train.steps:
            self._log({"step": self.step, "eval": self.evaluate()})
        if self.step % train.checkpoint_every == 0 and self.step < train.steps:
            self.save_checkpoint()

    def _progress(self, last: int):
        if not self.config.train.progress or self.rank != 0:
            return None
        import sys

        from tqdm.auto import tqdm

        # Logs written to a file get a line every 10 s rather than a redraw per step.
        interval = 0.1 if sys.stderr.isatty() else 10.0
        return tqdm(total=last, initial=self.step, desc=self.mode, dynamic_ncols=True, mininterval=interval)

    def _finish(self) -> None:
        self._log({"step": self.step, "eval": self.evaluate(), "final": True})
        if self.rank == 0:
            self.save_model(self.output_dir / "model")
        self.save_checkpoint()

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
            rows = [self.eval_set[i] for i in range(start, min(start + batch_size, len(self.eval_set)))]
            batch = {k: v.to(self.device) for k, v in self.collate(rows).items()}
            if kind == "unlabeled":
                terms, loss = self.step_module(batch)
                for name, value in {**terms, "loss": loss}.items():
                    totals[name] = totals.get(name, 0.0) + float(value)
                batches += 1
            else:
                logits.append(model(**_model_inputs(batch)).logits.float().cpu())
                labels.append(batch["labels"].cpu())
        if kind == "unlabeled":
            return {name: value / batches for name, value in totals.items()}
        return task_metrics(torch.cat(logits).numpy(), torch.cat(labels).numpy(), kind)

    # ---- persistence ----

    def _log(self, record: dict) -> None:
        self.history.append(record)
        if self.rank != 0:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.output_dir / LOG, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if "eval" in record:
            print(f"[{self.mode}] step {record['step']}: " +
                  ", ".join(f"{k} {v:.4f}" for k, v in record["eval"].items()), flush=True)

    def save_checkpoint(self) -> None:
        if self.rank != 0:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        state = {"format": CHECKPOINT_FORMAT, "step": self.step, "mode": self.mode, "config": to_dict(self.config),
                 "world": self.world, "train_examples": len(self.train_set),
                 "model": self.step_module.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "rng": _rng_state(),
                 "log_window": {"sums": dict(self._window), "steps": self._window_steps}}
        partial = self.output_dir / (CHECKPOINT + ".partial")
        torch.save(state, partial)
        os.replace(partial, self.output_dir / CHECKPOINT)  # a crash mid-write leaves the last checkpoint whole

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
        _set_rng_state(state["rng"])
        self._window, self._window_steps = dict(state["log_window"]["sums"]), state["log_window"]["steps"]
        self.step = state["step"]

    def save_model(self, directory: Path) -> None:
        """A plain Hugging Face model directory (plus pykd_objective.pt with critics and projections)."""
        directory.mkdir(parents=True, exist_ok=True)
        self.step_module.trained_model().save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        if isinstance(self.step_module, DistillStep):
            torch.save(self.step_module.objective.state_dict(), directory / "pykd_objective.pt")
