"""AutoDistiller: meta-features, pipeline encoding, the ratio model, leave-one-dataset-out regret, the
KD runs table (`pykd runs-table`, and the one shipped in the package) and `pykd recommend`, on tiny
models and data."""
import csv
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import pykd

from pykd.distill import config as run_config

transformers = pytest.importorskip("transformers")
pytest.importorskip("sklearn")
from tests.kd_fixtures import tiny_csv, tiny_teacher
from pykd.distiller import autodistiller, pipeline
from pykd.distiller import runs_table as kd_runs_table

TINY_STUDENT = "layers=2,hidden=24,heads=2,ffn=40"
PIPELINES = "default,prediction_only,mi_alpha"


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """The real table tool on two tiny datasets, a tiny teacher and four pipelines of 3 steps each."""
    tmp = tmp_path_factory.mktemp("kdruns")
    os.environ["PYKD_CACHE"] = str(tmp / "cache")
    first, second = tmp / "a", tmp / "b"
    first.mkdir(), second.mkdir()
    datasets = [tiny_csv(first, rows=80, seed=0), tiny_csv(second, rows=120, seed=1)]
    teacher = tiny_teacher(tmp)
    output = tmp / "kd_runs.csv"
    args = ["--datasets", ",".join(datasets), "--pipelines", PIPELINES, "--teacher", teacher,
            "--students", TINY_STUDENT, "--max-train", "30,60", "--finetune-steps", "4", "--distill-steps", "3",
            "--batch-size", "8",
            "--max-length", "20", "--output", str(output), "--runs", str(tmp / "runs")]
    from pykd.cli import main

    assert main(["runs-table", *args]) == 0  # the command an installed pykd has
    return {"path": output, "datasets": datasets, "teacher": teacher, "tmp": tmp, "args": args}


def test_the_table_holds_every_run_with_its_meta_features_and_resumes(table):
    rows = list(csv.DictReader(Path(table["path"]).read_text().splitlines()))
    settings = ("n=30 student=2x24", "n=60 student=2x24")
    assert [(r["dataset"], r["setting"], r["pipeline"]) for r in rows] == [
        (d, s, p) for d in ("a_sentiment", "b_sentiment") for s in settings for p in PIPELINES.split(",")]
    for dataset in ("a_sentiment", "b_sentiment"):  # the settings' training sizes reach the meta-features
        sizes = {r["setting"]: float(r["log_train_size"]) for r in rows if r["dataset"] == dataset}
        assert sizes[settings[0]] < sizes[settings[1]]
    for row in rows:
        assert math.isclose(float(row["ratio"]), float(row["student_score"]) / float(row["teacher_score"]))
        assert 0 < float(row["capacity_ratio"]) < 1 and float(row["classes"]) == 2
        assert 0 <= float(row["vocab_coverage"]) <= 1 and 0 <= float(row["label_entropy"]) <= 1
        assert json.loads(row["params"]) == kd_runs_table.PIPELINES[row["pipeline"]]
    assert kd_runs_table.main(table["args"]) == 0  # every row is there: nothing re-runs, nothing is added
    assert len(list(csv.DictReader(Path(table["path"]).read_text().splitlines()))) == len(rows)
    assert Path(str(table["path"]).replace(".csv", "_regret.md")).read_text().startswith("| held-out dataset |")
    made = json.loads(kd_runs_table.provenance_path(table["path"]).read_text())["made_by"]
    assert [m["rows_added"] for m in made] == [len(rows), 0] and made[0]["command"].startswith("pykd runs-table ")
    assert made[0]["pykd"] == pykd.__version__ and made[0]["date"] and made[0]["machine"]
    assert made[0]["versions"]["torch"] == torch.__version__


