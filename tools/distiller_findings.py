"""Distiller's three findings, measured on pykd's KD runs table and HPO studies.

    .venv/bin/python tools/distiller_findings.py [--table pykd/distiller/data/kd_runs.csv]
        [--study sqlite:///runs/hpo-x/study.db@pykd-hpo ...] [--output bench/results/distiller_findings.md]

(1) Which stage matters most: Optuna's fANOVA importances of each study (parameters drawn in every
    trial), summed per stage (augmentation, prediction loss, intermediate loss, optimisation).
(2) MI-alpha against the other intermediate losses: every (dataset, setting) of the table, the
    student score of each intermediate-loss pipeline, MI-alpha's rank among them.
(3) Augmentation's gain against dataset size and student size: score(augment_eda) -
    score(prediction_only) per (dataset, setting), which differ only in the augmentation stage.

Scores are single runs; each table gives the binomial standard error of an accuracy at the eval
set's size, sqrt(p (1 - p) / n_eval), so a difference smaller than about two of them is noise.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pykd.distiller.pipeline import INTERMEDIATE_PIPELINES, STAGES  # noqa: E402



def read_rows(path: str) -> list[dict]:
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "setting" not in rows[0]:
        raise ValueError(f"{path}: no KD runs with a setting column (regenerate with `pykd runs-table`)")
    return rows


def by_setting(rows: list[dict]) -> dict[tuple[str, str], dict[str, dict]]:
    groups = defaultdict(dict)
    for row in rows:
        groups[(row["dataset"], row["setting"])][row["pipeline"]] = row
    return dict(sorted(groups.items()))


def standard_error(row: dict) -> float:
    """Binomial standard error of the row's accuracy (nan for other metrics)."""
    if row["metric"] != "accuracy":
        return float("nan")
    p, n = float(row["student_score"]), int(row["eval_examples"])
    return math.sqrt(max(p * (1 - p), 1.0 / n) / n)


def _setting_key(setting: str) -> tuple[int, str]:
    size = re.search(r"n=(\d+)", setting)
    return (int(size[1]) if size else 0, setting)


# ---- (1) stage importances ----

def stage_importances(url: str, name: str) -> dict:
    """fANOVA importances of one study's parameters (those drawn in every complete trial), per stage."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=name, storage=url)
    except KeyError:  # optuna's message is only "Record does not exist."
        raise ValueError(f"no study named {name!r} in {url}") from None
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < 4:
        raise ValueError(f"study {name} ({url}) has {len(complete)} complete trials; importances need at least 4")
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    params = optuna.importance.get_param_importances(study, evaluator=evaluator)
    stages = {stage: sum(params.get(p, 0.0) for p in members) for stage, members in STAGES.items()}
    values = [t.value for t in complete]
    return {"study": name, "trials": len(complete), "params": params, "stages": stages,
            "best": max(values), "worst": min(values), "dataset": study.user_attrs.get("pykd_dataset", "")}


def importance_markdown(results: list[dict]) -> str:
    stages = list(STAGES)
    lines = ["| study | complete trials | metric range | " + " | ".join(stages) + " | parameters (fANOVA) |",
             "|---|---|---|" + "---|" * len(stages) + "---|"]
    for r in results:
        params = ", ".join(f"{k} {v:.2f}" for k, v in r["params"].items())
        lines.append(f"| {r['study']} | {r['trials']} | {r['worst']:.4f} to {r['best']:.4f} | "
                     + " | ".join(f"{r['stages'][s]:.2f}" for s in stages) + f" | {params} |")
    return "\n".join(lines) + "\n"


# ---- (2) MI-alpha against the other intermediate losses ----

def intermediate_markdown(groups: dict) -> str:
    present = [p for p in INTERMEDIATE_PIPELINES if any(p in g for g in groups.values())]
    lines = ["| dataset | setting | " + " | ".join(present) + " | std. error | mi_alpha's rank |",
             "|---|---|" + "---|" * len(present) + "---|---|"]
    ranks = []
    for (dataset, setting), runs in groups.items():
        if "mi_alpha" not in runs or sum(p in runs for p in present) < 3:
            continue
        scores = {p: float(runs[p]["student_score"]) for p in present if p in runs}
        rank = 1 + sum(s > scores["mi_alpha"] for s in scores.values())
        ranks.append((rank, len(scores)))
        cells = [f"{scores[p]:.4f}" if p in scores else "" for p in present]
        lines.append(f"| {dataset} | {setting} | " + " | ".join(cells) +
                     f" | {standard_error(runs['mi_alpha']):.4f} | {rank} of {len(scores)} |")
    if ranks:
        lines.append(f"\nMI-alpha's mean rank: {sum(r for r, _ in ranks) / len(ranks):.2f} "
                     f"(of {sum(n for _, n in ranks) / len(ranks):.1f} pipelines; ties share the better rank).")
    return "\n".join(lines) + "\n"


# ---- (3) augmentation gain against dataset size and student size ----

def augmentation_markdown(groups: dict) -> str:
    lines = ["| dataset | setting | prediction_only | augment_eda | gain | std. error of the gain |",
             "|---|---|---|---|---|---|"]
    gains = defaultdict(list)
    for (dataset, setting), runs in sorted(groups.items(), key=lambda item: (item[0][0], _setting_key(item[0][1]))):
        if "augment_eda" not in runs or "prediction_only" not in runs:
            continue
        plain, augmented = float(runs["prediction_only"]["student_score"]), float(runs["augment_eda"]["student_score"])
        error = math.hypot(standard_error(runs["prediction_only"]), standard_error(runs["augment_eda"]))
        lines.append(f"| {dataset} | {setting} | {plain:.4f} | {augmented:.4f} | {augmented - plain:+.4f} | "
                     f"{error:.4f} |")
        size, student = setting.split(" ")
        gains[size].append(augmented - plain)
        gains[student].append(augmented - plain)
    if gains:
        lines.append("\n| setting part | mean gain | runs |\n|---|---|---|")
        for part, values in sorted(gains.items(), key=lambda item: _setting_key(item[0])):
            lines.append(f"| {part} | {sum(values) / len(values):+.4f} | {len(values)} |")
    return "\n".join(lines) + "\n"


def parse_study(text: str) -> tuple[str, str]:
    url, _, name = text.rpartition("@")
    if not url or not name:
        raise argparse.ArgumentTypeError(f"--study takes STORAGE_URL@STUDY_NAME, got {text!r}")
    return url, name


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--table", default=str(ROOT / "pykd" / "distiller" / "data" / "kd_runs.csv"))
    parser.add_argument("--study", action="append", type=parse_study, default=[],
                        help="STORAGE_URL@STUDY_NAME of a pykd hpo study (repeatable)")
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "distiller_findings.md"))
    args = parser.parse_args(argv)
    try:
        groups = by_setting(read_rows(args.table))
        importances = [stage_importances(url, name) for url, name in args.study]
    except (OSError, ValueError) as error:
        parser.error(str(error))
    sections = []
    if importances:
        sections.append("## (1) Stage importances (fANOVA over each study's complete trials)\n\n"
                        + importance_markdown(importances))
    sections.append("## (2) MI-alpha against the other intermediate losses (student score)\n\n"
                    + intermediate_markdown(groups))
    sections.append("## (3) Augmentation's gain (augment_eda - prediction_only)\n\n" + augmentation_markdown(groups))
    text = f"# Distiller's findings on pykd's runs\n\nFrom `{Path(args.table).name}`" + \
        (f" and the studies {json.dumps([name for _, name in args.study])}" if args.study else "") + ".\n\n" + \
        "\n".join(sections)
    Path(args.output).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
