"""pykd.integrations.transformers.DistillationTrainer on the packaged teacher: a few steps with gradient
accumulation, step evaluation, checkpoints and load_best_model_at_end; the logged terms, TensorBoard through
report_to, and the saved student with its model card."""
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
datasets = pytest.importorskip("datasets")
from pykd.distill.config import StudentConfig
from pykd.distill.models import build_student, load_pretrained, load_tokenizer
from pykd.integrations.transformers import DistillationTrainer
from tests.kd_fixtures import tiny_csv

LOSSES = {"relation": {"relation_heads": 4}, "hidden": {"mapping": "uniform"}}


def _tokenized(tokenizer, path, rows):
    table = datasets.load_dataset("csv", data_files=path, split="train").select(range(rows))
    return table.map(lambda b: tokenizer(b["text"], truncation=True, max_length=16), batched=True,
                     remove_columns=["text"])


def _accuracy(prediction):
    logits, labels = prediction
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


def test_a_few_steps_log_every_term_and_save_the_student_with_a_card(tmp_path):
    from huggingface_hub import ModelCard

    tokenizer = load_tokenizer("minilm-l6")
    teacher = load_pretrained("minilm-l6", "classification", num_labels=2)
    student = build_student(teacher, StudentConfig(num_hidden_layers=2, hidden_size=96, num_attention_heads=3,
                                                   intermediate_size=192, dropout=0.0))
    data = tiny_csv(tmp_path, rows=40)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=4, per_device_eval_batch_size=8,
        gradient_accumulation_steps=2, learning_rate=1e-3, logging_steps=1, eval_strategy="steps", eval_steps=2,
        save_strategy="steps", save_steps=2, load_best_model_at_end=True, metric_for_best_model="accuracy",
        report_to=["tensorboard"], use_cpu=True, disable_tqdm=True, seed=0)
    trainer = DistillationTrainer(model=student, teacher=teacher, losses=LOSSES, teacher_name="minilm-l6", args=args,
                                  train_dataset=_tokenized(tokenizer, data, 32),
                                  eval_dataset=_tokenized(tokenizer, data, 8),
                                  data_collator=transformers.DataCollatorWithPadding(tokenizer),
                                  processing_class=tokenizer, compute_metrics=_accuracy)
    learned = {id(p) for p in trainer.kd_loss.parameters()}
    assert learned  # the hidden-state projections 96 -> 384
    projection = [p.clone() for p in trainer.kd_loss.parameters()]
    trainer.train()
    held = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert learned <= held and all(not torch.equal(a, b) for a, b in zip(projection, trainer.kd_loss.parameters()))

    steps = [entry for entry in trainer.state.log_history if "loss" in entry and "prediction" in entry]
    assert [entry["step"] for entry in steps] == [1, 2, 3, 4]
    for entry in steps:  # weights 1: the Trainer's loss (mean over the micro-batches) is the terms' sum
        total = entry["prediction"] + entry["hidden"] + entry["relation"]
        assert abs(entry["loss"] - total) <= 1e-5 * total
    assert trainer.state.best_model_checkpoint is not None
    assert [e["eval_accuracy"] for e in trainer.state.log_history if "eval_accuracy" in e]
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert (checkpoint / "pykd_objective.pt").exists() and (checkpoint / "README.md").exists()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = [EventAccumulator(str(path.parent)) for path in (tmp_path / "run").rglob("events.out.tfevents.*")]
    tags = set().union(*(set(e.Reload().Tags()["scalars"]) for e in events))
    assert {"train/prediction", "train/hidden", "train/relation", "train/loss"} <= tags

    final = tmp_path / "student"
    trainer.save_model(str(final))
    saved = transformers.AutoModelForSequenceClassification.from_pretrained(final)
    assert saved.config.num_hidden_layers == 2 and saved.config.hidden_size == 96
    assert sum(p.numel() for p in saved.parameters()) == sum(p.numel() for p in student.parameters())
    assert set(torch.load(final / "pykd_objective.pt")) == set(trainer.kd_loss.objective.state_dict())
    card = ModelCard.load(final / "README.md")
    assert card.data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert card.data.library_name == "transformers" and "accuracy" in card.data.metrics
    best = next(e for e in trainer.state.log_history if "eval_accuracy" in e
                and e["step"] == trainer.state.best_global_step)  # the weights load_best_model_at_end kept
    assert f"| accuracy | {best['eval_accuracy']:.4g} |" in card.text
    assert f"| loss | {best['eval_loss']:.4g} |" in card.text
    assert "relation_heads: 4" in card.text

    # resuming loads the checkpoint's learned parts into a fresh loss module
    resumed = DistillationTrainer(model=student, teacher=teacher, losses=LOSSES, args=args,
                                  train_dataset=_tokenized(tokenizer, data, 32),
                                  eval_dataset=_tokenized(tokenizer, data, 8),
                                  data_collator=transformers.DataCollatorWithPadding(tokenizer),
                                  processing_class=tokenizer, compute_metrics=_accuracy)
    saved_parts = torch.load(tmp_path / "run" / "checkpoint-4" / "pykd_objective.pt")
    assert any(not torch.equal(v, saved_parts[k]) for k, v in resumed.kd_loss.objective.state_dict().items())
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-4"))
    # nothing was left to train; load_best_model_at_end then loaded the best checkpoint, with its parts
    assert resumed.state.global_step == 4 and resumed.state.best_model_checkpoint == trainer.state.best_model_checkpoint
    best_parts = torch.load(Path(resumed.state.best_model_checkpoint) / "pykd_objective.pt")
    assert all(torch.equal(v, best_parts[k]) for k, v in resumed.kd_loss.objective.state_dict().items())


