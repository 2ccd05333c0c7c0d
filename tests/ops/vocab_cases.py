"""Cases of pykd.vocab_kd_loss, an independent float64 oracle, and the rounding bounds the paths must meet.

The oracle evaluates the formulas of pykd/ops/vocab_kd.py on the materialised logits in float64,
written here apart from the op's reference. Its student logits are shifted by the row's top word
with that entry a constant 0, and its log-softmaxes keep the top word apart (log p_t =
-log1p(sum of the others' e^{x_v - x_t})): autograd then gives the top word's gradient as minus the
sum of the others, exact to float64 rounding on rows tens of nats peaked, where q_t - p_t of two
numbers near 1 would be rounding.

The bounds are first-order (Higham, Accuracy and Stability of Numerical Algorithms, 2002, ch. 3
and 4) with the probabilistic constant of Higham & Mary (SIAM J. Sci. Comput. 41, 2019):
gamma~(m) = lam sqrt(m) u for a length-m sum or dot product, lam = 8 (an excess has probability
below 2 e^{-lam^2/2}); u is fp32's for the fused paths (float64's for the reference on float64
inputs). The logits are computed from exactly representable inputs, so for each (row, word)
    e_b = (gamma~(d + 1)(|h| |W_v| + |b_v|) + u |z|) / T + u (3 |log q_v| + 6 log Z + 24)
bounds the error of the computed log q_v (the GEMM, the shifted subtraction, log1p and
exp_u20's 20 ulp), e_a the teacher's alike (no GEMM term for given logits) and e_1 the hard
term's at T = 1. First-order perturbation of a softmax, dq_v = q_v sum_u q_u (db_v - db_u), gives
    |dq_v| <= q_v (e_v + sum_u q_u e_u),   |d log q_v| <= e_v + sum_u q_u e_u
(the same for p and q1). With d = log q - log p, R = sum q d, l = log q - log m, K = sum q l:
    kl, soft_ce   |dg_v| <= |dq_v| + |dp_v|
    reverse_kl    |dg_v| <= |dq_v| |d_v - R| + q_v (|d log q_v| + |d log p_v| + |dR|),
                  |dR| <= sum_v |dq_v| |d_v| + sum_v |q_v - p_v| e_a,v   (sum_v q_v d log q_v = 0)
    jsd           |dg_v| <= (1 - beta)(|dq_v| |l_v - K| + q_v (|dl_v| + |dK|)),
                  |dl_v| <= 2 |d log q_v| + |d log p_v|,  |dK| <= sum_v (|dq_v| |l_v| + q_v |dl_v|)
and |dG_v| <= c (kd_value / T |dg_v| + hard |dq1_v|) + 8 u |G_v| for v != sigma (c the row's
coefficient, 8 u the arithmetic after the exponentials); G_sigma, minus their sum, errs by their
errors' sum plus gamma~(V) sum_{v != sigma} |G_v|. Then, with E the (N, V) matrix of those bounds,
||d dh|| <= ||E||_F ||W_s||_2 + gamma~(V) || |G| |W_s| ||_F, ||d dW|| <= ||E||_F ||h_s||_2 +
gamma~(n) || |G|^T |h_s| ||_F and ||d db|| <= || sum_i E_i || + gamma~(n) || sum_i |G_i| ||, plus
the rounding of each gradient to its input's dtype. The value errs by at most
sum_i c_i (sum_v (|dD/db_v| e_b,v + |dD/da_v| e_a,v) + hard sum_v 2 q1_v e_1,v + gamma~(V) S_i)
+ (gamma~(n) + u) |L|, with S_i = kd_value sum_v (p_v + q_v)(|log p_v| + |log q_v|) + hard
(max|log q1| + 1) the magnitude of the summed terms (the direct sums and the Triton path's
max-shifted cross sums are both sums of such terms).
"""
import functools
import math
from dataclasses import dataclass, field

import torch

UNIT = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float64: 2.0**-53}
LAMBDA = 8.0


