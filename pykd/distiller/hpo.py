"""Hyper-parameter search over Distiller's whole KD pipeline with Optuna (`pykd hpo`).

A search is a run config (the base: teacher, student, data, train) plus a *space file* (YAML, see
`DEFAULT_SPACE`) with two sections:

    study:  name, storage, sampler (tpe | random), pruner (median | hyperband | none), metric,
            direction, seed, startup_trials, max_retries, output
    space:  dimension -> {choices: [...]} | {low: a, high: b, log: bool, int: bool}

Dimensions are the pipeline's named choices (pykd.distiller.pipeline.DIMENSIONS: augmentation policy,
prediction loss and temperature, hard-label weight, intermediate loss with its mapping, MI bound and
alpha, loss weights, learning rate) or any run-config key written with dots (`train.batch_size`).
Conditional dimensions (temperature needs prediction; mapping, mi_* and intermediate_weight need
intermediate) are drawn only when their parent's value uses them, and need their parent in the space.

Storage: SQLite in the output directory by default, any SQLAlchemy URL (`postgresql://...`), or a
journal file (`journal:PATH`). Trials run through Optuna's `Study.optimize`, which stops once the
study holds `--trials` finished or running trials (`MaxTrialsCallback`). Finished trials are in the
storage the moment they are told, so a killed worker loses only the trial it was running; that
trial is failed and re-queued with the same parameters, at most study.max_retries times, and the
re-run resumes from its checkpoint (it trains in the directory of the trial it re-runs,
`trial_directory`). For RDB storages Optuna's heartbeat does it (`RetryHeartbeatStaleTrialCallback`,
by any worker once the dead one's heartbeat is stale); Optuna has nothing for a journal file, and
waits for the grace period, so the next worker started on the same machine also re-queues the
RUNNING trials whose process is gone (`recover_dead_workers`). Workers on one machine or many share
a study by pointing at the same storage and study name. Under torchrun, rank 0 talks to the study
and broadcasts each trial's config and pruning decisions; every rank trains the same trial.

The space and the base config are fingerprinted into the study's user attrs; resuming a study with
another space or base config is refused. Before the first trial, the whole space is checked against the
base config (`check_space`: every choice and both bounds of every dimension make a valid run config, and
study.metric is one the task reports), so no trial is started only to be refused. A fixed study.seed
seeds a fresh study; a study resumed with trials in it draws from (seed, trials so far), so a worker
restarted after a signal does not repeat the draws of the trials before it. A journal file whose last
line was torn by a worker killed mid-write has that line dropped (with a note) when it opens.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import socket
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..distill import config as run_config
from ..distill.augment import OPERATIONS
from ..distill.cache import file_lock, replace_atomically
from ..distill.callbacks import TrainerCallback, report_summary
from ..distill.distributed import broadcast, world
from ..loading import read_yaml
from . import pipeline

DEFAULT_SPACE = """
study:
  name: pykd-hpo
  storage: null        # null: sqlite:///<output>/study.db; any SQLAlchemy URL; journal:PATH for a journal file
  sampler: tpe         # tpe | random
  pruner: median       # median | hyperband | none
  metric: null         # the eval metric to optimise; null: accuracy (classification), pearson (regression)
  direction: maximize  # maximize | minimize
  seed: null           # sampler seed; give parallel workers different seeds (or null)
  startup_trials: 5    # random trials before TPE models, and trials before the median pruner prunes
  max_retries: 3       # re-runs of a trial whose worker died or was stopped, at most
  output: runs/hpo
