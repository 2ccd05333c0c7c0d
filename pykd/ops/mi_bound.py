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
from ._checks import check_same_device, check_tensor, resolve_backend

BOUNDS = tuple(MI_BOUND_IDS)
_BASELINE_BOUNDS = ("tuba", "alpha")


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
    """Lower bound on I(X; Y) from critic embeddings a, b (n, e); an fp32 scalar to maximise.

    log_q: optional (n,) log-baseline per row, used by "tuba" and "alpha". Gradients reach a, b
    and log_q, any of which may be constants. gather: use the b of every rank of `group` (default:
    the world) as negatives, so the bound runs over the global batch. backend as in
    attention_relation_loss.
    """
    spec = validate_bound_args(a, b, log_q, bound, alpha, scale)
    path = resolve_backend(backend, a)
    group = _gather_group(gather, group, a)
    if path == "reference":
        return _gathered_reference(a, b, log_q, spec, group) if group is not None else _reference(a, b, log_q, spec)
    columns, offset = (_all_gather(b, group), dist.get_rank(group) * a.shape[0]) if group is not None else (b, 0)
    function = _CppMIBound if path == "cpp" else _TritonMIBound
    return function.apply(a, columns, log_q, spec, offset, group)


def mi_lower_bound_reference(a, b, log_q=None, bound="alpha", alpha=0.9, scale=1.0) -> torch.Tensor:
    """Materialises S (n x n); float64 when any input is, else float32."""
    spec = validate_bound_args(a, b, log_q, bound, alpha, scale)
    return _reference(a, b, log_q, spec)


def validate_bound_args(a, b, log_q, bound, alpha, scale) -> BoundSpec:
    check_tensor("a", a, ndim=2)
    check_tensor("b", b, ndim=2)
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape (n, e), got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] < 2:
        raise ValueError(f"the bounds need n >= 2 pairs (one positive and one negative), got a of shape "
                         f"{tuple(a.shape)}")
    if bound not in BOUNDS:
        raise ValueError(f"bound must be one of {BOUNDS}, got {bound!r}")
    if log_q is not None:
        check_tensor("log_q", log_q, ndim=1)
        if log_q.shape[0] != a.shape[0]:
            raise ValueError(f"log_q must have shape ({a.shape[0]},), got {tuple(log_q.shape)}")
        if bound not in _BASELINE_BOUNDS:
            raise ValueError(f"log_q is used by the bounds {_BASELINE_BOUNDS}, not by {bound!r}")
    if not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    check_same_device(a=a, b=b, log_q=log_q)
    return BoundSpec(bound=bound, alpha=float(alpha), scale=float(scale))


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


def bound_value(spec: BoundSpec, n: int, joint: torch.Tensor, log_marg: torch.Tensor, group=None) -> torch.Tensor:
    """Combines the per-row terms of the fused kernels (over the group's ranks if given)."""
    joint = joint.double()
    if group is not None:
        dist.all_reduce(joint, group=group)
    if spec.bound == "infonce":
        return math.log(n) + joint / n
    log_marg = log_marg.double()
    peak = log_marg.max()
    if group is not None:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    total = torch.exp(log_marg - peak).sum()
    if group is not None:
        dist.all_reduce(total, group=group)
    pairs = n * (n - 1)
    marginal = torch.exp(peak + torch.log(total) - math.log(pairs))
    joint_term = joint / pairs if spec.bound == "alpha" else joint / n
    return 1.0 + joint_term - marginal


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


class _CppMIBound(torch.autograd.Function):
    """CPU path: one sweep over row blocks gives the row terms and all gradients."""

    @staticmethod
    def forward(ctx, a, b, log_q, spec: BoundSpec, offset: int, group):
        need_grad = any(ctx.needs_input_grad[:3])
        joint, log_marg, grad_a, grad_b, grad_q = cpu_extension().mi_bound_forward(
            a, b, log_q, spec.bound_id, spec.alpha, spec.scale, need_grad, offset)
        if need_grad:
            ctx.save_for_backward(grad_a, grad_b, grad_q)
            ctx.dtypes = (a.dtype, b.dtype, log_q.dtype if log_q is not None else None)
        return bound_value(spec, b.shape[0], joint, log_marg, group).float()

    @staticmethod
    def backward(ctx, grad_output):
        grads = []
        for k, (grad, dtype) in enumerate(zip(ctx.saved_tensors, ctx.dtypes)):
            grads.append((grad * grad_output).to(dtype) if ctx.needs_input_grad[k] else None)
        return (*grads, None, None, None)


class _TritonMIBound(torch.autograd.Function):
    """GPU path: row statistics in the forward, tiles recomputed in the backward."""

    @staticmethod
    def forward(ctx, a, b, log_q, spec: BoundSpec, offset: int, group):
        from ..kernels import mi_bound as kernel

        joint, log_marg, stats = kernel.bound_forward(a, b, log_q, spec.bound_id, spec.alpha, spec.scale, offset)
        ctx.save_for_backward(a, b, log_q, stats)
        ctx.spec, ctx.offset = spec, offset
        return bound_value(spec, b.shape[0], joint, log_marg, group).float()

    @staticmethod
    def backward(ctx, grad_output):
        from ..kernels import mi_bound as kernel

        a, b, log_q, stats = ctx.saved_tensors
        spec = ctx.spec
        grad_a, grad_b, grad_q = kernel.bound_backward(a, b, log_q, stats, grad_output, spec.bound_id,
                                                       spec.alpha, spec.scale, ctx.offset)
        return (grad_a if ctx.needs_input_grad[0] else None, grad_b if ctx.needs_input_grad[1] else None,
                grad_q if ctx.needs_input_grad[2] else None, None, None, None)
