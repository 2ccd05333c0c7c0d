"""Teacher-to-student layer mappings (Distiller's layer-mapping stage).

Hidden states are numbered as transformers returns them: 0 is the embedding output, i >= 1
the output of layer i. Attention layers are numbered 0 .. n-1. With S student and T teacher
layers:

    skip      hidden i <-> floor(i T / S),        attention i <-> floor((i + 1) T / S) - 1
    uniform   hidden i <-> round(i T / S),        attention i <-> round((i + 1) T / S) - 1
    last      hidden S <-> T,                     attention S - 1 <-> T - 1
    pairs     the explicit [[student, teacher], ...] list given

    emd       every student layer with every teacher layer, weighted by an optimal transport plan

skip is Distiller's (and PKD's) mapping; uniform spreads the student over the teacher with
rounding instead of flooring (the same as skip when S divides T). include_embeddings adds the
pair (0, 0) to a hidden-state mapping.

emd is BERT-EMD's many-to-many mapping (Li et al., EMNLP 2020, arXiv 2010.06133), one of
Distiller's layer mappings. With D_ij >= 0 the loss between student layer i and teacher layer j
(hidden states 1..S x 1..T, or attention layers), student layer weights a (sum 1) and teacher layer
weights b (sum 1), the flow F solves the transportation problem

    min_F sum_ij F_ij D_ij   subject to   F_ij >= 0,  sum_j F_ij = a_i,  sum_i F_ij = b_j

(solved exactly as a linear program, HiGHS through scipy.optimize.linprog, on the detached costs)
and the loss is the earth mover's distance EMD = sum_ij F_ij D_ij / sum_ij F_ij = sum_ij F_ij D_ij,
differentiable in D with F held fixed. The weights start uniform (a_i = 1/S, b_j = 1/T) and after
every training forward move towards the layers that transfer cheaply (BERT-EMD's cost attention,
as in its released code): with the transfer cost per unit of mass c_i = sum_j F_ij D_ij / a_i,

    a_i <- softmax_i( (sum_k c_k / c_i) / tau ),   and likewise b_j from c_j = sum_i F_ij D_ij / b_j,

tau being the temperature (1 in BERT-EMD). The weights are buffers of the loss module, so they are
saved in checkpoints and a resumed run continues with them.
"""
from __future__ import annotations

import numbers

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .distributed import world

MAPPINGS = ("skip", "uniform", "last", "pairs", "emd")


def _pick(kind: str, position: int, student_layers: int, teacher_layers: int) -> int:
    exact = position * teacher_layers / student_layers
    return int(exact) if kind == "skip" else round(exact)


def _checked_pairs(pairs, student_count: int, teacher_count: int, what: str) -> list[tuple[int, int]]:
    checked = []
    for pair in pairs:
        if len(pair) != 2:
            raise ValueError(f"layer pairs must be [student, teacher], got {pair!r}")
        student, teacher = int(pair[0]), int(pair[1])
        if not (0 <= student < student_count and 0 <= teacher < teacher_count):
            raise ValueError(f"{what} pair {pair!r} is out of range: the student has {student_count} and the "
                             f"teacher {teacher_count} {what} entries")
        checked.append((student, teacher))
    return checked


def hidden_pairs(kind: str, student_layers: int, teacher_layers: int, pairs=None,
                 include_embeddings: bool = False) -> list[tuple[int, int]]:
    """(student, teacher) indices into the hidden-state tuples (0 = embeddings)."""
    _check_kind(kind, pairs)
    if kind == "pairs":
        return _checked_pairs(pairs, student_layers + 1, teacher_layers + 1, "hidden-state")
    if kind == "last":
        mapped = [(student_layers, teacher_layers)]
    elif kind == "emd":
        mapped = [(i, j) for i in range(1, student_layers + 1) for j in range(1, teacher_layers + 1)]
    else:
        mapped = [(i, _pick(kind, i, student_layers, teacher_layers)) for i in range(1, student_layers + 1)]
    return ([(0, 0)] if include_embeddings else []) + mapped


def attention_pairs(kind: str, student_layers: int, teacher_layers: int, pairs=None) -> list[tuple[int, int]]:
    """(student, teacher) attention-layer indices (0 = first layer)."""
    _check_kind(kind, pairs)
    if kind == "pairs":
        return _checked_pairs(pairs, student_layers, teacher_layers, "attention-layer")
    if kind == "last":
        return [(student_layers - 1, teacher_layers - 1)]
    if kind == "emd":
        return [(i, j) for i in range(student_layers) for j in range(teacher_layers)]
    return [(i, _pick(kind, i + 1, student_layers, teacher_layers) - 1) for i in range(student_layers)]


def _check_kind(kind: str, pairs) -> None:
    if kind not in MAPPINGS:
        raise ValueError(f"mapping must be one of {MAPPINGS}, got {kind!r}")
    if (kind == "pairs") != (pairs is not None):
        raise ValueError("layer pairs are given exactly when mapping is 'pairs'")


