"""mse_prob at peaked attention: every path's loss and gradients against a 100-digit evaluation.

A trained relation head puts nearly all of a row's probability on one key. The inputs make each
student row's scores level * f_k + o_k with f = 1 on the peak and one to three contenders, f = 0
elsewhere, and small integer offsets o (the peak's the largest, contenders 2 to 32 nats below
it); the teacher's rows are the student's with offsets moved by -1, 0 or 1 ("agree": the same
peak) or with the peak moved to a contender ("disagree"). With the keys one-hot, the scores are
exact integers in fp32 and bf16 (every product and partial sum is an integer below 2^24), so the
paths' only errors are their own arithmetic's, and the one-hot keys make dL/ds_a row i equal
G's row i: a query row's gradient is compared on its own, however small it is next to others.

The bound follows from the stable form in pykd/ops/attention_relation.py (u: unit roundoff of
the path's arithmetic, L: keys per row, d = q - p, a and M as in tests/ops/relation_exact.py):
  - every probability q_k, p_k and complement 1 - q_m, 1 - p_m (a sum over L keys of exps good
    to 20 ulp, divided by the row's sum) carries a relative error below nu = (2L + 24) u; the
    Triton path forms them as exp(s - lse) from a log-sum-exp rounded at the scores' magnitude
    kappa, which adds 4 kappa u (for every loss, not a cancellation: in real use the fp32 scores
    themselves carry about that much, from their GEMM);
  - then |delta d_k| <= (nu + u) a_k, the row sums R = sum_{k != m} q_k d_k and
    Delta = q_m d_m + R err by at most 3 nu sum_k q_k a_k, and D_j = d_j - Delta (j != m),
    D_m = (1 - q_m) d_m - R by at most (5 nu + 4 u) M_j; G_j = 2 w q_j D_j by at most
    rho 2 w q_j M_j with rho = 6 nu + 8 u;
  - dL/ds_a = c G Y adds the GEMM's (L + 8) u relative to c |G| |Y| <= c (2 w q M) |Y|;
    bf16 gradients are rounded once more on output (2^-8; the Triton interpreter truncates:
    2^-7; a GPU also multiplies G in one tf32 pass: 2^-11);
  - below fp32's normal range (2^-126) operations err absolutely: 2^-120 per entry covers them;
  - the value errs by at most (2 nu + 3 u) w sum |d_k| a_k plus (L + B A L + 2) u of itself.
The old form q_j (g_j - sum_k q_k g_k) exceeds this bound by orders of magnitude at every level:
it forms q_m - p_m from two numbers within eps of 1 (an absolute error of u where eps is needed).
"""
import math
import os

import pytest
import torch
from tests.ops.devices import triton_device
from tests.ops.relation_exact import exact_mse_prob

import pykd

HEADS = 2
CPU_SHAPE = (3, 29)        # (batch, length)
TRITON_SHAPE = (2, 21)     # the interpreter runs every program in Python: small, still two key tiles
LEVELS = (30, 100, 1000, 10000)
LAYOUTS = ("agree", "disagree")
PEAK_OFFSET = 31
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}
UNDERFLOW_FLOOR = 2.0**-120


def _bf16_split(level: float) -> tuple[float, float]:
    """level = hi + lo with both exact in bf16, so one set of inputs serves every dtype."""
    hi = float(torch.tensor(level).to(torch.bfloat16))
    lo = level - hi
    assert float(torch.tensor(lo).to(torch.bfloat16)) == lo
    return hi, lo


def _row_offsets(keys: list[int], length: int, layout: str, g: torch.Generator):
    """(student offsets, student top flags, teacher offsets, teacher top flags) over length keys."""
    order = [keys[k] for k in torch.randperm(len(keys), generator=g).tolist()]
    peak, contenders = order[0], order[1:1 + int(torch.randint(1, 4, (1,), generator=g))]
    o_s = torch.randint(0, PEAK_OFFSET + 1, (length,), generator=g).double()
    o_s[contenders] = torch.randint(0, PEAK_OFFSET - 1, (len(contenders),), generator=g).double()
    o_s[peak] = PEAK_OFFSET
    top = torch.zeros(length, dtype=torch.float64)
    top[[peak] + contenders] = 1.0
    o_t = o_s + torch.randint(-1, 2, (length,), generator=g).double()
    o_t[peak] = PEAK_OFFSET
    if layout == "disagree":  # the teacher's peak is the first contender; the student's peak drops to its place
        o_t[peak], o_t[contenders[0]] = o_t[contenders[0]], PEAK_OFFSET
    return o_s, o_t, top


