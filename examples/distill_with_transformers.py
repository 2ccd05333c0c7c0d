"""Distil a BERT-family classifier with pykd inside the transformers Trainer, or with pykd.KDLoss in a plain loop.

    python examples/distill_with_transformers.py [--teacher DIR] [--data rotten_tomatoes|FILE.csv]
        [--loop trainer|plain] [--steps 100] [--output runs/hf-kd]

--teacher is a fine-tuned classifier (`pykd finetune`'s output/model, or any AutoModelForSequenceClassification
directory or Hub id); the default, the packaged all-MiniLM-L6-v2 with a fresh 2-class head, only shows the
mechanics. The student (3 layers, hidden 192, 6 heads) is cut from the teacher. Losses: soft cross-entropy,
hidden-state MSE through a learned projection, QK + VV attention relations. The data are read by pykd
(`data.dataset` names: a built-in corpus or a local csv/json/jsonl file with text and label columns).
Prints the loss terms as it trains and the final accuracy; writes the student to OUTPUT/student.
"""
import argparse
import itertools

import numpy as np
import torch
import transformers

import pykd
from pykd.distill.config import DataConfig, StudentConfig
from pykd.distill.data import load_splits
from pykd.distill.models import build_student, load_pretrained, load_tokenizer

LOSSES = {"prediction": {"temperature": 2.0}, "hidden": {"type": "mse"},
          "relation": {"relations": ["qk", "vv"], "relation_heads": 6}}


def accuracy(prediction):
    logits, labels = prediction
    return {"accuracy": float((np.argmax(logits, -1) == labels).mean())}


def with_trainer(teacher, student, tokenizer, train, evaluation, args):
    from pykd.integrations.transformers import DistillationTrainer

    trainer = DistillationTrainer(
        model=student, teacher=teacher, losses=LOSSES,
        args=transformers.TrainingArguments(
            args.output, max_steps=args.steps, per_device_train_batch_size=16, learning_rate=2e-4,
            warmup_steps=0.1, logging_steps=max(1, args.steps // 10), eval_strategy="steps",
            eval_steps=max(1, args.steps // 2), save_steps=max(1, args.steps // 2), save_total_limit=1,
            load_best_model_at_end=True, metric_for_best_model="accuracy", report_to=args.report_to,
            disable_tqdm=True),
        train_dataset=train, eval_dataset=evaluation, processing_class=tokenizer,
        data_collator=transformers.DataCollatorWithPadding(tokenizer), compute_metrics=accuracy)
    trainer.train()
    trainer.save_model(f"{args.output}/student")  # student, pykd_objective.pt, README.md (the model card)
    print(f"accuracy {trainer.evaluate()['eval_accuracy']:.4f}")


def plain_loop(teacher, student, tokenizer, train, evaluation, args):
    kd = pykd.KDLoss(teacher, student, LOSSES)
    optimizer = torch.optim.AdamW([*student.parameters(), *kd.parameters()], lr=2e-4)
    collate = transformers.DataCollatorWithPadding(tokenizer)
    loader = torch.utils.data.DataLoader(train, batch_size=16, shuffle=True, collate_fn=collate)
    student.train()
    for step, batch in zip(range(1, args.steps + 1), itertools.cycle(loader)):
        out = kd(batch)  # out.loss: the weighted total; out.terms: each term
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        if step % max(1, args.steps // 10) == 0:
            print(f"step {step}: loss {float(out.loss):.4f}, " +
                  ", ".join(f"{name} {float(value):.4f}" for name, value in out.terms.items()), flush=True)
    student.eval()
    with torch.no_grad():
        batches = torch.utils.data.DataLoader(evaluation, batch_size=64, collate_fn=collate)
        right = sum(int((student(**{k: v for k, v in b.items() if k != "labels"}).logits.argmax(-1)
                         == b["labels"]).sum()) for b in batches)
    student.save_pretrained(f"{args.output}/student")
    tokenizer.save_pretrained(f"{args.output}/student")
    print(f"accuracy {right / len(evaluation):.4f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", default="minilm-l6")
    parser.add_argument("--data", default="rotten_tomatoes")
    parser.add_argument("--loop", choices=("trainer", "plain"), default="trainer")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--max-train", type=int, default=2000)
    parser.add_argument("--report-to", nargs="*", default=[], help="the Trainer's trackers, e.g. tensorboard")
    parser.add_argument("--output", default="runs/hf-kd")
    args = parser.parse_args(argv)

    splits = load_splits(DataConfig(dataset=args.data, max_train_examples=args.max_train, max_eval_examples=200),
                         seed=0)
    tokenizer = load_tokenizer(args.teacher)

    def tokenized(rows):
        rows = rows.map(lambda b: tokenizer(b["text"], truncation=True, max_length=64), batched=True)
        return rows.select_columns(["input_ids", "attention_mask", "token_type_ids", "label"])

    teacher = load_pretrained(args.teacher, "classification", len(splits.label_names))
    student = build_student(teacher, StudentConfig(num_hidden_layers=3, hidden_size=192, num_attention_heads=6))
    run = with_trainer if args.loop == "trainer" else plain_loop
    run(teacher, student, tokenizer, tokenized(splits.train), tokenized(splits.eval), args)


if __name__ == "__main__":
    main()
