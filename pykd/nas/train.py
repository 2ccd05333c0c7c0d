r"""Sandwich training of SuperLMs (AutoDistil, arXiv 2201.12507) on the KD engine's Trainer.

One SuperLM per sub-space of the search space (K of them; K = 1 is one-shot). Every optimiser
step of a SuperLM draws its sandwich from a generator seeded by (train.seed, step), so every DDP
rank draws the same sub-networks and a resumed run draws what the uninterrupted one drew:

    the largest, the smallest and nas.sandwich_random (M, default 2) random sub-networks.

The teacher runs once per micro-batch under `pykd.capture`; each sub-network then runs under
capture and is distilled with AutoDistil's task-agnostic objective, the self-attention relations
of the teacher's last layer against the sub-network's last layer (Eq. 4):

    L(a) = sum_{r in QQ, KK, VV} pykd.attention_relation_loss(R^T_r, R^S_r; A relation heads)

with A = the teacher's head count unless nas.relation_heads says otherwise. The loss type
defaults to "mse_prob", the MSE between relation probabilities that the paper writes (its
released code takes the MSE of the scores before the softmax: "mse_logit"; MiniLMv2 uses "kl").
When A does not divide a sub-network's attention width, its Q/K/V vectors are cropped to the
first A * floor(width / A) dimensions, as AutoDistil's code drops the leftover dimensions.

Each sub-network's loss is backpropagated as soon as it is computed (so only one sub-network's
activations are alive at a time), gradients accumulate over the sandwich, and the Trainer makes
one optimiser update. The step module therefore owns its backward passes: the Trainer does not
wrap it in DistributedDataParallel but all-reduces (averages) its gradients once per step.

The Mixture-of-Supernets objective "inplace" (arXiv 2306.04845) distils the largest sub-network
from the teacher as above and every other sub-network from the largest one's output of the same
batch (detached): the last hidden state (MSE over valid tokens, on the sub-network's leading
hidden units, which bottom-left extraction shares with the largest) or soft logits (cross-entropy
against the largest's softmax, for models with a classification head).
"""
from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..capture import capture
from ..distill.config import RunConfig
from ..distill.trainer import Trainer, _model_inputs
from ..ops import attention_relation_loss

SUPERNET_FILE = "supernet.pt"
_FIELDS = {"q": "query", "k": "key", "v": "value"}


def build_space(config: RunConfig, teacher_config):
    """The search space the nas section describes, scaled to (or checked against) the teacher."""
    from .space import SearchSpace

    if config.nas.space == "custom":
        return SearchSpace.from_dict(config.nas.custom_space, teacher_config)
    return SearchSpace.autodistil(teacher_config, k=config.nas.k, layerwise=config.nas.layerwise)


