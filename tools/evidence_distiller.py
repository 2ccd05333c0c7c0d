"""Evidence for Distiller and AutoDistiller (issue 15, studies 3 and 4), one resumable command:

    .venv/bin/python tools/evidence_distiller.py [--root runs/evidence-distiller] [--workers 2] [--scale full|smoke]
    .venv/bin/python tools/evidence_distiller.py --summarise-only

Teacher: the packaged MiniLM-L6 fine-tuned once per dataset (400 steps, batch 32, lr 1e-4, on up to
4,000 training examples). Students are cut from the fine-tuned teacher and distilled for 500 steps
(batch 16, 64 tokens, AdamW lr 1e-4, 10% warmup), evaluated on the dataset's test split (at most 600
examples, the same rows for every run); the score is accuracy, the ratio student / teacher.

Study 3 (AutoDistiller): 6 datasets (rotten_tomatoes with a fixed 2,000-row test split, healthtweets,
wordnet_glosses, fortunes, reuters_grain, chatterbot_topics; the built-in corpora keep their own
splits) x 2 training sizes (1,000 and 4,000 examples, or all a dataset has) x 6 pipelines (default,
prediction only, hidden MSE with skip mapping, MiniLM relations on the last layer, MI-alpha 0.9, EDA
augmentation) x 3 seeds, student 2 x 384. The rows are the KD runs table the recommender learns from.

Study 4 (augmentation and the findings): on rotten_tomatoes and healthtweets, augmentation's gain
(EDA augmentation - prediction only, which differ in that stage alone) at 250 / 1,000 / 4,000
examples for the 2 x 384 student and a 3 x 192 one, 3 seeds; and a `pykd hpo` study of 30 trials over
the whole pipeline (rotten_tomatoes, 1,000 examples, 2 x 384, 500 steps, TPE, median pruning) for the
stage importances.

Outputs: the runs table bench/results/kd_runs_evidence.csv (one row per run, with its seed), the
study's entries in bench/results/evidence.json, and bench/results/evidence_distiller.md.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from evidence_jobs import Job, Study, run_workers  # noqa: E402

RESULTS = ROOT / "bench" / "results"
DATASETS = ("rotten_tomatoes", "healthtweets", "wordnet_glosses", "fortunes", "reuters_grain", "chatterbot_topics")
PIPELINE_NAMES = ("default", "prediction_only", "hidden_mse_skip", "relation_last", "mi_alpha", "augment_eda")
AUGMENT_DATASETS = ("rotten_tomatoes", "healthtweets")
AUGMENT_PIPELINES = ("prediction_only", "augment_eda")
STUDENTS = {"2x384": {"num_hidden_layers": 2, "hidden_size": 384, "num_attention_heads": 12,
                      "intermediate_size": 1536},
            "3x192": {"num_hidden_layers": 3, "hidden_size": 192, "num_attention_heads": 6,
                      "intermediate_size": 768}}
SEEDS = (0, 1, 2)
SCALES = {
    "full": {"teacher_steps": 400, "steps": 500, "sizes": (1000, 4000), "augment_sizes": (250, 1000, 4000),
             "teacher_train": 4000, "max_eval": 600, "rt_test": 2000, "hpo_trials": 30, "datasets": DATASETS,
             "seeds": SEEDS},
    "smoke": {"teacher_steps": 3, "steps": 3, "sizes": (40, 80), "augment_sizes": (20, 40, 80), "teacher_train": 80,
              "max_eval": 30, "rt_test": 60, "hpo_trials": 2, "datasets": ("rotten_tomatoes", "chatterbot_topics"),
              "seeds": (0, 1)},
}
COLUMNS = ("dataset", "setting", "pipeline", "seed", "params")  # then meta-features, then the scores
SCORES = ("metric", "teacher_score", "student_score", "ratio", "eval_examples", "seconds")


def pipelines() -> dict:
    from pykd.distiller.pipeline import PIPELINES

    return {name: PIPELINES[name] for name in PIPELINE_NAMES}


def setting_name(size: int, student: str) -> str:
    return f"n={size} student={student}"


# ---- data and configs ----

def prepare_data(root: Path, scale: dict) -> dict:
    """rotten_tomatoes as a file with a fixed train/test split (pykd splits it by train.seed otherwise,
    which would give every seed another test set)."""
    import numpy as np

    from pykd.distill import data as data_module

    prepared = data_module.prepare(data_module.load_corpus("rotten_tomatoes"), "classification", "rotten_tomatoes")
    texts, labels = prepared.dataset["text"][:], prepared.dataset["label"][:]
    order = np.random.default_rng(1234).permutation(len(texts))
    test = {int(i) for i in order[: scale["rt_test"]]}
    path = root / "data" / "rotten_tomatoes.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": texts[i], "label": int(labels[i]),
                                        "split": "test" if i in test else "train"}) + "\n"
                            for i in (int(j) for j in order)))
    return {"rotten_tomatoes": str(path), "rows": len(texts), "test": len(test)}


def data_source(root: Path, dataset: str) -> str:
    return str(root / "data" / "rotten_tomatoes.jsonl") if dataset == "rotten_tomatoes" else dataset


def base_values(root: Path, scale: dict, dataset: str, size: int, student: str | None, output: Path) -> dict:
    values = {"teacher": {"path": "minilm-l6"},
              "data": {"dataset": data_source(root, dataset), "kind": "classification", "max_length": 64,
                       "max_train_examples": size, "max_eval_examples": scale["max_eval"]},
              "train": {"steps": scale["steps"], "batch_size": 16, "lr": 1e-4, "warmup_fraction": 0.1,
                        "eval_every": 10 ** 6, "log_every": 50, "checkpoint_every": 250, "progress": False,
                        "seed": 0, "output_dir": str(output)}}
    if student is not None:
        values["student"] = dict(STUDENTS[student])
        values["teacher"].update(finetuned=str(root / "teachers" / dataset / "model"), cache_logits=True)
    return values


# ---- jobs ----

def finetune_teacher(root: Path, scale: dict, dataset: str) -> dict:
    from pykd.distill import config as run_config
    from pykd.distill.report import final_eval
    from pykd.distill.trainer import Trainer

    values = base_values(root, scale, dataset, scale["teacher_train"], None, root / "teachers" / dataset)
    values["train"].update(steps=scale["teacher_steps"], batch_size=32, checkpoint_every=10 ** 6)
    history = Trainer(run_config.from_dict(values), "finetune").train()
    return {"accuracy": final_eval(history)["accuracy"]}


def meta(root: Path, scale: dict, dataset: str, size: int, student: str) -> dict:
    from pykd.distill import config as run_config
    from pykd.distiller import autodistiller

    values = base_values(root, scale, dataset, size, student, root / "unused")
    return {"meta": autodistiller.meta_features(run_config.from_dict(values))}


def distil(root: Path, scale: dict, dataset: str, size: int, student: str, pipeline: str, seed: int) -> dict:
    from pykd.distill import config as run_config
    from pykd.distiller import pipeline as pipeline_module
    from pykd.distill.report import final_eval
    from pykd.distill.trainer import Trainer

    output = root / "runs" / dataset / setting_name(size, student).replace(" ", "_").replace("=", "") / \
        f"{pipeline}-s{seed}"
    base = base_values(root, scale, dataset, size, student, output)
    values = pipeline_module.pipeline_values(base, pipelines()[pipeline])
    values["train"]["seed"] = seed
    trainer = Trainer(run_config.from_dict(values), "distill")
    score = final_eval(trainer.train())["accuracy"]
    for path in [output / "checkpoint.pt", *(output / "model").glob("*.safetensors"),
                 output / "model" / "pykd_objective.pt"]:
        path.unlink(missing_ok=True)  # ~300 runs: only the log and the config are kept
    return {"student_score": score, "eval_examples": len(trainer.eval_set), "train_examples": len(trainer.train_set)}


SPACE = """study:
  name: evidence-rotten-tomatoes
  storage: null
  sampler: tpe
  pruner: median
  metric: null
  direction: maximize
  seed: 0
  startup_trials: 6
  output: {output}