space:
  augment: {choices: [none, swap, delete, synonym]}
  prediction: {choices: [soft_ce, mse]}
  temperature: {low: 1.0, high: 8.0, log: true}
  prediction_weight: {low: 0.1, high: 2.0}
  hard_weight: {low: 0.0, high: 1.0}
  intermediate: {choices: [none, mse, cosine, pkd, relation, mi]}
  intermediate_weight: {low: 0.01, high: 10.0, log: true}
  mapping: {choices: [skip, uniform, last, emd]}
  mi_mapping: {choices: [skip, uniform, last]}
  mi_bound: {choices: [alpha, infonce, nwj, js]}
  mi_alpha: {low: 0.5, high: 0.99}
  lr: {low: 1.0e-5, high: 1.0e-3, log: true}
"""

STUDY_KEYS = {"name": str, "storage": (str, type(None)), "sampler": str, "pruner": str, "metric": (str, type(None)),
              "direction": str, "seed": (int, type(None)), "startup_trials": int, "max_retries": int, "output": str}
STUDY_CHOICES = {"sampler": ("tpe", "random"), "pruner": ("median", "hyperband", "none"),
                 "direction": ("maximize", "minimize")}
SPEC_KEYS = {"choices", "low", "high", "log", "int"}
RETRY_ATTR = "pykd_retry_of"  # user attr of a re-queued trial: the number of the trial it re-runs
RETRIES_ATTR = "pykd_retries"  # user attr of a re-queued trial: the re-runs of that trial so far
WORKER_ATTR = "pykd_worker"  # user attr of a trial: host:pid of the worker that runs it
HEARTBEAT_INTERVAL, GRACE_PERIOD = 30, 120  # seconds (RDB storages)
# The trials --trials counts: those finished (complete or pruned) or running (a failed one is re-queued or given up).
COUNTED_STATES = ("COMPLETE", "PRUNED", "RUNNING")


@dataclass
class Dimension:
    name: str
    choices: list | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False

    def suggest(self, trial):
        if self.choices is not None:
            return trial.suggest_categorical(self.name, self.choices)
        if self.integer:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log)


@dataclass
class SearchSpec:
    """A parsed space file: the study settings and the dimensions, in the file's order."""
    study: dict
    dimensions: list[Dimension]

    def fingerprint(self) -> str:
        space = [vars(d) for d in self.dimensions]
        key = {"space": space, "metric": self.study["metric"], "direction": self.study["direction"]}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


# ---- the space file ----

def load_space(path: str | None = None) -> SearchSpec:
    """The space file at `path` (None: DEFAULT_SPACE); study keys it omits take DEFAULT_SPACE's values."""
    if path is None:
        values = yaml.safe_load(DEFAULT_SPACE)
    else:
        values = read_yaml(path, "hpo space file", "give a YAML file with study and space sections (see "
                           "pykd.distiller.hpo.DEFAULT_SPACE)") or {}
    where = path or "the default space"
    if not isinstance(values, dict):
        raise ValueError(f"hpo space file {where} must be a mapping with study and space sections")
    unknown = sorted(set(values) - {"study", "space"})
    if unknown:
        raise ValueError(f"hpo space file {where}: unknown section(s) {unknown}; it takes study and space")
    study = dict(yaml.safe_load(DEFAULT_SPACE)["study"])
    study.update(values.get("study") or {})
    try:
        return SearchSpec(_checked_study(study), parse_dimensions(values.get("space") or {}))
    except ValueError as error:
        raise ValueError(f"hpo space file {where}: {error}") from None


def _checked_study(study: dict) -> dict:
    for key, value in study.items():
        if key not in STUDY_KEYS:
            raise ValueError(f"unknown hpo key study.{key}; study takes {sorted(STUDY_KEYS)}")
        if isinstance(value, bool) or not isinstance(value, STUDY_KEYS[key]):
            raise ValueError(f"hpo key study.{key} has the wrong type: got {value!r}")
    for key, choices in STUDY_CHOICES.items():
        if study[key] not in choices:
            raise ValueError(f"hpo key study.{key} must be one of {choices}, got {study[key]!r}")
    for key in ("startup_trials", "max_retries"):
        if study[key] < 0:
            raise ValueError(f"hpo key study.{key} must be >= 0, got {study[key]}")
    return study


