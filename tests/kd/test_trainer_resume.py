"""The trainer loses nothing: signals, kills, refused resumes, safe checkpoints, checks before training."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from pykd.distill import config as run_config

transformers = pytest.importorskip("transformers")
from tests.kd_fixtures import tiny_csv, tiny_teacher
from pykd.distill.checkpoint import read_checkpoint
from pykd.distill.trainer import Trainer

STEPS = 40


def _unlabeled(tmp_path, output, **train):
    """Task-agnostic KD of a tiny teacher (no fine-tuning needed); dropout on, so RNG state matters."""
    return {"teacher": {"path": tiny_teacher(tmp_path)},
            "data": {"dataset": tiny_csv(tmp_path), "kind": "unlabeled", "max_length": 20, "eval_fraction": 0.2},
            "student": {"num_hidden_layers": 2, "hidden_size": 24, "num_attention_heads": 2, "intermediate_size": 40},
            "losses": {"prediction": {"type": "none"}, "relation": {"relation_heads": 2},
                       "mi": {"bound": "alpha"}},
            "train": {"steps": STEPS, "batch_size": 8, "lr": 1e-3, "eval_every": 100, "log_every": 3,
                      "checkpoint_every": 10, "output_dir": str(tmp_path / output), "progress": False, **train}}


def _records(log):
    try:
        lines = log.read_text().splitlines()
    except FileNotFoundError:
        return []
    records = []
    for line in lines:
        with contextlib.suppress(json.JSONDecodeError):  # the line being written
            records.append(json.loads(line))
    return records


def _last_logged_step(log) -> int:
    return max([r["step"] for r in _records(log) if "eval" not in r], default=0)


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def _distill(config_path, output_dir, stop_at=None, signum=None, launcher=(sys.executable,)):
    """`pykd distill` in a subprocess; with stop_at, sends `signum` once a step >= stop_at is logged.
    Returns (exit code, stderr)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(output_dir.parent / f"{output_dir.name}.stderr", "w+") as stderr:
        process = subprocess.Popen([*launcher, "-m", "pykd.cli", "distill", str(config_path)],
                                   stdout=subprocess.DEVNULL, stderr=stderr, env=env)
        deadline = time.monotonic() + 600
        while stop_at is not None and _last_logged_step(output_dir / "log.jsonl") < stop_at:
            assert process.poll() is None, f"the run ended before step {stop_at}"
            assert time.monotonic() < deadline, "the run made no progress"
            time.sleep(0.005)
        if stop_at is not None:
            process.send_signal(signum)
        process.wait(timeout=600)
        stderr.seek(0)
        return process.returncode, stderr.read()


def _checkpoint_step(output_dir) -> int:
    return torch.load(output_dir / "checkpoint.pt", weights_only=True)["step"]


@pytest.mark.slow  # five CLI processes: about 30 s on an idle 2-core machine
def test_sigterm_sigint_and_a_kill_lose_no_step_and_log_each_step_once(tmp_path):
    """SIGTERM, resume, SIGINT, resume, SIGKILL (steps logged after the last checkpoint), resume: the
    parameters are bit-equal to an uninterrupted run's and the log is that run's log, line for line."""
    from concurrent.futures import ThreadPoolExecutor

    straight, chain = tmp_path / "straight", tmp_path / "chain"
    (tmp_path / "straight.yaml").write_text(json.dumps(_unlabeled(tmp_path, "straight")))
    path = tmp_path / "chain.yaml"
    path.write_text(json.dumps(_unlabeled(tmp_path, "chain")))  # (re)writes the teacher and data: before any run
    uninterrupted = ThreadPoolExecutor(1).submit(_distill, tmp_path / "straight.yaml", straight)  # beside the chain

    code, stderr = _distill(path, chain, stop_at=3, signum=signal.SIGTERM)
    first = _checkpoint_step(chain)
    assert code == 143 and f"stopped by SIGTERM after step {first}" in stderr, stderr
    assert 3 <= first < STEPS

    code, stderr = _distill(path, chain, stop_at=first + 3, signum=signal.SIGINT)
    second = _checkpoint_step(chain)
    assert code == 130 and f"stopped by SIGINT after step {second}" in stderr, stderr
    assert first < second < STEPS

    periodic = (second // 10 + 1) * 10  # the next checkpoint_every boundary
    code, _ = _distill(path, chain, stop_at=periodic + 3, signum=signal.SIGKILL)
    assert code == -signal.SIGKILL and _checkpoint_step(chain) == periodic < _last_logged_step(chain / "log.jsonl")

    assert _distill(path, chain)[0] == 0
    code, stderr = uninterrupted.result()
    assert code == 0, stderr[-3000:]
    expected, resumed = (torch.load(d / "checkpoint.pt", weights_only=True)["model"] for d in (straight, chain))
    assert expected.keys() == resumed.keys()
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), key
    steps = [r["step"] for r in _records(chain / "log.jsonl") if "eval" not in r]
    assert steps == list(range(3, STEPS, 3)) + [STEPS]
    assert _records(chain / "log.jsonl") == _records(straight / "log.jsonl")