def single_threaded(fn):
    """Runs fn with one intra-op thread: the oracle's tensors are small, and on a loaded 2-core
    machine every two-thread op waits for the other thread's time slice (6 s instead of 0.03 s)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
    return wrapper


def gamma_prob(m: int, unit: float = UNIT[torch.float32]) -> float:
    """Higham and Mary's probabilistic bound on a length-m sum's relative error, lam = 8."""
    return LAMBDA * math.sqrt(max(m, 1)) * unit


@dataclass
class Case:
    h_s: torch.Tensor
    w_s: torch.Tensor
    b_s: torch.Tensor | None
    teacher: dict  # keyword arguments of the teacher: h_t/w_t/b_t, teacher_logits or the top-k pair
    labels: torch.Tensor | None
    options: dict = field(default_factory=dict)  # divergence, beta, temperature, weights, topk_tail

    def students(self):
        return [x for x in (self.h_s, self.w_s, self.b_s) if x is not None]

    def run(self, backend: str) -> torch.Tensor:
        import pykd

        teacher = dict(self.teacher)
        positional = [teacher.pop(name, None) for name in ("h_t", "w_t", "b_t")]
        return pykd.vocab_kd_loss(self.h_s, self.w_s, self.b_s, *positional, labels=self.labels, backend=backend,
                                  **teacher, **self.options)


def make_case(rng, n=9, vocab=37, d_s=24, d_t=20, teacher="projected", dtype=torch.float32, ignored="some",
              gap=None, student_gap=None, k=5, device="cpu", bias=True, **options) -> Case:
    """A case with exactly representable inputs in `dtype`.

    gap: the teacher's top word per row is `gap` nats above the rest (logits and top-k teachers:
    a random word per row; a projected teacher: one word, through its bias). student_gap: the
    student's bias lifts one word (each row's teacher top word of row 0 for "same") by that much.
    ignored: "none", "some" (every third row) or "all" rows carry ignore_index.
    """
    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=rng, dtype=torch.float64) * scale).to(dtype)

    h_s = randn(n, d_s)
    w_s = randn(vocab, d_s, scale=d_s**-0.5 * 2)
    b_s = randn(vocab, scale=0.5) if bias or student_gap else None
    teacher_kw: dict = {}
    top_words = torch.randint(0, vocab, (n,), generator=rng)
    if teacher == "projected":
        b_t = randn(vocab, scale=0.5)
        if gap is not None:
            b_t = b_t.double()
            b_t[top_words[0]] += gap
            b_t = b_t.to(dtype)
        teacher_kw = dict(h_t=randn(n, d_t), w_t=randn(vocab, d_t, scale=d_t**-0.5 * 2), b_t=b_t)
    else:
        logits = torch.randn(n, vocab, generator=rng, dtype=torch.float64) * 2
        if gap is not None:
            logits[torch.arange(n), top_words] += gap
        if teacher == "logits":
            teacher_kw = dict(teacher_logits=logits.to(dtype))
        else:
            tail = options.get("topk_tail", "renormalise")
            values, indices = torch.topk(logits, k, dim=1)
            if tail == "spread":
                values = torch.log_softmax(logits, dim=1).gather(1, indices)
            order = torch.randperm(k, generator=rng)  # the op must not assume sorted words
            teacher_kw = dict(teacher_topk_logits=values[:, order].to(dtype),
                              teacher_topk_indices=indices[:, order])
    if student_gap is not None:
        b_s = b_s.double()
        b_s[top_words[0]] += student_gap
        b_s = b_s.to(dtype)
    labels = torch.randint(0, vocab, (n,), generator=rng)
    if ignored == "some":
        labels[::3] = -100
    elif ignored == "all":
        labels[:] = -100
    def move(x):
        return x.to(device) if x is not None else None

    h_s, w_s, b_s, labels = (move(x) for x in (h_s, w_s, b_s, labels))
    teacher_kw = {key: move(x) for key, x in teacher_kw.items()}
    for x in (h_s, w_s, b_s):
        if x is not None:
            x.requires_grad_()
    return Case(h_s, w_s, b_s, teacher_kw, labels if ignored != "absent" else None, options)


# ---- the float64 oracle ----

def _one_hot(index, like):
    return torch.zeros_like(like, dtype=torch.bool).scatter_(1, index[:, None], True)


def _log_softmax_split(x, is_top):
    top = torch.where(is_top, x, 0).sum(1, keepdim=True)
    shifted = x - top
    return shifted - torch.log1p(torch.exp(shifted).masked_fill(is_top, 0).sum(1, keepdim=True))


def teacher_logits64(case: Case) -> torch.Tensor:
    t = {key: x.detach().double().cpu() if x.is_floating_point() else x.cpu() for key, x in case.teacher.items()}
    vocab = case.w_s.shape[0]
    if "h_t" in t:
        z = t["h_t"] @ t["w_t"].T
        return z + t["b_t"] if t.get("b_t") is not None else z
    if "teacher_logits" in t:
        return t["teacher_logits"]
    values, indices = t["teacher_topk_logits"], t["teacher_topk_indices"].long()
    k = values.shape[1]
    if case.options.get("topk_tail", "renormalise") == "spread" and k < vocab:
        mass = torch.exp(torch.logsumexp(values, 1)).clamp(max=1.0)
        fill = torch.log(1.0 - mass) - math.log(vocab - k)
    else:
        fill = torch.full((values.shape[0],), float("-inf"), dtype=torch.float64)
    return fill[:, None].expand(-1, vocab).clone().scatter(1, indices, values)


def _log_mix(x, c):
    """log(c e^x + 1 - c) as log1p(c expm1(x)), exact near x = 0 (float64 overflows past x = 709;
    x = +inf only off a renormalised teacher's words, where the term is masked: the clamp keeps
    its gradient 0 there, not nan)."""
    return torch.log1p(c * torch.expm1(x.clamp(max=700.0)))


def mixture_ratios(log_p, log_q, beta):
    """(log p - log m, log q - log m), m = beta p + (1 - beta) q: log m itself would round to u at
    nearly equal peaked rows, where these ratios are ~1e-11."""
    x = log_p - log_q
    return -_log_mix(-x, 1 - beta), -_log_mix(x, beta)


@dataclass
class Oracle:
    value: float
    grads: list          # float64 gradients of h_s, w_s (, b_s)
    G: torch.Tensor      # dL/dz_s (N, V)
    rows: dict           # per-row quantities for the bounds


@single_threaded
def oracle(case: Case) -> Oracle:
    o = dict(divergence="kl", beta=0.5, temperature=1.0, scale_by_t2=True, kd_weight=1.0, hard_label_weight=0.0,
             ignore_index=-100)
    o.update({key: v for key, v in case.options.items() if key != "topk_tail"})
    T, beta = o["temperature"], o["beta"]
    divergence = o["divergence"]
    if divergence == "jsd" and beta in (0.0, 1.0):
        divergence = "kl" if beta == 0.0 else "reverse_kl"
    kd_value = o["kd_weight"] * (T * T if o["scale_by_t2"] else 1.0)
    hard = o["hard_label_weight"]
    leaves = [x.detach().double().cpu().requires_grad_() for x in case.students()]
    h_s, w_s = leaves[0], leaves[1]
    b_s = leaves[2] if case.b_s is not None else None
    labels = case.labels.cpu() if case.labels is not None else None
    selected = labels != o["ignore_index"] if labels is not None else torch.ones(h_s.shape[0], dtype=torch.bool)
    z_s = h_s @ w_s.T + (b_s if b_s is not None else 0.0)
    z_s.retain_grad()
    z_t = teacher_logits64(case).requires_grad_()
    is_top = _one_hot(z_s.detach().argmax(1), z_s)
    shifted = torch.where(is_top, 0.0, z_s - torch.where(is_top, z_s, 0).sum(1, keepdim=True))
    log_q = _log_softmax_split(shifted / T, is_top)
    log_p = _log_softmax_split(z_t / T, _one_hot(z_t.detach().argmax(1), z_t))
    p, q = log_p.exp(), log_q.exp()
    mass = p > 0
    # Words without teacher mass (log p = -inf) add 0; a finite stand-in keeps their gradient 0, not nan.
    log_p_mass = torch.where(mass, log_p, 0.0)
    if divergence == "kl":
        d_rows = (p * (log_p_mass - log_q)).sum(1)
    elif divergence == "soft_ce":
        d_rows = (-p * log_q).sum(1)
    elif divergence == "reverse_kl":
        d_rows = (q * (log_q - log_p)).sum(1)
    else:
        ratio_p, ratio_q = mixture_ratios(log_p, log_q, beta)
        d_rows = beta * (p * torch.where(mass, ratio_p, 0.0)).sum(1) + (1 - beta) * (q * ratio_q).sum(1)
    row = kd_value * d_rows
    log_q1 = _log_softmax_split(shifted, is_top)
    if hard:
        row = row - hard * log_q1.gather(1, torch.where(selected, labels, 0)[:, None]).squeeze(1)
    n = int(selected.sum())
    value = torch.where(selected, row, 0).sum() / max(n, 1)
    value.backward(retain_graph=True)
    grads = [x.grad if x.grad is not None else torch.zeros_like(x) for x in leaves]
    # dD/da and dD/db per row, for the value's bound.
    dd_db, dd_da = torch.autograd.grad(d_rows.sum(), (z_s, z_t), allow_unused=True) if n else (None, None)
    rows = dict(selected=selected, n=n, p=p.detach(), q=q.detach(), log_p=log_p.detach(), log_q=log_q.detach(),
                log_q1=log_q1.detach(), d_rows=d_rows.detach(), z_s=z_s.detach(), z_t=z_t.detach(),
                dd_db=(dd_db * T) if dd_db is not None else None, dd_da=(dd_da * T) if dd_da is not None else None,
                divergence=divergence, beta=beta, T=T, kd_value=kd_value, hard=hard, is_top=is_top)
    return Oracle(float(value.detach()), grads, z_s.grad if z_s.grad is not None else torch.zeros_like(z_s), rows)


# ---- the bounds ----

def _logit_error(h, w, b, z, log_x, T, gemm: bool, u: float):
    """(N, V) bound on the error of the computed log-softmax of z / T, in nats (module docstring)."""
    z_abs = torch.where(torch.isfinite(z), z.abs(), 0.0)
    err = u * z_abs
    if gemm:
        err = err + gamma_prob(h.shape[1] + 1, u) * (h.abs() @ w.abs().T + (b.abs() if b is not None else 0.0))
    finite_log = torch.where(torch.isfinite(log_x), log_x.abs(), 0.0)
    log_z = (-log_x.amax(1, keepdim=True)).clamp(min=0)  # log1p(rest) = -log x_top
    return err / T + u * (3 * finite_log + 6 * log_z + 24)


def _softmax_error(x, err):
    """|d x_v| <= x_v (err_v + sum_u x_u err_u) for x = softmax, err the logits' (and d log x_v alike)."""
    mean = (x * err).sum(1, keepdim=True)
    return x * (err + mean), err + mean


