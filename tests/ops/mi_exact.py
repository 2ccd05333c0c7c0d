"""The MI bounds of methods.md section 2 evaluated in 90-digit decimal arithmetic, independently of pykd.

Written from the definitions (value) and methods.md's closed-form gradients, with no stable
rewriting: at 90 digits the plain forms (T_i - e_ij, 1 - p) keep more than 40 correct digits at
separations of 80 nats, so they serve as the exact answer the float paths are measured against.
"""
import decimal
import math
from dataclasses import dataclass

import torch

CONTEXT = decimal.Context(prec=90, Emax=10**6, Emin=-10**6)
NOISE_WIDTH = 8
# Relative rounding of bf16 gradient outputs: once on output (2^-8), and a GPU multiplies G in one
# tf32 pass (2^-11); the Triton interpreter's fp32 -> bf16 conversion truncates instead (2^-7).
BF16_GRAD_ROUNDING = 2.0**-8 + 2.0**-11
BF16_INTERPRETER_ROUNDING = 2.0**-7
D = CONTEXT.create_decimal_from_float


@dataclass
class Exact:
    value: float
    grad_scores: torch.Tensor     # dI/dS (n, n), float64
    grad_log_q: torch.Tensor      # dI/dq (n,), float64 (zeros when the bound ignores q)
    value_grad_l1: float          # sum |dI/dS| of the value (differs from grad_scores for js)
    value_terms: float            # magnitude of the value's terms, sum |term| / count
    grad_log_q_terms: torch.Tensor  # per row, sum |term| of dI/dq (its rounding scale)


def exact_scores(a: torch.Tensor, b: torch.Tensor, scale: float):
    """(S, e^S) with S = scale a b^T exactly (inputs taken at their binary values, no rounding)."""
    a_d = [[D(float(x)) for x in row] for row in a.double().tolist()]
    b_d = [[D(float(x)) for x in row] for row in b.double().tolist()]
    s = D(scale)
    with decimal.localcontext(CONTEXT):
        scores = [[s * sum((x * y for x, y in zip(ai, bj)), D(0)) for bj in b_d] for ai in a_d]
        return scores, [[x.exp() for x in row] for row in scores]


def _tensor(rows) -> torch.Tensor:
    return torch.tensor([[float(x) for x in row] for row in rows], dtype=torch.float64)


def exact_bound(exact_scores, log_q, bound: str, alpha: float) -> Exact:
    """The bound's value and gradients at exact_scores = (S, e^S) from exact_scores()."""
    scores, exps = exact_scores
    with decimal.localcontext(CONTEXT):
        n = len(scores)
        pairs = D(n * (n - 1))
        q = [D(float(x)) for x in log_q.double().tolist()] if log_q is not None else [D(0)] * n
        if bound == "infonce":
            return _infonce(scores, exps, n)
        if bound in ("nwj", "js"):
            nwj = _tuba(scores, exps, [D(1)] * n, n, pairs)
            if bound == "nwj":
                return nwj
            return _js(exps, n, pairs, nwj)
        if bound == "tuba":
            return _tuba(scores, exps, q, n, pairs)
        return _alpha(scores, exps, q, D(alpha), n, pairs)


def _infonce(scores, exps, n):
    value, terms, grad = D(math.log(n)), D(math.log(n)), []
    for i in range(n):
        total = sum(exps[i], D(0))
        term = scores[i][i] - total.ln()
        value += term / n
        terms += abs(term) / n
        grad.append([((1 if k == i else 0) - exps[i][k] / total) / n for k in range(n)])
    return Exact(float(value), _tensor(grad), torch.zeros(n, dtype=torch.float64),
                 float(sum(abs(g) for row in grad for g in row)), float(terms),
                 torch.zeros(n, dtype=torch.float64))


def _tuba(scores, exps, q, n, pairs):
    """1 + mean_i (S_ii - q_i) - mean_{i != j} e^{S_ij - q_i}: TUBA, and NWJ with q = 1."""
    value, terms, grad, grad_q, grad_q_terms = D(1), D(1), [], [], []
    for i in range(n):
        eq = q[i].exp()
        marginal = sum((exps[i][j] for j in range(n) if j != i), D(0)) / eq
        value += (scores[i][i] - q[i]) / n - marginal / pairs
        terms += abs(scores[i][i] - q[i]) / n + marginal / pairs
        grad.append([D(1) / n if k == i else -exps[i][k] / eq / pairs for k in range(n)])
        grad_q.append(-D(1) / n + marginal / pairs)
        grad_q_terms.append(D(1) / n + marginal / pairs)
    l1 = float(sum(abs(g) for row in grad for g in row))
    return Exact(float(value), _tensor(grad), _tensor([grad_q])[0], l1, float(terms), _tensor([grad_q_terms])[0])


def _js(exps, n, pairs, nwj: Exact):
    """Value of NWJ; gradient of mean_i(-softplus(-S_ii)) - mean_{i != j} softplus(S_ij)."""
    grad = [[1 / (1 + exps[i][k]) / n if k == i else -exps[i][k] / (1 + exps[i][k]) / pairs for k in range(n)]
            for i in range(n)]
    return Exact(nwj.value, _tensor(grad), torch.zeros(n, dtype=torch.float64), nwj.value_grad_l1,
                 nwj.value_terms, torch.zeros(n, dtype=torch.float64))


