"""train.report_to (JSONL and TensorBoard carry the same scalars) and the model card of a run's model directory."""
import json

import pytest

from pykd.distill import config as run_config

pytest.importorskip("transformers")
from pykd.distill.trainer import Trainer
from tests.kd_fixtures import tiny_csv, tiny_teacher


def _values(tmp_path, output="run", **sections):
    values = {"teacher": {"path": tiny_teacher(tmp_path)},
              "data": {"dataset": tiny_csv(tmp_path, rows=40), "max_length": 16, "eval_fraction": 0.25},
              "train": {"steps": 4, "batch_size": 4, "lr": 1e-3, "eval_every": 2, "log_every": 1,
                        "checkpoint_every": 100, "output_dir": str(tmp_path / output), "progress": False,
                        "report_to": ["jsonl", "tensorboard"]}}
    for section, entries in sections.items():
        values.setdefault(section, {}).update(entries)
    return values


def _scalars(directory) -> dict:
    """{tag: [(step, value), ...]} of the event files under `directory` (tensorboard's EventAccumulator)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _jsonl_scalars(path) -> dict:
    expected = {}
    for record in map(json.loads, path.read_text().splitlines()):
        prefix, numbers = ("eval", record["eval"]) if "eval" in record else ("train", record)
        for name, value in numbers.items():
            if name not in ("step", "final"):
                expected.setdefault(f"{prefix}/{name}", []).append((record["step"], value))
    return expected


def test_tensorboard_scalars_equal_the_jsonl(tmp_path):
    run = tmp_path / "run"
    Trainer(run_config.from_dict(_values(tmp_path)), "finetune").train()
    scalars = _scalars(run / "tensorboard")
    expected = _jsonl_scalars(run / "log.jsonl")
    assert {"train/task", "train/loss", "train/lr", "eval/accuracy", "eval/f1", "eval/mcc"} <= set(expected)
    assert set(scalars) == set(expected) | {"train/examples_per_second"}
    for tag, points in expected.items():
        assert [step for step, _ in scalars[tag]] == [step for step, _ in points], tag
        # event files store float32: equal to the JSONL's float64 after one rounding
        assert all(abs(got - value) <= 2 ** -23 * abs(value) for (_, got), (_, value) in zip(scalars[tag], points)), tag
    throughput = scalars["train/examples_per_second"]
    assert [step for step, _ in throughput] == [1, 2, 3, 4] and all(v > 0 for _, v in throughput)


def test_a_resumed_run_keeps_each_step_once_in_tensorboard(tmp_path):
    config = run_config.from_dict(_values(tmp_path))
    Trainer(config, "finetune").train(stop_after=2)
    Trainer(config, "finetune").train()
    steps = [step for step, _ in _scalars(tmp_path / "run" / "tensorboard")["train/loss"]]
    assert steps == [1, 2, 3, 4]


def test_report_to_refuses_an_unknown_tracker(tmp_path):
    values = _values(tmp_path)
    values["train"]["report_to"] = ["jsonl", "wandb"]
    with pytest.raises(ValueError, match="train.report_to"):
        run_config.from_dict(values)


def test_without_jsonl_no_log_file_is_written(tmp_path):
    values = _values(tmp_path, train={"report_to": ["tensorboard"], "steps": 2})
    Trainer(run_config.from_dict(values), "finetune").train()
    assert not (tmp_path / "run" / "log.jsonl").exists()
    assert "train/loss" in _scalars(tmp_path / "run" / "tensorboard")


def test_the_model_directory_holds_a_hub_model_card_with_the_run_figures(tmp_path):
    from huggingface_hub import ModelCard

    teacher_run = tmp_path / "teacher"
    history = Trainer(run_config.from_dict(_values(tmp_path, "teacher")), "finetune").train()
    values = _values(tmp_path, "student", teacher={"finetuned": str(teacher_run / "model")},
                     student={"num_hidden_layers": 2, "hidden_size": 24, "num_attention_heads": 2,
                              "intermediate_size": 40},
                     losses={"relation": {"relation_heads": 2}})
    history = Trainer(run_config.from_dict(values), "distill").train()
    final = next(r for r in history if r.get("final"))["eval"]
    card = ModelCard.load(tmp_path / "student" / "model" / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and data["base_model"] == str(tmp_path / "teacher")
    # a local file is named in the body, not among the Hub's dataset ids
    assert "datasets" not in data and f"Data: `{values['data']['dataset']}`." in card.text
    assert data["metrics"] == sorted(final) and {"pykd", "knowledge-distillation"} <= set(data["tags"])
    for name, value in final.items():
        assert f"| {name} | {value:.4g} |" in card.text
    from pykd.distill.models import load_pretrained
    from pykd.distill.model_card import count_parameters, forward_flops

    student = load_pretrained(str(tmp_path / "student" / "model"), "classification")
    assert f"| parameters | {count_parameters(student):,} |" in card.text
    flops = forward_flops(student, 16)
    # 2 layers at n = 16 tokens, hidden 24, FFN 40: Q, K, V, O (2 n 4 d^2), the FFN (2 n 2 d f), Q K^T and A V
    # (2 * 2 n^2 d); then the pooler (2 d^2) and the 2-class head (2 d 2); a multiply-add is 2 FLOPs
    assert flops == 2 * (2 * 16 * 4 * 24 * 24 + 2 * 16 * 2 * 24 * 40 + 2 * 2 * 16 * 16 * 24) + 2 * 24 * 24 + 2 * 24 * 2
    assert f"| FLOPs per sequence of 16 tokens | {flops:,} |" in card.text
    assert "relation_heads: 2" in card.text and "AutoModelForSequenceClassification" in card.text
    teacher_card = ModelCard.load(teacher_run / "model" / "README.md")
    assert "fine-tuned from" in teacher_card.text and "Made by `pykd finetune`" in teacher_card.text
    assert "knowledge-distillation" not in teacher_card.data.tags


def test_a_summary_is_one_event_file_that_a_later_summary_replaces(tmp_path):
    from pykd.distill.callbacks import SUMMARY_EVENTS, report_summary

    report_summary(["jsonl"], tmp_path, {"hpo/value": [(0, 1.0)]})
    assert not (tmp_path / "tensorboard").exists()  # jsonl only: the summary's own files
    report_summary(["jsonl", "tensorboard"], tmp_path, {"hpo/value": [(0, 1.0), (1, 0.5)]})
    report_summary(["tensorboard"], tmp_path, {"hpo/value": [(0, 1.0), (1, 0.5), (2, 0.25)], "hpo/best": [(2, 0.25)]})
    assert [p.name for p in (tmp_path / "tensorboard").iterdir()] == [SUMMARY_EVENTS]
    assert _scalars(tmp_path / "tensorboard") == {"hpo/value": [(0, 1.0), (1, 0.5), (2, 0.25)], "hpo/best": [(2, 0.25)]}


def test_the_nas_search_series_follow_the_scoring_order_and_the_front():
    from pykd.nas.search import search_series

    rows = [{"loss": 3.0, "flops": 10, "feasible": False}, {"loss": 2.0, "flops": 30, "feasible": True},
            {"loss": 2.5, "flops": 20, "feasible": True}, {"loss": 1.0, "flops": 50, "feasible": True}]
    series = search_series(rows, front=[rows[3], rows[2], rows[1]])
    assert series["nas/candidate_loss"] == [(0, 3.0), (1, 2.0), (2, 2.5), (3, 1.0)]
    assert series["nas/best_feasible_loss"] == [(1, 2.0), (2, 2.0), (3, 1.0)]
    assert series["nas/pareto_loss_by_flops"] == [(20, 2.5), (30, 2.0), (50, 1.0)]
