"""pykd.mi_lower_bound: fused C++ and Triton paths against the float64 reference at moderate scores
(tests/test_mi_confident.py checks every path against a 90-digit evaluation at confident critics)."""
import math

import pytest
import torch
from tests.fp_bounds import rel_err
from tests.ops.devices import triton_device

import pykd

ALPHAS = (0.0, 0.01, 0.5, 0.9, 1.0)
# (bound, alpha, with log_q): alpha only matters for "alpha", log_q only for "tuba" and "alpha".
CASES = [(bound, 0.9, False) for bound in ("infonce", "nwj", "js")]
CASES += [("tuba", 0.9, with_q) for with_q in (False, True)]
CASES += [("alpha", alpha, with_q) for alpha in ALPHAS for with_q in (False, True)]
CASE_IDS = [f"{b}-a{a}-{'q' if q else 'noq'}" for b, a, q in CASES]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
GRAD_TOL = {torch.float32: 2e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
EMBED = 19


def inputs(n, with_q, dtype, rng, device="cpu"):
    a = (torch.randn(n, EMBED, generator=rng) * 0.5).to(device=device, dtype=dtype).requires_grad_()
    b = (torch.randn(n, EMBED, generator=rng) * 0.5).to(device=device, dtype=dtype).requires_grad_()
    log_q = torch.randn(n, generator=rng).to(device=device, dtype=dtype).requires_grad_() if with_q else None
    return a, b, log_q


def reference(a, b, log_q, bound, alpha, scale):
    leaves = [x.detach().double().requires_grad_() for x in (a, b, log_q) if x is not None]
    value = pykd.mi_lower_bound_reference(leaves[0], leaves[1], leaves[2] if log_q is not None else None,
                                          bound=bound, alpha=alpha, scale=scale)
    grads = torch.autograd.grad(value, leaves, allow_unused=True)  # alpha = 1 leaves log_q unused
    return value, [g if g is not None else torch.zeros_like(x) for g, x in zip(grads, leaves)]


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> bool:
    """Norm-wise: ||actual - expected|| <= rtol ||expected|| + atol (atol for bounds that vanish,
    e.g. alpha = 1 at n = 2, where the leave-one-out bound is identically zero)."""
    diff = (actual.detach().double() - expected.detach().double()).norm()
    return float(diff) <= rtol * float(expected.detach().double().norm()) + atol


def check(backend, bound, alpha, with_q, n, dtype, rng, device="cpu", scale=0.7):
    a, b, log_q = inputs(n, with_q, dtype, rng, device)
    leaves = [x for x in (a, b, log_q) if x is not None]
    value = pykd.mi_lower_bound(a, b, log_q, bound=bound, alpha=alpha, scale=scale, backend=backend)
    grads = torch.autograd.grad(value, leaves)
    ref_value, ref_grads = reference(a, b, log_q, bound, alpha, scale)
    assert value.dtype == torch.float32 and value.dim() == 0
    assert close(value, ref_value, 1e-5, 1e-6)
    for grad, ref_grad, leaf in zip(grads, ref_grads, leaves):
        assert grad.dtype == leaf.dtype and grad.shape == leaf.shape
        rounding = rel_err(ref_grad.to(leaf.dtype), ref_grad) if ref_grad.norm() > 0 else 0.0
        assert close(grad, ref_grad, max(GRAD_TOL[dtype], 2 * rounding), 1e-6)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("n", (2, 3, 37, 300))
@pytest.mark.parametrize("bound, alpha, with_q", CASES, ids=CASE_IDS)
def test_cpp_matches_reference(bound, alpha, with_q, n, dtype, rng):
    check("cpp", bound, alpha, with_q, n, dtype, rng)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=("fp32", "bf16"))
@pytest.mark.parametrize("n", (2, 3, 37))
@pytest.mark.parametrize("bound, alpha, with_q", CASES, ids=CASE_IDS)
def test_triton_matches_reference(bound, alpha, with_q, n, dtype, rng):
    pytest.importorskip("triton")
    check("triton", bound, alpha, with_q, n, dtype, rng, device=triton_device())


@pytest.mark.parametrize("bound, alpha", [("infonce", 0.9), ("alpha", 0.9)])
def test_triton_several_tiles(bound, alpha, rng):
    pytest.importorskip("triton")
    check("triton", bound, alpha, bound == "alpha", 53, torch.float32, rng, device=triton_device())


GRADCHECK_CASES = [c for c in CASES if c[0] != "js"]  # js's gradient is not its value's, by design


@pytest.mark.parametrize("bound, alpha, with_q", GRADCHECK_CASES,
                         ids=[i for c, i in zip(CASES, CASE_IDS) if c[0] != "js"])
def test_reference_gradcheck(bound, alpha, with_q, rng):
    a, b, log_q = (x.detach().double().requires_grad_() if x is not None else None
                   for x in inputs(5, with_q, torch.float64, rng))
    leaves = tuple(x for x in (a, b, log_q) if x is not None)

    def fn(*xs):
        return pykd.mi_lower_bound_reference(xs[0], xs[1], xs[2] if with_q else None, bound=bound, alpha=alpha)

    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("backend", ("cpp", "triton"))
