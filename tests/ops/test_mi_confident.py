"""MI bounds at confident critics: every path against a 90-digit evaluation of methods.md section 2.

A trained critic separates the positive pair from the negatives by tens of nats. The layouts:
"confident" puts S_ii = sep + N(0, 1) over S_ij ~ N(0, 1); "confused" does so for half the rows
and lets one negative dominate by sep in the others; "normalised" uses unit embeddings with
scale = sep. Tolerances follow from the math, not from observed errors (u: unit roundoff of the
path's arithmetic, e: embedding width, kappa = scale max|a_i| max|b_j|):
  - each computed score is off by at most gamma = (e + 2) u kappa (dot product and scaling);
  - every entry of dI/dS, and each term of dI/dq, is a sum of positive terms e^{x} whose
    exponents x move by at most 4 gamma under that perturbation, so its relative error is
    rho = 4 gamma + (n + 100) u (the second part: summing n terms, each from a few
    transcendentals good to 20 ulp);
  - dI/da = scale G b adds the GEMM's (n + e) u relative to scale |G| |b|; bf16 gradients are
    rounded once more on output (2^-8; the Triton interpreter truncates instead: 2^-7), and a
    GPU multiplies them in one tf32 pass (2^-11);
  - the value moves by at most 2 gamma sum|dI/dS| plus (n + 20) u times its terms' magnitude.
"""
import math
import os

import pytest
import torch
from tests.ops.devices import triton_device
from tests.ops.mi_exact import (BF16_GRAD_ROUNDING, BF16_INTERPRETER_ROUNDING, exact_bound, exact_errors,
                                exact_scores, layout_inputs)

import pykd

N = 37
SEPARATIONS = (10, 20, 40, 80)
ALPHAS = (0.0, 0.01, 0.5, 0.9, 1.0)
CASES = [(bound, 0.9, False) for bound in ("infonce", "nwj", "js")]
CASES += [("tuba", 0.9, with_q) for with_q in (False, True)]
CASES += [("alpha", alpha, with_q) for alpha in ALPHAS for with_q in (False, True)]
CASE_IDS = [f"{b}-a{a}-{'q' if q else 'noq'}" if b == "alpha" else f"{b}-{'q' if q else 'noq'}" for b, a, q in CASES]
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}


_EXACT_SCORES, _EXACT_BOUNDS = {}, {}


def exact(layout, sep, dtype, bound, alpha, with_q, seed):
    """Cached: the 90-digit scores serve every bound, and each bound every path, on the same inputs."""
    inputs = (layout, sep, dtype, seed)
    key = inputs + (bound, alpha, with_q)
    if key not in _EXACT_BOUNDS:
        a, b, log_q, scale = layout_inputs(layout, N, sep, dtype, seed)
        if inputs not in _EXACT_SCORES:
            _EXACT_SCORES[inputs] = exact_scores(a, b, scale)
        _EXACT_BOUNDS[key] = exact_bound(_EXACT_SCORES[inputs], log_q if with_q else None, bound, alpha)
    return _EXACT_BOUNDS[key]


def run_path(path, a, b, log_q, bound, alpha, scale):
    device = triton_device() if path == "triton" else "cpu"
    if path == "reference64":
        a, b, log_q = (x.double() if x is not None else None for x in (a, b, log_q))
    leaves = [x.detach().to(device).requires_grad_() for x in (a, b, log_q) if x is not None]
    backend = "reference" if path.startswith("reference") else path
    value = pykd.mi_lower_bound(leaves[0], leaves[1], leaves[2] if log_q is not None else None, bound=bound,
                                alpha=alpha, scale=scale, backend=backend)
    grads = torch.autograd.grad(value, leaves, allow_unused=True)  # alpha = 1 leaves log_q unused
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves)]
    assert all(g.dtype == x.dtype for g, x in zip(grads, leaves))
    return float(value.detach()), [g.detach().cpu().double() for g in grads]


def check_against_exact(path, layout, sep, dtype, bound, alpha, with_q, seed=0):
    a, b, log_q, scale = layout_inputs(layout, N, sep, dtype, seed)
    log_q = log_q if with_q else None
    assert_matches_exact(path, a, b, log_q, scale, dtype, bound, alpha,
                         exact(layout, sep, dtype, bound, alpha, with_q, seed))