def test_an_optimizer_without_the_learned_parts_is_refused(tmp_path):
    teacher = load_pretrained("minilm-l6", "classification", num_labels=2)
    student = build_student(teacher, StudentConfig(num_hidden_layers=1, hidden_size=96, num_attention_heads=3,
                                                   intermediate_size=192))
    optimizer = torch.optim.AdamW(student.parameters())
    trainer = DistillationTrainer(model=student, teacher=teacher, losses={"relation": {"relations": []}},
                                  optimizers=(optimizer, None),
                                  args=transformers.TrainingArguments(str(tmp_path), use_cpu=True, report_to=[]))
    with pytest.raises(ValueError, match="lacks 2 of the loss module's 2 learned parameters"):
        trainer.create_optimizer()


def test_bf16_on_cpu_trains_with_finite_terms(tmp_path):
    """TrainingArguments(bf16=True): the Trainer's autocast; the terms are fp32 (the objective upcasts)."""
    teacher = load_pretrained("minilm-l6", "classification", num_labels=2)
    student = build_student(teacher, StudentConfig(num_hidden_layers=1, hidden_size=96, num_attention_heads=3,
                                                   intermediate_size=192))
    tokenizer = load_tokenizer("minilm-l6")
    args = transformers.TrainingArguments(str(tmp_path), max_steps=2, per_device_train_batch_size=4, logging_steps=1,
                                          bf16=True, use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True)
    trainer = DistillationTrainer(model=student, teacher=teacher, losses=LOSSES, args=args,
                                  train_dataset=_tokenized(tokenizer, tiny_csv(tmp_path, rows=16), 8),
                                  data_collator=transformers.DataCollatorWithPadding(tokenizer))
    trainer.train()
    logged = [e for e in trainer.state.log_history if "relation" in e]
    assert len(logged) == 2 and all(torch.isfinite(torch.tensor(e["loss"])) for e in logged)


def test_a_missing_extra_is_named(monkeypatch):
    import importlib
    import sys

    monkeypatch.setitem(sys.modules, "accelerate", None)  # import accelerate now raises ModuleNotFoundError
    monkeypatch.delitem(sys.modules, "pykd.integrations.transformers", raising=False)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'pykd-distill\[transformers\]'.*'accelerate'"):
        importlib.import_module("pykd.integrations.transformers")