def parse_dimensions(space: dict) -> list[Dimension]:
    """Each entry checked: a known pipeline dimension or run-config key, a valid spec, parents present."""
    if not isinstance(space, dict) or not space:
        raise ValueError(f"hpo section space must be a non-empty mapping of dimensions, got {space!r}")
    defaults = run_config.flatten(run_config.to_dict(run_config.DEFAULT))
    dimensions = []
    for name, spec in space.items():
        if name not in pipeline.DIMENSIONS and name not in defaults:
            raise ValueError(f"unknown hpo dimension space.{name}: it is neither a pipeline dimension "
                             f"{sorted(pipeline.DIMENSIONS)} nor a run-config key (section.key, e.g. train.batch_size)")
        dimensions.append(_dimension(name, spec))
    names = {d.name for d in dimensions}
    for dimension in dimensions:
        parent = pipeline.DIMENSIONS.get(dimension.name)
        if parent is not None and parent[0] not in names:
            raise ValueError(f"hpo dimension space.{dimension.name} is drawn only for some values of "
                             f"{parent[0]}, so space.{parent[0]} must be in the space too")
    return dependency_order(dimensions)


def dependency_order(dimensions: list[Dimension]) -> list[Dimension]:
    """The dimensions with every parent before its children, in the file's order otherwise: drawing is
    define-by-run, so a child listed before its parent was once never drawn."""
    depth = {}

    def level(name: str) -> int:
        if name not in depth:
            parent = pipeline.DIMENSIONS.get(name)
            depth[name] = 0 if parent is None else level(parent[0]) + 1
        return depth[name]

    return sorted(dimensions, key=lambda d: level(d.name))  # stable: ties keep the file's order


def _dimension(name: str, spec) -> Dimension:
    if not isinstance(spec, dict) or not spec or set(spec) - SPEC_KEYS:
        raise ValueError(f"hpo dimension space.{name} takes {{choices: [...]}} or {{low: a, high: b, log: bool, "
                         f"int: bool}}, got {spec!r}")
    if "choices" in spec:
        choices = spec["choices"]
        if set(spec) != {"choices"} or not isinstance(choices, list) or not choices:
            raise ValueError(f"hpo dimension space.{name}: choices must be a non-empty list alone, got {spec!r}")
        _check_choices(name, choices)
        return Dimension(name, choices=choices)
    low, high = spec.get("low"), spec.get("high")
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (low, high))
    if not numbers or not low < high:
        raise ValueError(f"hpo dimension space.{name} needs numbers low < high, both finite, got low={low!r}, "
                         f"high={high!r}")
    if spec.get("log") and low <= 0:
        raise ValueError(f"hpo dimension space.{name} is log-scaled, so low must be > 0, got {low}")
    integer = bool(spec.get("int", False))
    if integer and not (float(low).is_integer() and float(high).is_integer()):
        raise ValueError(f"hpo dimension space.{name} is int, so low and high must be integers, got {low}, {high}")
    if name in pipeline.CHOICES or name == "augment":
        raise ValueError(f"hpo dimension space.{name} is categorical: give it choices, got {spec!r}")
    return Dimension(name, low=low, high=high, log=bool(spec.get("log", False)), integer=integer)


def _check_choices(name: str, choices: list) -> None:
    if name == "augment":
        for policy in choices:
            bad = [op for op in pipeline.augment_operations(policy) if op not in OPERATIONS]
            if bad:
                raise ValueError(f"hpo dimension space.augment: policy {policy!r} has unknown operation(s) {bad}; "
                                 f"policies are none or operations from {OPERATIONS} joined by '+'")
    elif name in pipeline.CHOICES:
        bad = [c for c in choices if c not in pipeline.CHOICES[name]]
        if bad:
            raise ValueError(f"hpo dimension space.{name} takes choices from {pipeline.CHOICES[name]}, got {bad}")


