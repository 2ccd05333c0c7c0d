"""pykd.distiller.hpo (Optuna search over the KD pipeline) and the teacher-logit cache, on tiny models."""
import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pykd.distill import config as run_config

optuna = pytest.importorskip("optuna")
transformers = pytest.importorskip("transformers")
from tests.kd_fixtures import tiny_csv, tiny_teacher
from pykd.distiller import hpo, pipeline
from pykd.distill.callbacks import TrainerCallback
from pykd.distill.trainer import Trainer

TINY_SPACE = {"study": {"sampler": "random", "pruner": "none", "seed": 0},
              "space": {"prediction": {"choices": ["soft_ce", "mse"]}, "temperature": {"low": 1.0, "high": 4.0},
                        "intermediate": {"choices": ["none", "mse", "mi"]},
                        "mapping": {"choices": ["skip", "last"]}, "mi_bound": {"choices": ["alpha", "infonce"]},
                        "mi_alpha": {"low": 0.5, "high": 0.95}, "lr": {"low": 1e-4, "high": 1e-2, "log": True}}}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny fine-tuned teacher and the base run config of a 4-step distillation."""
    tmp = tmp_path_factory.mktemp("hpo")
    os.environ["PYKD_CACHE"] = str(tmp / "cache")
    values = {"teacher": {"path": tiny_teacher(tmp)}, "data": {"dataset": tiny_csv(tmp), "max_length": 20,
                                                               "eval_fraction": 0.2},
              "student": {"num_hidden_layers": 2, "hidden_size": 24, "num_attention_heads": 2,
                          "intermediate_size": 40},
              "losses": {"relation": {"relation_heads": 2}},
              "train": {"steps": 4, "batch_size": 8, "lr": 1e-3, "eval_every": 2, "log_every": 1,
                        "checkpoint_every": 100, "output_dir": str(tmp / "teacher-run"), "progress": False}}
    Trainer(run_config.from_dict(values), "finetune").train()
    values["teacher"]["finetuned"] = str(tmp / "teacher-run" / "model")
    values["train"]["output_dir"] = str(tmp / "unused")
    return values


def _spec(tmp_path, storage=None, **study):
    path = tmp_path / "space.yaml"
    space = {"study": {**TINY_SPACE["study"], "output": str(tmp_path / "hpo"), **study}, "space": TINY_SPACE["space"]}
    if storage:
        space["study"]["storage"] = storage
    path.write_text(yaml.safe_dump(space))
    return path


@pytest.mark.parametrize("space, message", [
    ({"space": {"bogus": {"choices": [1]}}}, "unknown hpo dimension space.bogus"),
    ({"space": {"prediction": {"choices": ["bogus"]}}}, "space.prediction takes choices"),
    ({"space": {"augment": {"choices": ["swap+shout"]}}}, r"unknown operation\(s\) \['shout'\]"),
    ({"space": {"mapping": {"choices": ["skip"]}}}, "space.intermediate must be in the space"),
    ({"space": {"lr": {"low": 1e-3, "high": 1e-4}}}, "needs numbers low < high"),
    ({"space": {"lr": {"low": 0.0, "high": 1e-3, "log": True}}}, "low must be > 0"),
    ({"space": {"lr": {"low": 1e-5, "high": 1e-3, "step": 2}}}, "space.lr takes"),
    ({"space": {"intermediate": {"low": 0, "high": 1}}}, "space.intermediate is categorical"),
    ({"study": {"sampler": "grid"}, "space": {"lr": {"low": 1e-5, "high": 1e-3}}}, "study.sampler must be one of"),
    ({"study": {"trials": 3}, "space": {"lr": {"low": 1e-5, "high": 1e-3}}}, r"unknown hpo key study.trials"),
    ({"spaces": {}}, r"unknown section\(s\) \['spaces'\]"),
])
def test_bad_space_files_name_the_key(tmp_path, space, message):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    with pytest.raises(ValueError, match=message):
        hpo.load_space(str(path))


def test_run_config_keys_are_dimensions_and_pipelines_map_to_valid_configs(base):
    spec = hpo.load_space(None)  # the default space covers every pipeline stage
    assert {d.name for d in spec.dimensions} >= {"augment", "prediction", "temperature", "hard_weight",
                                                   "intermediate", "mapping", "mi_bound", "mi_alpha", "lr"}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    for _ in range(60):
        trial = study.ask()
        params = hpo.sample_pipeline(trial, spec.dimensions)
        config = run_config.from_dict(pipeline.pipeline_values(base, params))  # every draw is a valid config
        seen.add(params["intermediate"])
        losses = config.losses
        active = [losses.hidden.type != "none", bool(losses.relation.relations), losses.mi.bound != "none"]
        assert sum(active) == (params["intermediate"] != "none")  # exactly one intermediate loss
        assert ("temperature" in params) == (params["prediction"] == "soft_ce")
        assert ("mi_alpha" in params) == (params.get("mi_bound") == "alpha")
        if params["intermediate"] == "mi":
            assert losses.mi.bound == params["mi_bound"] and losses.mi.mapping == params["mi_mapping"]
        study.tell(trial, 0.0)
    assert seen == set(pipeline.INTERMEDIATE)
    extra = hpo.parse_dimensions({"train.batch_size": {"choices": [4, 8]}})
    assert pipeline.pipeline_values(base, {"train.batch_size": 4})["train"]["batch_size"] == 4
    assert extra[0].choices == [4, 8]


def test_study_runs_writes_reloadable_trial_configs_csv_and_plots(base, tmp_path):
    spec = hpo.load_space(str(_spec(tmp_path, storage=f"journal:{tmp_path / 'hpo' / 'journal.log'}")))
    result = hpo.run_study(base, spec, trials=3, log=lambda line: None)
    assert result["trials"] == 3 and result["best"] is not None
    rows = Path(result["csv"]).read_text().splitlines()
    assert len(rows) == 4 and "params_intermediate" in rows[0]
    assert {os.path.basename(p) for p in result["plots"]} == {"history.png", "importances.png",
                                                             "parallel_coordinates.png"}
    assert all(os.path.getsize(p) > 1000 for p in result["plots"])
    for number in range(3):
        directory = tmp_path / "hpo" / "trials" / f"trial-{number:04d}"
        reloaded = run_config.load(str(directory / "config.yaml"))
        import torch

        trained = torch.load(directory / "checkpoint.pt", weights_only=True)["config"]
        assert run_config.to_dict(reloaded) == trained  # `pykd distill config.yaml` runs exactly this trial
        assert reloaded.teacher.cache_logits
    # More trials continue the same study; a changed space or base config is refused.
    assert hpo.run_study(base, spec, trials=4, log=lambda line: None)["trials"] == 4
    other = hpo.load_space(str(_spec(tmp_path, storage=spec.study["storage"])))
    other.dimensions = other.dimensions[:-1]
    with pytest.raises(ValueError, match="created with another search space"):
        hpo.run_study(base, other, trials=5)
    changed = json.loads(json.dumps(base))
    changed["train"]["steps"] = 5
    with pytest.raises(ValueError, match="created with another base run config"):
        hpo.run_study(changed, spec, trials=5)


def test_intermediate_evaluations_are_reported_and_prune(base, tmp_path):
    class Pruning:
        def __init__(self):
            self.reports = []

        def report(self, value, step):
            self.reports.append((step, value))

        def should_prune(self):
            return True

    values = json.loads(json.dumps(base))
    values["train"]["output_dir"] = str(tmp_path / "pruned")
    trial = Pruning()
    with pytest.raises(optuna.TrialPruned, match="pruned at step 2"):
        hpo.run_trial(values, "accuracy", trial)
    assert len(trial.reports) == 1 and trial.reports[0][0] == 2 and 0.0 <= trial.reports[0][1] <= 1.0
    with pytest.raises(ValueError, match="study.metric 'pearson' is not an evaluation metric"):
        hpo.run_trial(dict(values, train=dict(values["train"], output_dir=str(tmp_path / "m"))), "pearson")
    base_config = run_config.from_dict(base)
    assert isinstance(hpo.pruner({"pruner": "hyperband", "startup_trials": 0}, base_config),
                      optuna.pruners.HyperbandPruner)


@pytest.mark.parametrize("url", ["nosuchdialect://x", "sqlite:////proc/no/such/dir/study.db"])
def test_a_storage_that_cannot_be_opened_is_a_clear_error(tmp_path, url):
    with pytest.raises(ValueError, match="hpo storage .* cannot be opened"):
        hpo.open_storage(url)


def _cli(args, env, **kwargs):
    command = [sys.executable, "-m", "pykd.cli", "hpo", *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def _base_file(base, tmp_path, **train):
    values = json.loads(json.dumps(base))
    values["train"].update(train)
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_cli_errors_exit_2(base, tmp_path, capsys):
    from pykd.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["hpo", "--trials", "0"])
    assert stop.value.code == 2 and "argument --trials: must be an integer >= 1" in capsys.readouterr().err
    space, config = str(_spec(tmp_path)), _base_file(base, tmp_path)
    for args, message in (([config, "--trials", "1", "--space", space, "--storage", "nosuchdialect://x"],
                           "pykd hpo: error: hpo storage 'nosuchdialect://x' cannot be opened"),
                          ([config, "--trials", "1", "--set", "losses.prediction.type=bogus"],
                           "pykd hpo: error: config key losses.prediction.type"),
                          ([config, "--trials", "1", "--space", str(tmp_path / "missing.yaml")],
                           "pykd hpo: error: hpo space file " + str(tmp_path / "missing.yaml") + " does not exist")):
        assert main(["hpo", *args]) == 2
        err = capsys.readouterr().err
        assert message in err, err


def _trials(url, name="pykd-hpo"):
    storage = hpo.open_storage(url)
    return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["journal", "sqlite"])
def test_two_workers_share_one_study_without_duplicating_trials(base, tmp_path, storage):
    url = f"journal:{tmp_path / 'study.log'}" if storage == "journal" else f"sqlite:///{tmp_path / 'study.db'}"
    space, config = _spec(tmp_path, storage=url), _base_file(base, tmp_path)
    workers = [_cli([config, "--trials", "4", "--space", str(space), "--seed", str(seed)], dict(os.environ))
               for seed in (1, 2)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    trials = _trials(url)
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert 4 <= len(done) <= 5  # the last ask may race: at most one trial more than asked
    assert len({t.number for t in done}) == len(done)
    workers_seen = {t.user_attrs["pykd_worker"] for t in done}
    assert len(workers_seen) == 2  # both processes took trials
    assert len({json.dumps(t.params, sort_keys=True) for t in done}) == len(done)  # different draws


@pytest.mark.slow
def test_a_killed_worker_loses_no_finished_trial_and_its_trial_resumes(base, tmp_path):
    url = f"journal:{tmp_path / 'study.log'}"
    space = _spec(tmp_path, storage=url)
    config = _base_file(base, tmp_path, steps=60, eval_every=100, checkpoint_every=5, log_every=5)
    worker = _cli([config, "--trials", "2", "--space", str(space)], dict(os.environ), start_new_session=True)
    second = tmp_path / "hpo" / "trials" / "trial-0001" / "checkpoint.pt"
    deadline = time.time() + 300
    while not second.exists() and worker.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert second.exists(), worker.communicate()[0]
    worker.kill()  # SIGKILL mid-trial: no handler runs
    worker.communicate()
    before = {t.number: (t.state, t.value) for t in _trials(url)}
    assert before[0][0] == optuna.trial.TrialState.COMPLETE and before[1][0] == optuna.trial.TrialState.RUNNING
    resumed = _cli([config, "--trials", "2", "--space", str(space)], dict(os.environ))
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert "re-queued trial(s) [1] of dead workers" in out
    after = {t.number: t for t in _trials(url)}
    assert (after[0].state, after[0].value) == before[0]  # the finished trial is untouched
    assert after[1].state == optuna.trial.TrialState.FAIL
    retry = after[2]
    assert retry.state == optuna.trial.TrialState.COMPLETE and retry.user_attrs["pykd_retry_of"] == 1
    assert retry.params == after[1].params
    log = [json.loads(line) for line in Path(second.parent / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "eval" not in r] == list(range(5, 65, 5))  # resumed, each step logged once


class StepWindow(TrainerCallback):
    """open while a training step runs."""

    open = False

    def on_step_begin(self, trainer, step):
        self.open = True

    def on_step_end(self, trainer, terms):
        self.open = False


def test_teacher_cache_skips_the_teacher_and_matches_the_live_forward(base, tmp_path):
    import torch

    def run(name, cache):
        values = json.loads(json.dumps(base))
        values["teacher"]["cache_logits"] = cache
        values["losses"] = {"relation": {"relations": []}, "hidden": {"type": "none"}}
        values["train"].update(output_dir=str(tmp_path / name), steps=3, eval_every=100)
        trainer = Trainer(run_config.from_dict(values), "distill")
        calls, in_step = [], StepWindow()
        trainer.add_callback(in_step)
        # Teacher forwards inside training steps (the model card's FLOP count runs the teacher once at the save).
        trainer.step_module.teacher.register_forward_hook(lambda *args: calls.append(1) if in_step.open else None)
        started = time.perf_counter()
        history = trainer.train()
        return [r["prediction"] for r in history if "prediction" in r], len(calls), time.perf_counter() - started

    live, live_calls, live_seconds = run("live", False)
    cached, cached_calls, cached_seconds = run("cached", True)
    assert live_calls == 3 and cached_calls == 0
    # Same logits up to float32 rounding of differently padded batches: the loss agrees to ~1e-6 relative.
    assert torch.allclose(torch.tensor(cached), torch.tensor(live), rtol=1e-4, atol=0)
    print(f"teacher cache: 3 tiny steps {live_seconds:.2f} s live vs {cached_seconds:.2f} s cached")
    values = json.loads(json.dumps(base))
    values["teacher"]["cache_logits"] = True
    values["data"]["kind"] = "unlabeled"
    values["losses"] = {"prediction": {"type": "none"}}
    with pytest.raises(ValueError, match="teacher.cache_logits caches the teacher's task logits"):
        run_config.from_dict(values)


@pytest.mark.slow
def test_torchrun_ranks_train_the_trial_rank_0_drew(base, tmp_path):
    url = f"journal:{tmp_path / 'study.log'}"
    space, config = _spec(tmp_path, storage=url), _base_file(base, tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "pykd.cli", "hpo", config, "--trials", "2", "--space", str(space)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    trials = _trials(url)
    # one study trial per trial, not per rank
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    import torch

    for trial in trials:
        directory = tmp_path / "hpo" / "trials" / f"trial-{trial.number:04d}"
        state = torch.load(directory / "checkpoint.pt", weights_only=True)
        assert state["world"] == 2 and state["step"] == 4  # both ranks trained it together
        assert run_config.to_dict(run_config.load(str(directory / "config.yaml"))) == state["config"]
    assert done.stdout.count("[hpo] best: trial") == 1  # only rank 0 reports


def _study(tmp_path, url=None):
    storage = hpo.open_storage(url or f"journal:{tmp_path / 'j.log'}")
    return optuna.create_study(storage=storage, study_name="s")


def test_running_trials_of_dead_local_workers_are_failed_and_requeued(tmp_path):
    import socket

    study = _study(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    owners = {"dead": f"{socket.gethostname()}:{int(dead.stdout)}", "alive": f"{socket.gethostname()}:{os.getpid()}",
              "elsewhere": "another-host:1"}
    numbers = {}
    for name, owner in owners.items():
        trial = study.ask()
        trial.suggest_float("lr", 1e-4, 1e-2)
        trial.set_user_attr(hpo.WORKER_ATTR, owner)
        numbers[name] = trial.number
    assert hpo.recover_dead_workers(study) == [numbers["dead"]]
    trials = study.get_trials(deepcopy=False)
    assert trials[numbers["dead"]].state == optuna.trial.TrialState.FAIL
    assert trials[numbers["alive"]].state == trials[numbers["elsewhere"]].state == optuna.trial.TrialState.RUNNING
    retry = trials[-1]
    assert retry.state == optuna.trial.TrialState.WAITING and retry.user_attrs[hpo.RETRY_ATTR] == numbers["dead"]
    assert retry.system_attrs["fixed_params"] == trials[numbers["dead"]].params  # drawn again as they were
    assert hpo.recover_dead_workers(study) == []  # once only
    rerun = study.ask()
    assert hpo.trial_directory("out", rerun).name == f"trial-{numbers['dead']:04d}"  # resumes the dead one's run


STALE_WORKER = """
import sys, time
import optuna
from pykd.distiller import hpo

