"""Rounding-error bounds for comparing two computations that the math says are equal.

Two runs that sum the same terms in a different order (DDP's all-reduce vs one process, a
gathered batch vs a concatenated one) differ by rounding only. For a sum of n terms in a
precision with unit roundoff u, recursive summation errs by at most gamma(n) * sum |terms|, with
gamma(n) = n u / (1 - n u) (Higham, Accuracy and Stability of Numerical Algorithms, 2002, 4.2).
Comparisons are norm-wise against the norm of the whole result: a component that is zero in exact
arithmetic (the gradient of a softmax's key bias) is pure rounding of terms of the scale of the
others, so no bound relative to its own size exists (Adam, dividing by its root mean square,
blows such components up to the learning rate).
"""
import torch

UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float64: 2.0 ** -53, torch.bfloat16: 2.0 ** -8}


def gamma(n: int, dtype=torch.float32) -> float:
    """Higham's gamma_n: the relative error bound of a length-n recursive sum or dot product."""
    nu = n * UNIT_ROUNDOFF[dtype]
    assert nu < 1, f"gamma({n}) is unbounded in {dtype}"
    return nu / (1 - nu)


def assert_normwise_close(got: torch.Tensor, want: torch.Tensor, bound: float, what: str = "") -> None:
    """||got - want||_2 <= bound * ||want||_2 (want must not be zero: that would test nothing)."""
    got, want = got.double(), want.double()
    scale = float(want.norm())
    assert scale > 0, f"{what}: the reference is zero, the comparison would test nothing"
    error = float((got - want).norm())
    assert error <= bound * scale, f"{what}: ||got - want|| / ||want|| = {error / scale:.3e} > {bound:.3e}"


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64."""
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))