@pytest.mark.parametrize("bound, alpha, with_q", [c for c in CASES if c[2] or c[0] != "alpha"],
                         ids=[i for c, i in zip(CASES, CASE_IDS) if c[2] or c[0] != "alpha"])
def test_large_scores_stay_finite(backend, bound, alpha, with_q, rng):
    """|S| ~ 80: exp(80) still fits fp32; every path must stay finite."""
    if backend == "triton":
        pytest.importorskip("triton")
    device = triton_device() if backend == "triton" else "cpu"
    n = 9
    a = torch.randn(n, 4, generator=rng)
    a = (a / a.norm(dim=1, keepdim=True) * 9.0).to(device).requires_grad_()
    b = a.detach().clone().requires_grad_()
    log_q = torch.full((n,), 40.0, device=device, requires_grad=True) if with_q else None
    value = pykd.mi_lower_bound(a, b, log_q, bound=bound, alpha=alpha, backend=backend)
    leaves = [x for x in (a, b, log_q) if x is not None]
    grads = torch.autograd.grad(value, leaves)
    assert float((a @ b.T).abs().max()) == pytest.approx(81.0, rel=1e-4)
    assert math.isfinite(float(value))
    assert all(torch.isfinite(g).all() for g in grads)


def test_js_reports_nwj_and_follows_the_fgan_gradient(rng):
    a, b, _ = inputs(13, False, torch.float64, rng)
    scores = a @ b.T
    n = scores.shape[0]
    softplus = torch.nn.functional.softplus
    fgan = -softplus(-scores.diagonal()).mean() - (softplus(scores).sum() - softplus(scores.diagonal()).sum()) / (
        n * (n - 1))
    for backend in ("reference", "cpp"):
        js = pykd.mi_lower_bound(a, b, bound="js", backend=backend)
        nwj = pykd.mi_lower_bound(a, b, bound="nwj", backend=backend)
        assert float(js) == pytest.approx(float(nwj), rel=1e-6)
        assert all(rel_err(g, r) < 1e-5 for g, r in zip(torch.autograd.grad(js, [a, b]),
                                                         torch.autograd.grad(fgan, [a, b], retain_graph=True)))


def test_constants_get_no_gradient(rng):
    a, b, log_q = inputs(11, True, torch.float32, rng)
    b = b.detach()
    value = pykd.mi_lower_bound(a, b, log_q.detach(), bound="alpha")
    (grad_a,) = torch.autograd.grad(value, [a])
    assert grad_a.shape == a.shape and grad_a.abs().sum() > 0


def test_infonce_never_exceeds_log_n(rng):
    a, _b, _ = inputs(37, False, torch.float32, rng)
    value = pykd.mi_lower_bound(a * 10, a * 10, bound="infonce")
    assert float(value) <= math.log(37) + 1e-5


def test_endpoints_are_infonce_family_and_tuba(rng):
    """alpha = 0 is exactly TUBA with the same baseline."""
    a, b, log_q = inputs(23, True, torch.float32, rng)
    tuba = pykd.mi_lower_bound(a, b, log_q, bound="tuba")
    alpha0 = pykd.mi_lower_bound(a, b, log_q, bound="alpha", alpha=0.0)
    assert float(alpha0) == pytest.approx(float(tuba), rel=1e-5)


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        (dict(b=torch.randn(7, 8)), ValueError, r"a and b must have the same shape .* \(6, 8\) and \(7, 8\)"),
        (dict(b=torch.randn(6, 5)), ValueError, r"a and b must have the same shape"),
        (dict(a=torch.randn(1, 8), b=torch.randn(1, 8)), ValueError, r"n >= 2 .* \(1, 8\)"),
        (dict(log_q=torch.randn(5)), ValueError, r"log_q must have shape \(6,\), got \(5,\)"),
        (dict(log_q=torch.randn(6), bound="nwj"), ValueError, r"log_q is used by the bounds"),
        (dict(alpha=1.5), ValueError, r"alpha must be in \[0, 1\], got 1.5"),
        (dict(alpha=-0.1), ValueError, r"alpha must be in \[0, 1\]"),
        (dict(bound="dv"), ValueError, r"bound must be one of"),
        (dict(a=torch.randn(6)), ValueError, r"a must have 2 dimensions, got shape \(6,\)"),
        (dict(b=torch.randn(6, 8).to("meta")), ValueError, r"b is on device meta"),
        (dict(a=torch.ones(6, 8, dtype=torch.int64)), TypeError, r"a has dtype torch.int64"),
    ],
)
def test_bad_input_raises_clear_error(kwargs, error, pattern):
    args = dict(a=torch.randn(6, 8), b=torch.randn(6, 8), log_q=None, bound="alpha", alpha=0.9)
    args.update(kwargs)
    with pytest.raises(error, match=pattern):
        pykd.mi_lower_bound(**args)
