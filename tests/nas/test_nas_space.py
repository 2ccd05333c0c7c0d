"""pykd.nas.space: AutoDistil's sub-spaces, the scaling rule, architectures, exact params and FLOPs."""
import itertools
import random

import pytest
import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode

from pykd.nas import Architecture, SearchSpace, SubSpace, TeacherShape
from pykd.nas.space import PAPER_SUBSPACES, scale_factor

FACTORS = ("layers", "hidden", "ffn_ratio", "heads")


def bert_base_config():
    return transformers.BertConfig()  # 12 layers, 768 hidden, 12 heads, FFN 3072


def minilm_config():
    return transformers.BertConfig(num_hidden_layers=6, hidden_size=384, num_attention_heads=12,
                                   intermediate_size=1536)


def tiny_config(model_type="bert", **overrides):
    values = dict(vocab_size=67, hidden_size=48, num_hidden_layers=4, num_attention_heads=4, intermediate_size=96,
                  max_position_embeddings=40, type_vocab_size=2)
    values.update(overrides)
    config_class = transformers.RobertaConfig if model_type == "roberta" else transformers.BertConfig
    return config_class(**values)


def test_bert_base_gets_table_2_exactly():
    space = SearchSpace.autodistil(bert_base_config())
    assert [s.name for s in space.subspaces] == ["tiny", "small", "base"]
    for subspace in space.subspaces:
        paper = PAPER_SUBSPACES[subspace.name]
        for factor in FACTORS:
            assert getattr(subspace, factor) == tuple(paper[factor])
        expected = sorted(Architecture(*values) for values in itertools.product(*(paper[f] for f in FACTORS))
                          if values[1] % values[3] == 0)
        assert subspace.candidates() == expected
    assert [len(s.candidates()) for s in space.subspaces] == [96, 96, 48]


def test_minilm_scaling_rule():
    space = SearchSpace.autodistil(minilm_config())
    got = {s.name: s.to_dict() for s in space.subspaces}
    assert got["tiny"] == {"name": "tiny", "layers": [1, 2, 3, 4], "hidden": [64, 80, 96, 112],
                           "ffn_ratio": [2.0, 2.5, 3.0, 3.5], "heads": [7, 8, 9, 10]}
    assert got["small"] == {"name": "small", "layers": [3, 4, 5, 6], "hidden": [128, 144, 160, 176],
                            "ffn_ratio": [2.5, 3.0, 3.5, 4.0], "heads": [7, 8, 9, 10]}
    assert got["base"] == {"name": "base", "layers": [3, 4, 5, 6], "hidden": [272, 288, 304, 320],
                           "ffn_ratio": [2.5, 3.0, 3.5, 4.0], "heads": [9, 10, 11, 12]}
    for arch in space.candidates():
        space.validate(arch)
        assert arch.hidden % arch.heads == 0 and arch.layers <= 6 and arch.hidden <= 384 and arch.heads <= 12


def test_scale_factor_rounds_dedups_and_refills():
    # layers of a 6-layer teacher, small sub-space: 4.5, 5, 5.5, 6 -> 5, 5, 6, 6 -> {5, 6} -> refilled below.
    assert scale_factor((9, 10, 11, 12), 0.5, 1, 6) == (3, 4, 5, 6)
    # 2-layer teacher: {1} cannot grow below 1, grows above up to the teacher's 2.
    assert scale_factor((4, 5, 6, 7), 2 / 12, 1, 2) == (1, 2)
    # hidden rounds to multiples of 8 (half up): 70.8, 75, 79.2, 83.3 -> {72, 80}, refilled below.
    assert scale_factor((544, 576, 608, 640), 100 / 768, 8, 100) == (56, 64, 72, 80)
    # clipped to the teacher's width (150 -> 144), then refilled below.
    assert scale_factor((128, 160), 1.0, 8, 150) == (128, 144)
    # the FFN ratio of a ratio-2 teacher lands on multiples of 0.5.
    assert scale_factor((2.0, 2.5, 3.0, 3.5), 0.5, 0.5, 2.0) == (0.5, 1.0, 1.5, 2.0)


def test_k1_is_one_subspace_over_the_union():
    k3, k1 = SearchSpace.autodistil(minilm_config()), SearchSpace.autodistil(minilm_config(), k=1)
    assert [s.name for s in k1.subspaces] == ["all"]
    for factor in FACTORS:
        union = sorted({v for s in k3.subspaces for v in getattr(s, factor)})
        assert list(getattr(k1.subspaces[0], factor)) == union
    assert set(k3.candidates()) <= set(k1.candidates())
    with pytest.raises(ValueError, match="k must be 1"):
        SearchSpace.autodistil(minilm_config(), k=2)