@single_threaded
def bounds(case: Case, ref: Oracle, out_dtype=None, compute=torch.float32) -> dict:
    """Absolute bounds on |value error| and on ||grad error||_2 of each of h_s, w_s, b_s, for a path
    computing in `compute` (fp32 for the fused paths; the reference computes in float64 for float64
    inputs)."""
    r = ref.rows
    u = UNIT[compute]

    def gamma(m):
        return gamma_prob(m, u)

    T, n = r["T"], r["n"]
    vocab = case.w_s.shape[0]
    if n == 0:
        return dict(value=0.0, grads=[0.0] * len(ref.grads))
    h_s, w_s = (x.detach().double().cpu() for x in (case.h_s, case.w_s))
    b_s = case.b_s.detach().double().cpu() if case.b_s is not None else None
    t = {key: x.detach().cpu() for key, x in case.teacher.items()}
    projected = "h_t" in t
    p, q, log_p, log_q = r["p"], r["q"], r["log_p"], r["log_q"]
    q1 = r["log_q1"].exp()
    err_b = _logit_error(h_s, w_s, b_s, r["z_s"], log_q, T, gemm=True, u=u)
    err_a = _logit_error(t["h_t"].double() if projected else None, t["w_t"].double() if projected else None,
                         t["b_t"].double() if projected and t.get("b_t") is not None else None, r["z_t"], log_p, T,
                         gemm=projected, u=u)
    err_a = torch.where(p > 0, err_a, 0.0)
    err_1 = _logit_error(h_s, w_s, b_s, r["z_s"], r["log_q1"], 1.0, gemm=True, u=u)
    dq, dlog_q = _softmax_error(q, err_b)
    dp, dlog_p = _softmax_error(p, err_a)
    dq1, _ = _softmax_error(q1, err_1)
    div, beta = r["divergence"], r["beta"]
    if div in ("kl", "soft_ce"):
        dg = dq + dp
    elif div == "reverse_kl":
        d = torch.where(p > 0, log_q - log_p, 0.0)
        d_r = (dq * d.abs()).sum(1, keepdim=True) + ((q - p).abs() * err_a).sum(1, keepdim=True)
        dg = dq * (d - r["d_rows"][:, None]).abs() + q * (dlog_q + dlog_p + d_r)
    else:
        ell = mixture_ratios(log_p, log_q, beta)[1]
        k_rows = (q * ell).sum(1, keepdim=True)
        d_ell = 2 * dlog_q + dlog_p
        d_k = (dq * ell.abs()).sum(1, keepdim=True) + (q * d_ell).sum(1, keepdim=True)
        dg = (1 - beta) * (dq * (ell - k_rows).abs() + q * (d_ell + d_k))
    coef = torch.where(r["selected"], 1.0 / n, 0.0)[:, None]
    G, top = ref.G, r["is_top"]
    g_abs = G.abs()
    e = coef * (r["kd_value"] / T * dg + r["hard"] * dq1) + 8 * u * g_abs
    e = torch.where(top, 0.0, e)
    others = torch.where(top, 0.0, g_abs).sum(1, keepdim=True)
    e = e + top * (e.sum(1, keepdim=True) + gamma(vocab) * others)  # G_sigma = -(the others' sum)
    w_norm = float(torch.linalg.matrix_norm(w_s, ord=2))
    h_norm = float(torch.linalg.matrix_norm(h_s, ord=2))
    e_norm = float(e.norm())
    dh = e_norm * w_norm + gamma(vocab) * float((g_abs @ w_s.abs()).norm())
    dw = e_norm * h_norm + gamma(n) * float((g_abs.T @ h_s.abs()).norm())
    db = float(e.sum(0).norm()) + gamma(n) * float(g_abs.sum(0).norm())
    grads = [dh, dw, db][:len(ref.grads)]
    for k, (grad, x) in enumerate(zip(ref.grads, case.students())):
        grads[k] += max(UNIT[out_dtype or x.dtype], u) * float(grad.norm())  # the gradient rounded to its dtype
    # The value: first-order in the logits' errors plus the rounding of the row sums.
    finite = lambda x: torch.where(torch.isfinite(x), x.abs(), 0.0)  # noqa: E731
    s_kd = ((p + q) * (finite(log_p) + finite(log_q))).sum(1)
    s_hard = finite(r["log_q1"]).amax(1) + 1.0
    dd_da = torch.where(p > 0, r["dd_da"], 0.0).abs()  # words of no teacher mass: no sensitivity (nan there)
    first_order = r["kd_value"] * ((r["dd_db"].abs() * err_b).sum(1) + (dd_da * err_a).sum(1))
    first_order = first_order + r["hard"] * 2 * (q1 * err_1).sum(1)
    rounding = gamma(vocab) * (r["kd_value"] * s_kd + r["hard"] * s_hard)
    value = float((coef.squeeze(1) * (first_order + rounding)).sum()) + (gamma(n) + u) * abs(ref.value)
    return dict(value=value, grads=grads)