# ---- drawing a pipeline ----

def sample_pipeline(trial, dimensions: list[Dimension]) -> dict:
    """Define-by-run: a dimension is suggested only when its parent's value uses it."""
    params = {}
    for dimension in dimensions:
        if pipeline.applies(dimension.name, params):
            params[dimension.name] = dimension.suggest(trial)
    return params


# ---- storage and study ----

def open_storage(url: str, max_retries: int = 3, heartbeat_interval: int = HEARTBEAT_INTERVAL,
                 grace_period: int = GRACE_PERIOD, log=print):
    """An Optuna storage for `url`: journal:PATH (a journal file) or an SQLAlchemy URL.

    An RDB storage records each running trial's heartbeat every heartbeat_interval seconds; a trial
    without one for grace_period seconds is failed by the next worker and re-queued with the same
    parameters (Optuna's RetryHeartbeatStaleTrialCallback), at most max_retries times.
    """
    import optuna

    try:
        if url.startswith("journal:"):
            from optuna.storages.journal import JournalFileBackend

            from optuna.storages.journal import JournalFileSymlinkLock

            path = url[len("journal:"):]
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            lock = JournalFileSymlinkLock(path)
            drop_torn_journal_line(Path(path), lock, log)
            return optuna.storages.JournalStorage(JournalFileBackend(path, lock_obj=lock))
        engine, lock = None, None
        if url.startswith("sqlite:///"):
            database = Path(url[len("sqlite:///"):])
            database.parent.mkdir(parents=True, exist_ok=True)
            # Workers wait for each other's writes instead of failing with "database is locked", and
            # the first one creates the schema alone (concurrent creation breaks on alembic's table).
            engine, lock = {"connect_args": {"timeout": 120}}, database.with_name(database.name + ".lock")
        with file_lock(lock) if lock else contextlib.nullcontext(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # heartbeats and their retry callback are marked experimental
            retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retries)
            return optuna.storages.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=heartbeat_interval,
                                              grace_period=grace_period, heartbeat_stale_trial_callback=retry)
    except Exception as error:  # noqa: BLE001 - SQLAlchemy, drivers and the OS raise many types
        first = str(error).strip().splitlines()[0] if str(error).strip() else "no message"  # SQLAlchemy adds lines
        raise ValueError(f"hpo storage {url!r} cannot be opened: {type(error).__name__}: {first}") from None


def drop_torn_journal_line(path: Path, lock, log=print) -> None:
    """A journal file not ending in a newline was torn by a worker killed mid-write (Optuna appends whole
    lines under the journal's lock, taken here): its last line is dropped. Optuna's reader skips such a line
    as a write in progress, and the next append would join it into a line no reader parses, leaving a
    study that cannot resume."""
    if not path.is_file():
        return
    lock.acquire()
    try:
        data = path.read_bytes()
        if not data or data.endswith(b"\n"):
            return
        keep = data.rfind(b"\n") + 1
        with open(path, "r+b") as handle:
            handle.truncate(keep)
    finally:
        lock.release()
    log(f"[hpo] journal {path}: dropped its torn last line ({len(data) - keep} bytes, a write its worker did "
        "not finish)")


def original_trial(trial) -> int:
    """The number of the trial that `trial` (a Trial or FrozenTrial) re-runs, through any chain of
    re-runs; its own number when it is no re-run."""
    import optuna

    if RETRY_ATTR in trial.user_attrs:  # re-queued by pykd (a dead local worker, a signal)
        return trial.user_attrs[RETRY_ATTR]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # marked experimental
        retried = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(_frozen(trial))
    return trial.number if retried is None else retried


