"""Runs that go wrong stop clearly (issue 21, section 4): a loss or gradient norm turning NaN stops the run
before the step is applied, keeping the last checkpoint; a second run on a busy output directory is refused."""
import json
import math
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
from pykd.distill.cache import DirectoryInUse
from pykd.distill.callbacks import TrainerCallback
from pykd.distill.stopping import NonFiniteTraining
from pykd.distill.trainer import Trainer


def _values(tmp_path, output="run", **train):
    """Task-agnostic KD of a tiny teacher: no fine-tuning needed."""
    return {"teacher": {"path": tiny_teacher(tmp_path)},
            "data": {"dataset": tiny_csv(tmp_path), "kind": "unlabeled", "max_length": 20, "eval_fraction": 0.2},
            "student": {"num_hidden_layers": 2, "hidden_size": 24, "num_attention_heads": 2, "intermediate_size": 40},
            "losses": {"prediction": {"type": "none"}, "relation": {"relation_heads": 2}},
            "train": {"steps": 6, "batch_size": 8, "lr": 1e-3, "eval_every": 100, "log_every": 1,
                      "checkpoint_every": 1, "output_dir": str(tmp_path / output), "progress": False, **train}}


def _cli(tmp_path, values, *overrides, wait=True):
    """`pykd distill` on `values` in a subprocess: (exit code, stderr), or the Popen when wait is false."""
    path = tmp_path / f"config-{time.monotonic_ns()}.yaml"
    path.write_text(json.dumps(values))
    command = [sys.executable, "-m", "pykd.cli", "distill", str(path), *(f"--set={o}" for o in overrides)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if not wait:
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    return done.returncode, done.stderr


def _steps(log):
    return [json.loads(line)["step"] for line in log.read_text().splitlines() if "eval" not in json.loads(line)]


# ---- non-finite training ----

def test_a_run_whose_loss_turns_nan_stops_with_exit_2_keeping_its_checkpoint(tmp_path):
    """train.lr 1e30 (finite, accepted) blows the weights up after one step: the next loss is NaN. The run
    once logged NaN to the end, exited 0 and saved a NaN model."""
    run = tmp_path / "run"
    code, stderr = _cli(tmp_path, _values(tmp_path, lr=1e30))
    assert code == 2 and "Traceback" not in stderr, stderr[-3000:]
    line = next(line for line in stderr.splitlines() if line.startswith("pykd distill: error:"))
    assert "training stopped at step 2: not finite:" in line and "The step was not applied" in line, line
    assert f"the checkpoint {run / 'checkpoint.pt'} of step 1 is kept" in line and "train.lr" in line, line
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["step"] == 1 and all(torch.isfinite(t).all() for t in state["model"].values())
    assert not (run / "model").exists() and _steps(run / "log.jsonl") == [1]


class _PoisonGradients(TrainerCallback):
    """From optimiser step `at` (0-based) on, one parameter's gradient is NaN while every loss stays finite."""

    def __init__(self, at: int):
        self.at, self.before = at, None

    def on_step_begin(self, trainer, step):
        if step == self.at:
            parameter = next(p for p in trainer.step_module.parameters() if p.requires_grad)
            parameter.register_hook(lambda grad: grad * math.nan)
            self.before = {k: v.clone() for k, v in trainer.step_module.state_dict().items()}


def test_a_nan_gradient_with_a_finite_loss_stops_the_run_before_the_update(tmp_path):
    poison = _PoisonGradients(at=3)
    trainer = Trainer(run_config.from_dict(_values(tmp_path, checkpoint_every=2)), "distill", callbacks=[poison])
    with pytest.raises(NonFiniteTraining, match=r"training stopped at step 4: not finite: gradient norm nan\. .*"
                                                r"checkpoint .*checkpoint.pt of step 2 is kept"):
        trainer.train()
    after = trainer.step_module.state_dict()
    assert all(torch.equal(poison.before[k], after[k]) for k in after)  # the NaN step was not applied
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 2
    assert all(math.isfinite(r["loss"]) for r in trainer.history if "loss" in r)


# ---- one run per output directory ----

@pytest.mark.slow  # three `pykd distill` processes (the in-process test below covers the lock in seconds)
def test_a_second_run_on_a_busy_output_dir_is_refused_and_a_dead_holder_frees_it(tmp_path):
    """Two `pykd distill` on one directory once corrupted each other (a checkpoint partial lost, log.jsonl
    holding steps twice). The second is refused at once; a SIGKILLed holder leaves no stale lock."""
    run = tmp_path / "run"
    values = _values(tmp_path, steps=100000, checkpoint_every=1000)
    first = _cli(tmp_path, values, wait=False)
    try:
        deadline = time.monotonic() + 300
        while not ((run / "log.jsonl").exists() and _steps(run / "log.jsonl")):
            assert first.poll() is None, first.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the first run made no progress"
            time.sleep(0.01)
        logged = (run / "log.jsonl").read_text()
        code, stderr = _cli(tmp_path, values)
        assert code == 2 and "Traceback" not in stderr, stderr[-3000:]
        assert (f"pykd distill: error: train.output_dir {str(run)!r} is in use by another pykd run "
                f"(pid {first.pid})") in stderr, stderr
        assert (run / "log.jsonl").read_text().startswith(logged)  # the refused run wrote nothing there
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    code, stderr = _cli(tmp_path, values, "train.steps=2", "train.resume=false")
    assert code == 0, stderr[-3000:]
    assert _steps(run / "log.jsonl") == [1, 2]


HOLDER = """
import sys, time
from pykd.distill.cache import DirectoryLock
DirectoryLock(sys.argv[1], "train.output_dir").acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_a_trainer_is_refused_before_loading_anything_while_another_process_holds_its_dir(tmp_path):
    values = _values(tmp_path, steps=2)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "run")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(DirectoryInUse, match=rf"train.output_dir '{tmp_path / 'run'}' is in use by another pykd "
                                                 rf"run \(pid {holder.pid}\)"):
            Trainer(run_config.from_dict(values), "distill")
    finally:
        holder.kill()
        holder.wait(timeout=60)
    first = Trainer(run_config.from_dict(values), "distill")  # the dead holder's lock file locks nothing
    second = Trainer(run_config.from_dict(values), "distill")  # one process: one writer, the lock is shared
    assert first.train()[-1]["step"] == 2 and second.train()[-1]["step"] == 2