def test_the_packaged_table_loads_from_any_directory(tmp_path, monkeypatch):
    """`pykd recommend` without --table learns from the table shipped in the package, wherever it runs."""
    import importlib.resources

    monkeypatch.chdir(tmp_path)
    runs = autodistiller.read_table(None)
    assert len(runs) == 57 and {r.dataset for r in runs} == {"rotten_tomatoes", "chatterbot_topics",
                                                              "wordnet_glosses", "reuters_grain"}
    assert {r.pipeline for r in runs} == set(pipeline.PIPELINES)
    resource = importlib.resources.files("pykd.distiller").joinpath("data", "kd_runs.csv")
    assert resource.read_text().startswith("dataset,setting,pipeline,params,")
    made = autodistiller.packaged_provenance()
    assert made["pykd"] and made["date"] and made["machine"] and made["table"] == "kd_runs.csv"
    assert all(m["command"].startswith("pykd runs-table ") for m in made["made_by"])


def test_vocabulary_coverage_counts_whole_non_unknown_words():
    from pykd.distill.models import load_tokenizer

    tokenizer = load_tokenizer("minilm-l6")
    assert tokenizer.tokenize("xyzzyqv") != ["xyzzyqv"]  # split into word pieces
    coverage, unknown = autodistiller._vocabulary(tokenizer, ["good movie", "xyzzyqv good"])
    assert coverage == pytest.approx(3 / 4) and unknown == 0.0
    assert autodistiller._entropy(np.array([5, 5])) == pytest.approx(1.0)
    assert autodistiller._entropy(np.array([10, 0])) == 0.0


def test_pipeline_encodings_tell_the_pipelines_apart():
    encoded = {name: pipeline.encode_config(run_config.from_dict(pipeline.pipeline_values({}, params)))
               for name, params in kd_runs_table.PIPELINES.items()}
    assert len({json.dumps(e, sort_keys=True) for e in encoded.values()}) == len(encoded)
    assert encoded["default"]["hidden_mse"] == 1 and encoded["default"]["relation"] == 1
    assert encoded["mi_alpha"]["mi_alpha"] == 0.9 and encoded["hidden_mse_emd"]["mapping_emd"] == 1


def _synthetic_runs():
    """Ratios with a dataset x pipeline interaction: 'mi' wins on small data, 'plain' on large data."""
    runs = []
    for index, size in enumerate((2.0, 2.3, 4.0, 4.3, 3.0)):
        meta = dict.fromkeys(autodistiller.META_FEATURES, 0.5)
        meta["log_train_size"] = size
        small = size < 3.1
        for name, params in (("plain", {"intermediate": "none"}), ("mi", {"intermediate": "mi", "mi_bound": "alpha"}),
                             ("default", {})):
            ratio = {"plain": 0.8 if small else 0.95, "mi": 0.93 if small else 0.85, "default": 0.88}[name]
            runs.append(autodistiller.Run(f"d{index}", name, params, meta, ratio, {}))
    return runs


def test_leave_one_dataset_out_recovers_an_interaction():
    rows = autodistiller.leave_one_dataset_out(_synthetic_runs())
    assert [r["picked"] for r in rows] == ["mi", "mi", "plain", "plain", "mi"]
    assert all(r["regret"] == 0 and r["default_regret"] > 0 for r in rows)
    table = autodistiller.regret_markdown(rows)
    assert "| d0 |  | mi | 0.9300 | 0.8800 | mi | 0.9300 | 0.0000 | 0.0500 | mi | 0.0000 |" in table
    # Without meta-features the pipeline best on average elsewhere (mi: three of five datasets are small) is
    # wrong on the large ones.
    assert [r["fixed"] for r in rows] == ["mi"] * 5
    assert [round(r["fixed_regret"], 4) for r in rows] == [0.0, 0.0, 0.1, 0.1, 0.0]
    with pytest.raises(ValueError, match="at least 2 datasets"):
        autodistiller.leave_one_dataset_out(_synthetic_runs()[:3])


