"""`pykd runs-table`: the table of real KD runs AutoDistiller learns from, and its leave-one-dataset-out regret.

    pykd runs-table [--datasets rotten_tomatoes,chatterbot_topics,...] [--pipelines default,prediction_only,...]
        [--finetune-steps 150] [--distill-steps 60] [--max-train 500,2000]
        [--students "layers=2,hidden=192,heads=6,ffn=768;..."] [--teacher-train 4000] [--max-eval 300]
        [--output runs/kd_runs.csv] [--regret PATH] [--runs runs/kd_runs]

(also `python -m pykd.distiller.runs_table`). For each dataset: fine-tune the teacher (packaged MiniLM-L6
by default) on up to --teacher-train examples, then for each setting (a training size of --max-train
times a student of --students) compute the meta-features (pykd.distiller.autodistiller), distil the
student with every pipeline of PIPELINES (pykd.distiller.pipeline) and append one row per run: dataset,
setting, pipeline, its params (pipeline dimension values), meta-features, teacher and student scores
(accuracy, or Pearson r for regression), ratio = student / teacher, seconds. Rows already in the CSV are
skipped, so a killed run resumes (its trainers resume from their checkpoints too). Each invocation adds
its command, date, machine and versions to <output stem>.provenance.json. Then the leave-one-dataset-out
evaluation is written to --regret (default <output stem>_regret.md) and printed.

`pykd recommend --table PATH` learns from such a table; without --table it uses the one shipped in
the package (pykd/distiller/data/kd_runs.csv, its provenance beside it), made by this command.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from ..distill import config as run_config
from . import autodistiller
from .pipeline import PIPELINES, pipeline_values

DATASETS = ("rotten_tomatoes", "chatterbot_topics", "reuters_grain", "fortunes")
COLUMNS = ("dataset", "setting", "pipeline", "params", *autodistiller.META_FEATURES, "metric", "teacher_score",
           "student_score", "ratio", "eval_examples", "seconds")


def dataset_values(args, dataset: str, output_dir: Path, max_train: int, student: str | None) -> dict:
    from pykd.distill.corpora import CORPORA

    kind = CORPORA[dataset].kind if dataset in CORPORA else "classification"
    return {"teacher": {"path": args.teacher}, "data": {"dataset": dataset, "kind": kind,
                                                        "max_length": args.max_length, "eval_fraction": 0.2,
                                                        "max_train_examples": max_train,
                                                        "max_eval_examples": args.max_eval},
            "student": autodistiller.parse_student(student),
            "train": {"steps": args.finetune_steps, "batch_size": args.batch_size, "lr": args.finetune_lr,
                      "eval_every": 10 ** 6, "log_every": 10, "checkpoint_every": 10 ** 6,
                      "output_dir": str(output_dir), "progress": False, "seed": args.seed}}


def dataset_label(dataset: str) -> str:
    """The table's name of a dataset: a built-in name as is, a file as <folder>_<stem>."""
    path = Path(dataset)
    return f"{path.parent.name}_{path.stem}" if path.suffix else dataset


def final_score(history: list[dict], metric: str) -> float:
    return float([r for r in history if r.get("final")][-1]["eval"][metric])


def setting_name(max_train: int, student: dict) -> str:
    """"n=500 student=2x192": the training size and the student's layers x hidden size."""
    return f"n={max_train} student={student['num_hidden_layers']}x{student['hidden_size']}"


def done_rows(path: Path) -> set[tuple[str, str, str]]:
    if not path.is_file():
        return set()
    with open(path, newline="") as handle:
        return {(row["dataset"], row["setting"], row["pipeline"]) for row in csv.DictReader(handle)}


def append_row(path: Path, row: dict) -> None:
    new = not path.is_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow(row)


def run_dataset(args, dataset: str, pipelines: list[str], done: set) -> None:
    from pykd.distill.trainer import Trainer

    label = dataset_label(dataset)
    root = Path(args.runs) / label
    teacher_values = dataset_values(args, dataset, root / "teacher", args.teacher_train, None)  # no student in it
    config = run_config.from_dict(teacher_values)
    metric = "pearson" if config.data.kind == "regression" else "accuracy"
    started = time.perf_counter()
    teacher_score = final_score(Trainer(config, "finetune").train(), metric)
    print(f"[kd-runs] {label}: teacher {metric} {teacher_score:.4f} ({time.perf_counter() - started:.0f} s)",
          flush=True)
    for max_train in args.max_train:
        for student in args.students:
            base = dataset_values(args, dataset, root / "unused", max_train, student)
            setting = setting_name(max_train, run_config.from_dict(base).student.__dict__)
            todo = [name for name in pipelines if (label, setting, name) not in done]
            if todo:
                run_setting(base, root, label, setting, todo, metric, teacher_score, args)


