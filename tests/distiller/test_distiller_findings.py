"""tools/distiller_findings.py on a planted table and a planted study."""
import csv
import math
from pathlib import Path

import optuna
import pytest
from tests.paths import TOOLS, load_tool

distiller_findings = load_tool("distiller_findings")

SCORES = {  # (dataset, setting) -> pipeline -> accuracy
    ("a", "n=500 student=2x192"): {"prediction_only": 0.70, "hidden_mse_skip": 0.72, "mi_alpha": 0.75,
                                   "augment_eda": 0.74},
    ("a", "n=4000 student=2x192"): {"prediction_only": 0.80, "hidden_mse_skip": 0.82, "mi_alpha": 0.81,
                                    "augment_eda": 0.80},
    ("b", "n=500 student=3x384"): {"prediction_only": 0.60, "augment_eda": 0.66},
}


def _table(path: Path) -> str:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["dataset", "setting", "pipeline", "metric", "student_score",
                                                    "eval_examples"])
        writer.writeheader()
        for (dataset, setting), runs in SCORES.items():
            for pipeline, score in runs.items():
                writer.writerow({"dataset": dataset, "setting": setting, "pipeline": pipeline, "metric": "accuracy",
                                 "student_score": score, "eval_examples": 400})
    return str(path)


def _study(path: Path) -> str:
    """The metric depends on the intermediate loss only; lr and hard_weight are noise-free distractors."""
    url = f"sqlite:///{path}"
    study = optuna.create_study(study_name="planted", storage=url, direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    effect = {"none": 0.6, "mse": 0.7, "mi": 0.9}
    study.optimize(lambda t: effect[t.suggest_categorical("intermediate", list(effect))]
                   + 0 * t.suggest_float("lr", 1e-5, 1e-3, log=True) + 0 * t.suggest_float("hard_weight", 0, 1),
                   n_trials=30)
    return url


def test_the_three_tables_carry_the_planted_effects(tmp_path):
    output = tmp_path / "findings.md"
    args = ["--table", _table(tmp_path / "runs.csv"), "--study", f"{_study(tmp_path / 'study.db')}@planted",
            "--output", str(output)]
    assert distiller_findings.main(args) == 0
    text = output.read_text()
    stages = text.split("## (1)")[1].split("## (2)")[0]
    row = next(line for line in stages.splitlines() if line.startswith("| planted |")).split("|")
    columns = [c.strip() for c in stages.splitlines()[2].split("|")]
    cells = dict(zip(columns, (c.strip() for c in row)))
    assert float(cells["intermediate loss"]) > 0.9 and float(cells["optimisation"]) < 0.1
    assert cells["complete trials"] == "30"
    mi = text.split("## (2)")[1].split("## (3)")[0]
    assert "| a | n=500 student=2x192 | 0.7000 | 0.7200 | 0.7500 |" in mi and "1 of 3 |" in mi
    assert "| a | n=4000 student=2x192 | 0.8000 | 0.8200 | 0.8100 |" in mi and "2 of 3 |" in mi
    assert "mean rank: 1.50" in mi
    augmentation = text.split("## (3)")[1]
    error = math.hypot(math.sqrt(0.70 * 0.30 / 400), math.sqrt(0.74 * 0.26 / 400))
    assert f"| a | n=500 student=2x192 | 0.7000 | 0.7400 | +0.0400 | {error:.4f} |" in augmentation
    assert "| n=500 | +0.0500 | 2 |" in augmentation and "| n=4000 | +0.0000 | 1 |" in augmentation
    assert "| student=3x384 | +0.0600 | 1 |" in augmentation


def test_bad_arguments_are_named(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        distiller_findings.main(["--table", _table(tmp_path / "runs.csv"), "--study", "no-name-here"])
    assert exit_info.value.code == 2 and "STORAGE_URL@STUDY_NAME" in capsys.readouterr().err
    old = tmp_path / "old.csv"
    old.write_text("dataset,pipeline\nx,default\n")
    with pytest.raises(SystemExit) as exit_info:
        distiller_findings.main(["--table", str(old)])
    assert exit_info.value.code == 2 and "no KD runs with a setting column" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        distiller_findings.main(["--table", _table(tmp_path / "runs.csv"), "--study",
                                 f"sqlite:///{tmp_path / 'empty.db'}@missing"])
    assert exit_info.value.code == 2 and "missing" in capsys.readouterr().err


def test_the_study_configs_in_tools_are_valid():
    from pykd.distill import config as run_config
    from pykd.distiller import hpo

    configs = TOOLS / "configs"
    spec = hpo.load_space(str(configs / "hpo_space.yaml"))
    assert spec.study["name"] == "distiller-rotten-tomatoes" and spec.study["seed"] == 0
    base = run_config.load_values(str(configs / "hpo_rotten_tomatoes.yaml"), [])
    assert base["teacher"]["finetuned"] == "runs/kd_runs/rotten_tomatoes/teacher/model"


def test_the_tools_speak_the_package_vocabulary():
    """One vocabulary (pykd.distiller.pipeline) for hpo, the recommender and the evidence tools."""
    from pykd.distiller import pipeline

    kd_runs_table = load_tool("kd_runs_table")
    assert distiller_findings.STAGES is pipeline.STAGES and kd_runs_table.PIPELINES is pipeline.PIPELINES
    assert distiller_findings.INTERMEDIATE_PIPELINES is pipeline.INTERMEDIATE_PIPELINES
    staged = [name for members in pipeline.STAGES.values() for name in members]
    assert sorted(staged) == sorted(pipeline.DIMENSIONS)  # every dimension in exactly one stage
    assert set(pipeline.INTERMEDIATE_PIPELINES) <= set(pipeline.PIPELINES)
    for params in pipeline.PIPELINES.values():
        assert set(params) <= set(pipeline.DIMENSIONS)
        assert all(params[k] in pipeline.CHOICES[k] for k in params if k in pipeline.CHOICES)