def peaked_inputs(level: float, layout: str, shape, mask_kind: str, seed: int = 0):
    """float64 (t_a, t_b, s_a, s_b, mask) holding small integers; width per head 3L:
    [o, hi f, lo f] . [e_k, e_k, e_k]."""
    batch, length = shape
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.bool)
    if mask_kind == "ragged":
        lengths = torch.randint(2, length + 1, (batch,), generator=g)
        lengths[0] = length - 3
        mask = torch.arange(length)[None, :] < lengths[:, None]
        mask[1] = mask[1].flip(0)  # left padding: valid tokens need not be a prefix
    hi, lo = _bf16_split(level)
    width = 3 * length
    s_a = torch.zeros(batch, length, HEADS * width, dtype=torch.float64)
    t_a = torch.zeros_like(s_a)
    keys_one_hot = torch.eye(length, dtype=torch.float64).repeat(1, 3)
    t_b = keys_one_hot.repeat(batch, 1, HEADS).reshape(batch, length, HEADS * width)
    for b in range(batch):
        keys = torch.nonzero(mask[b]).flatten().tolist()
        for head in range(HEADS):
            cols = slice(head * width, (head + 1) * width)
            for i in range(length):
                o_s, o_t, top = _row_offsets(keys, length, layout, g)
                s_a[b, i, cols] = torch.cat([o_s, hi * top, lo * top])
                t_a[b, i, cols] = torch.cat([o_t, hi * top, lo * top])
    return t_a, t_b, s_a, t_b.clone(), (mask if mask_kind != "none" else None)


_EXACT = {}


def exact(level, layout, shape, mask_kind):
    key = (level, layout, shape, mask_kind)
    if key not in _EXACT:
        t_a, t_b, s_a, s_b, mask = peaked_inputs(level, layout, shape, mask_kind)
        _EXACT[key] = exact_mse_prob(t_a, t_b, s_a, s_b, HEADS, mask, 1.0, 1.0)
    return _EXACT[key]


def run_path(path, t_a, t_b, s_a, s_b, mask, dtype):
    """(value, dL/ds_a, dL/ds_b) of one path, gradients as float64 on the CPU."""
    device = triton_device() if path == "triton" else "cpu"
    work = torch.float64 if path == "reference64" else dtype
    t_a, t_b = (x.detach().to(device=device, dtype=work) for x in (t_a, t_b))
    s_a, s_b = (x.detach().to(device=device, dtype=work).requires_grad_() for x in (s_a, s_b))
    mask = mask.to(device) if mask is not None else None
    backend = "reference" if path.startswith("reference") else path
    value = pykd.attention_relation_loss(t_a, t_b, s_a, s_b, HEADS, mask=mask, loss="mse_prob", scale_t=1.0,
                                         scale_s=1.0, backend=backend)
    grads = torch.autograd.grad(value, (s_a, s_b))
    assert all(grad.dtype == work for grad in grads)
    return float(value.detach()), *(grad.detach().cpu().double() for grad in grads)