def test_architecture_parse_str_dict_round_trip():
    arch = Architecture.parse("layers=4, hidden=256,ffn_ratio=3,heads=8")
    assert arch == Architecture(4, 256, 3.0, 8) and arch.intermediate == 768 and arch.head_size == 32
    assert Architecture.parse(str(arch)) == arch
    assert Architecture.from_dict(arch.to_dict()) == arch
    assert str(Architecture(2, 80, 2.5, 10)) == "layers=2,hidden=80,ffn_ratio=2.5,heads=10"
    assert len({arch, Architecture(4, 256, 3, 8)}) == 1
    assert Architecture(3, 64, 2.0, 8) < Architecture(4, 32, 2.0, 8)


@pytest.mark.parametrize("text, match", [
    ("layers=4,hidden=256,ffn_ratio=3,heads=8,depth=2", r"unknown \['depth'\]"),
    ("layers=4,hidden=256,heads=8", r"missing \['ffn_ratio'\]"),
    ("layers=4,hidden=256,ffn_ratio=3,heads=x", "heads='x' is not a number"),
    ("layers 4,hidden=256", "expected key=value"),
    ("layers=4,layers=5,hidden=256,ffn_ratio=3,heads=8", "gives 'layers' twice"),
    ("layers=4,hidden=250,ffn_ratio=3,heads=8", "hidden=250 is not divisible by heads=8"),
    ("layers=0,hidden=256,ffn_ratio=3,heads=8", "layers must be a positive int, got 0"),
    ("layers=4,hidden=256,ffn_ratio=-1,heads=8", "ffn_ratio must be a positive number, got -1.0"),
])
def test_architecture_errors_name_the_value(text, match):
    with pytest.raises(ValueError, match=match):
        Architecture.parse(text)


def test_architecture_rejects_non_ints():
    with pytest.raises(ValueError, match="hidden must be a positive int, got 256.0"):
        Architecture(4, 256.0, 3.0, 8)
    with pytest.raises(ValueError, match="layers must be a positive int, got True"):
        Architecture(True, 256, 3.0, 8)


def test_subspace_sampling_is_deterministic_and_covers_candidates():
    subspace = SearchSpace.autodistil(minilm_config()).subspace("tiny")
    draws = [subspace.sample(torch.Generator().manual_seed(7)) for _ in range(2)]
    assert draws[0] == draws[1] and subspace.contains(draws[0])
    rng_draws = [subspace.sample(random.Random(3)) for _ in range(2)]
    assert rng_draws[0] == rng_draws[1]
    generator = torch.Generator().manual_seed(0)
    seen = {subspace.sample(generator) for _ in range(2000)}
    assert seen == set(subspace.candidates())
    with pytest.raises(TypeError, match="generator must be"):
        subspace.sample(3)


def test_largest_and_smallest_bound_every_candidate():
    space = SearchSpace.autodistil(minilm_config())
    for subspace in space.subspaces:
        largest, smallest = subspace.largest(), subspace.smallest()
        assert subspace.contains(largest) and subspace.contains(smallest)
        sizes = [space.params(a) for a in subspace.candidates()]
        flops = [space.flops(a, 64) for a in subspace.candidates()]
        assert space.params(largest) == max(sizes) and space.params(smallest) == min(sizes)
        assert space.flops(largest, 64) == max(flops) and space.flops(smallest, 64) == min(flops)
    base = space.subspace("base")  # hidden 272 and 304 have no head count in 9-12 dividing them
    assert base.smallest() == Architecture(3, 288, 2.5, 9) and base.largest() == Architecture(6, 320, 4.0, 10)


def test_subspace_errors():
    with pytest.raises(ValueError, match="no candidate"):
        SubSpace("odd", (2,), (30,), (2.0,), (7,))
    with pytest.raises(ValueError, match="heads must be a non-empty list"):
        SubSpace("empty", (2,), (32,), (2.0,), ())
    with pytest.raises(ValueError, match=r"unknown \['depth'\]"):
        SubSpace.from_dict({"name": "x", "layers": [1], "hidden": [8], "ffn_ratio": [1], "heads": [1], "depth": 1})


