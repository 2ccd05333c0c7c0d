"""The trainer's input path: the share of a training step spent waiting for its batch (issue 17, item 5).

    pytest bench/test_input_pipeline_bench.py      (part of `make bench`; PYKD_BENCH_TINY=1 for a quick check)

Task-agnostic distillation of the packaged MiniLM-L6 teacher into its 2-layer slice (hidden MSE and
the relation losses, pykd's default) on the pydocs corpus, batch 32, 128 tokens, fp32 on the CPU.
Three ways to feed the same steps, measured in one run:

- tokenize: each batch tokenized on the training thread (what the trainer did before issue 17);
- pretokenized: token ids computed once before the first step (datasets' map), the batch padded on
  the training thread (what the trainer does with train.num_workers: 0);
- worker: the same, read and padded by one DataLoader worker process ahead of the step
  (train.num_workers: 1; on a GPU, pinned memory and non_blocking copies as well).

The figure is Trainer.input_wait_s over the wall time of the steps after the first (warm-up).
Writes bench/results/input_pipeline.{json,csv,md}.
"""
import os
import time

import pytest
from conftest import write_table

from pykd.distill.callbacks import TrainerCallback

pytest.importorskip("transformers")

TINY = os.environ.get("PYKD_BENCH_TINY") == "1"
BATCH, LENGTH, STEPS = (4, 32, 3) if TINY else (32, 128, 12)
VARIANTS = ("tokenize", "pretokenized", "worker")
MEASURED: dict[str, dict] = {}


def _trainer(variant: str, output_dir):
    from pykd.distill import config as run_config
    from pykd.distill.data import TOKEN_FIELDS
    from pykd.distill.trainer import Trainer

    values = {"teacher": {"path": "minilm-l6"}, "student": {"num_hidden_layers": 2},
              "losses": {"prediction": {"type": "none"}},
              "data": {"dataset": "pydocs", "kind": "unlabeled", "max_length": LENGTH, "max_train_examples": 2000,
                       "max_eval_examples": 8},
              "train": {"steps": STEPS, "batch_size": BATCH, "eval_every": 10_000, "log_every": 10_000,
                        "checkpoint_every": 10_000, "progress": False, "output_dir": str(output_dir),
                        "num_workers": 1 if variant == "worker" else 0}}
    trainer = Trainer(run_config.from_dict(values), "distill")
    if variant == "tokenize":  # text rows only: the collator tokenizes each batch, as before
        trainer.train_set = trainer.train_set.remove_columns(
            [name for name in TOKEN_FIELDS if name in trainer.train_set.column_names])
    return trainer


class StepClock(TrainerCallback):
    """Per step: its wall time and the trainer's input wait during it."""

    def __init__(self):
        self.steps: list[tuple[float, float]] = []

    def on_step_begin(self, trainer, step):
        self.started, self.waited = time.perf_counter(), trainer.input_wait_s

    def on_step_end(self, trainer, terms):
        self.steps.append((time.perf_counter() - self.started, trainer.input_wait_s - self.waited))


@pytest.mark.parametrize("variant", VARIANTS)
def test_input_share_of_a_step(variant, tmp_path):
    trainer, clock = _trainer(variant, tmp_path / variant), StepClock()
    trainer.add_callback(clock)
    trainer.train(stop_after=STEPS - 1)  # the last step would also evaluate and save the model
    measured = clock.steps[1:]  # the first step warms up (and waits for the worker to start)
    wall, waited = sum(w for w, _ in measured), sum(i for _, i in measured)
    MEASURED[variant] = {"variant": variant, "steps": len(measured), "step_ms": 1e3 * wall / len(measured),
                         "input_ms": 1e3 * waited / len(measured), "input_share": waited / wall}


def test_input_pipeline_report():
    if set(MEASURED) != set(VARIANTS):
        pytest.skip("the three variants did not all run in this session")
    rows = [MEASURED[v] for v in VARIANTS]
    lines = [f"Trainer input path, task-agnostic KD of MiniLM-L6 into 2 layers, batch {BATCH} x {LENGTH} tokens, fp32 "
             "CPU: time the training thread waited for its batch (Trainer.input_wait_s) per step.", "",
             "| feeding | step ms | waiting for the batch ms | share of the step |", "|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['step_ms']:.0f} | {r['input_ms']:.1f} | {r['input_share']:.1%} |" for r in rows]
    write_table("input_pipeline", rows, "\n".join(lines) + "\n")
    assert MEASURED["pretokenized"]["input_ms"] < MEASURED["tokenize"]["input_ms"]
