"""Sandwich training of SuperLMs on the KD Trainer: draws, teacher calls, resume, DDP, MoS options."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from tests.nas.nas_fixtures import TINY_SPACE, TWO_SUBSPACES, nas_values

from pykd.distill import config as run_config
from pykd.nas.space import SubSpace
from pykd.nas.sandwich import sandwich
from pykd.nas.train import SuperLMTrainer, subspace_run_config, train_supernets


def _subspace():
    return SubSpace.from_dict({"name": "g", "layers": [2, 3, 4], "hidden": [16, 24, 32, 48],
                               "ffn_ratio": [1.0, 1.5, 2.0], "heads": [2, 4]})


def test_sandwich_is_largest_smallest_and_random_draws_fixed_by_seed_and_step():
    subspace = _subspace()
    first = sandwich(subspace, seed=7, step=3, random_count=2)
    assert first[:2] == [subspace.largest(), subspace.smallest()] and len(first) == 4
    # The global RNGs (which differ between ranks after rank-dependent work) do not enter the draw.
    torch.manual_seed(123)
    random.seed(5)
    torch.rand(17)
    assert sandwich(subspace, seed=7, step=3, random_count=2) == first
    draws = {tuple(map(str, sandwich(subspace, seed=7, step=s, random_count=2)[2:])) for s in range(20)}
    assert len(draws) > 10  # steps draw different sub-networks
    assert sandwich(subspace, 8, 3, 2) != first or sandwich(subspace, 8, 4, 2) != sandwich(subspace, 7, 4, 2)
    assert all(subspace.contains(a) for s in range(20) for a in sandwich(subspace, 7, s, 3))


def _trainer(tmp_path, space=None, index=0, **sections):
    values = nas_values(tmp_path, space, **sections)
    config = run_config.from_dict(values)
    name = config.nas.custom_space["subspaces"][index]["name"]
    return SuperLMTrainer(subspace_run_config(config, name), index)


def test_teacher_runs_once_per_batch_and_every_sandwich_member_gets_a_backward(tmp_path):
    trainer = _trainer(tmp_path, nas={"sandwich_random": 3})
    step = trainer.step_module
    calls = {"teacher": 0, "supernet": 0}
    step.teacher.register_forward_hook(lambda *a: calls.__setitem__("teacher", calls["teacher"] + 1))
    step.supernet.register_forward_hook(lambda *a: calls.__setitem__("supernet", calls["supernet"] + 1))
    terms = trainer._train_step()
    assert calls == {"teacher": 1, "supernet": 5}
    assert set(terms) == {"largest", "smallest", "random1", "random2", "random3", "loss"}
    assert all(v > 0 for v in terms.values())


def test_sandwich_gradient_is_the_sum_of_the_members_gradients(tmp_path):
    """One backward per member (bounded memory) gives the gradient of the summed loss."""
    trainer = _trainer(tmp_path, nas={"sandwich_random": 1})
    step = trainer.step_module.train()
    batch = trainer.micro_batch(0, 0)
    step.step = 0
    torch.manual_seed(0)  # the same dropout masks in both passes
    _terms, total = step(batch)
    fused = {n: p.grad.clone() for n, p in step.named_parameters() if p.grad is not None}
    step.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    teacher = step.teacher_view(batch)
    summed = 0
    for arch in sandwich(step.subspace, step.seed, 0, 1):
        _, qkv = step.sub_network_forward(arch, batch)
        summed = summed + step.relation(teacher["qkv"], qkv, teacher["mask"])
    summed.backward()
    assert float(summed.detach()) == pytest.approx(float(total), rel=1e-6)
    for name, grad in fused.items():
        reference = dict(step.named_parameters())[name].grad
        # Same float32 terms added in another order: rounding of a sum of 3 gradients, ~4 eps of its size.
        torch.testing.assert_close(grad, reference, rtol=0, atol=4 * torch.finfo(torch.float32).eps *
                                   float(reference.abs().max()) + 1e-30, msg=name)


def _checkpoint_state(run_dir):
    return torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)["model"]


@pytest.mark.parametrize("mos", [False, True], ids=["plain", "mos-neuron"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, mos):
    extra = {"experts": 2, "routing": "neuron", "noise": 0.01} if mos else {}
    straight = nas_values(tmp_path, nas={"output": str(tmp_path / "straight"), **extra},
                          train={"steps": 3, "grad_accum": 1 if mos else 2, "batch_size": 8 if mos else 4, "lr": 1e-3,
                                 "eval_every": 100,
                                 "log_every": 1, "checkpoint_every": 100, "progress": False})
    train_supernets(run_config.from_dict(straight))
    interrupted = json.loads(json.dumps(straight))
    interrupted["nas"]["output"] = str(tmp_path / "interrupted")
    train_supernets(run_config.from_dict(interrupted), stop_after=1)
    assert torch.load(tmp_path / "interrupted" / "supernet-s" / "checkpoint.pt", weights_only=False)["step"] == 1
    train_supernets(run_config.from_dict(interrupted))
    expected = _checkpoint_state(tmp_path / "straight" / "supernet-s")
    resumed = _checkpoint_state(tmp_path / "interrupted" / "supernet-s")
    assert expected.keys() == resumed.keys()
    if mos:
        assert any("router" in k for k in expected) and any("expert" in k for k in expected)
    initial = _trainer(tmp_path).step_module.state_dict() if not mos else None
    for key in expected:
        if isinstance(expected[key], torch.Tensor):
            assert torch.equal(expected[key], resumed[key]), key
    if initial is not None:
        tensors = [k for k in initial if isinstance(initial[k], torch.Tensor)]
        moved = [k for k in tensors if not torch.equal(expected[k], initial[k])]
        assert len(moved) > 5


def test_one_supernet_per_subspace_with_its_own_run(tmp_path):
    values = nas_values(tmp_path, TWO_SUBSPACES, train={"steps": 2, "eval_every": 100, "log_every": 1,
                                                       "checkpoint_every": 100, "progress": False})
    directories = train_supernets(run_config.from_dict(values))
    assert [os.path.basename(d) for d in directories] == ["supernet-lo", "supernet-hi"]
    for directory in directories:
        log = [json.loads(line) for line in Path(os.path.join(directory, "log.jsonl")).read_text().splitlines()]
        assert {"largest", "smallest", "random1", "loss"} <= set(log[0])
        assert set(log[-1]["eval"]) == {"largest", "smallest", "loss"}
        assert os.path.exists(os.path.join(directory, "model", "supernet.pt"))


def test_resuming_into_another_space_is_refused(tmp_path):
    values = nas_values(tmp_path, train={"steps": 4})
    train_supernets(run_config.from_dict(values), stop_after=1)
    other = json.loads(json.dumps(TINY_SPACE))
    other["subspaces"][0]["hidden"] = [32, 48]
    values["nas"]["custom_space"] = other
    with pytest.raises(ValueError, match="another configuration|differ"):
        train_supernets(run_config.from_dict(values))


def test_inplace_objective_distils_members_from_the_largest(tmp_path):
    trainer = _trainer(tmp_path, nas={"objective": "inplace", "inplace_target": "hidden", "sandwich_random": 1})
    terms = trainer._train_step()
    assert set(terms) == {"largest", "smallest", "random1", "loss"} and all(v > 0 for v in terms.values())
    with pytest.raises(ValueError, match="nas.inplace_target 'logits' needs a model with a classification head"):
        _trainer(tmp_path, nas={"objective": "inplace", "inplace_target": "logits"})


def test_experts_and_routing_flow_to_the_supernet(tmp_path):
    trainer = _trainer(tmp_path, nas={"experts": 2, "routing": "neuron"})
    supernet = trainer.step_module.supernet
    assert supernet.experts == 2 and supernet.routing == "neuron"
    before = {n: p.detach().clone() for n, p in supernet.named_parameters() if "router" in n}
    assert before
    trainer._train_step()
    trainer.step += 1
    trainer._train_step()
    moved = [n for n, p in supernet.named_parameters() if "router" in n and not torch.equal(p, before[n])]
    assert moved


def test_ddp_on_two_gloo_ranks_equals_one_process_on_the_global_batch(tmp_path):
    """torchrun + the CLI, plain SGD: 2 ranks x batch 4 make the update of 1 process x batch 8.

    The relation loss "kl" averages per example, so the ranks' mean equals the global batch's
    ("mse_prob" normalises by the batch's valid entries, which a rank split changes)."""
    values = nas_values(tmp_path, nas={"relation_loss": "kl"},
                        train={"optimizer": "sgd", "lr": 0.5, "steps": 2, "clip_norm": 0.0, "weight_decay": 0.0,
                               "eval_every": 100, "log_every": 1, "checkpoint_every": 100, "progress": False})
    teacher_config = os.path.join(values["teacher"]["path"], "config.json")
    settings = json.loads(Path(teacher_config).read_text())
    settings.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # no rank-dependent masks
    Path(teacher_config).write_text(json.dumps(settings))
    path = tmp_path / "ddp.yaml"
    path.write_text(json.dumps(values))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cli = [sys.executable, "-m", "pykd.cli", "nas", "train", str(path)]
    one = subprocess.run(cli + ["--set", f"nas.output={tmp_path / 'one'}", "--set", "train.batch_size=8"],
                         capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          *cli[1:], "--set", f"nas.output={tmp_path / 'two'}", "--set", "train.batch_size=4"],
                         capture_output=True, text=True, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    initial = _trainer(tmp_path).step_module.state_dict()
    single, ranks = (_checkpoint_state(tmp_path / run / "supernet-s") for run in ("one", "two"))
    eps, moved = torch.finfo(torch.float32).eps, 0
    tensors = [k for k, v in initial.items() if isinstance(v, torch.Tensor)]
    largest = max(float((single[k] - initial[k]).abs().max()) for k in tensors)
    for key in tensors:
        start = initial[key]
        update_one, update_two = single[key] - start, ranks[key] - start
        # The updates are lr x gradients summed in another order: relative error ~1e-5 for sums of
        # ~1e3 fp32 terms, of the tensor's own scale, and of the model's largest update for entries
        # that cancel to ~0 (the key bias's gradient is exactly 0 by softmax shift invariance);
        # both are read back through fp32 parameters (error eps |p| each).
        tolerance = 1e-4 * float(update_one.abs().max()) + 1e-5 * largest + 4 * eps * float(start.abs().max())
        assert float((update_two - update_one).abs().max()) <= tolerance, key
        moved += int(float(update_one.abs().max()) > 1e-3 * largest)
    assert moved > len(tensors) // 3