def sandwich_generator(seed: int, step: int) -> torch.Generator:
    """The generator of step `step`'s draws: a function of (seed, step) only."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63))


def sandwich(subspace, seed: int, step: int, random_count: int) -> list:
    """[largest, smallest, M random sub-networks] of `subspace` for optimiser step `step`."""
    generator = sandwich_generator(seed, step)
    return [subspace.largest(), subspace.smallest()] + [subspace.sample(generator) for _ in range(random_count)]


def sandwich_names(random_count: int) -> list[str]:
    return ["largest", "smallest"] + [f"random{i + 1}" for i in range(random_count)]


def heads_concatenated(x: torch.Tensor) -> torch.Tensor:
    """(B, H, L, d) as the attention saw it -> (B, L, H d)."""
    return x.transpose(1, 2).flatten(2)


def crop_to_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """The first heads * floor(width / heads) features (AutoDistil's code drops the rest)."""
    usable = heads * (x.shape[-1] // heads)
    if usable == 0:
        raise ValueError(f"nas.relation_heads={heads} exceeds a sub-network's attention width {x.shape[-1]}")
    return x if usable == x.shape[-1] else x[..., :usable]


@dataclasses.dataclass(frozen=True)
class RelationSpec:
    relations: tuple
    heads: int
    loss: str


def last_layer_qkv(layer) -> dict:
    """{"q"|"k"|"v": (B, L, H d)} of one captured attention layer."""
    return {short: heads_concatenated(getattr(layer, name)) for short, name in _FIELDS.items()}


def relation_loss(teacher: dict, student: dict, mask: torch.Tensor, spec: RelationSpec) -> torch.Tensor:
    """Sum over spec.relations of pykd.attention_relation_loss on last-layer Q/K/V (dicts from last_layer_qkv)."""
    total = None
    for name in spec.relations:
        t_a, t_b = (crop_to_heads(teacher[c], spec.heads) for c in name)
        s_a, s_b = (crop_to_heads(student[c], spec.heads) for c in name)
        term = attention_relation_loss(t_a, t_b, s_a, s_b, num_relation_heads=spec.heads, mask=mask, loss=spec.loss)
        total = term if total is None else total + term
    return total


def _masked_mse(guess: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token mean squared error averaged over each example's valid tokens, then over the batch."""
    weights = mask.to(guess.dtype)
    per_token = (guess.float() - target.float()).pow(2).mean(-1)
    return ((per_token * weights).sum(1) / weights.sum(1)).mean()


class SandwichStep(nn.Module):
    """Turns a batch into the sandwich's losses, running one backward pass per sub-network.

    Training (module in train mode, gradients on): forward returns ({sub-network: loss}, total)
    after the backward passes; the Trainer must not call backward again (`owns_backward`).
    Evaluation: the losses of the largest and the smallest sub-network, no backward.
    Set `.step` to the optimiser step before each training forward (SuperLMTrainer does).
    """

    owns_backward = True

    def __init__(self, teacher: nn.Module, supernet: nn.Module, subspace, config: RunConfig):
        super().__init__()
        nas = config.nas
        self.supernet = supernet
        self.subspace = subspace
        self._teacher = [teacher.eval().requires_grad_(False)]  # a list keeps it out of the state dict
        self.relation = RelationSpec(tuple(nas.relations), nas.relation_heads or teacher.config.num_attention_heads,
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
            output = self.teacher(**_model_inputs(batch))
        return {"qkv": last_layer_qkv(recorded[-1]), "mask": batch["attention_mask"].bool(), "output": output}

    def sub_network_forward(self, arch, batch: dict):
        self.supernet.set_active(arch)
        with capture(self.supernet) as recorded:
            output = self.supernet(**_model_inputs(batch))
        return output, last_layer_qkv(recorded[-1])

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
        return relation_loss(teacher["qkv"], qkv, teacher["mask"], self.relation)

    def _train_sandwich(self, archs: dict, batch: dict, teacher: dict):
        terms, reference = {}, None
        for name, arch in archs.items():
            output, qkv = self.sub_network_forward(arch, batch)
            if self.objective == "relation" or name == "largest":
                loss = relation_loss(teacher["qkv"], qkv, teacher["mask"], self.relation)
                if self.objective == "inplace":
                    reference = self._inplace_reference(output)
            else:
                loss = self._inplace_loss(output, reference, teacher["mask"])
            (loss * self.backward_scale).backward()
            terms[name] = loss.detach()
        return terms, torch.stack(list(terms.values())).sum()

    def _inplace_reference(self, output) -> torch.Tensor:
        if self.inplace_target == "logits":
            return torch.softmax(output.logits.detach().float(), dim=-1)
        return output.last_hidden_state.detach()

    def _inplace_loss(self, output, reference: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.inplace_target == "logits":
            return -(reference * torch.log_softmax(output.logits.float(), dim=-1)).sum(-1).mean()
        hidden = output.last_hidden_state
        return _masked_mse(hidden, reference[..., : hidden.shape[-1]], mask)


def _plain(value):
    """A JSON round trip: plain types only, so weights_only checkpoint loading accepts it."""
    return json.loads(json.dumps(value, default=str))


class SuperLMTrainer(Trainer):
    """The KD Trainer driving a SandwichStep for one sub-space; output in nas.output/supernet-<name>."""

    MODES = ("nas",)

    def __init__(self, config: RunConfig, subspace_index: int = 0):
        self.subspace_index = subspace_index
        super().__init__(config, mode="nas")

    def _build_step(self) -> nn.Module:
        from ..distill.models import load_pretrained
        from .superlm import SuperLM

        source = self.config.teacher.finetuned or self.config.teacher.path
        teacher = load_pretrained(source, self.config.data.kind, self.num_labels)
        space = build_space(self.config, teacher.config)
        if not 0 <= self.subspace_index < len(space.subspaces):
            raise ValueError(f"sub-space index {self.subspace_index} out of range: the space has "
                             f"{len(space.subspaces)} sub-space(s)")
        nas = self.config.nas
        supernet = SuperLM.from_teacher(teacher, space, **supernet_options(nas))
        return SandwichStep(teacher, supernet, space.subspaces[self.subspace_index], self.config)

    def _train_step(self) -> dict:
        self.step_module.step = self.step
        return super()._train_step()

    def save_model(self, directory: Path) -> None:
        """supernet.pt (the SuperLM's configuration and weights) and the teacher's tokenizer."""
        directory.mkdir(parents=True, exist_ok=True)
        supernet = self.step_module.supernet
        torch.save({"config": _plain(supernet.config_dict()), "subspace": self.step_module.subspace.name,
                    "state": supernet.state_dict()}, directory / SUPERNET_FILE)
        self.tokenizer.save_pretrained(directory)


def supernet_options(nas) -> dict:
    """SuperLM.from_teacher's keyword arguments from the nas config section (none for plain sharing)."""
    if nas.experts == 1 and not nas.route_attention:
        return {}
    return {"experts": nas.experts, "routing": nas.routing, "noise": nas.noise,
            "route_attention": nas.route_attention}


def subspace_run_config(config: RunConfig, name: str) -> RunConfig:
    """The config of one sub-space's training run: its own output directory under nas.output."""
    train = dataclasses.replace(config.train, output_dir=str(Path(config.nas.output) / f"supernet-{name}"))
    return dataclasses.replace(config, train=train)


def train_supernets(config: RunConfig, stop_after: int | None = None) -> list[str]:
    """Trains one SuperLM per sub-space (sequentially); returns their run directories."""
    from ..distill.models import load_pretrained

    teacher = load_pretrained(config.teacher.finetuned or config.teacher.path, "unlabeled")
    space = build_space(config, teacher.config)
    del teacher
    directories = []
    for index, subspace in enumerate(space.subspaces):
        run_config = subspace_run_config(config, subspace.name)
        print(f"[nas train] SuperLM {index + 1}/{len(space.subspaces)}: sub-space {subspace.name} "
              f"({len(subspace.candidates())} candidates) -> {run_config.train.output_dir}", flush=True)
        random.seed(config.train.seed)
        SuperLMTrainer(run_config, index).train(stop_after=stop_after)
        directories.append(run_config.train.output_dir)
    return directories
