"""Mixture-of-Supernets in the SuperLM: routed FFN experts, collapse on export, per-layer architectures."""
import pytest
import torch

import pykd
from pykd.nas import Architecture, SearchSpace, SuperLM, save_student
from pykd.nas.elastic import ElasticLinear
from pykd.nas.mos import LayerRouter, RoutedElasticLinear, arch_encoding
from pykd.nas.architecture import LayerwiseArchitecture
from tests.nas.test_superlm import make_batch, make_teacher, valid

ARCHS = [Architecture(2, 24, 1.5, 3), Architecture(3, 40, 0.5, 4), Architecture(4, 48, 2.0, 4)]


def supernet(experts=2, routing="layer", seed=0, kind="bert", **options):
    teacher = make_teacher(kind)
    torch.manual_seed(seed)
    return SuperLM.from_teacher(teacher, SearchSpace.autodistil(teacher), experts=experts, routing=routing,
                                **options).eval()


def assert_outputs_equal(got, expected, batch, tolerance):
    torch.testing.assert_close(valid(got.last_hidden_state, batch), valid(expected.last_hidden_state, batch),
                               rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(got.pooler_output, expected.pooler_output, rtol=tolerance, atol=tolerance)


def test_one_expert_is_the_plain_superlm():
    plain, one = supernet(experts=1), supernet(experts=1, routing="neuron")
    assert plain.state_dict().keys() == one.state_dict().keys()
    assert not any("experts" in key or "router" in key for key in one.state_dict())
    batch = make_batch()
    for arch in ARCHS:
        plain.set_active(arch)
        one.set_active(arch)
        with torch.no_grad():
            assert_outputs_equal(one(**batch), plain(**batch), batch, 0.0)


@pytest.mark.parametrize("routing", ["layer", "neuron"])
def test_a_routed_linear_with_one_expert_is_the_elastic_linear(routing):
    torch.manual_seed(0)
    dense = torch.nn.Linear(13, 11)
    elastic = ElasticLinear(dense)
    router = LayerRouter(1, routing, {"ffn": 11}, hidden=16)
    routed = RoutedElasticLinear(dense.weight, dense.bias, 1, 0.0, router, "ffn")
    encoding = arch_encoding(9, 3, 7, (13, 4, 11))
    elastic.set_active(7, 9)
    routed.set_active(7, 9, encoding)
    x = torch.randn(2, 5, 9, dtype=torch.float32)
    torch.testing.assert_close(routed(x), elastic(x), rtol=1e-6, atol=1e-6)  # alpha = softmax of one logit = 1


@pytest.mark.parametrize("routing", ["layer", "neuron"])
def test_noise_free_experts_change_nothing(routing):
    """Copies of one weight mix to that weight whatever alpha is: E=2 without noise equals E=1."""
    plain, routed = supernet(experts=1), supernet(experts=2, routing=routing, noise=0.0)
    batch = make_batch()
    for arch in ARCHS:
        plain.set_active(arch)
        routed.set_active(arch)
        with torch.no_grad():
            assert_outputs_equal(routed(**batch), plain(**batch), batch, 1e-5)


def test_experts_start_as_noisy_copies_of_the_teacher():
    teacher = make_teacher()
    net = supernet(experts=3, noise=1e-2)
    original = teacher.encoder.layer[1].intermediate.dense.weight
    experts = net.model.encoder.layer[1].intermediate.dense.experts_w
    assert experts.shape == (3, *original.shape)
    deviation = (experts - original).detach()
    assert 0.8e-2 < float(deviation.std().detach()) < 1.2e-2  # 3 x 96 x 48 Gaussian draws of std 1e-2
    assert not torch.equal(experts[0], experts[1])
    assert net.model.encoder.layer[1].mos_router is not None


@pytest.mark.parametrize("routing", ["layer", "neuron"])
@pytest.mark.parametrize("route_attention", [False, True])
def test_collapsed_export_equals_the_routed_subnetwork(routing, route_attention, tmp_path):
    net = supernet(experts=2, routing=routing, noise=0.05, route_attention=route_attention)
    with torch.no_grad():  # routers away from their initialisation
        for name, parameter in net.named_parameters():
            if "mos_router" in name:
                parameter.add_(0.5 * torch.randn_like(parameter))
    batch = make_batch()
    space = net.space
    for index, arch in enumerate(ARCHS):
        net.set_active(arch)
        with torch.no_grad():
            expected = net(**batch)
        student = net.export(arch)
        assert not any("experts" in key or "router" in key for key in student.state_dict())
        assert sum(p.numel() for p in student.parameters()) == space.params(arch)
        if index == 0:  # one trip through the disk; the others compare the model in memory
            student = type(student).from_pretrained(save_student(student, None, tmp_path / "student")).eval()
        with torch.no_grad():
            assert_outputs_equal(student(**batch), expected, batch, 1e-5)


def test_routed_layers_mix_by_architecture():
    """Different architectures get different mixtures; the layer-wise alpha is shared within a layer."""
    net = supernet(experts=2, routing="layer")
    layer = net.model.encoder.layer[3]
    net.set_active(Architecture(4, 24, 1.0, 3))
    small = layer.intermediate.dense.alpha()
    assert torch.equal(small, layer.output.dense.alpha())
    net.set_active(Architecture(4, 48, 2.0, 4))
    assert not torch.allclose(small, layer.intermediate.dense.alpha())
    torch.testing.assert_close(small.sum(), torch.tensor(1.0))
    neuron = supernet(experts=2, routing="neuron")
    neuron.set_active(Architecture(2, 24, 1.5, 3))
    alpha = neuron.model.encoder.layer[2].intermediate.dense.alpha()
    assert alpha.shape == (36, 2)
    torch.testing.assert_close(alpha.sum(-1), torch.ones(36))


@pytest.mark.parametrize("routing", ["layer", "neuron"])
def test_router_gradients_and_experts_diverge_with_training(routing):
    net = supernet(experts=2, routing=routing, noise=0.0).train()  # identical experts to start with
    layer = net.model.encoder.layer[2]
    experts = layer.intermediate.dense.experts_w
    assert torch.equal(experts[0], experts[1])
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    batch = make_batch()
    for step, arch in enumerate([Architecture(4, 48, 2.0, 4), Architecture(2, 24, 1.0, 3)] * 2):
        net.set_active(arch)
        optimizer.zero_grad()
        net(**batch).last_hidden_state.pow(2).mean().backward()
        if step == 3:  # (at step 0 identical experts give the router no gradient: d alpha_e is alike for all e)
            assert float(layer.mos_router.body.weight.grad.abs().sum()) > 0
            head = layer.mos_router.head if routing == "layer" else layer.mos_router.heads["ffn_in"]
            assert float(head.weight.grad.abs().sum()) > 0
        optimizer.step()
    # The experts get alpha_e-weighted updates and the router's alphas differ: they move apart.
    gap = (experts[0] - experts[1]).detach().abs()
    assert float(gap.max()) > 1e-6


def test_gradients_stay_inside_the_active_expert_slice():
    net = supernet(experts=2, routing="neuron")
    net.set_active(Architecture(2, 24, 1.0, 3))
    net(**make_batch()).last_hidden_state.pow(2).sum().backward()
    grad = net.model.encoder.layer[2].intermediate.dense.experts_w.grad  # student layer 1 <- teacher layer 2
    assert grad[:, :24, :24].abs().sum() > 0 and grad[:, 24:].abs().sum() == 0 and grad[:, :, 24:].abs().sum() == 0


def test_per_layer_architectures_run_capture_and_export():
    net = supernet(experts=2, routing="neuron", noise=0.05)
    mixed_heads = LayerwiseArchitecture(24, (3, 2, 4), (1.0, 2.0, 0.5))
    net.set_active(mixed_heads)
    batch = make_batch()
    with torch.no_grad(), pykd.capture(net) as recorded:
        net(**batch)
    assert [tuple(layer.query.shape) for layer in recorded.layers] == [(3, 3, 11, 8), (3, 2, 11, 12), (3, 4, 11, 6)]
    with pytest.raises(ValueError, match=r"different head counts per layer \(3, 2, 4\)"):
        net.export(mixed_heads)
    mixed_ffn = LayerwiseArchitecture(24, (4, 4, 4), (1.0, 2.0, 0.5))
    with pytest.raises(ValueError, match=r"different FFN widths per layer \(24, 48, 12\).*pad_ffn=True"):
        net.export(mixed_ffn)
    net.set_active(mixed_ffn)
    with torch.no_grad():
        expected = net(**batch)
    padded = net.export(mixed_ffn, pad_ffn=True)
    assert padded.config.intermediate_size == 48
    with torch.no_grad():
        assert_outputs_equal(padded(**batch), expected, batch, 1e-5)
    uniform = LayerwiseArchitecture(24, (4, 4), (1.5, 1.5))
    student = net.export(uniform)
    assert student.config.intermediate_size == 36 and student.config.num_hidden_layers == 2
    net.set_active(uniform)
    with torch.no_grad():
        layerwise_out = net(**batch)
    net.set_active(uniform.uniform())
    with torch.no_grad():
        assert_outputs_equal(net(**batch), layerwise_out, batch, 0.0)


@pytest.mark.parametrize("options, match", [
    ({"experts": 0}, "experts must be an int >= 1 .* got 0"),
    ({"experts": 2.0}, "experts must be an int >= 1 .* got 2.0"),
    ({"routing": "token"}, r"routing must be one of \('layer', 'neuron'\), got 'token'"),
    ({"noise": -1.0}, "noise must be a number >= 0, got -1.0"),
    ({"route_attention": "yes"}, "route_attention must be True or False, got 'yes'"),
    ({"router_hidden": 0}, "router_hidden must be a positive int, got 0"),
])
def test_bad_mos_options(options, match):
    teacher = make_teacher()
    with pytest.raises(ValueError, match=match):
        SuperLM.from_teacher(teacher, SearchSpace.autodistil(teacher), **options)


def test_checkpoints_of_another_mos_configuration_are_refused():
    saved = supernet(experts=2, routing="layer").config_dict()
    with pytest.raises(ValueError, match="differs in 'experts': checkpoint 2, this SuperLM 3"):
        supernet(experts=3, routing="layer").check_config_dict(saved)
    with pytest.raises(ValueError, match="differs in 'routing': checkpoint 'layer', this SuperLM 'neuron'"):
        supernet(experts=2, routing="neuron").check_config_dict(saved)
    with pytest.raises(ValueError, match="differs in 'encoding'"):
        supernet(experts=2).check_config_dict({**saved, "encoding": ["hidden/hidden_max"]})


def test_router_refuses_an_encoding_of_another_size():
    router = LayerRouter(2, "layer", {"ffn_in": 8})
    with pytest.raises(ValueError, match=r"encoding must have shape \(3,\).*got \(4,\)"):
        router(torch.ones(4), "ffn_in", 8)
