"""The ops at their edges: empty inputs, NaN/Inf under padding, arguments of the wrong type, meta tensors.

Every path (reference, C++, Triton under the interpreter) must give the same clear error or the
same finite result.
"""
import re

import numpy as np
import pytest
import torch

import pykd
from pykd.ops.attention_relation import LOSSES

PATHS = ("reference", "cpp", "triton")


def raises(error, message: str):
    return pytest.raises(error, match=re.escape(message))


# ---- empty inputs ----

@pytest.mark.parametrize("backend", PATHS)
@pytest.mark.parametrize("name, t_shape, s_shape", [
    ("t_a", (0, 5, 4), (0, 5, 4)), ("t_a", (2, 0, 4), (2, 0, 4)), ("t_a", (2, 5, 0), (2, 5, 4)),
    ("s_a", (2, 5, 4), (2, 5, 0)),
])
def test_empty_relation_inputs_name_the_argument(backend, name, t_shape, s_shape):
    t, s = torch.randn(t_shape), torch.randn(s_shape, requires_grad=True)
    shape = t_shape if name == "t_a" else s_shape
    with raises(ValueError, f"{name} has an empty dimension: shape {shape} for (batch, length, width)"):
        pykd.attention_relation_loss(t, t, s, s, 1, backend=backend)


@pytest.mark.parametrize("backend", PATHS)
def test_empty_mi_inputs_name_the_argument(backend):
    with raises(ValueError, "a has an empty dimension: shape (3, 0) for (n, e)"):
        pykd.mi_lower_bound(torch.randn(3, 0), torch.randn(3, 0), backend=backend)
    with raises(ValueError, "the bounds need n >= 2 pairs (one positive and one negative), got a of shape (0, 4)"):
        pykd.mi_lower_bound(torch.randn(0, 4), torch.randn(0, 4), backend=backend)


@pytest.mark.parametrize("backend", PATHS)
def test_routed_linear_refuses_zero_input_features(backend):
    with raises(ValueError, "x must have shape (..., in_features) with in_features >= 1, got shape (4, 0)"):
        pykd.routed_linear(torch.randn(4, 0), torch.randn(2, 5, 3), torch.ones(2) / 2, backend=backend)
    with raises(ValueError, "experts_w has an empty dimension: shape (0, 5, 3)"):
        pykd.routed_linear(torch.randn(4, 3), torch.randn(0, 5, 3), torch.ones(0), backend=backend)


@pytest.mark.parametrize("neuron_wise", (False, True))
@pytest.mark.parametrize("backend", PATHS)
def test_routed_linear_of_zero_tokens_is_empty_with_zero_weight_gradients(backend, neuron_wise, rng):
    """Zero tokens are a routed layer's ordinary case (a bucket no token went to), as for nn.Linear."""
    x = torch.randn(0, 3, 4, generator=rng, requires_grad=True)
    experts_w = torch.randn(2, 5, 4, generator=rng, requires_grad=True)
    experts_b = torch.randn(2, 5, generator=rng, requires_grad=True)
    alpha = (torch.ones(5, 2) if neuron_wise else torch.ones(2)).div(2).requires_grad_()
    y = pykd.routed_linear(x, experts_w, alpha, experts_b, backend=backend)
    assert y.shape == (0, 3, 5)
    y.sum().backward()
    for leaf in (x, experts_w, alpha, experts_b):
        assert leaf.grad is not None and leaf.grad.shape == leaf.shape and not leaf.grad.any()


# ---- NaN and Inf under padding ----

def padded_relation_inputs(rng, poison: float):
    """Inputs whose padded positions hold `poison`, with a mask that pads two examples differently."""
    t = torch.randn(3, 6, 8, generator=rng)
    s_a, s_b = torch.randn(3, 6, 4, generator=rng), torch.randn(3, 6, 4, generator=rng)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[0, 4:] = False
    mask[2, 1:] = False
    clean = (t, t.roll(1, 1), s_a, s_b)
    poisoned = tuple(x.masked_fill(~mask[..., None], poison) for x in clean)
    return clean, poisoned, mask


@pytest.mark.parametrize("poison", (float("nan"), float("-inf")))
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("backend", PATHS)
def test_nan_or_inf_under_padding_changes_nothing(backend, loss, poison, rng):
    clean, poisoned, mask = padded_relation_inputs(rng, poison)
    results = []
    for t_a, t_b, s_a, s_b in (clean, poisoned):
        s_a, s_b = s_a.clone().requires_grad_(), s_b.clone().requires_grad_()
        value = pykd.attention_relation_loss(t_a, t_b, s_a, s_b, 2, mask=mask, loss=loss, backend=backend,
                                             check_inputs_finite=True)
        results.append((value, *torch.autograd.grad(value, (s_a, s_b))))
    for got, expected in zip(results[1], results[0]):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, expected, rtol=0, atol=0)  # the padding's values are never read
    for grad in results[1][1:]:
        assert not grad[~mask].any()