def test_from_dict_round_trip_and_errors():
    space = SearchSpace.autodistil(minilm_config())
    assert SearchSpace.from_dict(space.to_dict(), minilm_config()) == space
    user = {"subspaces": [{"name": "mine", "layers": [2, 3], "hidden": [64, 96], "ffn_ratio": [2, 3],
                           "heads": [4, 8]}]}
    mine = SearchSpace.from_dict(user, minilm_config())
    assert len(mine.candidates()) == 16
    with pytest.raises(ValueError, match="made for teacher"):
        SearchSpace.from_dict(space.to_dict(), bert_base_config())
    too_big = {"subspaces": [{"name": "big", "layers": [8], "hidden": [64], "ffn_ratio": [2], "heads": [4]}]}
    with pytest.raises(ValueError, match="sub-space .big. is larger than the teacher: layers 8 > the teacher.s 6"):
        SearchSpace.from_dict(too_big, minilm_config())
    with pytest.raises(ValueError, match=r"unknown search space keys \['spaces'\]"):
        SearchSpace.from_dict({"subspaces": [], "spaces": 1}, minilm_config())


def test_validate_names_what_is_wrong():
    space = SearchSpace.autodistil(minilm_config())
    with pytest.raises(ValueError, match="hidden 512 > the teacher's 384"):
        space.validate(Architecture(4, 512, 2.0, 8))
    with pytest.raises(ValueError, match=r"FFN width \(hidden \* ffn_ratio\) 1920 > the teacher's 1536"):
        space.validate(Architecture(4, 384, 5.0, 8))
    with pytest.raises(ValueError, match="layers=5,hidden=96,ffn_ratio=2,heads=8 is in none of the sub-spaces"):
        space.validate(Architecture(5, 96, 2.0, 8))
    with pytest.raises(TypeError, match="expected an Architecture"):
        space.validate("layers=4")


def test_unsupported_family_is_refused():
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        SearchSpace.autodistil(transformers.GPT2Config())
    with pytest.raises(ValueError, match="embedding_size == hidden_size"):
        SearchSpace.autodistil(transformers.ElectraConfig(embedding_size=128, hidden_size=256))


def _model(kind: str, config):
    classes = {"bert": transformers.BertModel, "bert-cls": transformers.BertForSequenceClassification,
               "roberta-cls": transformers.RobertaForSequenceClassification}
    torch.manual_seed(0)
    return classes[kind](config).eval()


def _student_config(config, arch):
    config = config.__class__(**{**config.to_dict(), "num_hidden_layers": arch.layers, "hidden_size": arch.hidden,
                                 "num_attention_heads": arch.heads, "intermediate_size": arch.intermediate})
    config._attn_implementation = "eager"
    return config


ARCHS = [Architecture(1, 8, 1.0, 2), Architecture(2, 24, 1.5, 3), Architecture(3, 40, 2.0, 4),
         Architecture(4, 48, 2.0, 4)]


@pytest.mark.parametrize("kind", ["bert", "bert-cls", "roberta-cls"])
def test_params_and_flops_match_the_built_model(kind):
    model_type = kind.split("-")[0]
    teacher = _model(kind, tiny_config(model_type, num_labels=3))
    space = SearchSpace.autodistil(teacher)
    assert space.teacher.num_labels == (3 if kind != "bert" else None)
    assert space.teacher.head_dense == (kind == "roberta-cls")
    for arch in ARCHS:
        student = _model(kind, _student_config(teacher.config, arch))
        assert space.params(arch) == sum(p.numel() for p in student.parameters())
        for seq_len in (1, 13):
            ids = torch.randint(3, 60, (1, seq_len))
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                student(input_ids=ids)
            measured = counter.get_total_flops()
            assert abs(space.flops(arch, seq_len) - measured) <= 0.01 * measured, (arch, seq_len)
    assert space.teacher_params() == sum(p.numel() for p in teacher.parameters())


def test_teacher_shape_from_config_assumes_a_bare_encoder_with_pooler():
    shape = TeacherShape.from_config(minilm_config())
    assert shape.pooler and shape.num_labels is None
    assert SearchSpace.autodistil(minilm_config()).teacher_params() == 22713216  # all-MiniLM-L6-v2's count


def test_flops_rejects_bad_seq_len():
    space = SearchSpace.autodistil(minilm_config())
    with pytest.raises(ValueError, match="seq_len must be a positive int, got 0"):
        space.flops(Architecture(2, 64, 2.0, 8), 0)


# ---- per-layer architectures and sub-spaces (HAT / Mixture-of-Supernets) ----

from pykd.nas.architecture import LayerwiseArchitecture, architecture_from_dict, parse_architecture
from pykd.nas.space import LayerwiseSubSpace


