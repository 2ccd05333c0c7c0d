"""The mse_prob relation loss (AutoDistil Eq. 4) and its score gradient in 100-digit decimal arithmetic,
independently of pykd.

Written from the definitions, with no stable rewriting: per relation head and valid query row,
p = softmax(t), q = softmax(s) over the valid keys, the loss is w sum_j (p_j - q_j)^2 with
w = 1/N, and G = dL/ds = q (g - sum_k q_k g_k) with g = 2 w (q - p). The plain form cancels at
a peak: with eps = 1 - q_max it loses about log10(1/eps^2) of the 100 digits, so a row whose
closest competitor to the peak is within 35 nats (eps > 1e-16) keeps more than 60 correct digits.
The scores are formed exactly from the inputs' binary values (no rounding), as the float paths see them.

Besides the exact values, each row gets the magnitudes that the rounding-error bound of the
tests is stated in (tests/test_attention_relation_peaked.py derives it): with m the student's
peak (first argmax of s) and d = q - p,
    a_k = q_k + p_k (k != m),   a_m = min(q_m + p_m, (1 - q_m) + (1 - p_m)),
    M_j = sum_{k != j} q_k (|d_j - d_k| + a_j + a_k),
so that |G_j| <= 2 w q_j M_j and a few ulps of every term of the stable form stay below
rho * 2 w q_j M_j.
"""
import decimal
from dataclasses import dataclass

import torch

CONTEXT = decimal.Context(prec=100, Emax=10**6, Emin=-10**6)
D = CONTEXT.create_decimal_from_float


@dataclass
class ExactRelation:
    value: float
    grad_scores: torch.Tensor   # dL/ds (B, A, L, L), float64; zero on padded rows and keys
    magnitude: torch.Tensor     # 2 w q_j M_j (B, A, L, L), float64: the scale of G_j's rounding error
    value_terms: float          # w sum_{rows, k} |d_k| a_k: the scale of the value's rounding error
    max_abs_score: float        # max |t|, |s| over valid entries


def _head_rows(x: torch.Tensor, b: int, head: int, heads: int, keep: list[int]):
    width = x.shape[2] // heads
    rows = x[b, :, head * width:(head + 1) * width].double().tolist()
    return [[D(float(v)) for v in rows[i]] for i in keep]


def _exact_scores(a_rows, b_rows, scale):
    with decimal.localcontext(CONTEXT):
        return [[scale * sum((x * y for x, y in zip(ai, bj)), D(0)) for bj in b_rows] for ai in a_rows]


def _softmax(row):
    top = max(row)
    exps = [(x - top).exp() for x in row]
    total = sum(exps, D(0))
    return [e / total for e in exps]


def _row(t_row, s_row, w):
    """(loss, G, magnitude 2 w q M, value terms) of one row over its valid keys."""
    p, q = _softmax(t_row), _softmax(s_row)
    n = len(q)
    d = [qk - pk for qk, pk in zip(q, p)]
    g = [2 * w * dk for dk in d]
    qg = sum((qk * gk for qk, gk in zip(q, g)), D(0))
    grad = [qk * (gk - qg) for qk, gk in zip(q, g)]
    peak = s_row.index(max(s_row))
    a = [qk + pk for qk, pk in zip(q, p)]
    a[peak] = min(a[peak], (1 - q[peak]) + (1 - p[peak]))
    # M_j in float64: a magnitude, needed to a few digits only (every term is non-negative).
    qf, df, af = (torch.tensor([float(x) for x in v], dtype=torch.float64) for v in (q, d, a))
    off_diagonal = 1.0 - torch.eye(n, dtype=torch.float64)
    spread = (df[:, None] - df[None, :]).abs() + af[:, None] + af[None, :]
    big_m = (off_diagonal * spread * qf[None, :]).sum(dim=1)
    magnitude = 2 * float(w) * qf * big_m
    loss = w * sum((dk * dk for dk in d), D(0))
    terms = float(w * sum((abs(dk) * ak for dk, ak in zip(d, a)), D(0)))
    return loss, [float(x) for x in grad], magnitude, terms


def exact_mse_prob(t_a, t_b, s_a, s_b, heads: int, mask, scale_t: float, scale_s: float) -> ExactRelation:
    """Exact mse_prob loss and dL/ds for inputs shaped as pykd.attention_relation_loss takes them."""
    batch, length = t_a.shape[:2]
    mask = torch.ones(batch, length, dtype=torch.bool) if mask is None else mask.cpu()
    counts = mask.sum(dim=1).tolist()
    with decimal.localcontext(CONTEXT):
        w = 1 / D(heads * sum(c * c for c in counts))
        grad = torch.zeros(batch, heads, length, length, dtype=torch.float64)
        magnitude = torch.zeros_like(grad)
        value, terms, top = D(0), 0.0, 0.0
        for b in range(batch):
            keep = torch.nonzero(mask[b]).flatten().tolist()
            index = torch.tensor(keep)
            for head in range(heads):
                t = _exact_scores(_head_rows(t_a, b, head, heads, keep), _head_rows(t_b, b, head, heads, keep),
                                  D(scale_t))
                s = _exact_scores(_head_rows(s_a, b, head, heads, keep), _head_rows(s_b, b, head, heads, keep),
                                  D(scale_s))
                top = max(top, max(float(abs(x)) for row in t + s for x in row))
                for r, i in enumerate(keep):
                    loss, g, size, row_terms = _row(t[r], s[r], w)
                    value += loss
                    terms += row_terms
                    grad[b, head, i, index] = torch.tensor(g, dtype=torch.float64)
                    magnitude[b, head, i, index] = size
    return ExactRelation(float(value), grad, magnitude, terms, top)