DDP_SCRIPT = """
import sys, torch, transformers
from pykd.distill.config import StudentConfig
from pykd.distill.models import build_student
from pykd.integrations.transformers import DistillationTrainer

out = sys.argv[1]
config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=48, max_position_embeddings=32, num_labels=2)
config._attn_implementation = "sdpa"
torch.manual_seed(0)
teacher = transformers.BertForSequenceClassification(config)
student = build_student(teacher, StudentConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2,
                                               intermediate_size=24, dropout=0.0))
generator = torch.Generator().manual_seed(1)
rows = [{"input_ids": torch.randint(1, 50, (8,), generator=generator),
         "attention_mask": torch.ones(8, dtype=torch.long),
         "labels": int(torch.randint(0, 2, (), generator=generator))} for _ in range(32)]
args = transformers.TrainingArguments(out, max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                                      logging_steps=1, use_cpu=True, ddp_backend="gloo", report_to=[],
                                      save_strategy="no", disable_tqdm=True, seed=0)
trainer = DistillationTrainer(model=student, teacher=teacher, losses={"relation": {"relation_heads": 2}},
                              args=args, train_dataset=rows)
trainer.train()
rank = torch.distributed.get_rank()
torch.save({"kd": trainer.kd_loss.state_dict(), "student": student.state_dict(),
            "logs": [e for e in trainer.state.log_history if "hidden" in e]}, f"{out}/rank{rank}.pt")
"""


@pytest.mark.slow
def test_torchrun_ddp_keeps_the_learned_parts_equal_on_every_rank(tmp_path):
    """Two gloo ranks see different batches: without averaging, the projections' updates would differ."""
    import os
    import subprocess
    import sys

    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(tmp_path)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    zero, one = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert zero["kd"].keys() == one["kd"].keys() and zero["kd"]
    for key in zero["kd"]:
        assert torch.equal(zero["kd"][key], one["kd"][key]), key
    for key in zero["student"]:
        assert torch.equal(zero["student"][key], one["student"][key]), key
    assert [e["hidden"] for e in zero["logs"]] == [e["hidden"] for e in one["logs"]]  # means over the ranks


def test_cached_teacher_logits_skip_the_teacher_forward(tmp_path):
    """A teacher_logits column (pykd's teacher cache, or computed once by the user) reaches the loss with
    remove_unused_columns=False; an objective that needs only the logits then runs no teacher forward."""
    tokenizer = load_tokenizer("minilm-l6")
    teacher = load_pretrained("minilm-l6", "classification", num_labels=2)
    student = build_student(teacher, StudentConfig(num_hidden_layers=1, hidden_size=96, num_attention_heads=3,
                                                   intermediate_size=192))
    rows = _tokenized(tokenizer, tiny_csv(tmp_path, rows=16), 8)
    with torch.no_grad():
        logits = [teacher(input_ids=torch.tensor([r["input_ids"]])).logits[0].tolist() for r in rows]
    rows = rows.add_column("teacher_logits", logits)
    calls = []
    teacher.register_forward_hook(lambda *args: calls.append(1))
    args = transformers.TrainingArguments(str(tmp_path), max_steps=2, per_device_train_batch_size=4, logging_steps=1,
                                          remove_unused_columns=False, use_cpu=True, report_to=[],
                                          save_strategy="no", disable_tqdm=True)
    trainer = DistillationTrainer(model=student, teacher=teacher, args=args, train_dataset=rows,
                                  losses={"hidden": {"type": "none"}, "relation": {"relations": []}},
                                  data_collator=transformers.DataCollatorWithPadding(tokenizer))
    trainer.train()
    assert calls == [] and len([e for e in trainer.state.log_history if "prediction" in e]) == 2