def retries(trial) -> int:
    """How many times the trial's original has been re-run before `trial` (pykd's and Optuna's re-queues)."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # marked experimental
        history = optuna.storages.RetryHeartbeatStaleTrialCallback.retry_history(_frozen(trial))
    return trial.user_attrs.get(RETRIES_ATTR, 0) + len(history)


def _frozen(trial):
    """The FrozenTrial of a Trial (FrozenTrials as they are)."""
    import optuna

    if isinstance(trial, optuna.trial.FrozenTrial):
        return trial
    return next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)


def requeue(study, trial, max_retries: int, log=print) -> bool:
    """Queues a re-run of `trial` with its parameters (it will train in the same trial directory and resume
    from the checkpoint there), unless the trial has been re-run max_retries times already. Used where
    Optuna's heartbeat retry does not reach: a worker stopped by a signal, a dead worker on a journal
    storage. Optuna counts its own retries from the last of pykd's, so a trial alternating between both
    ways runs at most about twice max_retries times. Returns whether it was queued."""
    count = retries(trial) + 1
    if count > max_retries:
        log(f"[hpo] trial {trial.number} is not re-queued: trial {original_trial(trial)} has been re-run "
            f"{count - 1} time(s) (study.max_retries {max_retries})")
        return False
    study.enqueue_trial(trial.params, user_attrs={RETRY_ATTR: original_trial(trial), RETRIES_ATTR: count},
                        skip_if_exists=False)
    return True


def _sampler(study: dict, trials_so_far: int = 0):
    """The study's sampler. A fixed seed seeds a fresh study as given; a study that already holds trials
    (a worker restarted after a signal, or a second run) is seeded from (seed, trials so far), which would
    otherwise replay the earlier trials' draws exactly."""
    import numpy as np
    import optuna

    seed = study["seed"]
    if seed is not None and trials_so_far:
        seed = int(np.random.SeedSequence([seed, trials_so_far]).generate_state(1)[0])
    if study["sampler"] == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=study["startup_trials"])


def pruner(study: dict, base):
    """The study's pruner (study.pruner) for the base run config (Hyperband reads its steps and eval period)."""
    import optuna

    if study["pruner"] == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=study["startup_trials"])
    if study["pruner"] == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=base.train.eval_every, max_resource=base.train.steps)
    return optuna.pruners.NopPruner()


def _base_fingerprint(base_values: dict) -> str:
    flat = run_config.flatten(run_config.to_dict(run_config.from_dict(base_values)))
    flat.pop("train.output_dir", None)
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:16]


def open_study(spec: SearchSpec, base_values: dict):
    """The study (created or loaded) after checking it was made with this space and base config."""
    import optuna

    base = run_config.from_dict(base_values)
    url = spec.study["storage"] or f"sqlite:///{Path(spec.study['output']).resolve() / 'study.db'}"
    storage = open_storage(url, spec.study["max_retries"])
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=spec.study["name"], storage=storage, sampler=_sampler(spec.study),
                                pruner=pruner(spec.study, base), direction=spec.study["direction"],
                                load_if_exists=True)
    study.sampler = _sampler(spec.study, len(study.get_trials(deepcopy=False)))
    expected = {"pykd_space": spec.fingerprint(), "pykd_base_config": _base_fingerprint(base_values)}
    for key, value in expected.items():
        stored = study.user_attrs.get(key)
        if stored is None:
            study.set_user_attr(key, value)
        elif stored != value:
            what = "search space (space file)" if key == "pykd_space" else "base run config"
            raise ValueError(f"study {spec.study['name']!r} in {url} was created with another {what} "
                             f"(fingerprint {stored}, this one {value}); use the original, or a new study.name")
    return study, url


# ---- trials ----

def metric_name(spec: SearchSpec, base) -> str:
    """study.metric (checked against the task's metrics), or the task's default."""
    from ..distill.metrics import METRICS

    metric = spec.study["metric"]
    if not metric:
        return "pearson" if base.data.kind == "regression" else "accuracy"
    known = METRICS.get(base.data.kind)
    if known is not None and metric not in known:
        raise ValueError(f"hpo key study.metric must be one of {known} (the metrics a {base.data.kind} evaluation "
                         f"reports), got {metric!r}")
    return metric


