"""The demo's report: accuracy, size and CPU latency of teacher and student, learning curves."""
from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from . import data as data_module
from ..loading import reading
from .callbacks import LOG
from .callbacks import read_log as read_records
from .config import RunConfig
from .models import load_pretrained, load_tokenizer


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def cpu_latency_ms(model: nn.Module, batch: dict, repeats: int = 5) -> float:
    """Median wall time of one forward of `batch` in eval mode."""
    model.eval()
    model(**batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(**batch)
        times.append(time.perf_counter() - start)
    return 1000.0 * sorted(times)[len(times) // 2]


def read_log(run_dir) -> list[dict]:
    """The run's log.jsonl records (a line torn by a kill mid-write skipped, as a resumed run does)."""
    path = Path(run_dir) / LOG
    with reading(path, "training log", f"run the training of {run_dir} again"):
        path.stat()  # a missing log is an error here (the report needs one), not an empty history
        return read_records(path, float("inf"))


def final_eval(records: list[dict]) -> dict:
    finals = [r["eval"] for r in records if r.get("final")]
    if not finals:
        raise ValueError("the run's log has no final evaluation: did it finish?")
    return finals[-1]


def plot_curves(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4))
    for axis, (title, records) in zip(axes, runs.items()):
        steps = [r for r in records if "eval" not in r]
        for name in [k for k in steps[0] if k not in ("step", "lr")]:
            axis.plot([r["step"] for r in steps], [r[name] for r in steps], label=name)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _latency_batch(config: RunConfig, tokenizer) -> dict:
    corpus = data_module.load_corpus(config.data.dataset)
    rows = [corpus[i] for i in range(config.train.batch_size)]
    return data_module.Collator(tokenizer, config.data.max_length, "unlabeled")(rows)


def write_report(output, config: RunConfig, teacher_dir, student_dir) -> str:
    output = Path(output)
    teacher_log, student_log = read_log(teacher_dir), read_log(student_dir)
    tokenizer = load_tokenizer(f"{student_dir}/model")
    batch = _latency_batch(config, tokenizer)
    rows = []
    for name, run_dir, records in (("teacher", teacher_dir, teacher_log), ("student", student_dir, student_log)):
        model = load_pretrained(f"{run_dir}/model", config.data.kind)
        rows.append((name, final_eval(records), count_parameters(model), cpu_latency_ms(model.cpu(), batch)))
    plot_curves({"teacher fine-tuning": teacher_log, "distillation": student_log}, output / "learning_curves.png")
    metrics = list(rows[0][1])
    lines = ["# pykd demo report", "",
             f"Task: {config.data.dataset} ({config.data.kind}); student: {config.student.num_hidden_layers} layers, "
             f"hidden {config.student.hidden_size}, {config.student.num_attention_heads} heads, cut from the teacher.",
             f"CPU latency: median forward of a batch of {config.train.batch_size} at max length "
             f"{config.data.max_length}, {torch.get_num_threads()} threads.", "",
             "| model | " + " | ".join(metrics) + " | parameters | CPU ms / batch |",
             "|---" * (len(metrics) + 3) + "|"]
    for name, evaluation, parameters, latency in rows:
        lines.append(f"| {name} | " + " | ".join(f"{evaluation[m]:.4f}" for m in metrics) +
                     f" | {parameters / 1e6:.2f} M | {latency:.1f} |")
    teacher_row, student_row = rows
    lines += ["", f"The student has {student_row[2] / teacher_row[2]:.1%} of the teacher's parameters and runs "
              f"{teacher_row[3] / student_row[3]:.2f}x faster.", "", "![learning curves](learning_curves.png)", ""]
    path = output / "report.md"
    path.write_text("\n".join(lines))
    return str(path)
