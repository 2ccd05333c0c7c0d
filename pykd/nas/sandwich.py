r"""The sandwich step of SuperLM training (AutoDistil, arXiv 2201.12507): a TrainingStep for the KD Trainer.

One SuperLM per sub-space of the search space (K of them; K = 1 is one-shot). Every optimiser
step of a SuperLM draws its sandwich from a generator seeded by (train.seed, step), so every DDP
rank draws the same sub-networks and a resumed run draws what the uninterrupted one drew:

    the largest, the smallest and nas.sandwich_random (M, default 2) random sub-networks.

The teacher runs once per micro-batch under `pykd.capture`; each sub-network then runs under
capture and is distilled with AutoDistil's task-agnostic objective, the self-attention relations
of the teacher's last layer against the sub-network's last layer (Eq. 4):

    L(a) = sum_{r in QQ, KK, VV} pykd.attention_relation_loss(R^T_r, R^S_r; A relation heads)

(the KD engine's relation term, pykd.distill.losses.RelationTerms)
with A = the teacher's head count unless nas.relation_heads says otherwise. The loss type
defaults to "mse_prob", the MSE between relation probabilities that the paper writes (its
released code takes the MSE of the scores before the softmax: "mse_logit"; MiniLMv2 uses "kl").
When A does not divide a sub-network's attention width, its Q/K/V vectors are cropped to the
first A * floor(width / A) dimensions, as AutoDistil's code drops the leftover dimensions.
The Trainer's SandwichSchedule callback (pykd.nas.train) gives the step its optimiser step number.

Each sub-network's loss is backpropagated as soon as it is computed (so only one sub-network's
activations are alive at a time), gradients accumulate over the sandwich, and the Trainer makes
one optimiser update. The step module therefore owns its backward passes: the Trainer does not
wrap it in DistributedDataParallel but all-reduces (averages) its gradients once per step.

The Mixture-of-Supernets objective "inplace" (arXiv 2306.04845) distils the largest sub-network
from the teacher as above and every other sub-network from the largest one's output of the same
batch (detached): the last hidden state (MSE over valid tokens, on the sub-network's leading
hidden units, which bottom-left extraction shares with the largest: pykd.distill.losses.masked_mse)
or soft logits (cross-entropy against the largest's softmax, for models with a classification head:
pykd.distill.losses.soft_cross_entropy).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..capture import capture
from ..distill.losses import RelationTerms, layer_qkv, masked_mse, soft_cross_entropy
from ..distill.steps import TrainingStep, model_inputs
from .superlm import SUPERNET_FILE

OBJECTIVES = ("relation", "inplace")  # nas.objective
INPLACE_TARGETS = ("hidden", "logits")  # nas.inplace_target


def sandwich_generator(seed: int, step: int) -> torch.Generator:
    """The generator of step `step`'s draws: a function of (seed, step) only."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63))


def sandwich(subspace, seed: int, step: int, random_count: int) -> list:
    """[largest, smallest, M random sub-networks] of `subspace` for optimiser step `step`."""
    generator = sandwich_generator(seed, step)
    return [subspace.largest(), subspace.smallest()] + [subspace.sample(generator) for _ in range(random_count)]


def sandwich_names(random_count: int) -> list[str]:
    return ["largest", "smallest"] + [f"random{i + 1}" for i in range(random_count)]


