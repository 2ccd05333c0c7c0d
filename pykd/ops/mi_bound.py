r"""Variational lower bounds on mutual information over all pairs of a batch (Poole et al., 2019).

A batch of n pairs gives critic embeddings a (n, e) and b (n, e) of a separable critic; the scores
S_ij = scale <a_i, b_j> hold the positives on the diagonal, and the off-diagonal entries act as
samples of the product of marginals. Row i may carry a learned log-baseline q_i (log_q). With
N = n (n - 1) and sums over j != i written sum':

    infonce  log n + (1/n) sum_i (S_ii - LSE_j S_ij)
    tuba     1 + (1/n) sum_i (S_ii - q_i) - (1/N) sum_i sum'_j e^{S_ij - q_i}          (q = 0 without log_q)
    nwj      tuba with q_i = 1
    js       value of nwj, gradient of (1/n) sum_i -softplus(-S_ii) - (1/N) sum_i sum'_j softplus(S_ij)
    alpha    1 + (1/N) sum_i sum'_j (S_ii - u_ij) - (1/N) sum_i sum'_j e^{S_ij - u_ii}
             u_ij = log(alpha e^{m_ij} + (1 - alpha) e^{q_i}),  m_ij = log((1/(n-1)) sum_{k != j} e^{S_ik})

alpha = 1 is the leave-one-out InfoNCE-family bound (at most log(n - 1)), alpha = 0 is TUBA.

A trained critic puts S_ii tens of nats above its row, so no form may subtract the positive (or a
dominant negative) from a sum that holds it: the vbmi notebook's m_ij = S_ij + log(expm1(LSE_i -
S_ij)) - log(n - 1) loses m_ii to rounding once LSE_i - S_ii ~ e^{S_ii - LSE'_i} falls below
|LSE_i| eps (10 nats in fp32, 35 in fp64), and 1 - p_ii in the gradients with it. Instead, with
x_i = argmax_{k != i} S_ik (the top negative) and rho_i = sum_{k != i, x_i} e^{S_ik - S_ix_i}:

    LSE'_i = log sum_{k != i} e^{S_ik} = S_ix_i + log1p(rho_i),   LSE_i = logaddexp(S_ii, LSE'_i)
    R_ij   = log sum_{k != i, j} e^{S_ik} = S_ix_i + log(rho_i)                        (j = x_i)
                                          = S_ix_i + log1p(rho_i - e^{S_ij - S_ix_i})    (j != i, x_i)
    m_ij   = logaddexp(S_ii, R_ij) - log(n - 1)   (j != i),    m_ii = LSE'_i - log(n - 1)

(the argument of log1p keeps the top's 1, so it never cancels), and u_ij = logaddexp(log alpha +
m_ij, log(1 - alpha) + q_i), w_ij = e^{log alpha + m_ij - u_ij} = du_ij/dm_ij, 1 - w_ij =
e^{log(1 - alpha) + q_i - u_ij}, each formed directly, never as one minus the other.

Every gradient with respect to S is row-local (the marginal terms are means), so the fused paths
need only per-row reductions. Differentiating I_alpha gives sums of positive terms only:

    N dI/dS_ii = sum'_j [(1 - w_ij) + w_ij e^{R_ij - m_ij - log(n - 1)}]
    N dI/dS_ik = -(alpha/(n-1)) sum_{j != i, k} e^{S_ik - u_ij} - e^{S_ik - u_ii} (1 - w_ii)     (k != i)
    N dI/dq_i  = -sum'_j (1 - w_ij) + e^{LSE'_i - u_ii} (1 - w_ii)

(methods.md's closed forms, regrouped). The sum over j != i, k is taken from one per-row total:
t_ij = (alpha/(n-1)) e^{S_ix_i - u_ij} <= 1 for j != x_i and V_i = sum_{j != i, x_i} t_ij give
V_i for k = x_i and (alpha/(n-1)) e^{S_ik - u_ix_i} + e^{S_ik - S_ix_i} (V_i - t_ik) otherwise, every
exponent bounded (u_ij >= log(alpha/(n-1)) + S_ik whenever k != j). InfoNCE likewise uses
S_ii - LSE_i = -softplus(LSE'_i - S_ii) and n dI/dS_ii = e^{LSE'_i - LSE_i}, never 1 - p_ii.
The PyTorch reference differentiates S_ii - u_ij = -psi(softplus(R_ij - S_ii), q_i - S_ii) and
LSE'_i - u_ii = -psi(0, q_i - LSE'_i) with psi(x, y) = log(alpha/(n-1) e^x + (1 - alpha) e^y), so
that S_ii and LSE'_i each enter a term once and autograd yields the sums above, exact in float64.

With G = dI/dS, da = scale G b and db = scale G^T a. The fused paths never hold the n x n matrix:
they walk row blocks (C++) or tiles (Triton) of S and keep a few statistics per row (for alpha:
S_ii, S_ix_i, x_i, rho_i, V_i and the sums above).

gather=True runs the bound over the global batch of a torch.distributed group: every rank's b
joins the columns (an all-gather whose backward sums the gradients back to their owners), each
rank keeps its own rows, and the value (the same on every rank) is reduced across the group.
Gradients with respect to a rank's inputs are those of the global bound.
"""
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .._extension import cpu_extension
from ..kernels.ids import MI_BOUND_IDS
from ._backends import autocast_off, select_backend
from ._checks import check_nonempty, check_same_device, check_tensor, is_finite, real_arg

