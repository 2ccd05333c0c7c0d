"""pykd.routed_linear and the MoS modules: fused C++ and Triton paths against the float64 reference."""
import pytest
import torch
from tests.fp_bounds import rel_err
from tests.ops.devices import triton_device

import pykd

F_MAX, D_MAX, F, D = 41, 29, 33, 23  # active slice (F, D) inside the experts, none a multiple of a tile
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def make_inputs(experts, neuron_wise, with_bias, x_shape, dtype, rng, device="cpu"):
    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, generator=rng) * scale).to(device=device, dtype=dtype).requires_grad_()

    x = leaf(*x_shape, D)
    experts_w = leaf(experts, F_MAX, D_MAX, scale=D**-0.5)
    logits = torch.randn(F, experts, generator=rng) if neuron_wise else torch.randn(experts, generator=rng)
    alpha = torch.softmax(logits, -1).to(device=device, dtype=dtype).requires_grad_()
    experts_b = leaf(experts, F_MAX) if with_bias else None
    return x, experts_w, alpha, experts_b


def check(backend, experts, neuron_wise, with_bias, x_shape, dtype, rng, device="cpu"):
    x, experts_w, alpha, experts_b = make_inputs(experts, neuron_wise, with_bias, x_shape, dtype, rng, device)
    leaves = [t for t in (x, experts_w, alpha, experts_b) if t is not None]
    y = pykd.routed_linear(x, experts_w, alpha, experts_b, out_features=F, backend=backend)
    grad_y = torch.randn(y.shape, generator=rng).to(device=device, dtype=dtype)
    grads = torch.autograd.grad(y, leaves, grad_y)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref_y = pykd.routed_linear_reference(ref_leaves[0], ref_leaves[1], ref_leaves[2],
                                         ref_leaves[3] if with_bias else None, F)
    ref_grads = torch.autograd.grad(ref_y, ref_leaves, grad_y.double())
    assert y.dtype == dtype and y.shape == (*x_shape, F)
    for got, ref, like in [(y, ref_y, x), *zip(grads, ref_grads, leaves)]:
        assert got.dtype == like.dtype and got.shape == ref.shape
        rounding = rel_err(ref.to(like.dtype), ref)
        assert rel_err(got, ref) <= max(TOL[dtype], 2 * rounding)
    # Only the active slice of the experts learns.
    assert not grads[1][:, F:].any() and not grads[1][:, :, D:].any()


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("x_shape", ((37,), (3, 5)), ids=("2d", "3d"))
@pytest.mark.parametrize("experts", (1, 2, 4))
@pytest.mark.parametrize("with_bias", (False, True), ids=("nobias", "bias"))
@pytest.mark.parametrize("neuron_wise", (False, True), ids=("layer", "neuron"))
def test_cpp_matches_reference(neuron_wise, with_bias, experts, x_shape, dtype, rng):
    check("cpp", experts, neuron_wise, with_bias, x_shape, dtype, rng)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=("fp32", "bf16"))
@pytest.mark.parametrize("x_shape", ((37,), (3, 5)), ids=("2d", "3d"))
@pytest.mark.parametrize("experts", (1, 2, 4))
@pytest.mark.parametrize("with_bias", (False, True), ids=("nobias", "bias"))
@pytest.mark.parametrize("neuron_wise", (False, True), ids=("layer", "neuron"))
def test_triton_matches_reference(neuron_wise, with_bias, experts, x_shape, dtype, rng):
    pytest.importorskip("triton")
    check("triton", experts, neuron_wise, with_bias, x_shape, dtype, rng, device=triton_device())


@pytest.mark.parametrize("neuron_wise", (False, True), ids=("layer", "neuron"))
def test_reference_gradcheck(neuron_wise, rng):
    x, experts_w, alpha, experts_b = (t.detach().double().requires_grad_() for t in
                                      make_inputs(2, neuron_wise, True, (4,), torch.float64, rng))
    assert torch.autograd.gradcheck(
        lambda *args: pykd.routed_linear_reference(*args, out_features=F), (x, experts_w, alpha, experts_b))


@pytest.mark.parametrize("neuron_wise", (False, True), ids=("layer", "neuron"))
def test_collapse_gives_a_dense_layer_with_the_same_outputs(neuron_wise, rng):
    layer = pykd.RoutedLinear(D_MAX, F_MAX, num_experts=3, encoding_size=3, neuron_wise=neuron_wise)
    encoding = torch.tensor([0.5, 0.75, 1.0])
    layer.set_active(F, D, encoding)
    x = torch.randn(7, D, generator=rng)
    dense = layer.collapse()
    assert isinstance(dense, torch.nn.Linear) and dense.weight.shape == (F, D)
    torch.testing.assert_close(dense(x), layer(x).detach(), rtol=1e-5, atol=1e-5)


def test_from_linear_starts_as_the_pretrained_layer(rng):
    dense = torch.nn.Linear(D, F)
    layer = pykd.RoutedLinear.from_linear(dense, num_experts=2, encoding_size=2, noise=0.0)
    layer.set_active(F, D, torch.ones(2))
    x = torch.randn(5, D, generator=rng)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("neuron_wise", (False, True), ids=("layer", "neuron"))