def check_against_oracle(case: Case, backend: str, out_dtype=None) -> None:
    """The op's value and gradients on `backend` against the oracle, within bounds()."""
    got = case.run(backend)
    float64 = backend == "reference" and any(x.dtype == torch.float64 for x in case.students())
    assert got.dtype == (torch.float64 if float64 else torch.float32) and got.dim() == 0
    ref = oracle(case)
    bound = bounds(case, ref, out_dtype, torch.float64 if float64 else torch.float32)
    grads = torch.autograd.grad(got, case.students(), allow_unused=True) if got.requires_grad else \
        [None] * len(case.students())
    value = float(got.detach())
    assert abs(value - ref.value) <= bound["value"], \
        f"value {value!r} vs {ref.value!r}: error {abs(value - ref.value):.3e} > bound {bound['value']:.3e}"
    for name, grad, want, tol, x in zip(("h_s", "w_s", "b_s"), grads, ref.grads, bound["grads"], case.students()):
        assert grad is not None, f"no gradient reached {name}"
        assert grad.dtype == x.dtype and grad.shape == x.shape, name
        error = float((grad.double().cpu() - want).norm())
        norm = float(want.norm())
        assert error <= tol, (f"d{name}: ||error|| {error:.3e} > bound {tol:.3e} "
                              f"(||grad|| {norm:.3e}, relative {error / max(norm, 1e-300):.2e})")