def _per_head(x: torch.Tensor) -> torch.Tensor:
    """(B, L, A * e) -> (B, A, L, e)."""
    batch, length, width = x.shape
    return x.reshape(batch, length, HEADS, width // HEADS).transpose(1, 2)


def gradient_bounds(path, dtype, ref, length, batch):
    """(nu, relative part of the gradient bound) of the module docstring for one path."""
    u = UNIT_ROUNDOFF[torch.float64 if path == "reference64" else torch.float32]
    nu = (2 * length + 24) * u
    if path == "triton":
        nu += 4 * u * (ref.max_abs_score + 1 + math.log(length))
    out = 0.0
    if dtype == torch.bfloat16:
        if path == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
            out = 2.0**-7
        else:
            out = 2.0**-8 + (2.0**-11 if path == "triton" else 0.0)
    return nu, 6 * nu + 8 * u + (length + 8) * u + out


def worst_ratio(got, want, size):
    """max over rows of ||got - want|| / bound, with bound = size (a per-row norm)."""
    error = (got - want).norm(dim=-1)
    return float((error / size).max()), error, size


def check_against_exact(path, level, layout, shape, mask_kind, dtype):
    t_a, t_b, s_a, s_b, mask = peaked_inputs(level, layout, shape, mask_kind)
    ref = exact(level, layout, shape, mask_kind)
    value, grad_a, grad_b = run_path(path, t_a, t_b, s_a, s_b, mask, dtype)
    batch, length = shape
    u = UNIT_ROUNDOFF[torch.float64 if path == "reference64" else torch.float32]
    nu, rel = gradient_bounds(path, dtype, ref, length, batch)

    value_tol = (2 * nu + 3 * u) * ref.value_terms + (length + batch * HEADS * length + 2) * u * ref.value
    assert abs(value - ref.value) <= value_tol, (value, ref.value, value_tol)

    xs, ys = _per_head(s_a), _per_head(s_b)                        # (B, A, L, e)
    g, size = ref.grad_scores, ref.magnitude                       # (B, A, L, L)
    floor = UNDERFLOW_FLOOR * math.sqrt(xs.shape[-1])
    checks = {
        "s_a": (_per_head(grad_a), g @ ys, rel * (size @ ys.abs()).norm(dim=-1) + floor),
        "s_b": (_per_head(grad_b), g.transpose(-1, -2) @ xs,
                rel * (size.transpose(-1, -2) @ xs.abs()).norm(dim=-1) + floor),
    }
    for name, (got, want, bound) in checks.items():
        ratio, error, _ = worst_ratio(got, want, bound)
        worst = (error / bound).argmax()
        assert ratio <= 1.0, (f"d/d{name}: a row's error is {ratio:.3g} x its bound "
                              f"(error {float(error.flatten()[worst]):.3e}, "
                              f"bound {float(bound.flatten()[worst]):.3e}, |grad row| "
                              f"{float(want.norm(dim=-1).flatten()[worst]):.3e})")


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@pytest.mark.parametrize("mask_kind", ("none", "ragged"))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("level", LEVELS)
def test_reference_in_float64_matches_exact(level, layout, mask_kind):
    check_against_exact("reference64", level, layout, CPU_SHAPE, mask_kind, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("mask_kind", ("none", "ragged"))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("path", ("reference", "cpp"))
def test_cpu_paths_match_exact(path, level, layout, mask_kind, dtype):
    check_against_exact(path, level, layout, CPU_SHAPE, mask_kind, dtype)


TRITON_GRID = [(level, layout, torch.float32) for level in LEVELS for layout in LAYOUTS]
TRITON_GRID += [(level, "disagree", torch.bfloat16) for level in (100, 10000)]


@pytest.mark.parametrize("level, layout, dtype", TRITON_GRID,
                         ids=[f"{lev}-{lay}-{str(d)[6:]}" for lev, lay, d in TRITON_GRID])
def test_triton_matches_exact(level, layout, dtype):
    pytest.importorskip("triton")
    check_against_exact("triton", level, layout, TRITON_SHAPE, "ragged", dtype)


def test_inputs_make_exact_integer_scores():
    """The construction's premise: fp32 and bf16 scores equal the float64 ones, integers within 2^24."""
    t_a, t_b, s_a, s_b, _ = peaked_inputs(10000, "disagree", CPU_SHAPE, "ragged")
    for a, b in ((t_a, t_b), (s_a, s_b)):
        exact_scores = _per_head(a) @ _per_head(b).transpose(-1, -2)
        assert torch.equal(exact_scores, exact_scores.round()) and float(exact_scores.abs().max()) < 2**24
        for dtype in (torch.float32, torch.bfloat16):
            assert torch.equal(a.to(dtype).double(), a) and torch.equal(b.to(dtype).double(), b)
            low = _per_head(a.to(dtype)).float() @ _per_head(b.to(dtype)).float().transpose(-1, -2)
            assert torch.equal(low.double(), exact_scores)


def test_exact_evaluation_keeps_its_digits():
    """The plain form at 100 digits agrees with 130 digits to far below any float's resolution."""
    from tests.ops import relation_exact

    t_a, t_b, s_a, s_b, mask = peaked_inputs(30, "agree", (1, 9), "none")
    base = relation_exact.exact_mse_prob(t_a, t_b, s_a, s_b, HEADS, mask, 1.0, 1.0)
    saved = relation_exact.CONTEXT.prec
    relation_exact.CONTEXT.prec = 130
    try:
        finer = relation_exact.exact_mse_prob(t_a, t_b, s_a, s_b, HEADS, mask, 1.0, 1.0)
    finally:
        relation_exact.CONTEXT.prec = saved
    assert torch.equal(base.grad_scores, finer.grad_scores) and base.value == finer.value