def test_router_learns_through_the_fused_op(neuron_wise, rng):
    torch.manual_seed(0)
    layer = pykd.RoutedLinear(D_MAX, F_MAX, num_experts=2, encoding_size=3, neuron_wise=neuron_wise)
    layer.set_active(F, D, torch.tensor([0.3, 0.6, 1.0]))
    x, target = torch.randn(16, D, generator=rng), torch.randn(16, F, generator=rng)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    before = [p.detach().clone() for p in layer.router.parameters()]
    active_rows = F * 2 if neuron_wise else 2  # a neuron-wise head computes only the active neurons
    for _ in range(2):
        loss = torch.nn.functional.mse_loss(layer(x), target)
        optimizer.zero_grad()
        loss.backward()
        head_grad = layer.router.head.weight.grad
        assert layer.router.hidden.weight.grad.abs().sum() > 0
        assert head_grad[:active_rows].abs().sum() > 0 and not head_grad[active_rows:].any()
        optimizer.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, layer.router.parameters()))


def test_neuron_wise_router_computes_only_active_neurons():
    router = pykd.ArchRouter(3, num_experts=2, neuron_wise=True, max_out_features=10)
    alpha = router(torch.ones(3), out_features=4)
    assert alpha.shape == (4, 2)
    torch.testing.assert_close(alpha.sum(-1), torch.ones(4))


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        (dict(alpha=torch.ones(3) / 3), ValueError,
     r"layer-wise alpha must have shape \(2,\) for 2 experts, got \(3,\)"),
        (dict(alpha=torch.ones(5, 2) / 2, out_features=6), ValueError,
         r"neuron-wise alpha must have shape \(out_features, E\) = \(6, 2\), got \(5, 2\)"),
        (dict(out_features=12), ValueError, r"out_features must be an int in \[1, 10\] .* got 12"),
        (dict(x=torch.randn(4, 9)), ValueError, r"x has 9 input features .* experts have only 8"),
        (dict(experts_b=torch.randn(3, 10)), ValueError, r"experts_b must have shape \(2, 10\), got \(3, 10\)"),
        (dict(alpha=torch.ones(2, 2, 2)), ValueError, r"alpha must be \(E,\) layer-wise or \(out_features, E\)"),
        (dict(experts_w=torch.randn(2, 10)), ValueError, r"experts_w must have 3 dimensions"),
        (dict(alpha=(torch.ones(2) / 2).to("meta")), ValueError, r"alpha is on device meta"),
    ],
)
def test_bad_input_raises_clear_error(kwargs, error, pattern):
    args = dict(x=torch.randn(4, 8), experts_w=torch.randn(2, 10, 8), alpha=torch.ones(2) / 2, experts_b=None,
                out_features=None)
    args.update(kwargs)
    with pytest.raises(error, match=pattern):
        pykd.routed_linear(**args)


def test_module_rejects_inputs_of_the_wrong_width():
    layer = pykd.RoutedLinear(8, 10, num_experts=2, encoding_size=2)
    layer.set_active(6, 5, torch.ones(2))
    with pytest.raises(ValueError, match=r"active in_features=5, got shape \(3, 8\)"):
        layer(torch.randn(3, 8))
    with pytest.raises(ValueError, match=r"active shape \(11, 5\) must fit"):
        layer.set_active(11, 5, torch.ones(2))


@pytest.mark.parametrize("build, error, message", [
    (lambda: pykd.RoutedLinear(0, 4, num_experts=2, encoding_size=3), ValueError,
     "max_in_features must be an int >= 1, got 0"),
    (lambda: pykd.RoutedLinear(4, 0, num_experts=2, encoding_size=3), ValueError,
     "max_out_features must be an int >= 1, got 0"),
    (lambda: pykd.RoutedLinear(4, 4, num_experts=0, encoding_size=3), ValueError,
     "num_experts must be an int >= 1, got 0"),
    (lambda: pykd.RoutedLinear(4, 4, num_experts=2, encoding_size=0), ValueError,
     "encoding_size must be an int >= 1, got 0"),
    (lambda: pykd.RoutedLinear(4, 4, num_experts=2, encoding_size=3, router_hidden=0), ValueError,
     "router_hidden must be an int >= 1, got 0"),
    (lambda: pykd.RoutedLinear(4.0, 4, num_experts=2, encoding_size=3), TypeError,
     "max_in_features must be an int, got float 4.0"),
    (lambda: pykd.RoutedLinear(4, 4, 2, 3).set_active(2.0, 3, torch.ones(3)), TypeError,
     "out_features must be an int, got float 2.0"),
    (lambda: pykd.ArchRouter(3, 2, neuron_wise=True, max_out_features=0), ValueError,
     "max_out_features must be an int >= 1, got 0"),
    (lambda: pykd.ArchRouter(3, 2, neuron_wise=True, max_out_features=8)(torch.ones(3), 5.5), TypeError,
     "out_features must be an int, got float 5.5"),
    (lambda: pykd.ArchRouter(3, 2, neuron_wise=True, max_out_features=8)(torch.ones(3), 0), ValueError,
     "out_features must be an int >= 1, got 0"),
    (lambda: pykd.ArchRouter(3, 2, neuron_wise=True, max_out_features=8)(torch.ones(3), 9), ValueError,
     r"out_features must be in \[1, 8\], got 9"),
])
def test_module_sizes_name_the_argument(build, error, message):
    """Sizes of 0 (a ZeroDivisionError in the initialiser before) and non-int sizes are refused by name."""
    with pytest.raises(error, match=message):
        build()