def trial_values(base_values: dict, params: dict, directory) -> dict:
    """The run-config values of the trial that draws `params`, training in `directory`."""
    values = pipeline.pipeline_values(base_values, params)
    values.setdefault("train", {})["output_dir"] = str(directory)
    values.setdefault("teacher", {}).setdefault("cache_logits", True)
    return values


def check_space(spec: SearchSpec, base_values: dict) -> None:
    """Every value a trial can draw makes a valid run config: each choice, every value of an integer range
    of at most INT_VALUES_CHECKED values (a head count must divide a width) and both bounds of any other
    range, drawn with parent values that enable it, on the base config. A value the run config refuses
    once was found only by a started trial, which stayed RUNNING in the study."""
    by_name = {d.name: d for d in spec.dimensions}
    for dimension in spec.dimensions:
        enabling = _enabling(dimension.name, by_name)
        for value in _values_to_check(dimension):
            try:
                run_config.from_dict(trial_values(base_values, {**enabling, dimension.name: value}, "unused"))
            except ValueError as error:
                raise ValueError(f"hpo dimension space.{dimension.name} can draw {value!r}, which the run config "
                                 f"refuses: {error}") from None


INT_VALUES_CHECKED = 256


def _values_to_check(dimension: Dimension) -> list:
    if dimension.choices is not None:
        return dimension.choices
    if dimension.integer:
        low, high = int(dimension.low), int(dimension.high)
        return list(range(low, high + 1)) if high - low < INT_VALUES_CHECKED else [low, high]
    return [dimension.low, dimension.high]


def _enabling(name: str, by_name: dict) -> dict:
    """Values of `name`'s ancestors (from their dimensions) under which `name` is drawn."""
    parent = pipeline.DIMENSIONS.get(name)
    if parent is None:
        return {}
    parent_name, allowed = parent
    dimension = by_name[parent_name]
    candidates = dimension.choices if dimension.choices is not None else [dimension.low]
    ancestors = _enabling(parent_name, by_name)
    for candidate in candidates:
        if pipeline.applies(name, {**ancestors, parent_name: candidate}):
            return {**ancestors, parent_name: candidate}
    raise ValueError(f"hpo dimension space.{name} is never drawn: space.{parent_name}'s choices {candidates} "
                     f"do not include a value that uses it ({list(allowed) if allowed else 'any but none'})")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_dead_workers(study, max_retries: int = 3, log=print) -> list[int]:
    """RUNNING trials of workers on this machine whose process is gone: failed and re-queued with the
    same parameters (the re-run resumes from the dead trial's checkpoint). Optuna's heartbeat does this
    for RDB storages after its grace period; a journal storage has no heartbeat, and a worker restarted
    on the same machine need not wait. Returns the numbers of the trials it failed."""
    import optuna

    host, recovered = socket.gethostname(), []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        worker = trial.user_attrs.get(WORKER_ATTR, "")
        name, _, pid = worker.rpartition(":")
        if name != host or not pid.isdigit() or _alive(int(pid)):
            continue
        try:
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        except (ValueError, RuntimeError, optuna.exceptions.UpdateFinishedTrialError):
            continue  # another worker recovered it first
        requeue(study, trial, max_retries, log)
        recovered.append(trial.number)
    return recovered


def _counted(study) -> int:
    import optuna

    return len(study.get_trials(deepcopy=False, states=tuple(optuna.trial.TrialState[s] for s in COUNTED_STATES)))


def trial_directory(output: str, trial) -> Path:
    """trials/trial-NNNN of the trial, or of the trial it re-runs (so the re-run resumes its checkpoint)."""
    return Path(output) / "trials" / f"trial-{original_trial(trial):04d}"