def test_finite_check_still_names_nan_at_a_valid_token(rng):
    clean, _, mask = padded_relation_inputs(rng, 0.0)
    t_a, t_b, s_a, s_b = (x.clone() for x in clean)
    s_b[2, 0, 1] = float("nan")  # example 2 keeps only token 0
    with raises(ValueError, "s_b contains NaN or Inf at a valid token (shape (3, 6, 4))"):
        pykd.attention_relation_loss(t_a, t_b, s_a, s_b, 2, mask=mask, check_inputs_finite=True)


# ---- arguments of the wrong type ----

def relation_args(**changes):
    t, s = torch.randn(2, 5, 8), torch.randn(2, 5, 4)
    args = dict(t_a=t, t_b=t, s_a=s, s_b=s, num_relation_heads=2)
    args.update(changes)
    return args


@pytest.mark.parametrize("changes, message", [
    (dict(mask=[[True] * 5] * 2), "mask must be a bool torch.Tensor of shape (2, 5), got list"),
    (dict(num_relation_heads=torch.tensor(2)), "num_relation_heads must be a Python int (or NumPy integer), got a "
                                               "torch.Tensor of shape (); pass a number (e.g. tensor.item())"),
    (dict(num_relation_heads=2.0), "num_relation_heads must be a Python int (or NumPy integer), got float 2.0"),
    (dict(num_relation_heads=True), "num_relation_heads must be a Python int (or NumPy integer), got bool True"),
    (dict(scale_s=torch.tensor(0.5)), "scale_s must be a Python float (or NumPy scalar), got a torch.Tensor of "
                                      "shape ()"),
    (dict(scale_t="0.5"), "scale_t must be a Python float (or NumPy scalar), got str '0.5'"),
])
def test_relation_arguments_of_the_wrong_type(changes, message):
    with raises(TypeError, message):
        pykd.attention_relation_loss(**relation_args(**changes))


@pytest.mark.parametrize("changes, message", [
    (dict(alpha=torch.tensor(0.5)), "alpha must be a Python float (or NumPy scalar), got a torch.Tensor of shape ()"),
    (dict(scale=torch.ones(1)), "scale must be a Python float (or NumPy scalar), got a torch.Tensor of shape (1,)"),
    (dict(alpha=None), "alpha must be a Python float (or NumPy scalar), got NoneType None"),
])
def test_mi_arguments_of_the_wrong_type(changes, message):
    with raises(TypeError, message):
        pykd.mi_lower_bound(torch.randn(4, 3), torch.randn(4, 3), **changes)


def test_routed_out_features_of_the_wrong_type():
    with raises(TypeError, "out_features must be a Python int (or NumPy integer), got a torch.Tensor of shape ()"):
        pykd.routed_linear(torch.randn(4, 3), torch.randn(2, 5, 3), torch.ones(2) / 2, out_features=torch.tensor(4))


def test_numpy_scalars_count_as_the_numbers_they_hold():
    args = relation_args()
    expected = pykd.attention_relation_loss(**args, scale_s=0.5)
    numpy_args = dict(args, num_relation_heads=np.int64(2))
    assert torch.equal(pykd.attention_relation_loss(**numpy_args, scale_s=np.float32(0.5)), expected)
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    assert torch.equal(pykd.mi_lower_bound(a, b, alpha=np.float32(0.5), scale=np.float64(2.0)),
                       pykd.mi_lower_bound(a, b, alpha=0.5, scale=2.0))
    x, experts_w, alpha = torch.randn(4, 3), torch.randn(2, 5, 3), torch.ones(2) / 2
    assert torch.equal(pykd.routed_linear(x, experts_w, alpha, out_features=np.int32(4)),
                       pykd.routed_linear(x, experts_w, alpha, out_features=4))


# ---- meta tensors ----

@pytest.mark.parametrize("backend", ("auto",) + PATHS)
def test_meta_tensors_name_the_argument_and_device(backend):
    t, s = torch.empty(2, 5, 8, device="meta"), torch.empty(2, 5, 4, device="meta")
    with raises(ValueError, "t_a is on device meta (shape (2, 5, 8)): the ops compute values"):
        pykd.attention_relation_loss(t, t, s, s, 2, backend=backend)
    mask = torch.ones(2, 5, dtype=torch.bool, device="meta")
    with raises(ValueError, "mask is on device meta (shape (2, 5))"):
        pykd.attention_relation_loss(*(torch.zeros(x.shape) for x in (t, t, s, s)), 2, mask=mask, backend=backend)
    with raises(ValueError, "a is on device meta (shape (4, 3))"):
        pykd.mi_lower_bound(torch.empty(4, 3, device="meta"), torch.empty(4, 3, device="meta"), backend=backend)
    with raises(ValueError, "experts_w is on device meta (shape (2, 5, 3))"):
        pykd.routed_linear(torch.randn(4, 3), torch.empty(2, 5, 3, device="meta"), torch.ones(2) / 2,
                           backend=backend)