def transport_plan(source, target, cost) -> np.ndarray:
    """The optimal flow of the balanced transportation problem (exact, a linear program).

    Args:
        source: (M,) non-negative masses a; target: (N,) non-negative masses b with the same total.
        cost: (M, N) finite costs D.

    Returns:
        F, (M, N) float64, minimising sum F D subject to F >= 0, F 1 = a, F^T 1 = b.
    """
    from scipy.optimize import linprog

    a, b, d = (np.asarray(x, dtype=np.float64) for x in (source, target, cost))
    if a.ndim != 1 or b.ndim != 1 or d.shape != (a.size, b.size):
        raise ValueError(f"transport_plan needs masses (M,), (N,) and costs (M, N), got shapes {a.shape}, "
                         f"{b.shape}, {d.shape}")
    for name, masses in (("source", a), ("target", b)):
        if not np.isfinite(masses).all():
            raise ValueError(f"transport_plan needs finite {name} masses, got {masses.tolist()}")
    if (a < 0).any() or (b < 0).any() or not a.sum() > 0 or not np.isfinite(d).all():
        raise ValueError(f"transport_plan needs non-negative masses with a positive total and finite costs, got "
                         f"{a.tolist()}, {b.tolist()}")
    if abs(a.sum() - b.sum()) > 1e-9 * a.sum():
        raise ValueError(f"transport_plan needs masses with equal totals, got {a.sum()} and {b.sum()}")
    m, n = d.shape
    rows = np.kron(np.eye(m), np.ones((1, n)))  # sum_j F_ij = a_i
    columns = np.kron(np.ones((1, m)), np.eye(n - 1, n))  # sum_i F_ij = b_j for j < n - 1
    # The last column's constraint is implied by the others (the totals agree): kept, it makes the system
    # rank-deficient and HiGHS' presolve declared masses whose totals differ by one rounding "infeasible".
    result = linprog(d.ravel(), A_eq=np.vstack([rows, columns]), b_eq=np.concatenate([a, b[:-1]]),
                     bounds=(0, None), method="highs")
    if result.status != 0:
        raise RuntimeError(f"the transport linear program failed: {result.message} (masses {a.tolist()}, "
                           f"{b.tolist()}; costs {d.tolist()})")
    return np.clip(result.x, 0.0, None).reshape(m, n)


class EarthMoverMapping(nn.Module):
    """BERT-EMD's many-to-many layer mapping (see the module docstring): forward(D) is the EMD loss.

    Args:
        student_layers, teacher_layers: S and T. temperature: tau of the weight update.

    Shapes:
        forward takes D (S, T), any float dtype and device, and returns a scalar.
    """

    def __init__(self, student_layers: int, teacher_layers: int, temperature: float = 1.0):
        super().__init__()
        for name, count in (("student_layers", student_layers), ("teacher_layers", teacher_layers)):
            if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 1:
                raise ValueError(f"the EMD mapping's {name} must be a positive int, got {count!r}")
        if not temperature > 0:
            raise ValueError(f"the EMD mapping's temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.register_buffer("student_weights", torch.full((student_layers,), 1.0 / student_layers,
                                                           dtype=torch.float64))
        self.register_buffer("teacher_weights", torch.full((teacher_layers,), 1.0 / teacher_layers,
                                                           dtype=torch.float64))

    def forward(self, costs: torch.Tensor) -> torch.Tensor:
        if costs.shape != (self.student_weights.numel(), self.teacher_weights.numel()):
            layers = (self.student_weights.numel(), self.teacher_weights.numel())
            raise ValueError(f"EMD costs must be (student layers, teacher layers) = {layers}, got {tuple(costs.shape)}")
        shared = costs.detach().double()
        if world()[1] > 1:
            # Every rank solves the same problem, so the flows and the weights stay identical across ranks.
            shared = shared.clone()
            dist.all_reduce(shared)
            shared /= dist.get_world_size()
        shared = shared.cpu().numpy()
        flow = transport_plan(self.student_weights.cpu().numpy(), self.teacher_weights.cpu().numpy(), shared)
        if self.training and torch.is_grad_enabled():
            self._update_weights(flow, shared)
        dtype = torch.promote_types(costs.dtype, torch.float32)  # bf16 costs under autocast: sum in fp32
        return (torch.as_tensor(flow, dtype=dtype, device=costs.device) * costs.to(dtype)).sum()

    @torch.no_grad()
    def _update_weights(self, flow: np.ndarray, costs: np.ndarray) -> None:
        transfer = flow * costs
        for weights, spent, cheapest in ((self.student_weights, transfer.sum(1), costs.min(1)),
                                         (self.teacher_weights, transfer.sum(0), costs.min(0))):
            mass = weights.cpu().numpy()
            # A layer that holds no mass has no cost per unit under the flow: take its cheapest pairing.
            unit_cost = np.where(mass > 0, spent / np.where(mass > 0, mass, 1.0), cheapest)
            # A layer that transfers for free gets a large finite ratio (all the weight), not a division by zero.
            unit_cost = np.maximum(unit_cost, 1e-12 * max(unit_cost.sum(), 1e-300))
            weights.copy_(torch.softmax(torch.as_tensor(unit_cost.sum() / unit_cost / self.temperature), 0))