class SandwichStep(TrainingStep):
    """Turns a batch into the sandwich's losses, running one backward pass per sub-network.

    Training (module in train mode, gradients on): forward returns ({sub-network: loss}, total)
    after the backward passes; the Trainer must not call backward again (`owns_backward`).
    Evaluation: the losses of the largest and the smallest sub-network, no backward.
    Set `.step` to the optimiser step before each training forward (pykd.nas.train.SandwichSchedule does).

    Args:
        teacher, supernet: the teacher and the SuperLM over it; subspace: the sub-space it trains.
        config: the run config (nas section; train.seed and train.grad_accum).
    """

    owns_backward = True

    def __init__(self, teacher: nn.Module, supernet: nn.Module, subspace, config):
        super().__init__()
        nas = config.nas
        self.supernet = supernet
        self.subspace = subspace
        self._teacher = [teacher.eval().requires_grad_(False)]  # a list keeps it out of the state dict
        self.relation = RelationTerms(tuple(nas.relations), nas.relation_heads or teacher.config.num_attention_heads,
                                      nas.relation_loss)
        self.objective, self.inplace_target = nas.objective, nas.inplace_target
        if self.objective == "inplace" and self.inplace_target == "logits" and not hasattr(teacher, "classifier"):
            raise ValueError("nas.inplace_target 'logits' needs a model with a classification head; the teacher "
                             f"{type(teacher).__name__} has none (use 'hidden' for unlabeled data)")
        self.seed, self.random_count = config.train.seed, nas.sandwich_random
        self.backward_scale = 1.0 / config.train.grad_accum
        self.step = 0

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    def trained_model(self) -> nn.Module:
        return self.supernet

    def models(self) -> list[nn.Module]:
        return [self.supernet, self.teacher]

    def save_model(self, directory: Path, tokenizer) -> None:
        """supernet.pt (the SuperLM's configuration and weights) and the teacher's tokenizer."""
        torch.save({"config": _plain(self.supernet.config_dict()), "subspace": self.subspace.name,
                    "state": self.supernet.state_dict()}, Path(directory) / SUPERNET_FILE)
        tokenizer.save_pretrained(directory)

    # A checkpoint records which supernet it holds; loading one of another space, expert count or
    # routing into this module fails here, naming both, instead of silently mixing weights.
    def get_extra_state(self) -> dict:
        return {"supernet": _plain(self.supernet.config_dict()), "subspace": self.subspace.name}

    def set_extra_state(self, state: dict) -> None:
        self.supernet.check_config_dict(state["supernet"])
        if state["subspace"] != self.subspace.name:
            raise ValueError(f"the checkpoint holds the SuperLM of sub-space {state['subspace']!r}, not of "
                             f"{self.subspace.name!r}")

    def teacher_view(self, batch: dict) -> dict:
        """The teacher's last-layer Q/K/V (and last hidden state), computed without gradients."""
        self.teacher.eval()
        with torch.no_grad(), capture(self.teacher) as recorded:
            output = self.teacher(**model_inputs(batch))
        return {"qkv": layer_qkv(recorded[-1], self.relation.letters), "mask": batch["attention_mask"].bool(),
                "output": output}

    def sub_network_forward(self, arch, batch: dict):
        self.supernet.set_active(arch)
        with capture(self.supernet) as recorded:
            output = self.supernet(**model_inputs(batch))
        return output, layer_qkv(recorded[-1], self.relation.letters)

    def forward(self, batch: dict):
        teacher = self.teacher_view(batch)
        if self.training and torch.is_grad_enabled():
            archs = sandwich(self.subspace, self.seed, self.step, self.random_count)
            names = sandwich_names(self.random_count)
            return self._train_sandwich(dict(zip(names, archs)), batch, teacher)
        archs = {"largest": self.subspace.largest(), "smallest": self.subspace.smallest()}
        terms = {name: self._relation_of(arch, batch, teacher) for name, arch in archs.items()}
        return terms, torch.stack(list(terms.values())).mean()

    def _relation_of(self, arch, batch, teacher) -> torch.Tensor:
        _, qkv = self.sub_network_forward(arch, batch)
        return self.relation(teacher["qkv"], qkv, teacher["mask"])

    def _train_sandwich(self, archs: dict, batch: dict, teacher: dict):
        terms, reference = {}, None
        for name, arch in archs.items():
            output, qkv = self.sub_network_forward(arch, batch)
            if self.objective == "relation" or name == "largest":
                loss = self.relation(teacher["qkv"], qkv, teacher["mask"])
                if self.objective == "inplace":
                    reference = self._inplace_reference(output)
            else:
                loss = self._inplace_loss(output, reference, teacher["mask"])
            (loss * self.backward_scale).backward()
            terms[name] = loss.detach()
        return terms, torch.stack(list(terms.values())).sum()

    def _inplace_reference(self, output) -> torch.Tensor:
        return (output.logits if self.inplace_target == "logits" else output.last_hidden_state).detach()

    def _inplace_loss(self, output, reference: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.inplace_target == "logits":
            return soft_cross_entropy(reference, output.logits)
        hidden = output.last_hidden_state
        return masked_mse(hidden, reference[..., : hidden.shape[-1]], mask)


def _plain(value):
    """A JSON round trip: plain types only, so weights_only checkpoint loading accepts it."""
    return json.loads(json.dumps(value, default=str))
