"""pykd hpo checks its whole space and study before the first trial, draws conditionals in dependency order,
reseeds a resumed study and survives a torn journal line (issue 21, section 4). No trial trains here."""
import pytest
import yaml

optuna = pytest.importorskip("optuna")
from pykd.distiller import hpo

BASE = {"data": {"dataset": "sentiment.csv"}, "teacher": {"finetuned": "teacher-model"},
        "train": {"steps": 4, "eval_every": 2}}


def _spec(tmp_path, space, **study):
    path = tmp_path / "space.yaml"
    study = {"sampler": "random", "pruner": "none", "seed": 0, "output": str(tmp_path / "hpo"),
             "storage": f"journal:{tmp_path / 'study.log'}", **study}
    path.write_text(yaml.safe_dump({"study": study, "space": space}))
    return hpo.load_space(str(path))


def _draws(study, dimensions, count):
    drawn = []
    for _ in range(count):
        trial = study.ask()
        drawn.append(hpo.sample_pipeline(trial, dimensions))
        study.tell(trial, 0.0)
    return drawn


def test_conditionals_listed_before_their_parents_are_still_drawn(tmp_path):
    """mi_alpha, mi_bound, intermediate (children first) once never drew mi_alpha nor mi_bound."""
    spec = _spec(tmp_path, {"mi_alpha": {"low": 0.5, "high": 0.9}, "mi_bound": {"choices": ["alpha", "nwj"]},
                            "intermediate": {"choices": ["mi", "none"]}})
    assert [d.name for d in spec.dimensions] == ["intermediate", "mi_bound", "mi_alpha"]
    drawn = _draws(optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)), spec.dimensions, 30)
    assert any("mi_alpha" in params for params in drawn)
    for params in drawn:
        assert ("mi_bound" in params) == (params["intermediate"] == "mi")
        assert ("mi_alpha" in params) == (params.get("mi_bound") == "alpha")


@pytest.mark.parametrize("bounds", [{"low": 1e-5, "high": float("inf")}, {"low": float("-inf"), "high": 1.0},
                                    {"low": 0.0, "high": float("nan")}])
def test_an_infinite_bound_is_refused_when_the_space_loads(tmp_path, bounds):
    """It once crashed the first trial with a raw OverflowError."""
    with pytest.raises(ValueError, match=r"hpo dimension space.hard_weight needs numbers low < high, both finite"):
        _spec(tmp_path, {"hard_weight": bounds})


@pytest.mark.parametrize("space, message", [
    ({"train.batch_size": {"choices": [8, 0]}},
     r"space.train.batch_size can draw 0, which the run config refuses: config key train.batch_size must be >= 1"),
    ({"intermediate": {"choices": ["mse"]}, "intermediate_weight": {"low": -1.0, "high": 1.0}},
     r"space.intermediate_weight can draw -1.0, which the run config refuses: config key losses.hidden.weight"),
    ({"train.lr": {"low": 0.0, "high": 1e-3}}, r"space.train.lr can draw 0.0, .*config key train.lr must be > 0"),
    ({"student.num_attention_heads": {"low": 4, "high": 8, "int": True}},
     r"space.student.num_attention_heads can draw 5, .*must divide student.hidden_size"),
    ({"intermediate": {"choices": ["none"]}, "mapping": {"choices": ["skip"]}},
     r"space.mapping is never drawn: space.intermediate's choices \['none'\]"),
])
def test_a_value_a_trial_would_reject_fails_before_the_study_holds_a_trial(tmp_path, space, message):
    """A refused value was once found by a started trial, leaving a RUNNING trial per attempt."""
    spec = _spec(tmp_path, space)
    with pytest.raises(ValueError, match=message):
        hpo.run_study(BASE, spec, 1, log=lambda *a: None)
    assert not (tmp_path / "study.log").exists() and not (tmp_path / "hpo").exists()


