"""The same short distillation through `pykd distill` (pykd's Trainer) and through
pykd.integrations.transformers.DistillationTrainer: the loss terms of step 1 and the time per step.

    .venv/bin/python tools/trainer_parity.py [--steps 20] [--batch-size 16] [--max-length 64] [--output DIR]

Teacher: the packaged all-MiniLM-L6-v2 with a (random, seeded) 2-class head standing in for a fine-tuned
one; student: the default 3 layers x 192 cut from it, dropout 0 (so both runs compute the same forward);
losses: the default prediction (soft CE, T = 2), hidden (MSE, skip mapping) and relation (QK + VV, KL)
terms; rotten_tomatoes, first --max-train examples. Both runs start from the same student and learned
parts (the transformers run loads pykd's initial state) and read the same batches in the same order
(pykd's epoch-0 permutation, its collator, a sequential sampler). The time per step is the mean over
steps 2.. of the wall time of one optimiser step, measured by a callback on each side.
Writes DIR/trainer_parity.json (default bench/results) and prints a markdown table.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _step_seconds(starts: list[float], ends: list[float]) -> float:
    durations = [end - start for start, end in zip(starts, ends)][1:]  # step 1 pays one-off costs
    return sum(durations) / len(durations)


def pykd_run(values: dict):
    """(the Trainer, its history, seconds per step, the initial student and objective states)."""
    from pykd.distill import config as run_config
    from pykd.distill.callbacks import TrainerCallback
    from pykd.distill.trainer import Trainer

    class Clock(TrainerCallback):
        starts, ends = [], []

        def on_step_begin(self, trainer, step):
            self.starts.append(time.perf_counter())

        def on_step_end(self, trainer, terms):
            self.ends.append(time.perf_counter())

    clock = Clock()
    trainer = Trainer(run_config.from_dict(values), "distill", callbacks=[clock])
    initial = (copy.deepcopy(trainer.step_module.student.state_dict()),
               copy.deepcopy(trainer.step_module.objective.state_dict()))
    history = trainer.train()
    return trainer, history, _step_seconds(clock.starts, clock.ends), initial


def transformers_run(trainer, initial, output: Path):
    """The same run through DistillationTrainer: (its log history, seconds per step)."""
    import torch
    import transformers

    from pykd.distill.models import build_student, load_pretrained
    from pykd.integrations.transformers import DistillationTrainer

    config = trainer.config
    teacher = load_pretrained(config.teacher.finetuned, config.data.kind, trainer.num_labels)
    student = build_student(teacher, config.student)
    student.load_state_dict(initial[0])
    train = config.train
    # pykd's Trainer visits epoch 0 in the permutation drawn from train.seed (pykd.distill.trainer's data order)
    order = torch.randperm(len(trainer.train_set), generator=torch.Generator().manual_seed(train.seed)).tolist()
    rows = [trainer.train_set[i] for i in order[: train.steps * train.batch_size]]

    class Clock(transformers.TrainerCallback):
        starts, ends = [], []

        def on_step_begin(self, args, state, control, **kwargs):
            self.starts.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    clock = Clock()
    args = transformers.TrainingArguments(
        output_dir=str(output), max_steps=train.steps, per_device_train_batch_size=train.batch_size,
        learning_rate=train.lr, weight_decay=train.weight_decay, max_grad_norm=train.clip_norm,
        warmup_steps=max(1, int(train.warmup_fraction * train.steps)), lr_scheduler_type="linear", logging_steps=1,
        train_sampling_strategy="sequential", remove_unused_columns=False, save_strategy="no", eval_strategy="no",
        report_to=[], use_cpu=True, disable_tqdm=True, seed=train.seed)
    hf = DistillationTrainer(model=student, teacher=teacher, losses=config.losses, task_kind=config.data.kind,
                             args=args, train_dataset=rows, data_collator=trainer.collate, callbacks=[clock])
    hf.kd_loss.objective.load_state_dict(initial[1])
    hf.train()
    return hf.state.log_history, _step_seconds(clock.starts, clock.ends)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--max-train", type=int, default=2000)
    parser.add_argument("--output", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args(argv)
    import torch

    from pykd.distill.models import load_pretrained, load_tokenizer

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        torch.manual_seed(0)
        teacher_dir = scratch / "teacher"
        load_pretrained("minilm-l6", "classification", 2).save_pretrained(teacher_dir)
        load_tokenizer("minilm-l6").save_pretrained(teacher_dir)
        values = {"teacher": {"finetuned": str(teacher_dir)}, "student": {"dropout": 0.0},
                  "data": {"max_length": args.max_length, "max_train_examples": args.max_train},
                  "train": {"steps": args.steps, "batch_size": args.batch_size, "log_every": 1,
                            "eval_every": 10 ** 6, "checkpoint_every": 10 ** 6, "progress": False,
                            "autocast": "none", "output_dir": str(scratch / "pykd")}}
        trainer, history, pykd_seconds, initial = pykd_run(values)
        hf_history, hf_seconds = transformers_run(trainer, initial, scratch / "hf")
    first = next(r for r in history if r.get("step") == 1)
    hf_first = next(r for r in hf_history if r.get("step") == 1 and "loss" in r)
    last = next(r for r in history if r.get("step") == args.steps and "eval" not in r)
    hf_last = next(r for r in hf_history if r.get("step") == args.steps and "loss" in r)
    names = [n for n in first if n not in ("step", "lr")]
    result = {"steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length,
              "threads": torch.get_num_threads(),
              "step_1": {n: {"pykd": first[n], "DistillationTrainer": hf_first[n]} for n in names},
              f"step_{args.steps}": {n: {"pykd": last[n], "DistillationTrainer": hf_last[n]} for n in names},
              "seconds_per_step": {"pykd": pykd_seconds, "DistillationTrainer": hf_seconds}}
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "trainer_parity.json").write_text(json.dumps(result, indent=1))
    print(f"| term | step 1 pykd distill | step 1 DistillationTrainer | step {args.steps} pykd | "
          f"step {args.steps} DistillationTrainer |")
    print("|---|---|---|---|---|")
    for n in names:
        print(f"| {n} | {first[n]:.6f} | {hf_first[n]:.6f} | {last[n]:.6f} | {hf_last[n]:.6f} |")
    print(f"\nseconds per step (steps 2..{args.steps}, {torch.get_num_threads()} threads): pykd {pykd_seconds:.3f}, "
          f"DistillationTrainer {hf_seconds:.3f} (ratio {hf_seconds / pykd_seconds:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