BOUNDS = tuple(MI_BOUND_IDS)
BASELINE_BOUNDS = ("tuba", "alpha")


@dataclass(frozen=True)
class BoundSpec:
    bound: str
    alpha: float
    scale: float

    @property
    def bound_id(self) -> int:
        return MI_BOUND_IDS[self.bound]


def mi_lower_bound(a: torch.Tensor, b: torch.Tensor, log_q: torch.Tensor | None = None, bound: str = "alpha",
                   alpha: float = 0.9, scale: float = 1.0, *, gather: bool = False, group=None,
                   backend: str = "auto") -> torch.Tensor:
    """Lower bound on I(X; Y) from the critic embeddings of n pairs (formulas in the module docstring).

    Args:
        a, b: embeddings of the pairs' two sides; S = scale a b^T holds the positives on its diagonal.
        log_q: optional learned log-baseline per row, used by "tuba" and "alpha".
        bound: "infonce", "nwj", "tuba", "js" or "alpha".
        alpha: the interpolation of "alpha", in [0, 1] (1: leave-one-out InfoNCE family, 0: TUBA).
        scale: score scale (a Python or NumPy number; tensors are refused).
        gather: use the b of every rank of `group` (default: the world) as negatives, so the bound
            runs over the global batch; the all-gather and the value's all-reduce run outside the
            custom ops (eager collectives), so under torch.compile gather=True breaks the graph.
        backend: "auto" (C++ for CPU tensors, Triton for CUDA ones, the reference when the fused
            path declines the inputs), "reference", "cpp" or "triton"; a forced backend that cannot
            take the inputs raises ValueError saying why.
    Shapes:
        a, b (n, e) with n >= 2 and e >= 1; log_q (n,).
    Returns:
        The bound as an fp32 scalar tensor to maximise, computed in fp32 whatever the input dtypes
        and with autocast off (the reference path computes and returns float64 for float64 inputs).
        Gradients reach a, b and log_q in their dtypes; any of them may be a constant.
    """
    spec = validate_bound_args(a, b, log_q, bound, alpha, scale)
    group = _gather_group(gather, group, a)
    n_columns = a.shape[0] * (dist.get_world_size(group) if group is not None else 1)
    path = select_backend(backend, "a", a, lambda chosen: _kernel_limits(chosen, a, n_columns))
    if path == "reference":
        with autocast_off(a):
            return _gathered_reference(a, b, log_q, spec, group) if group is not None else _reference(a, b, log_q, spec)
    columns, offset = (_all_gather(b, group), dist.get_rank(group) * a.shape[0]) if group is not None else (b, 0)
    share = _fused_share(path, a, columns, log_q, spec, offset)
    if group is not None:
        share = _summed_over_ranks(share, group)
    return (_constant_part(spec, columns.shape[0]) + share).float()