def _alpha(scores, exps, q, alpha, n, pairs):
    """methods.md: e_ik, T_i, U_i, a_ij = alpha (T_i - e_ij)/(n-1) + (1-alpha) e^{q_i}, R_i = sum'_j 1/a_ij."""
    value, terms, grad, grad_q, grad_q_terms = D(1), D(1), [], [], []
    for i in range(n):
        e, eq = exps[i], q[i].exp()
        total = sum(e, D(0))
        off = total - e[i]
        a = [alpha * (total - e[j]) / (n - 1) + (1 - alpha) * eq for j in range(n)]
        recip = sum((1 / a[j] for j in range(n) if j != i), D(0))
        log_prod = D(1)
        for j in range(n):
            if j != i:
                log_prod *= a[j]
        joint = (n - 1) * scores[i][i] - log_prod.ln()  # sum'_j (S_ii - log a_ij)
        marginal = off / a[i]
        value += joint / pairs - marginal / pairs
        # A rounding scale only: floats suffice (and n^2 decimal logs would be slow).
        diag = float(scores[i][i])
        terms += D(sum(abs(diag - math.log(float(a[j]))) for j in range(n) if j != i)) / pairs + marginal / pairs
        row = []
        for k in range(n):
            if k == i:
                row.append(((n - 1) - alpha * e[i] * recip / (n - 1)) / pairs)
            else:
                row.append((-alpha * e[k] * (recip - 1 / a[k]) / (n - 1) - e[k] / a[i]
                            + alpha * off * e[k] / ((n - 1) * a[i] ** 2)) / pairs)
        grad.append(row)
        grad_q.append((1 - alpha) * eq * (off / a[i] ** 2 - recip) / pairs)
        grad_q_terms.append((1 - alpha) * eq * (off / a[i] ** 2 + recip) / pairs)
    l1 = float(sum(abs(g) for row in grad for g in row))
    return Exact(float(value), _tensor(grad), _tensor([grad_q])[0], l1, float(terms), _tensor([grad_q_terms])[0])


def layout_inputs(layout: str, n: int, sep: float, dtype: torch.dtype, seed: int):
    """(a, b, log_q, scale), rounded to dtype; log_q ~ sep U(0, 1) spans both sides of the LOO mean."""
    g = torch.Generator().manual_seed(seed)
    if layout == "normalised":
        a = torch.nn.functional.normalize(torch.randn(n, 16, generator=g, dtype=torch.float64), dim=1)
        b = torch.nn.functional.normalize(a + 0.3 * torch.randn(n, 16, generator=g, dtype=torch.float64), dim=1)
        scale = float(sep)
    else:
        noise = NOISE_WIDTH**-0.25  # x_i . y_j ~ N(0, 1)
        columns = torch.arange(n)
        if layout == "confused":  # the second half of the rows: a negative dominates (a derangement)
            half = torch.arange(n // 2, n)
            columns[half] = half.roll(1)
        peak = math.sqrt(sep) * torch.eye(n, dtype=torch.float64)
        a = torch.cat([peak, noise * torch.randn(n, NOISE_WIDTH, generator=g, dtype=torch.float64)], 1)
        b = torch.cat([peak[columns], noise * torch.randn(n, NOISE_WIDTH, generator=g, dtype=torch.float64)], 1)
        scale = 1.0
    log_q = sep * torch.rand(n, generator=g, dtype=torch.float64)
    return a.to(dtype), b.to(dtype), log_q.to(dtype), scale


def exact_errors(value: float, grads, a, b, log_q, scale: float, ref: Exact, u: float, out_rounding: float = 0.0):
    """[(what, error, bound)] of a path's value and gradients (float64 CPU tensors, in the order a, b,
    log_q) against the exact ones, with the bounds of tests/test_mi_confident.py's docstring: u is the
    unit roundoff of the path's arithmetic, out_rounding the relative rounding of its gradient outputs."""
    n, e = a.shape
    a64, b64 = a.double(), b.double()
    kappa = scale * float(a64.norm(dim=1).max() * b64.norm(dim=1).max())
    gamma = (e + 2) * u * kappa
    rho = 4 * gamma + (n + 100) * u
    value_tol = 2 * gamma * ref.value_grad_l1 + (n + 20) * u * (ref.value_terms + kappa)
    errors = [("value", abs(value - ref.value), value_tol)]
    g = ref.grad_scores
    expected = [scale * g @ b64, scale * g.T @ a64]
    magnitude = [scale * g.abs() @ b64.abs(), scale * g.abs().T @ a64.abs()]
    if log_q is not None:
        expected.append(ref.grad_log_q)
        magnitude.append(ref.grad_log_q_terms)
    for name, grad, want, size in zip(("d/da", "d/db", "d/dlog_q"), grads, expected, magnitude):
        errors.append((name, float((grad - want).norm()), (rho + (n + e) * u + out_rounding) * float(size.norm())))
    return errors