def test_an_unknown_study_metric_fails_before_any_trial(tmp_path):
    """It was once caught only after a trial had trained."""
    spec = _spec(tmp_path, {"lr": {"low": 1e-4, "high": 1e-3}}, metric="bleu")
    with pytest.raises(ValueError, match=r"hpo key study.metric must be one of \('accuracy', 'f1', 'mcc'\) "
                                         r"\(the metrics a classification evaluation reports\), got 'bleu'"):
        hpo.run_study(BASE, spec, 1, log=lambda *a: None)
    assert not (tmp_path / "study.log").exists()
    regression = {**BASE, "data": {"dataset": "scores.csv", "kind": "regression"}}
    with pytest.raises(ValueError, match=r"\('pearson', 'spearman'\)"):
        hpo.run_study(regression, spec, 1, log=lambda *a: None)


def test_the_task_metrics_are_the_ones_an_evaluation_reports():
    import numpy as np

    from pykd.distill.metrics import METRICS, task_metrics

    logits, labels = np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]), np.array([1, 0, 0])
    assert tuple(task_metrics(logits, labels, "classification")) == METRICS["classification"]
    assert tuple(task_metrics(logits[:, :1], np.array([0.5, 0.1, 0.2]), "regression")) == METRICS["regression"]


def test_a_fixed_seed_study_restarted_does_not_repeat_its_draws(tmp_path):
    """A worker restarted (after SIGTERM) with study.seed 0 once replayed the earlier trials' draws exactly."""
    spec = _spec(tmp_path, {"lr": {"low": 1e-5, "high": 1e-2, "log": True},
                            "hard_weight": {"low": 0.0, "high": 1.0}})
    study, _ = hpo.open_study(spec, BASE)
    first = _draws(study, spec.dimensions, 3)
    restarted, _ = hpo.open_study(spec, BASE)
    again = _draws(restarted, spec.dimensions, 3)
    assert not any(params in first for params in again)
    (tmp_path / "fresh").mkdir()
    fresh = _spec(tmp_path / "fresh", {"lr": {"low": 1e-5, "high": 1e-2, "log": True},
                                       "hard_weight": {"low": 0.0, "high": 1.0}})
    other, _ = hpo.open_study(fresh, BASE)
    assert _draws(other, fresh.dimensions, 3) == first  # a fresh study with the seed is reproducible


def test_a_torn_last_journal_line_is_dropped_and_the_study_resumes(tmp_path):
    """A worker killed mid-write once left a journal whose study could not resume (a raw AttributeError)."""
    spec = _spec(tmp_path, {"hard_weight": {"low": 0.0, "high": 1.0}})
    study, _ = hpo.open_study(spec, BASE)
    _draws(study, spec.dimensions, 2)
    journal = tmp_path / "study.log"
    data = journal.read_bytes()
    journal.write_bytes(data[:-15])  # the last record (the second trial's end) half written
    notes = []
    storage = hpo.open_storage(f"journal:{journal}", log=notes.append)
    assert len(notes) == 1 and f"journal {journal}: dropped its torn last line (" in notes[0]
    resumed = optuna.load_study(study_name=spec.study["name"], storage=storage)
    _draws(resumed, spec.dimensions, 1)
    assert journal.read_bytes().endswith(b"\n")
    reopened = optuna.load_study(study_name=spec.study["name"], storage=hpo.open_storage(f"journal:{journal}"))
    states = [t.state.name for t in reopened.get_trials(deepcopy=False)]
    assert states.count("COMPLETE") == 2 and len(states) == 3  # the torn trial stays RUNNING, for recovery


def test_a_trial_whose_training_diverges_fails_and_the_study_goes_on(tmp_path, monkeypatch):
    """The Trainer now stops a non-finite run with NonFiniteTraining; in a study that is one failed trial."""
    from pykd.distill.stopping import NonFiniteTraining

    spec = _spec(tmp_path, {"hard_weight": {"low": 0.0, "high": 1.0}})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    calls = []

    def diverging(values, metric, trial=None):
        calls.append(values["train"]["output_dir"])
        if len(calls) == 1:
            raise NonFiniteTraining("training stopped at step 2: not finite: loss nan")
        return 0.5

    monkeypatch.setattr(hpo, "run_trial", diverging)
    monkeypatch.setattr(hpo.run_config, "write_run_config", lambda values, directory: None)
    lines = []
    study.optimize(hpo.TrialObjective(spec, BASE, "accuracy", log=lines.append), n_trials=2)
    assert [t.state.name for t in study.get_trials(deepcopy=False)] == ["FAIL", "COMPLETE"]
    assert any("trial 0: diverged (training stopped at step 2" in line for line in lines)