def assert_matches_exact(path, a, b, log_q, scale, dtype, bound, alpha, ref):
    value, grads = run_path(path, a, b, log_q, bound, alpha, scale)
    u = UNIT_ROUNDOFF[torch.float64 if path == "reference64" else torch.float32]
    out = 0.0
    if dtype == torch.bfloat16:
        interpreted = path == "triton" and os.environ.get("TRITON_INTERPRET") == "1"
        out = BF16_INTERPRETER_ROUNDING if interpreted else BF16_GRAD_ROUNDING
    for what, error, bound_on_error in exact_errors(value, grads, a, b, log_q, scale, ref, u, out):
        assert error <= bound_on_error, f"{what}: error {error:.3e} > {bound_on_error:.3e}"


@pytest.mark.parametrize("sep", SEPARATIONS)
@pytest.mark.parametrize("bound, alpha, with_q", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("layout", ("confident", "confused", "normalised"))
def test_reference_in_float64_is_exact(layout, bound, alpha, with_q, sep):
    check_against_exact("reference64", layout, sep, torch.float32, bound, alpha, with_q)


@pytest.mark.parametrize("sep", SEPARATIONS)
@pytest.mark.parametrize("bound, alpha, with_q", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("layout", ("confident", "confused", "normalised"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=("fp32", "bf16"))
@pytest.mark.parametrize("path", ("reference", "cpp"))
def test_cpu_paths_match_exact(path, dtype, layout, bound, alpha, with_q, sep):
    check_against_exact(path, layout, sep, dtype, bound, alpha, with_q)


# The interpreter is slow: every case at every separation for fp32 where the positive dominates,
# fewer for the other layouts and bf16.
TRITON_GRID = [("confident", torch.float32, sep) for sep in SEPARATIONS]
TRITON_GRID += [("confused", torch.float32, sep) for sep in (20, 80)]
TRITON_GRID += [("confident", torch.bfloat16, sep) for sep in (20, 80)]


@pytest.mark.parametrize("layout, dtype, sep", TRITON_GRID,
                         ids=[f"{lay}-{str(d)[6:]}-{s}" for lay, d, s in TRITON_GRID])
@pytest.mark.parametrize("bound, alpha, with_q", CASES, ids=CASE_IDS)
def test_triton_matches_exact(layout, dtype, sep, bound, alpha, with_q):
    pytest.importorskip("triton")
    check_against_exact("triton", layout, sep, dtype, bound, alpha, with_q)


@pytest.mark.parametrize("path", ("reference64", "reference", "cpp", "triton"))
@pytest.mark.parametrize("sep", (40, 80, 160, 400))
def test_leave_one_out_bound_never_exceeds_log_n(path, sep):
    """alpha = 1 is at most log(n - 1) < log n in exact arithmetic (every a_ij >= e^{S_ii}/(n-1))."""
    if path == "triton":
        pytest.importorskip("triton")
    for layout in ("confident", "normalised"):
        a, b, _, scale = layout_inputs(layout, N, sep, torch.float32, seed=1)
        value, grads = run_path(path, a, b, None, "alpha", 1.0, scale)
        assert value <= math.log(N), (layout, value)
        assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("path", ("reference64", "reference", "cpp", "triton"))
@pytest.mark.parametrize("bound, alpha, with_q", [("alpha", 0.9, True), ("alpha", 1.0, False), ("infonce", 0.9, False)],
                         ids=["alpha-a0.9-q", "alpha-a1.0-noq", "infonce"])
def test_duplicate_pairs_tie_the_top_negative(path, bound, alpha, with_q):
    """A batch holding the same pair three times: rows 1 to 3 see their positive's score twice among
    their negatives (two top negatives tied with each other and with the positive), every other row
    three equal negatives."""
    if path == "triton":
        pytest.importorskip("triton")
    sep, seed = 40, 3
    a, b, log_q, scale = layout_inputs("confident", N, sep, torch.float32, seed)
    a[2:4], b[2:4] = a[1], b[1]
    log_q = log_q if with_q else None
    assert_matches_exact(path, a, b, log_q, scale, torch.float32, bound, alpha,
                         exact_bound(exact_scores(a, b, scale), log_q, bound, alpha))