def test_each_setting_of_the_held_out_dataset_is_scored_by_a_model_that_saw_none_of_it():
    # Every dataset is distilled at a small and a large training size; the interaction flips the best pipeline.
    runs = []
    for index in range(4):
        for setting, size in (("n=small", 2.0 + 0.1 * index), ("n=large", 4.0 + 0.1 * index)):
            for run in _synthetic_runs()[:3]:  # the three pipelines of one dataset
                meta = dict(run.meta, log_train_size=size)
                ratio = {"plain": 0.8, "mi": 0.93, "default": 0.88}[run.pipeline] if size < 3.1 else \
                    {"plain": 0.95, "mi": 0.85, "default": 0.88}[run.pipeline]
                runs.append(autodistiller.Run(f"d{index}", run.pipeline, run.params, meta, ratio, {}, setting))
    rows = autodistiller.leave_one_dataset_out(runs)
    assert [(r["dataset"], r["setting"]) for r in rows] == [(f"d{i}", s) for i in range(4)
                                                            for s in ("n=large", "n=small")]
    assert [r["picked"] for r in rows] == ["plain", "mi"] * 4
    assert all(r["regret"] == 0 for r in rows)
    # A held-out setting must not leak into training: with one dataset left the model has nothing to learn from.
    with pytest.raises(ValueError, match="at least 2 datasets"):
        autodistiller.leave_one_dataset_out([r for r in runs if r.dataset == "d0"])


def test_recommend_writes_top_k_configs_that_distill_runs(table, tmp_path):
    from pykd.distill.trainer import Trainer

    dataset = tiny_csv(tmp_path, rows=60, seed=3)
    base = {"teacher": {"path": table["teacher"], "finetuned": str(table["tmp"] / "runs" / "a_sentiment" / "teacher" /
                                                                    "model")},
            "data": {"max_length": 20, "eval_fraction": 0.2},
            "train": {"steps": 2, "batch_size": 8, "eval_every": 100, "progress": False}}
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(base))
    results = autodistiller.recommend_cli(str(path), [], dataset, TINY_STUDENT, 2, str(table["path"]),
                                          str(tmp_path / "rec"))
    assert [r["rank"] for r in results] == [1, 2] and results[0]["predicted_ratio"] >= results[1]["predicted_ratio"]
    assert {r["pipeline"] for r in results} <= set(PIPELINES.split(","))
    config = run_config.load(results[0]["config"])  # runs unchanged: load and train it as `pykd distill` does
    assert config.data.dataset == dataset and config.student.num_hidden_layers == 2
    history = Trainer(config, "distill").train()
    assert [r for r in history if r.get("final")]


def test_recommend_without_a_table_learns_from_the_packaged_one_in_any_directory(table, tmp_path, monkeypatch,
                                                                                 capsys):
    from pykd.cli import main

    dataset = tiny_csv(tmp_path, rows=60, seed=4)
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"teacher": {"path": table["teacher"], "finetuned": str(
        table["tmp"] / "runs" / "a_sentiment" / "teacher" / "model")}, "data": {"max_length": 20}}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["recommend", str(base), "--data", dataset, "--student", TINY_STUDENT, "--top-k", "2",
                 "--output", "rec"]) == 0
    out = capsys.readouterr().out
    assert "[recommend] learning from 57 KD runs on 4 datasets: the table shipped with pykd" in out
    configs = sorted(elsewhere.glob("rec/rank-*/config.yaml"))
    assert len(configs) == 2 and run_config.load(str(configs[0])).data.dataset == dataset


def test_recommend_errors(table, tmp_path, capsys):
    from pykd.cli import main

    text = tmp_path / "unlabelled.txt"
    text.write_text("just some text\nwithout any label\n")
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"teacher": {"path": table["teacher"], "finetuned": table["teacher"]},
                                    "data": {"max_length": 20}}))
    cases = ((["--data", str(text)], "has no labels"),
             (["--data", str(text), "--set", "data.kind=unlabeled", "--set", "losses.prediction.type=none"],
              "data.kind is 'unlabeled'"),
             (["--data", table["datasets"][0], "--student", "layers=two"], "--student takes layers="),
             (["--data", table["datasets"][0], "--table", str(tmp_path / "none.csv")],
              f"KD runs table {tmp_path / 'none.csv'} does not exist: make one with `pykd runs-table --output"))
    for args, message in cases:
        table_args = [] if "--table" in args else ["--table", str(table["path"])]
        assert main(["recommend", str(base), *args, *table_args]) == 2
        err = capsys.readouterr().err
        assert "pykd recommend: error:" in err and message in err, err