def test_layerwise_architecture_round_trips_and_errors():
    arch = LayerwiseArchitecture(96, (8, 12, 6), (2.0, 3.5, 1.0))
    assert arch.layers == 3 and arch.layer_ffn == (192, 336, 96)
    assert str(arch) == "layers=3,hidden=96,heads=8/12/6,ffn_ratio=2/3.5/1"
    assert parse_architecture(str(arch)) == arch and architecture_from_dict(arch.to_dict()) == arch
    assert parse_architecture("layers=2,hidden=96,ffn_ratio=2,heads=8") == Architecture(2, 96, 2.0, 8)
    assert LayerwiseArchitecture(96, (8, 8), (2, 2)).uniform() == Architecture(2, 96, 2.0, 8)
    with pytest.raises(ValueError, match="has layers that differ"):
        arch.uniform()
    with pytest.raises(ValueError, match="heads=7 of layer 1"):
        LayerwiseArchitecture(96, (8, 7), (2.0, 2.0))
    with pytest.raises(ValueError, match="one heads and one ffn_ratio value per layer"):
        LayerwiseArchitecture(96, (8, 8), (2.0,))
    with pytest.raises(ValueError, match="says layers=3 but lists 2 layers"):
        LayerwiseArchitecture.parse("layers=3,hidden=96,heads=8/8,ffn_ratio=2/2")
    with pytest.raises(ValueError, match=r"unknown \['width'\]"):
        LayerwiseArchitecture.from_dict({"hidden": 96, "heads": [8], "ffn_ratio": [2], "width": 1})


def test_layerwise_costs_sum_over_layers():
    space = SearchSpace.autodistil(tiny_config(), layerwise=True)
    mixed = LayerwiseArchitecture(24, (3, 2, 4), (1.0, 2.0, 0.5))

    def per_layer_and_shared(cost, ratio):
        one, two = cost(Architecture(1, 24, ratio, 4)), cost(Architecture(2, 24, ratio, 4))
        return two - one, 2 * one - two

    for cost in (space.params, lambda a: space.flops(a, 9)):
        parts = [per_layer_and_shared(cost, r) for r in mixed.ffn_ratio]
        assert len({shared for _, shared in parts}) == 1
        assert cost(mixed) == parts[0][1] + sum(layer for layer, _ in parts)
    with pytest.raises(ValueError, match="heads 8 > the teacher's 4"):
        space.params(LayerwiseArchitecture(24, (8, 2), (1.0, 1.0)))


def test_layerwise_subspace_genes_sampling_and_enumeration():
    subspace = LayerwiseSubSpace("x", (1, 2), (32, 48), (1.0, 2.0), (4, 8, 6))
    # hidden 32: heads 4, 8; hidden 48: heads 4, 8, 6 -> (2*2)^1 + (2*2)^2 + (3*2)^1 + (3*2)^2 = 62
    assert subspace.count() == 62 and len(set(subspace.candidates())) == 62
    assert all(subspace.contains(a) for a in subspace.candidates())
    assert not subspace.contains(Architecture(1, 32, 1.0, 4))
    assert subspace.largest() == LayerwiseArchitecture(48, (8, 8), (2.0, 2.0))
    assert subspace.smallest() == LayerwiseArchitecture(32, (4,), (1.0,))
    generator = random.Random(5)
    for _ in range(50):
        arch = subspace.sample(generator)
        assert subspace.contains(arch)
        assert subspace.from_genes(subspace.genes_of(arch)) == arch
        assert set(subspace.genes_of(arch)) == set(subspace.genes())
    assert subspace.from_genes({"layers": 1, "hidden": 32, "heads.0": 6, "ffn_ratio.0": 1.0}) is None
    assert SubSpace("u", (1,), (32,), (1.0,), (4, 6)).from_genes({"layers": 1, "hidden": 32, "ffn_ratio": 1.0,
                                                                   "heads": 6}) is None
    big = SearchSpace.autodistil(minilm_config(), layerwise=True, k=1).subspaces[0]
    with pytest.raises(ValueError, match="too many to enumerate"):
        big.candidates()


def test_layerwise_space_dict_round_trip():
    space = SearchSpace.autodistil(minilm_config(), layerwise=True)
    assert all(isinstance(s, LayerwiseSubSpace) for s in space.subspaces)
    assert SearchSpace.from_dict(space.to_dict(), minilm_config()) == space
    arch = space.subspace("small").sample(random.Random(1))
    assert space.subspace_of(arch).name == "small"