class TrialReporter(TrainerCallback):
    """Reports each intermediate evaluation of a trial's training to its Optuna trial (rank 0, which holds
    it) and stops the run with optuna.TrialPruned when the pruner says so; under torchrun rank 0's
    decision is broadcast, so every rank stops at the same evaluation."""

    def __init__(self, trial, metric: str):
        self.trial, self.metric = trial, metric

    def on_evaluate(self, trainer, metrics: dict, final: bool) -> None:
        import optuna

        if final:
            return
        prune = False
        if self.trial is not None:
            self.trial.report(_metric(metrics, self.metric), trainer.step)
            prune = self.trial.should_prune()
        if broadcast(prune):
            raise optuna.TrialPruned(f"pruned at step {trainer.step}")


def run_trial(values: dict, metric: str, trial=None) -> float:
    """Trains one trial (every rank); rank 0 reports to `trial` and prunes. Returns the final metric."""
    from ..distill.trainer import Trainer

    trainer = Trainer(run_config.from_dict(values), "distill", callbacks=[TrialReporter(trial, metric)])
    final = [r for r in trainer.train() if r.get("final")]
    return _metric(final[-1]["eval"], metric)


def _metric(metrics: dict, name: str) -> float:
    if name not in metrics:
        raise ValueError(f"hpo study.metric {name!r} is not an evaluation metric of this task; it has "
                         f"{sorted(metrics)}")
    return float(metrics[name])


class TrialObjective:
    """Optuna's objective for one trial of the study (rank 0): draws the pipeline, writes the trial's run
    config into its directory, hands it to the other torchrun ranks and trains it (run_trial).

    A trial stopped by SIGINT/SIGTERM is re-queued (so the next worker resumes it from its checkpoint) and
    the stop propagates; Optuna fails it. The metric is the study's; a NaN one fails the trial, as does a
    training whose loss or gradients turned non-finite (a pipeline that diverges, e.g. a learning rate too
    high, is a result of the search, not a reason to stop it).
    """

    def __init__(self, spec: SearchSpec, base_values: dict, metric: str, log=print):
        self.spec, self.base_values, self.metric, self.log = spec, base_values, metric, log

    def __call__(self, trial) -> float:
        import optuna

        from ..distill.stopping import NonFiniteTraining, TrainingInterrupted

        trial.set_user_attr(WORKER_ATTR, f"{socket.gethostname()}:{os.getpid()}")
        directory = trial_directory(self.spec.study["output"], trial)
        values = trial_values(self.base_values, sample_pipeline(trial, self.spec.dimensions), directory)
        run_config.write_run_config(values, directory)
        broadcast({"number": trial.number, "values": values})
        try:
            return run_trial(values, self.metric, trial)
        except optuna.TrialPruned:
            raise
        except NonFiniteTraining as error:
            self.log(f"[hpo] trial {trial.number}: diverged ({error})")
            return math.nan  # Optuna fails a trial whose value is NaN, and the study goes on
        except TrainingInterrupted:
            requeue(trial.study, trial, self.spec.study["max_retries"], self.log)
            self.log(f"[hpo] trial {trial.number}: fail")
            raise
        except BaseException:
            self.log(f"[hpo] trial {trial.number}: fail")
            raise


