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
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from evidence_jobs import Job, Study, claim_settings, mean_and_se, run_workers  # noqa: E402

RESULTS = ROOT / "bench" / "results"
ARCHIVE = RESULTS / "evidence" / "distiller"  # every finished job's result, committed
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
    return {"rotten_tomatoes": str(path), "rows": len(texts), "test": len(test),
            "outputs": ["data/rotten_tomatoes.jsonl"]}


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
    return {"accuracy": final_eval(history)["accuracy"], "outputs": [f"teachers/{dataset}/model"]}


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
    """(dataset, size, student, pipeline, seed) of every run, study 3 first, in groups of one (seed, size)
    over every dataset: a study stopped early has whole leave-one-dataset-out tables to show."""
    wanted = [(d, n, "2x384", p, s) for s in scale["seeds"] for n in scale["sizes"] for d in scale["datasets"]
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
        metas, group = set(), len(scale["datasets"]) * len(PIPELINE_NAMES)
        for index, (dataset, size, student, pipeline, seed) in enumerate(runs_wanted(scale)):
            meta_name = f"meta-{dataset}-n{size}-{student}"
            if meta_name not in metas:
                metas.add(meta_name)
                listed.append(Job(meta_name, lambda d=dataset, n=size, st=student: meta(root, scale, d, n, st),
                                  [f"teacher-{dataset}"], priority=1))
            listed.append(Job(run_job_name(dataset, size, student, pipeline, seed),
                              lambda d=dataset, n=size, st=student, p=pipeline, s=seed: distil(
                                  root, scale, d, n, st, p, s), [meta_name], priority=2 + index // group))
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
        meta_values = results[f"meta-{dataset}-n{size}-{student}"]["meta"]
        # The training rows before augmentation (a run's train_examples counts the augmented copies too).
        setting = setting_name(round(10 ** meta_values["log_train_size"]), student)
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


def seed_means(rows: list[dict]) -> dict[tuple[str, str, str], tuple[float, float, int]]:
    """{(dataset, setting, pipeline): (mean student score, its standard error over seeds, seeds)}."""
    groups = {}
    for row in rows:
        groups.setdefault((row["dataset"], row["setting"], row["pipeline"]), []).append(row["student_score"])
    return {key: (*mean_and_se(values), len(values)) for key, values in groups.items()}


def paired_gain(rows: list[dict], dataset: str, setting: str, treated: str, control: str) -> dict | None:
    """Mean and standard error over seeds of score(treated) - score(control), paired by seed (same data
    order and initialisation), or None where no seed has both."""
    by_seed = {}
    for row in rows:
        if row["dataset"] == dataset and row["setting"] == setting and row["pipeline"] in (treated, control):
            by_seed.setdefault(row["seed"], {})[row["pipeline"]] = row["student_score"]
    differences = [s[treated] - s[control] for s in by_seed.values() if len(s) == 2]
    if not differences:
        return None
    mean, se = mean_and_se(differences)
    return {"dataset": dataset, "setting": setting, "gain": mean, "se": se, "seeds": len(differences)}


def recommender_regrets(table: Path) -> dict:
    """Leave-one-dataset-out regret of every recommender and the baselines (pykd.distiller.recommenders)."""
    from pykd.distiller import autodistiller, recommenders

    runs = autodistiller.read_table(str(table))
    if len({r.dataset for r in runs}) < 2:
        return {}
    rows = recommenders.leave_one_dataset_out(runs)
    names = [*recommenders.RECOMMENDERS, "random"]
    means = recommenders.mean_regrets(rows, names)
    summary = {"per_setting": rows, "mean_regret": {n: {"mean": m, "se": se} for n, (m, se) in means.items()},
               "spread": mean_and_se([r["spread"] for r in rows]), "noise": mean_and_se(
                   [r["noise"] for r in rows if r["noise"] == r["noise"]] or [float("nan")])}
    if len({r.dataset for r in runs}) >= 3:
        nested = recommenders.nested_selection(runs)
        summary["nested_selection"] = {"rows": nested, "mean_regret": mean_and_se([r["selected_regret"]
                                                                                    for r in nested])}
    return summary


def hpo_importances(results: dict) -> dict | None:
    if "hpo" not in results:
        return None
    from distiller_findings import parse_study, stage_importances

    return stage_importances(*parse_study(results["hpo"]["study"]))


def summarise(scale_name: str, scale: dict, results: dict, table: Path) -> dict:
    """The study's entry of evidence.json: rows, seed means, regrets, augmentation's gains, findings."""
    from pykd.distiller.pipeline import INTERMEDIATE_PIPELINES

    rows = [{"dataset": r["dataset"], "setting": r["setting"], "pipeline": r["pipeline"], "kind": "kd",
             "seed": r["seed"], "metric": "accuracy", "value": r["student_score"], "student_score": r["student_score"],
             "ratio": r["ratio"], "eval_examples": int(r["eval_examples"]), "steps": scale["steps"]}
            for r in read_table_rows(table)]
    means = seed_means(rows)
    cells = sorted({(d, s) for d, s, _ in means})
    gains = [g for d, s in cells if (g := paired_gain(rows, d, s, "augment_eda", "prediction_only"))]
    mi_ranks = []
    for dataset, setting in cells:
        scores = {p: means[(dataset, setting, p)][0] for p in INTERMEDIATE_PIPELINES if (dataset, setting, p) in means}
        if "mi_alpha" in scores and len(scores) >= 3:
            mi_ranks.append({"dataset": dataset, "setting": setting, "of": len(scores),
                             "rank": 1 + sum(v > scores["mi_alpha"] for v in scores.values()),
                             "mi_alpha_minus_best_other": scores["mi_alpha"] - max(
                                 v for p, v in scores.items() if p != "mi_alpha")})
    teachers = {name[len("teacher-"):]: r["accuracy"] for name, r in results.items() if name.startswith("teacher-")}
    binomial = {}  # (dataset, setting) -> the binomial standard error of one run's accuracy on its eval set
    for dataset, setting in cells:
        cell = [r for r in rows if (r["dataset"], r["setting"]) == (dataset, setting)]
        accuracy = sum(r["value"] for r in cell) / len(cell)
        binomial[f"{dataset} | {setting}"] = math.sqrt(accuracy * (1 - accuracy) / cell[0]["eval_examples"])
    return {"scale": scale_name, "settings": scale, "rows": rows, "teachers": teachers,
            "summary": [{"dataset": d, "setting": s, "pipeline": p, "mean": m, "se": se, "seeds": n}
                        for (d, s, p), (m, se, n) in sorted(means.items())],
            "regret": recommender_regrets(table) if rows else {}, "augmentation": gains, "mi_alpha_rank": mi_ranks,
            "hpo": hpo_importances(results), "binomial_se": binomial,
            "compute_s": sum(r.get("seconds", 0.0) for r in results.values())}


def read_table_rows(table: Path) -> list[dict]:
    with open(table, newline="") as handle:
        return [{**row, "seed": int(row["seed"]), "student_score": float(row["student_score"]),
                 "ratio": float(row["ratio"])} for row in csv.DictReader(handle)]


def fmt(mean: float, se: float, signed: bool = False) -> str:
    return (f"{mean:+.4f}" if signed else f"{mean:.4f}") + ("" if se != se else f" +- {se:.4f}")


def markdown(summary: dict, command: str) -> str:
    lines = ["# Evidence: Distiller and AutoDistiller (studies 3-4)", "",
             f"Command: `{command}`. Compute so far: {summary['compute_s'] / 3600:.1f} core-hours (jobs' own wall "
             f"times, one thread each); {len(summary['rows'])} KD runs of {summary['settings']['steps']} steps.", "",
             "Teachers (accuracy after fine-tuning): " + ", ".join(f"{d} {a:.4f}" for d, a in
                                                                 sorted(summary["teachers"].items())), "",
             "## Student accuracy per pipeline (mean +- standard error over seeds)", ""]
    pipelines = [p for p in PIPELINE_NAMES if any(r["pipeline"] == p for r in summary["summary"])]
    lines += ["A cell with one seed has no seed standard error; the last column is the binomial standard error "
              "of one run's accuracy on that eval set (a difference between two runs is noise below ~2.8 of it).",
              "", "| dataset | setting | seeds | " + " | ".join(pipelines) + " | binomial SE |",
              "|---|---|---|" + "---|" * len(pipelines) + "---|"]
    cells = {}
    for r in summary["summary"]:
        cells.setdefault((r["dataset"], r["setting"]), {})[r["pipeline"]] = r
    for (dataset, setting), by_pipeline in sorted(cells.items()):
        seeds = max(r["seeds"] for r in by_pipeline.values())
        lines.append(f"| {dataset} | {setting} | {seeds} | " + " | ".join(
            fmt(by_pipeline[p]["mean"], by_pipeline[p]["se"]) if p in by_pipeline else "" for p in pipelines) +
            f" | {summary['binomial_se'][f'{dataset} | {setting}']:.4f} |")
    regret = summary["regret"]
    if regret:
        lines += ["", "## AutoDistiller: leave-one-dataset-out regret (ratio to the teacher; lower is better)", "",
                  "Per held-out (dataset, setting), regret = best pipeline's seed-mean ratio - the picked one's; "
                  "mean +- standard error over the held-out settings.", "",
                  "| recommender or baseline | mean regret |", "|---|---|"]
        for name, value in regret["mean_regret"].items():
            lines.append(f"| {name} | {fmt(value['mean'], value['se'])} |")
        if "nested_selection" in regret:
            nested = regret["nested_selection"]["mean_regret"]
            lines.append(f"| learned, chosen by inner leave-one-out | {fmt(*nested)} |")
        lines += ["", f"Oracle spread (best - worst pipeline): {fmt(*regret['spread'])}; noise (standard error of "
                      f"best - second best): {fmt(*regret['noise'])}."]
    if summary["augmentation"]:
        lines += ["", "## Augmentation's gain (augment_eda - prediction_only, paired by seed)", "",
                  "| dataset | setting | gain | seeds |", "|---|---|---|---|"]
        for g in summary["augmentation"]:
            lines.append(f"| {g['dataset']} | {g['setting']} | {fmt(g['gain'], g['se'], signed=True)} | {g['seeds']} |")
    if summary["mi_alpha_rank"]:
        lines += ["", "## MI-alpha among the intermediate losses (seed means)", "",
                  "| dataset | setting | rank | mi_alpha - best other |", "|---|---|---|---|"]
        for r in summary["mi_alpha_rank"]:
            lines.append(f"| {r['dataset']} | {r['setting']} | {r['rank']} of {r['of']} | "
                         f"{r['mi_alpha_minus_best_other']:+.4f} |")
    if summary["hpo"]:
        h = summary["hpo"]
        lines += ["", f"## Stage importances (fANOVA, {h['trials']} complete trials)", "",
                  ", ".join(f"{stage} {value:.2f}" for stage, value in h["stages"].items())]
    return "\n".join(lines) + "\n"


def write_outputs(summary: dict, out_dir: Path, suffix: str, command: str) -> Path:
    evidence_path = out_dir / f"evidence{suffix}.json"
    evidence = json.loads(evidence_path.read_text()) if evidence_path.exists() else {}
    evidence["distiller"] = summary
    evidence_path.write_text(json.dumps(evidence, indent=1, default=str))
    path = out_dir / f"evidence_distiller{suffix}.md"
    path.write_text(markdown(summary, command))
    return path


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
    archive = ARCHIVE if args.scale == "full" else None
    try:
        claim_settings([root] + ([archive] if archive else []), {"scale": args.scale, "settings": scale}, time.time())
    except ValueError as error:
        parser.error(str(error))
    study = Study(root, plan(root, scale), archive)
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
    suffix = "" if args.scale == "full" else f"_{args.scale}"
    command = "python tools/evidence_distiller.py" + ("" if args.scale == "full" else f" --scale {args.scale}")
    print(write_outputs(summarise(args.scale, scale, study.results(), table), out_dir, suffix, command).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