@pytest.mark.slow  # two torchrun jobs
def test_sigterm_to_torchrun_stops_every_rank_after_the_same_step(tmp_path):
    """torchrun forwards the signal to each rank at its own moment; the ranks agree on one step."""
    path = tmp_path / "ddp.yaml"
    path.write_text(json.dumps(_unlabeled(tmp_path, "ddp", batch_size=4)))
    _code, stderr = _distill(path, tmp_path / "ddp", stop_at=3, signum=signal.SIGTERM, launcher=TORCHRUN)
    step = _checkpoint_step(tmp_path / "ddp")
    assert stderr.count(f"stopped by SIGTERM after step {step};") == 2, stderr[-3000:]
    assert _distill(path, tmp_path / "ddp", launcher=TORCHRUN)[0] == 0
    steps = [r["step"] for r in _records(tmp_path / "ddp" / "log.jsonl") if "eval" not in r]
    assert steps == list(range(3, STEPS, 3)) + [STEPS]


def _stopped_run(tmp_path, **train):
    """A run stopped (with a checkpoint) after 2 steps, and its config values."""
    values = _unlabeled(tmp_path, "run", steps=4, log_every=1, **train)
    Trainer(run_config.from_dict(values), "distill").train(stop_after=2)
    return values


def _with(values, **sections):
    changed = json.loads(json.dumps(values))
    for section, entries in sections.items():
        changed[section].update(entries)
    return changed


def test_resume_with_a_different_config_is_refused_naming_the_keys(tmp_path):
    values = _stopped_run(tmp_path)
    changed = _with(values, train={"batch_size": 4, "lr": 2e-3}, data={"max_length": 16})
    trainer = Trainer(run_config.from_dict(changed), "distill")
    with pytest.raises(ValueError) as error:
        trainer.train()
    message = str(error.value)
    assert str(tmp_path / "run" / "checkpoint.pt") in message and "train.resume=false" in message
    for key in ("data.max_length (20 -> 16)", "train.batch_size (8 -> 4)", "train.lr (0.001 -> 0.002)"):
        assert key in message
    assert "log_every" not in message
    # Logging, evaluation and checkpoint periods, the step count and the progress bar may change.
    allowed = _with(values, train={"log_every": 2, "eval_every": 50, "checkpoint_every": 7, "steps": 3,
                                   "progress": False})
    history = Trainer(run_config.from_dict(allowed), "distill").train()
    assert [r["step"] for r in history if "eval" not in r] == [1, 2, 3]


def test_a_student_of_another_shape_is_refused(tmp_path):
    values = _stopped_run(tmp_path)
    changed = _with(values, student={"intermediate_size": 32})
    with pytest.raises(ValueError, match=r"student.intermediate_size \(40 -> 32\)"):
        Trainer(run_config.from_dict(changed), "distill").train()