def run_setting(base: dict, root: Path, label: str, setting: str, pipelines: list[str], metric: str,
                teacher_score: float, args) -> None:
    """Distils `pipelines` under one setting of the dataset whose runs live in `root` (its fine-tuned
    teacher in root/teacher, each run in root/<setting>/<pipeline>)."""
    from pykd.distill.trainer import Trainer

    directory = root / setting.replace(" ", "_").replace("=", "")
    base["teacher"]["finetuned"] = str(root / "teacher" / "model")
    base["teacher"]["cache_logits"] = True
    base["train"].update(steps=args.distill_steps, lr=args.distill_lr)
    meta = autodistiller.meta_features(run_config.from_dict(base))
    for name in pipelines:
        values = pipeline_values(base, PIPELINES[name])
        values["train"]["output_dir"] = str(directory / name)
        started = time.perf_counter()
        trainer = Trainer(run_config.from_dict(values), "distill")
        student_score = final_score(trainer.train(), metric)
        seconds = time.perf_counter() - started
        ratio = student_score / teacher_score if teacher_score > 0 else float("nan")
        append_row(Path(args.output), {"dataset": label, "setting": setting, "pipeline": name,
                                       "params": json.dumps(PIPELINES[name]), **meta, "metric": metric,
                                       "teacher_score": teacher_score, "student_score": student_score,
                                       "ratio": ratio, "eval_examples": len(trainer.eval_set),
                                       "seconds": round(seconds, 1)})
        print(f"[kd-runs] {label} / {setting} / {name}: student {metric} {student_score:.4f}, ratio {ratio:.4f} "
              f"({seconds:.0f} s)", flush=True)


def evaluate(table: str, regret: str | None = None) -> str:
    runs = autodistiller.read_table(table)
    markdown = autodistiller.regret_markdown(autodistiller.leave_one_dataset_out(runs))
    path = Path(regret) if regret else Path(table).with_name(Path(table).stem + "_regret.md")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown)
    print(markdown, flush=True)
    return str(path)


def provenance_path(table) -> Path:
    """Where a table's provenance lies: <stem>.provenance.json beside it."""
    return Path(table).with_name(Path(table).stem + ".provenance.json")


def machine() -> str:
    """The machine a table was made on, as the provenance says it: CPU, cores, accelerator."""
    import torch

    device = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.platform()}{device}"


def record_provenance(table: str, argv: list[str], rows_before: int) -> None:
    """Adds this invocation (command, date, machine, pykd and library versions, rows it added) to the table's
    provenance file, written whole (a temporary file renamed into place)."""
    import sklearn
    import torch
    import transformers

    from .. import __version__

    path = provenance_path(table)
    record = json.loads(path.read_text()) if path.is_file() else {"table": Path(table).name, "made_by": []}
    record["made_by"].append({
        "command": "pykd runs-table " + shlex.join(argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(), "pykd": __version__,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "scikit-learn": sklearn.__version__},
        "rows_added": len(done_rows(Path(table))) - rows_before})
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(partial, path)


def main(argv=None, default_output: str = "runs/kd_runs.csv") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="pykd runs-table", description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated data.dataset values")
    parser.add_argument("--pipelines", default=",".join(PIPELINES), help=f"comma-separated, of {list(PIPELINES)}")
    parser.add_argument("--teacher", default="minilm-l6")
    parser.add_argument("--students", default="layers=2,hidden=192,heads=6,ffn=768",
                        help="';'-separated students, each layers=L,hidden=H,heads=A,ffn=F")
    parser.add_argument("--finetune-steps", type=int, default=150)
    parser.add_argument("--finetune-lr", type=float, default=5e-5)
    parser.add_argument("--distill-steps", type=int, default=60)
    parser.add_argument("--distill-lr", type=float, default=2e-4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--max-train", default="1000", help="comma-separated training sizes (one setting each)")
    parser.add_argument("--teacher-train", type=int, default=None,
                        help="examples the teacher is fine-tuned on (default: the largest --max-train)")
    parser.add_argument("--max-eval", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=default_output, help="the table (CSV); rows already there are kept")
    parser.add_argument("--regret", help="the leave-one-dataset-out table (default: <output stem>_regret.md)")
    parser.add_argument("--runs", default="runs/kd_runs")
    parser.add_argument("--evaluate-only", action="store_true", help="only the leave-one-dataset-out table")
    args = parser.parse_args(argv)
    try:
        args.max_train = [int(n) for n in args.max_train.split(",")]
        args.students = args.students.split(";")
        for student in args.students:
            autodistiller.parse_student(student)
    except ValueError as error:
        parser.error(f"--max-train takes comma-separated integers and --students ';'-separated students: {error}")
    if args.teacher_train is None:
        args.teacher_train = max(args.max_train)
    pipelines = args.pipelines.split(",")
    unknown = [p for p in pipelines if p not in PIPELINES]
    if unknown:
        parser.error(f"unknown pipeline(s) {unknown}; known: {list(PIPELINES)}")
    started = time.perf_counter()
    if not args.evaluate_only:
        done = done_rows(Path(args.output))
        try:
            for dataset in args.datasets.split(","):
                run_dataset(args, dataset, pipelines, done)
        finally:  # the rows a killed or failed invocation added are in the table: say where they came from
            if Path(args.output).is_file():
                record_provenance(args.output, argv, len(done))
        print(f"[kd-runs] table {args.output} in {time.perf_counter() - started:.0f} s", flush=True)
    print(f"[kd-runs] regret table: {evaluate(args.output, args.regret)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
