"""The KD trainer end to end on tiny models: fine-tune, distil, resume exactly, DDP, CLI, data."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pykd.distill import config as run_config

transformers = pytest.importorskip("transformers")
from tests.kd_fixtures import tiny_csv, tiny_teacher
from pykd.distill.trainer import Trainer


def _values(tmp_path, dataset, output, **sections):
    values = {"teacher": {"path": tiny_teacher(tmp_path)},
              "data": {"dataset": dataset, "max_length": 20, "eval_fraction": 0.2},
              "student": {"num_hidden_layers": 2, "hidden_size": 24, "num_attention_heads": 2, "intermediate_size": 40},
              "losses": {"relation": {"relation_heads": 2}, "hidden": {"include_embeddings": True}},
              "train": {"steps": 6, "batch_size": 8, "lr": 1e-3, "eval_every": 3, "log_every": 1,
                        "checkpoint_every": 100, "output_dir": str(tmp_path / output), "progress": False}}
    for section, entries in sections.items():
        values.setdefault(section, {}).update(entries)
    return values


def _final_state(output_dir):
    return torch.load(os.path.join(output_dir, "checkpoint.pt"))["model"]


def test_finetune_then_distil_logs_every_term(tmp_path):
    dataset = tiny_csv(tmp_path)
    Trainer(run_config.from_dict(_values(tmp_path, dataset, "teacher")), "finetune").train()
    teacher_model = str(tmp_path / "teacher" / "model")
    values = _values(tmp_path, dataset, "student", teacher={"finetuned": teacher_model},
                     losses={"relation": {"relation_heads": 2, "relations": ["qk", "vv"]},
                             "mi": {"bound": "alpha", "alpha": 0.9},
                             "prediction": {"hard_weight": 0.5}})
    history = Trainer(run_config.from_dict(values), "distill").train()
    steps = [r for r in history if "eval" not in r]
    assert {"prediction", "hard_label", "hidden", "relation", "mi", "loss", "lr"} <= set(steps[-1])
    final = next(r for r in history if r.get("final"))["eval"]
    assert set(final) == {"accuracy", "f1", "mcc"}
    logged = [json.loads(line) for line in Path(tmp_path / "student" / "log.jsonl").read_text().splitlines()]
    assert logged == json.loads(json.dumps(history))
    saved = tmp_path / "student" / "model"
    student = transformers.AutoModelForSequenceClassification.from_pretrained(saved)
    assert student.config.num_hidden_layers == 2 and (saved / "pykd_objective.pt").exists()
    assert any(k.startswith("mi.teacher_critics") for k in torch.load(saved / "pykd_objective.pt"))

    from pykd.distill.report import write_report

    report = Path(write_report(tmp_path, run_config.from_dict(values), tmp_path / "teacher",
                               tmp_path / "student")).read_text()
    assert "| model | accuracy | f1 | mcc | parameters | CPU ms / batch |" in report
    assert f"| student | {final['accuracy']:.4f} |" in report
    assert (tmp_path / "learning_curves.png").stat().st_size > 0


def test_task_specific_kd_needs_a_finetuned_teacher(tmp_path):
    with pytest.raises(ValueError, match="needs a teacher fine-tuned on the task"):
        Trainer(run_config.from_dict(_values(tmp_path, tiny_csv(tmp_path), "student")), "distill")


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    dataset = tiny_csv(tmp_path)
    Trainer(run_config.from_dict(_values(tmp_path, dataset, "teacher")), "finetune").train()
    extra = dict(teacher={"finetuned": str(tmp_path / "teacher" / "model")},
                 losses={"relation": {"relation_heads": 2}, "mi": {"bound": "alpha"}},
                 train={"steps": 6, "batch_size": 8, "lr": 1e-3, "grad_accum": 2, "eval_every": 100, "progress": False,
                        "log_every": 1, "checkpoint_every": 100})
    straight = _values(tmp_path, dataset, "straight", **extra)
    straight["train"]["output_dir"] = str(tmp_path / "straight")
    Trainer(run_config.from_dict(straight), "distill").train()
    interrupted = dict(straight, train=dict(straight["train"], output_dir=str(tmp_path / "interrupted")))
    Trainer(run_config.from_dict(interrupted), "distill").train(stop_after=3)
    assert torch.load(tmp_path / "interrupted" / "checkpoint.pt")["step"] == 3
    Trainer(run_config.from_dict(interrupted), "distill").train()
    expected, resumed = _final_state(tmp_path / "straight"), _final_state(tmp_path / "interrupted")
    assert expected.keys() == resumed.keys()
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), key


def test_regression_task_reports_correlations(tmp_path):
    dataset = tiny_csv(tmp_path, regression=True)
    values = _values(tmp_path, dataset, "teacher", data={"dataset": dataset, "kind": "regression", "max_length": 20})
    history = Trainer(run_config.from_dict(values), "finetune").train()
    assert set(history[-1]["eval"]) == {"pearson", "spearman"}


def test_task_agnostic_kd_on_python_docs(tmp_path):
    values = _values(tmp_path, "pydocs", "agnostic",
                     data={"dataset": "pydocs", "kind": "unlabeled", "max_length": 24, "max_train_examples": 64,
                           "max_eval_examples": 16},
                     losses={"prediction": {"type": "none"}, "relation": {"relation_heads": 2,
                                                                          "relations": ["qq", "kk", "vv"]}})
    history = Trainer(run_config.from_dict(values), "distill").train()
    final = next(r for r in history if r.get("final"))["eval"]
    assert set(final) == {"hidden", "relation", "loss"}
    assert transformers.AutoModel.from_pretrained(tmp_path / "agnostic" / "model").config.num_hidden_layers == 2


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "pykd.cli", *args], capture_output=True, text=True, env=env)


def test_cli_rejects_unknown_keys(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  stepz: 3\n")
    done = _cli("distill", str(path))
    assert done.returncode == 2 and "unknown config key(s) ['train.stepz']" in done.stderr
    assert _cli("config").stdout.startswith("teacher:")


def test_cli_without_the_kd_extra_says_what_to_install():
    script = "import sys; sys.modules['yaml'] = None; from pykd.cli import main; sys.exit(main(['config']))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 2
    assert "needs `pip install 'pykd-distill[kd]'` (module 'yaml' is missing)" in done.stderr


def test_ddp_on_two_gloo_ranks_equals_one_process_on_the_global_batch(tmp_path):
    """torchrun + the CLI: 2 ranks x batch 4 take the SGD steps of 1 process x batch 8.

    The runs differ only in the order each gradient component is summed (4 examples per rank, then
    the all-reduce, vs 8 in one process). After T plain SGD steps the updates u = p_T - p_0 agree
    to gamma(m) ||u|| (fp32, m = batch x length x teacher width: a component's longest chain of
    sums, over tokens and then features), plus the rounding of storing p_T (T u |p_T| per run).
    Bounds are norm-wise against the whole update: a component that is zero in exact arithmetic
    (the key biases) is rounding of terms of the others' scale. SGD keeps the update linear in the
    gradient; Adam divides such a component by its own size and so magnifies its rounding.
    """
    from tests.fp_bounds import UNIT_ROUNDOFF, gamma

    dataset = tiny_csv(tmp_path)
    Trainer(run_config.from_dict(_values(tmp_path, dataset, "teacher")), "finetune").train()
    values = _values(tmp_path, dataset, "unused", teacher={"finetuned": str(tmp_path / "teacher" / "model")},
                     student={"num_hidden_layers": 2, "hidden_size": 24, "num_attention_heads": 2,
                              "intermediate_size": 40, "dropout": 0.0},
                     losses={"relation": {"relation_heads": 2}, "mi": {"bound": "alpha", "samples": "examples"},
                             "hidden": {"type": "mse"}})
    path = tmp_path / "ddp.yaml"
    path.write_text(json.dumps(values))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    steps = 3
    common = [f"train.steps={steps}", "train.eval_every=100", "train.optimizer=sgd", "train.lr=0.5"]
    single = _cli("distill", str(path), "--set", f"train.output_dir={tmp_path / 'one'}", "--set", "train.batch_size=8",
                  *(arg for c in common for arg in ("--set", c)), env=env)
    assert single.returncode == 0, single.stderr[-3000:]
    ranks = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            "-m", "pykd.cli", "distill", str(path), "--set", f"train.output_dir={tmp_path / 'two'}",
                            "--set", "train.batch_size=4", *(arg for c in common for arg in ("--set", c))],
                           capture_output=True, text=True, env=env)
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    one, two = _final_state(tmp_path / "one"), _final_state(tmp_path / "two")
    initial = Trainer(run_config.from_dict(dict(values, train=dict(values["train"], output_dir=str(tmp_path / "x")))),
                      "distill").step_module.state_dict()
    updates = {key: one[key].double() - initial[key].double() for key in one}
    differences = {key: (two[key].double() - one[key].double()) for key in one}
    update_norm = float(torch.cat([u.flatten() for u in updates.values()]).norm())
    summation = gamma(8 * values["data"]["max_length"] * 48) * update_norm
    storage = {key: 2 * steps * UNIT_ROUNDOFF[torch.float32] * float(one[key].double().norm()) for key in one}
    for key, difference in differences.items():
        assert float(difference.norm()) <= summation + storage[key], key
    total = float(torch.cat([d.flatten() for d in differences.values()]).norm())
    assert total <= summation + sum(storage.values())
    moved = sum(int(float(u.norm()) > storage[key]) for key, u in updates.items())
    assert moved > len(one) // 2


def test_batches_read_by_a_worker_process_train_the_same_model(tmp_path):
    """train.num_workers moves reading and padding off the training thread, nothing else: the same
    batches in the same order, so the same weights as the run that reads them itself."""
    dataset = tiny_csv(tmp_path)
    finals = []
    for workers in (0, 1):
        values = _values(tmp_path, dataset, f"workers{workers}", train={"num_workers": workers, "steps": 4,
                                                                      "eval_every": 100})
        trainer = Trainer(run_config.from_dict(values), "finetune")
        trainer.train()
        assert "input_ids" in trainer.train_set.column_names  # tokenized once, before the first step
        assert trainer.input_wait_s > 0
        first = trainer.micro_batch(0, 0)  # what the loop read at step 0, by the public accessor
        assert first["input_ids"].shape[0] == 8 and first["labels"].dtype == torch.long
        finals.append(_final_state(tmp_path / f"workers{workers}"))
    assert finals[0].keys() == finals[1].keys()
    for key in finals[0]:
        assert torch.equal(finals[0][key], finals[1][key]), key


def test_negative_num_workers_is_refused_when_the_config_loads(tmp_path):
    values = _values(tmp_path, "x.csv", "bad", train={"num_workers": -1})
    with pytest.raises(ValueError, match="train.num_workers"):
        run_config.from_dict(values)