def mi_lower_bound_reference(a: torch.Tensor, b: torch.Tensor, log_q: torch.Tensor | None = None,
                             bound: str = "alpha", alpha: float = 0.9, scale: float = 1.0) -> torch.Tensor:
    """Plain PyTorch MI bound on the materialised n x n score matrix.

    Args:
        a, b, log_q, bound, alpha, scale: as in mi_lower_bound.
    Shapes:
        as in mi_lower_bound.
    Returns:
        The bound as a scalar tensor, computed and returned in float64 when any input is float64,
        else in float32 (with autocast off).
    """
    spec = validate_bound_args(a, b, log_q, bound, alpha, scale)
    with autocast_off(a):
        return _reference(a, b, log_q, spec)


def validate_bound_args(a, b, log_q, bound, alpha, scale) -> BoundSpec:
    """Checks the arguments of mi_lower_bound (none of the checks reads a tensor's values)."""
    check_tensor("a", a, ndim=2)
    check_tensor("b", b, ndim=2)
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape (n, e), got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] < 2:
        raise ValueError(f"the bounds need n >= 2 pairs (one positive and one negative), got a of shape "
                         f"{tuple(a.shape)}")
    check_nonempty("a", a, "(n, e)")
    if bound not in BOUNDS:
        raise ValueError(f"bound must be one of {BOUNDS}, got {bound!r}")
    if log_q is not None:
        check_tensor("log_q", log_q, ndim=1)
        if log_q.shape[0] != a.shape[0]:
            raise ValueError(f"log_q must have shape ({a.shape[0]},), got {tuple(log_q.shape)}")
        if bound not in BASELINE_BOUNDS:
            raise ValueError(f"log_q is used by the bounds {BASELINE_BOUNDS}, not by {bound!r}")
    alpha = real_arg("alpha", alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    scale = real_arg("scale", scale)
    if not is_finite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    check_same_device(a=a, b=b, log_q=log_q)
    return BoundSpec(bound=bound, alpha=alpha, scale=scale)


def _kernel_limits(backend: str, a: torch.Tensor, n_columns: int) -> list[str]:
    if backend != "triton":
        return []
    from ..kernels.mi_bound import MAX_COLUMNS, MAX_EMBED

    reasons = []
    if a.shape[1] > MAX_EMBED:
        reasons.append(f"embedding width {a.shape[1]} (a of shape {tuple(a.shape)}) exceeds the kernel's maximum "
                       f"{MAX_EMBED}")
    if n_columns >= MAX_COLUMNS:
        reasons.append(f"{n_columns} columns (the b of every rank) reach the kernel's limit {MAX_COLUMNS}")
    return reasons


def _gather_group(gather: bool, group, a: torch.Tensor):
    if not gather:
        return None
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("gather=True needs an initialised torch.distributed process group")
    # On a's device: NCCL gathers CUDA tensors only.
    sizes = torch.zeros(dist.get_world_size(group), dtype=torch.long, device=a.device)
    dist.all_gather_into_tensor(sizes, torch.tensor([a.shape[0]], device=a.device), group=group)
    if len(set(sizes.tolist())) > 1:
        raise ValueError(f"gather=True needs the same batch size on every rank, got {sizes.tolist()}")
    return group if group is not None else dist.group.WORLD


class _GatherRows(torch.autograd.Function):
    """Concatenates x over the group's ranks along dim 0; the backward sums the gradient over
    the ranks (one all-reduce) and hands each rank the rows it owns."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        whole = x.new_empty((dist.get_world_size(group) * x.shape[0],) + tuple(x.shape[1:]))
        dist.all_gather_into_tensor(whole, x.contiguous(), group=group)
        return whole

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        rows = grad.shape[0] // dist.get_world_size(ctx.group)
        start = dist.get_rank(ctx.group) * rows
        return grad[start:start + rows], None


def _all_gather(x: torch.Tensor, group) -> torch.Tensor:
    return _GatherRows.apply(x, group)


def _gathered_reference(a, b, log_q, spec: BoundSpec, group) -> torch.Tensor:
    """Every rank evaluates the whole gathered batch; scaling the graph by 1/world keeps the
    gradient exact once the all-gather sums it over the ranks."""
    # One packed all-gather: separate ones would run their backward collectives in whatever
    # order autograd picks on each rank, and mismatched gloo collectives abort.
    parts = [a, b] + ([log_q[:, None]] if log_q is not None else [])
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), parts[-1].dtype)
    whole = _all_gather(torch.cat([p.to(dtype) for p in parts], dim=1), group)
    embed = a.shape[1]
    value = _reference(whole[:, :embed], whole[:, embed:2 * embed],
                       whole[:, 2 * embed] if log_q is not None else None, spec)
    world = dist.get_world_size(group)
    return value / world + (value - value / world).detach()


def _constant_part(spec: BoundSpec, n: int) -> float:
    """The part of the value no row contributes: log n for InfoNCE, the 1 of the others."""
    return math.log(n) if spec.bound == "infonce" else 1.0


def bound_share(bound_id: int, n: int, joint: torch.Tensor, log_marg: torch.Tensor) -> torch.Tensor:
    """A block of rows' part of the value less its constant part (float64), from the fused kernels'
    per-row terms; the parts of all rows (of all ranks) sum to the value less the constant."""
    joint = joint.double()
    if bound_id == MI_BOUND_IDS["infonce"]:
        return joint / n
    pairs = n * (n - 1)
    marginal = torch.exp(torch.logsumexp(log_marg.double(), dim=0) - math.log(pairs))
    joint_term = joint / pairs if bound_id == MI_BOUND_IDS["alpha"] else joint / n
    return joint_term - marginal


def _summed_over_ranks(share: torch.Tensor, group) -> torch.Tensor:
    """The shares summed over the group; the gradient stays this rank's share's, since the other
    ranks' shares reach this rank's b through the all-gather's backward."""
    total = share.detach().clone()
    dist.all_reduce(total, group=group)
    return share + (total - share.detach())


# ---- reference: the estimators on the materialised score matrix, in forms that stay exact when
# the positive (or one negative) dominates its row by tens of nats: no term is ever subtracted
# from a sum that holds it, and no gradient is formed as 1 minus a probability ----

def _off_diagonal(scores: torch.Tensor) -> torch.Tensor:
    n = scores.shape[0]
    return scores.masked_fill(torch.eye(n, dtype=torch.bool, device=scores.device), float("-inf"))


def _logmeanexp_offdiag(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    return torch.logsumexp(_off_diagonal(x).flatten(), 0) - math.log(n * (n - 1))


def _softplus(x: torch.Tensor) -> torch.Tensor:
    """log(1 + e^x) without torch's linear cut-off above x = 20 (off by e^-20 there)."""
    return torch.logaddexp(x, torch.zeros_like(x))


def _tuba(scores: torch.Tensor, log_q) -> torch.Tensor:
    if log_q is not None:
        scores = scores - log_q[:, None]
    return 1.0 + scores.diagonal().mean() - _logmeanexp_offdiag(scores).exp()


def _infonce(scores: torch.Tensor) -> torch.Tensor:
    # S_ii - LSE_i = -softplus(LSE'_i - S_ii): its gradient in S_ii is sigmoid(LSE'_i - S_ii), not 1 - p_ii.
    lse_off = torch.logsumexp(_off_diagonal(scores), 1)
    return math.log(scores.shape[0]) - _softplus(lse_off - scores.diagonal()).mean()


def _js(scores: torch.Tensor) -> torch.Tensor:
    n = scores.shape[0]
    diag = scores.diagonal()
    fgan = -_softplus(-diag).mean() - _softplus(_off_diagonal(scores)).sum() / (n * (n - 1))
    return fgan + (_tuba(scores - 1.0, None) - fgan).detach()


def _log_sums_without(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, LSE'): R_ij = log sum_{k != i, j} e^{S_ik} for j != i and LSE'_i = log sum_{k != i} e^{S_ik}.

    The row's largest negative (column x_i) is split off: LSE'_i = logaddexp(S_ix, R_ix) with
    R_ix = LSE'' (the others' sum) computed directly; every other negative holds at most half of
    LSE'_i, so R_ij = LSE'_i + log1p(-e^{S_ij - LSE'_i}) is well conditioned.
    """
    n = scores.shape[0]
    off = _off_diagonal(scores)
    top, top_column = off.max(dim=1)
    is_top = torch.zeros_like(off, dtype=torch.bool).scatter_(1, top_column[:, None], True)
    if n > 2:
        rest = torch.logsumexp(off.masked_fill(is_top, float("-inf")), 1)
    else:  # no other negative (a constant: logsumexp over nothing has a NaN gradient)
        rest = torch.full_like(top, float("-inf"))
    lse_off = torch.logaddexp(top, rest)
    fraction = (off - lse_off[:, None]).masked_fill(is_top, float("-inf"))
    without = torch.where(is_top, rest[:, None], lse_off[:, None] + torch.log1p(-torch.exp(fraction)))
    return without, lse_off


def _log_interpolate(log_a: torch.Tensor, log_b: torch.Tensor, alpha: float) -> torch.Tensor:
    """log(alpha e^{log_a} + (1 - alpha) e^{log_b}); alpha in {0, 1} gives log_b / log_a exactly."""
    if alpha == 0.0:
        return log_b
    if alpha == 1.0:
        return log_a
    return torch.logaddexp(math.log(alpha) + log_a, math.log1p(-alpha) + log_b)


def _interpolated(scores: torch.Tensor, log_q, alpha: float) -> torch.Tensor:
    """I_alpha through S_ii - u_ij = -psi(softplus(R_ij - S_ii), q_i - S_ii) and
    LSE'_i - u_ii = -psi(0, q_i - LSE'_i), psi(x, y) = log(alpha/(n-1) e^x + (1-alpha) e^y):
    S_ii and LSE'_i enter each term once, so autograd never cancels (n - 1) against sum' w_ij."""
    n = scores.shape[0]
    log_n1 = math.log(n - 1)
    baseline = log_q if log_q is not None else torch.zeros(n, dtype=scores.dtype, device=scores.device)
    diag = scores.diagonal()
    without, lse_off = _log_sums_without(scores)
    joint = -_log_interpolate(_softplus(without - diag[:, None]) - log_n1, (baseline - diag)[:, None], alpha)
    joint_term = joint.masked_fill(torch.eye(n, dtype=torch.bool, device=scores.device), 0.0).sum()
    log_marginal = -_log_interpolate(torch.full_like(lse_off, -log_n1), baseline - lse_off, alpha)  # LSE' - u_ii
    marginal = torch.exp(torch.logsumexp(log_marginal, 0) - math.log(n * (n - 1)))
    return 1.0 + joint_term / (n * (n - 1)) - marginal


def _reference(a, b, log_q, spec: BoundSpec) -> torch.Tensor:
    dtype = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
    scores = spec.scale * (a.to(dtype) @ b.to(dtype).T)
    log_q = log_q.to(dtype) if log_q is not None else None
    if spec.bound == "infonce":
        return _infonce(scores)
    if spec.bound == "nwj":
        return _tuba(scores - 1.0, None)
    if spec.bound == "tuba":
        return _tuba(scores, log_q)
    if spec.bound == "js":
        return _js(scores)
    return _interpolated(scores, log_q, spec.alpha)


# ---- the fused paths as custom ops: one graph under torch.compile, autograd registered below ----
# Rows a (n_rows, e) run against columns b (n, e), row r's positive in column diag_offset + r; each
# forward returns the rows' share of the value (bound_share).

def _fused_share(path: str, a, columns, log_q, spec: BoundSpec, offset: int) -> torch.Tensor:
    args = (a, columns, log_q, spec.bound_id, spec.alpha, spec.scale, offset)
    if path == "cpp":
        need_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (a, columns, log_q))
        return torch.ops.pykd.mi_bound_cpp(*args, need_grad)[0]
    return torch.ops.pykd.mi_bound_triton(*args)[0]


@torch.library.custom_op("pykd::mi_bound_cpp", mutates_args=())
def _cpp_bound(a: torch.Tensor, b: torch.Tensor, log_q: torch.Tensor | None, bound_id: int, alpha: float,
               scale: float, diag_offset: int, need_grad: bool
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(share, dI/da, dI/db, dI/dlog_q) in one sweep; the gradients are fp32, empty when not needed."""
    with autocast_off(a):
        joint, log_marg, *grads = cpu_extension().mi_bound_forward(a, b, log_q, bound_id, alpha, scale, need_grad,
                                                                   diag_offset)
    share = bound_share(bound_id, b.shape[0], joint, log_marg)
    return (share, *(g if g is not None else a.new_empty(0, dtype=torch.float32) for g in grads))


@_cpp_bound.register_fake
def _(a, b, log_q, bound_id, alpha, scale, diag_offset, need_grad):
    shapes = (a.shape, b.shape, log_q.shape if log_q is not None else (0,)) if need_grad else ((0,),) * 3
    return (a.new_empty((), dtype=torch.float64), *(a.new_empty(shape, dtype=torch.float32) for shape in shapes))


def _cpp_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*output[1:])
    ctx.dtypes = tuple(x.dtype if x is not None else None for x in inputs[:3])


def _cpp_backward(ctx, grad_share, *_saved_grads):
    grads = [(grad * grad_share).to(dtype) if ctx.needs_input_grad[k] else None
             for k, (grad, dtype) in enumerate(zip(ctx.saved_tensors, ctx.dtypes))]
    return (*grads,) + (None,) * 5


_cpp_bound.register_autograd(_cpp_backward, setup_context=_cpp_setup_context)


@torch.library.custom_op("pykd::mi_bound_triton", mutates_args=())
def _triton_bound(a: torch.Tensor, b: torch.Tensor, log_q: torch.Tensor | None, bound_id: int, alpha: float,
                  scale: float, diag_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(share, the row statistics the backward reads)."""
    from ..kernels import mi_bound as kernel

    with autocast_off(a):
        joint, log_marg, stats = kernel.bound_forward(a, b, log_q, bound_id, alpha, scale, diag_offset)
    return bound_share(bound_id, b.shape[0], joint, log_marg), stats


@_triton_bound.register_fake
def _(a, b, log_q, bound_id, alpha, scale, diag_offset):
    from ..kernels.mi_bound import STAT_NAMES

    return a.new_empty((), dtype=torch.float64), a.new_empty((len(STAT_NAMES), a.shape[0]), dtype=torch.float32)


@torch.library.custom_op("pykd::mi_bound_triton_backward", mutates_args=())
def _triton_bound_grads(a: torch.Tensor, b: torch.Tensor, log_q: torch.Tensor | None, stats: torch.Tensor,
                        grad_share: torch.Tensor, bound_id: int, alpha: float, scale: float, diag_offset: int
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dI/da, dI/db, dI/dlog_q) in the inputs' dtypes; dI/dlog_q is empty without log_q."""
    from ..kernels import mi_bound as kernel

    with autocast_off(a):
        grad_a, grad_b, grad_q = kernel.bound_backward(a, b, log_q, stats, grad_share, bound_id, alpha, scale,
                                                       diag_offset)
    return grad_a, grad_b, grad_q if grad_q is not None else a.new_empty(0)


@_triton_bound_grads.register_fake
def _(a, b, log_q, stats, grad_share, bound_id, alpha, scale, diag_offset):
    return torch.empty_like(a), torch.empty_like(b), torch.empty_like(log_q) if log_q is not None else a.new_empty(0)


def _triton_setup_context(ctx, inputs, output):
    a, b, log_q, *kernel_args = inputs
    ctx.save_for_backward(a, b, log_q, output[1])
    ctx.kernel_args = kernel_args


def _triton_backward(ctx, grad_share, _grad_stats):
    grads = _triton_bound_grads(*ctx.saved_tensors, grad_share, *ctx.kernel_args)
    return (*(grad if need else None for grad, need in zip(grads, ctx.needs_input_grad)),) + (None,) * 4


_triton_bound.register_autograd(_triton_backward, setup_context=_triton_setup_context)