def run_study(base_values: dict, spec: SearchSpec, trials: int, log=print) -> dict:
    """Runs trials until the study holds `trials` finished (complete or pruned) or running ones.

    Under torchrun every rank calls it: rank 0 runs the study, the others train what it hands them.

    Returns {"study": name, "storage": url, "best": {...} or None, "csv": path, "plots": [paths]} (rank 0; {}
    on the others).
    """
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ValueError(f"--trials must be an integer >= 1, got {trials!r}")
    base = run_config.from_dict(base_values)  # a bad base config, space or metric fails before any trial
    metric = metric_name(spec, base)
    check_space(spec, base_values)
    if world()[0] != 0:
        while (job := broadcast(None)) is not None:
            run_trial(job["values"], metric)
        return {}
    import optuna

    study, url = open_study(spec, base_values)
    recovered = recover_dead_workers(study, spec.study["max_retries"], log)
    if recovered:
        log(f"[hpo] re-queued trial(s) {recovered} of dead workers on this machine")
    if _counted(study) < trials:
        enough = optuna.study.MaxTrialsCallback(trials, states=tuple(optuna.trial.TrialState[s]
                                                                     for s in COUNTED_STATES))

        def told(study, trial) -> None:
            value = f", {metric} {trial.value:.4f}" if trial.value is not None else ""
            log(f"[hpo] trial {trial.number}: {trial.state.name.lower()}{value}")

        verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failed trial is reported above, not as a warning
        try:
            study.optimize(TrialObjective(spec, base_values, metric, log), callbacks=[enough, told])
        finally:
            optuna.logging.set_verbosity(verbosity)
    broadcast(None)  # the other ranks: no more trials
    return summarize(study, url, spec.study["output"], log, report_to=base.train.report_to)


# ---- results ----

def summarize(study, url: str, output: str, log=print, report_to=()) -> dict:
    """trials.csv and the history, importance and parallel-coordinate plots in `output`; with tensorboard in
    report_to (the base config's train.report_to) also output/tensorboard (study_series)."""
    import optuna

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    frame = study.trials_dataframe()
    csv_path = out / "trials.csv"
    replace_atomically(csv_path, lambda partial: frame.to_csv(partial, index=False))
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    plots = write_plots(study, out, log) if complete else []
    best = None
    if complete:
        best = {"number": study.best_trial.number, "value": study.best_value, "params": study.best_params,
                "config": str(trial_directory(output, study.best_trial) / "config.yaml")}
    report_summary(report_to, out, study_series(study))
    return {"study": study.study_name, "storage": url, "trials": len(frame), "best": best, "csv": str(csv_path),
            "plots": plots}


def study_series(study) -> dict:
    """The study as TensorBoard series: each complete trial's value and the best so far (step = trial number)."""
    import optuna

    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    values, best, so_far = [], None, []
    for trial in sorted(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)),
                        key=lambda t: t.number):
        values.append((trial.number, trial.value))
        best = trial.value if best is None else (max if maximize else min)(best, trial.value)
        so_far.append((trial.number, best))
    return {"hpo/value": values, "hpo/best_value": so_far}


def write_plots(study, out: Path, log=print) -> list[str]:
    """Optuna's matplotlib plots (no plotly needed). Importances need two complete trials with a
    varying parameter; a plot that cannot be drawn is skipped with its reason."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as plots

    written = []
    for name, draw in (("history", plots.plot_optimization_history), ("importances", plots.plot_param_importances),
                       ("parallel_coordinates", plots.plot_parallel_coordinate)):
        path = out / f"{name}.png"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the matplotlib backend is marked experimental
                axes = draw(study)
            figure = (axes if hasattr(axes, "figure") else axes.flat[0]).figure
            figure.tight_layout()
            replace_atomically(path, functools.partial(figure.savefig, dpi=110))
            plt.close(figure)
            written.append(str(path))
        except Exception as error:  # noqa: BLE001 - optuna raises ValueError/RuntimeError on too few trials
            log(f"[hpo] {name} plot skipped: {error}")
    return written


def print_summary(result: dict, stream=sys.stdout) -> None:
    print(f"[hpo] study {result['study']} ({result['storage']}): {result['trials']} trials; {result['csv']}",
          file=stream)
    if result["best"]:
        best = result["best"]
        print(f"[hpo] best: trial {best['number']} = {best['value']:.4f} {json.dumps(best['params'])}", file=stream)
        print(f"[hpo] re-run it: pykd distill {best['config']}", file=stream)
    for path in result["plots"]:
        print(f"[hpo] plot: {path}", file=stream)