space:
  augment: {{choices: [none, swap, delete, synonym]}}
  prediction: {{choices: [soft_ce, mse]}}
  temperature: {{low: 1.0, high: 8.0, log: true}}
  prediction_weight: {{low: 0.1, high: 2.0}}
  hard_weight: {{low: 0.0, high: 1.0}}
  intermediate: {{choices: [none, mse, cosine, pkd, relation, mi]}}
  intermediate_weight: {{low: 0.01, high: 10.0, log: true}}
  mapping: {{choices: [skip, uniform, last, emd]}}
  mi_mapping: {{choices: [skip, uniform, last]}}
  mi_bound: {{choices: [alpha, infonce, nwj, js]}}
  mi_alpha: {{low: 0.5, high: 0.99}}
  lr: {{low: 5.0e-5, high: 1.0e-3, log: true}}
"""


def hpo_study(root: Path, scale: dict) -> dict:
    from pykd.distiller import hpo

    output = root / "hpo"
    output.mkdir(parents=True, exist_ok=True)
    space_path = output / "space.yaml"
    space_path.write_text(SPACE.format(output=output))
    values = base_values(root, scale, "rotten_tomatoes", scale["sizes"][0], "2x384", output / "unused")
    values["train"].update(eval_every=100, checkpoint_every=100)
    result = hpo.run_study(values, hpo.load_space(str(space_path)), scale["hpo_trials"], log=print)
    return {"study": f"sqlite:///{output.resolve() / 'study.db'}@evidence-rotten-tomatoes", "best": result["best"],
            "trials": result["trials"]}


# ---- the plan ----

def runs_wanted(scale: dict) -> list[tuple]:
    """(dataset, size, student, pipeline, seed) of every run, study 3 first."""
    wanted = [(d, n, "2x384", p, s) for s in scale["seeds"] for d in scale["datasets"] for n in scale["sizes"]
              for p in PIPELINE_NAMES]
    for seed in scale["seeds"]:
        for dataset in (d for d in AUGMENT_DATASETS if d in scale["datasets"]):
            for student in STUDENTS:
                for size in scale["augment_sizes"]:
                    for pipeline in AUGMENT_PIPELINES:
                        run = (dataset, size, student, pipeline, seed)
                        if run not in wanted:
                            wanted.append(run)
    return wanted


def run_job_name(dataset, size, student, pipeline, seed) -> str:
    return f"kd-{dataset}-n{size}-{student}-{pipeline}-s{seed}"


def plan(root: Path, scale: dict):
    def jobs(results: dict) -> list[Job]:
        listed = [Job("data", lambda: prepare_data(root, scale))]
        for dataset in scale["datasets"]:
            listed.append(Job(f"teacher-{dataset}", lambda d=dataset: finetune_teacher(root, scale, d), ["data"]))
        metas = set()
        for index, (dataset, size, student, pipeline, seed) in enumerate(runs_wanted(scale)):
            meta_name = f"meta-{dataset}-n{size}-{student}"
            if meta_name not in metas:
                metas.add(meta_name)
                listed.append(Job(meta_name, lambda d=dataset, n=size, st=student: meta(root, scale, d, n, st),
                                  [f"teacher-{dataset}"], priority=1))
            listed.append(Job(run_job_name(dataset, size, student, pipeline, seed),
                              lambda d=dataset, n=size, st=student, p=pipeline, s=seed: distil(
                                  root, scale, d, n, st, p, s), [meta_name], priority=2 + index // 72))
        listed.append(Job("hpo", lambda: hpo_study(root, scale), ["teacher-rotten_tomatoes"], priority=4))
        return listed

    return jobs


# ---- the table and the summary ----

def table_rows(root: Path, scale: dict, results: dict) -> list[dict]:
    from pykd.distiller import autodistiller

    rows = []
    for dataset, size, student, pipeline, seed in runs_wanted(scale):
        name = run_job_name(dataset, size, student, pipeline, seed)
        if name not in results:
            continue
        run, teacher = results[name], results[f"teacher-{dataset}"]["accuracy"]
        setting = setting_name(run["train_examples"], student)
        meta_values = results[f"meta-{dataset}-n{size}-{student}"]["meta"]
        rows.append({"dataset": dataset, "setting": setting, "pipeline": pipeline, "seed": seed,
                     "params": json.dumps(pipelines()[pipeline]),
                     **{k: meta_values[k] for k in autodistiller.META_FEATURES}, "metric": "accuracy",
                     "teacher_score": teacher, "student_score": run["student_score"],
                     "ratio": run["student_score"] / teacher, "eval_examples": run["eval_examples"],
                     "seconds": run["seconds"]})
    return rows


def write_table(rows: list[dict], path: Path) -> None:
    from pykd.distiller import autodistiller

    # teacher_score is a meta-feature and a score column (as in kd_runs.csv): one column, the score.
    columns = list(dict.fromkeys([*COLUMNS, *autodistiller.META_FEATURES, *SCORES]))
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    partial.replace(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=None)
    parser.add_argument("--scale", choices=sorted(SCALES), default="full")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--summarise-only", action="store_true")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    root = Path(args.root or f"runs/evidence-distiller{'' if args.scale == 'full' else '-' + args.scale}").resolve()
    scale = SCALES[args.scale]
    study = Study(root, plan(root, scale))
    meta_path = root / "study.json"
    settings = json.loads(json.dumps({"scale": args.scale, "settings": scale}))
    if meta_path.exists() and json.loads(meta_path.read_text())["settings"] != settings:
        parser.error(f"{root} holds a study with other settings; use another --root")
    if not meta_path.exists():
        meta_path.write_text(json.dumps({"settings": settings, "started": time.time()}))
    if args.worker:
        import torch

        torch.set_num_threads(1)
        study.work()
        return 0
    if not args.summarise_only:
        code = run_workers([str(Path(__file__).resolve()), *(argv if argv is not None else sys.argv[1:])],
                           args.workers, root)
        if code:
            return code
    rows = table_rows(root, scale, study.results())
    out_dir = RESULTS if args.scale == "full" else root
    table = out_dir / ("kd_runs_evidence.csv" if args.scale == "full" else "kd_runs_evidence_smoke.csv")
    write_table(rows, table)
    print(f"[evidence] {len(rows)} runs in {table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