storage = hpo.open_storage(sys.argv[1], max_retries=int(sys.argv[2]), heartbeat_interval=1, grace_period=1)
study = optuna.create_study(storage=storage, study_name="s", load_if_exists=True)

def hang(trial):
    trial.suggest_categorical("intermediate", ["mse", "mi"])
    print("running", flush=True)
    time.sleep(600)

study.optimize(hang)
"""


def _killed_mid_trial(url, max_retries):
    """A worker process running a trial under Study.optimize (which beats its heart), killed with SIGKILL."""
    worker = subprocess.Popen([sys.executable, "-c", STALE_WORKER, url, str(max_retries)], stdout=subprocess.PIPE,
                              text=True)
    assert worker.stdout.readline().strip() == "running"
    time.sleep(1.5)  # a heartbeat or two recorded
    worker.kill()
    worker.wait()
    time.sleep(2.5)  # past the grace period


@pytest.mark.parametrize("max_retries", [1, 0])
def test_a_stale_heartbeat_requeues_the_trial_on_rdb_storages(tmp_path, max_retries):
    """Optuna's heartbeat and RetryHeartbeatStaleTrialCallback, with pykd's retry limit; the re-run trains in
    the dead trial's directory."""
    import warnings

    url = f"sqlite:///{tmp_path / 'hb.db'}"
    _killed_mid_trial(url, max_retries)
    study = optuna.load_study(study_name="s", storage=hpo.open_storage(url, max_retries, 1, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optuna.storages.fail_stale_trials(study)
    trials = study.get_trials(deepcopy=False)
    if max_retries == 0:
        assert [t.state for t in trials] == [optuna.trial.TrialState.FAIL]
        return
    assert [t.state for t in trials] == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.WAITING]
    assert hpo.original_trial(trials[1]) == trials[0].number and trials[1].params == trials[0].params
    assert hpo.trial_directory("out", trials[1]).name == "trial-0000" and hpo.retries(trials[1]) == 1


def test_a_signal_fails_and_requeues_the_trial_and_propagates(tmp_path, monkeypatch):
    from pykd.distill.stopping import TrainingInterrupted

    study = _study(tmp_path)
    spec = hpo.load_space(str(_spec(tmp_path)))

    def interrupted(values, metric, trial=None):
        raise TrainingInterrupted(signal.SIGTERM, 3, tmp_path / "checkpoint.pt")

    monkeypatch.setattr(hpo, "run_trial", interrupted)
    objective = hpo.TrialObjective(spec, {}, "accuracy", log=lambda line: None)
    with pytest.raises(TrainingInterrupted):
        study.optimize(objective)
    first, retry = study.get_trials(deepcopy=False)
    assert first.state == optuna.trial.TrialState.FAIL and retry.state == optuna.trial.TrialState.WAITING
    assert retry.system_attrs["fixed_params"] == first.params and retry.user_attrs[hpo.RETRY_ATTR] == first.number
    # A trial stopped again and again is re-run at most study.max_retries times.
    spec.study["max_retries"] = 2
    with pytest.raises(TrainingInterrupted):
        study.optimize(objective)  # the retry, stopped: re-queued a second time
    with pytest.raises(TrainingInterrupted):
        study.optimize(objective)  # the second retry, stopped: given up
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert states == [optuna.trial.TrialState.FAIL] * 3 and hpo.retries(study.get_trials(deepcopy=False)[2]) == 2


def test_concurrent_summaries_into_one_directory_never_lose_a_file(tmp_path):
    # Two workers of one study summarise into the same output; a partial name shared between them let one
    # rename the other's partial away. Threads race the same way processes do.
    import threading

    from pykd.distill.cache import replace_atomically

    target, errors = tmp_path / "trials.csv", []

    def write_many(tag):
        try:
            for i in range(200):
                replace_atomically(target, functools.partial(Path.write_text, data=f"{tag},{i}\n"))
        except Exception as error:  # noqa: BLE001 - the test reports whatever the race raised
            errors.append(error)

    threads = [threading.Thread(target=write_many, args=(tag,)) for tag in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert target.read_text().split(",")[0] in ("a", "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trials.csv"]


def test_the_summary_goes_to_tensorboard_with_report_to(tmp_path):
    import optuna
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    study = optuna.create_study(direction="maximize")
    distribution = {"x": optuna.distributions.FloatDistribution(0, 1)}
    for x, value in ((0.1, 0.5), (0.2, 0.75), (0.3, 0.625)):
        study.add_trial(optuna.trial.create_trial(params={"x": x}, distributions=distribution, value=value))
    hpo.summarize(study, "memory", str(tmp_path), log=lambda line: None, report_to=["jsonl", "tensorboard"])
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert scalars == {"hpo/value": [(0, 0.5), (1, 0.75), (2, 0.625)],
                       "hpo/best_value": [(0, 0.5), (1, 0.75), (2, 0.75)]}