def test_unreadable_or_truncated_checkpoints_name_the_file_and_the_way_out(tmp_path):
    values = _stopped_run(tmp_path)
    path = tmp_path / "run" / "checkpoint.pt"
    whole = path.read_bytes()
    for broken in (whole[: len(whole) // 2], b"", b"not a checkpoint"):
        path.write_bytes(broken)
        with pytest.raises(ValueError, match=r"unreadable") as error:
            Trainer(run_config.from_dict(values), "distill").train()
        assert str(path) in str(error.value) and "delete it" in str(error.value)
        assert "train.resume=false" in str(error.value)
    torch.save({"step": 2, "model": {}}, path)  # readable, but not this version's checkpoint
    with pytest.raises(ValueError, match="is not a checkpoint of this pykd version"):
        read_checkpoint(path)


class _RunsCode:
    """Unpickling this calls exec: what a malicious checkpoint carries."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('code ran')",)


def test_a_checkpoint_carrying_a_pickled_object_is_refused_and_runs_nothing(tmp_path):
    values = _stopped_run(tmp_path)
    path = tmp_path / "run" / "checkpoint.pt"
    state = torch.load(path, weights_only=True)  # what pykd writes reads safely
    assert state["format"] == 2 and state["step"] == 2
    marker = tmp_path / "marker"
    state["rng"]["python"] = _RunsCode(marker)
    torch.save(state, path)
    with pytest.raises(ValueError, match="holds objects other than tensors and plain values") as error:
        Trainer(run_config.from_dict(values), "distill").train()
    assert str(path) in str(error.value) and "exec" in str(error.value)
    assert not marker.exists()


def test_a_finished_run_resumed_does_nothing_and_a_fresh_start_clears_the_log(tmp_path):
    values = _unlabeled(tmp_path, "run", steps=2, log_every=1)
    first = Trainer(run_config.from_dict(values), "distill").train()
    assert Trainer(run_config.from_dict(values), "distill").train() == first
    afresh = _with(values, train={"resume": False, "steps": 1})
    Trainer(run_config.from_dict(afresh), "distill").train()
    steps = [r["step"] for r in _records(tmp_path / "run" / "log.jsonl")]
    assert steps == [1, 1]  # step 1, then its final evaluation


# ---- checked before training ----

def test_an_unwritable_output_dir_fails_before_training(tmp_path):
    (tmp_path / "a_file").write_text("")
    values = _unlabeled(tmp_path, "a_file/run")
    with pytest.raises(ValueError, match=r"train.output_dir .*a_file/run' is not a writable directory"):
        Trainer(run_config.from_dict(values), "distill")


def test_max_length_beyond_the_model_positions_fails_before_training(tmp_path):
    values = _with(_unlabeled(tmp_path, "run"), data={"max_length": 65})  # tiny_teacher has 64 positions
    with pytest.raises(ValueError, match="data.max_length 65 exceeds the 64 positions of the bert model"):
        Trainer(run_config.from_dict(values), "distill")


def _labeled_csv(tmp_path, labels, name="labels.csv"):
    path = tmp_path / name
    texts = ["good movie", "bad plot", "fine actor", "dull fun", "superb", "awful", "great plot", "boring"]
    path.write_text("text,label\n" + "".join(f"{texts[i % len(texts)]} {i},{label}\n" for i, label in
                                             enumerate(labels)))
    return str(path)


def _finetune_values(tmp_path, dataset, **data):
    return {"teacher": {"path": tiny_teacher(tmp_path)},
            "data": {"dataset": dataset, "max_length": 16, "eval_fraction": 0.25, **data},
            "train": {"steps": 1, "batch_size": 4, "eval_every": 100, "output_dir": str(tmp_path / "teacher_run"),
                      "progress": False}}


def test_string_labels_train_as_sorted_classes_named_in_the_model_config(tmp_path, capsys):
    dataset = _labeled_csv(tmp_path, ["pos", "neg", "neutral", "pos"] * 4)
    Trainer(run_config.from_dict(_finetune_values(tmp_path, dataset)), "finetune").train()
    assert "labels ['neg', 'neutral', 'pos'] are mapped to classes 0..2" in capsys.readouterr().err
    saved = transformers.AutoConfig.from_pretrained(tmp_path / "teacher_run" / "model")
    assert saved.id2label == {0: "neg", 1: "neutral", 2: "pos"} and saved.label2id["pos"] == 2


@pytest.mark.parametrize("labels, message", [
    (["yes"] * 8, r"classification needs at least 2 classes, the labels hold only \['yes'\]"),
    ([0.5, 1.0] * 4, r"row 0 holds 0.5; for real-valued targets set data.kind regression"),
])
def test_bad_classification_labels_fail_before_training(tmp_path, labels, message):
    dataset = _labeled_csv(tmp_path, labels)
    with pytest.raises(ValueError, match=message):
        Trainer(run_config.from_dict(_finetune_values(tmp_path, dataset)), "finetune")


def test_a_regression_eval_split_of_one_example_fails_before_training(tmp_path):
    dataset = _labeled_csv(tmp_path, [0.5, 1.5] * 4)
    values = _finetune_values(tmp_path, dataset, kind="regression", max_eval_examples=1)
    with pytest.raises(ValueError, match=r"the eval split has 1 example\(s\), a regression evaluation needs 2"):
        Trainer(run_config.from_dict(values), "finetune")


def test_a_teacher_fine_tuned_on_other_classes_fails_before_training(tmp_path):
    Trainer(run_config.from_dict(_finetune_values(tmp_path, _labeled_csv(tmp_path, ["neg", "pos"] * 8))),
            "finetune").train()
    other = _labeled_csv(tmp_path, ["neg", "neutral", "pos"] * 6, name="three.csv")
    values = _finetune_values(tmp_path, other)
    values["teacher"]["finetuned"] = str(tmp_path / "teacher_run" / "model")
    values["train"]["output_dir"] = str(tmp_path / "student_run")
    with pytest.raises(ValueError, match=r"predicts 2 classes \['neg', 'pos'\], but data.dataset .*three.csv' has 3 "
                                         r"classes \['neg', 'neutral', 'pos'\]: fine-tune the teacher on this data"):
        Trainer(run_config.from_dict(values), "distill")
