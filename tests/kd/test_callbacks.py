"""The Trainer's public extension surface: callbacks (when each event fires, with what) and build_step."""
import json

import pytest
import torch

from pykd.distill import config as run_config

pytest.importorskip("transformers")
from pykd.distill.callbacks import TrainerCallback
from pykd.distill.steps import FinetuneStep, model_inputs
from pykd.distill.trainer import Trainer
from tests.kd_fixtures import tiny_csv, tiny_teacher


class Recorder(TrainerCallback):
    def __init__(self):
        self.events = []

    def on_train_begin(self, trainer):
        self.events.append(("train_begin", trainer.step))

    def on_step_begin(self, trainer, step):
        self.events.append(("step_begin", step))

    def on_step_end(self, trainer, terms):
        self.events.append(("step_end", trainer.step, sorted(terms)))

    def on_log(self, trainer, record):
        self.events.append(("log", record["step"], "eval" in record))

    def on_evaluate(self, trainer, metrics, final):
        self.events.append(("evaluate", trainer.step, final, sorted(metrics)))

    def on_save(self, trainer, path, what):
        self.events.append(("save", trainer.step, what, path.name, path.exists()))

    def on_train_end(self, trainer):
        self.events.append(("train_end", trainer.step))


def _values(tmp_path, **train):
    return {"teacher": {"path": tiny_teacher(tmp_path)},
            "data": {"dataset": tiny_csv(tmp_path, rows=40), "max_length": 16, "eval_fraction": 0.25},
            "train": {"steps": 4, "batch_size": 4, "lr": 1e-3, "eval_every": 2, "log_every": 2,
                      "checkpoint_every": 2, "output_dir": str(tmp_path / "run"), "progress": False, **train}}


def test_events_fire_in_order_with_what_the_run_did(tmp_path):
    recorder = Recorder()
    config = run_config.from_dict(_values(tmp_path))
    history = Trainer(config, "finetune", callbacks=[recorder]).train(stop_after=2)
    metrics = ["accuracy", "f1", "mcc"]
    assert recorder.events == [
        ("train_begin", 0), ("step_begin", 0), ("step_end", 1, ["loss", "task"]),
        ("step_begin", 1), ("step_end", 2, ["loss", "task"]), ("log", 2, False), ("log", 2, True),
        ("evaluate", 2, False, metrics), ("save", 2, "checkpoint", "checkpoint.pt", True),
        ("save", 2, "checkpoint", "checkpoint.pt", True), ("train_end", 2)]
    assert len(history) == 2
    resumed = Recorder()
    Trainer(config, "finetune", callbacks=[resumed]).train()
    assert resumed.events[0] == ("train_begin", 2) and resumed.events[1] == ("step_begin", 2)
    assert resumed.events[-4:] == [("evaluate", 4, True, metrics), ("save", 4, "model", "model", True),
                                   ("save", 4, "checkpoint", "checkpoint.pt", True), ("train_end", 4)]
    # JsonlLog: each step once
    logged = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [(r["step"], "eval" in r) for r in logged] == [(2, False), (2, True), (4, False), (4, True)]


def test_a_callback_exception_ends_the_run(tmp_path):
    class Stop(TrainerCallback):
        def on_evaluate(self, trainer, metrics, final):
            raise RuntimeError(f"stopped at {trainer.step}")

    ended = Recorder()
    with pytest.raises(RuntimeError, match="stopped at 2"):
        Trainer(run_config.from_dict(_values(tmp_path)), "finetune", callbacks=[Stop(), ended]).train()
    assert ("train_end", 2) not in ended.events and ("step_begin", 2) not in ended.events


class ScaledLoss(FinetuneStep):
    """A step of one's own: the model's task loss, doubled."""

    def forward(self, batch):
        loss = 2.0 * self.model(**batch).loss
        return {"doubled": loss.detach()}, loss


def test_build_step_gives_the_run_its_own_step(tmp_path):
    from pykd.distill.models import load_pretrained

    def build(trainer):
        assert trainer.num_labels == 2 and trainer.tokenizer is not None  # the data has loaded
        return ScaledLoss(load_pretrained(trainer.config.teacher.path, "classification", trainer.num_labels))

    with pytest.raises(ValueError, match="mode must be one of"):
        Trainer(run_config.from_dict(_values(tmp_path)), "scaled")
    trainer = Trainer(run_config.from_dict(_values(tmp_path)), "scaled", build_step=build)
    history = trainer.train()
    assert "doubled" in history[0] and [r for r in history if r.get("final")]
    assert (tmp_path / "run" / "model" / "config.json").exists()
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["mode"] == "scaled"
    batch = trainer.collate([trainer.train_set[0]])
    assert set(model_inputs(batch)) == {"input_ids", "attention_mask", "token_type_ids"}
