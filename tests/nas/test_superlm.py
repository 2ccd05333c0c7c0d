"""pykd.nas.SuperLM: bottom-left extraction, teacher equality, capture, export round trips, errors."""
import pytest
import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode

import pykd
from pykd.distill.config import StudentConfig
from pykd.distill.models import build_student, load_pretrained, load_tokenizer, sliced_state
from pykd.nas import Architecture, SearchSpace, SuperLM, save_student
from tests.kd_fixtures import tiny_teacher

VOCAB = 67


def make_teacher(kind="bert", layers=4, hidden=48, heads=4, ffn=96, seed=0, vocab=VOCAB):
    family = kind.split("-")[0]
    config_class = {"bert": transformers.BertConfig, "roberta": transformers.RobertaConfig,
                    "electra": transformers.ElectraConfig}[family]
    extra = {"embedding_size": hidden} if family == "electra" else {}
    config = config_class(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                          intermediate_size=ffn, max_position_embeddings=40, num_labels=3, **extra)
    model_class = {"bert": transformers.BertModel, "bert-cls": transformers.BertForSequenceClassification,
                   "roberta": transformers.RobertaModel,
                   "electra-cls": transformers.ElectraForSequenceClassification}[kind]
    torch.manual_seed(seed)
    config._attn_implementation = "sdpa"
    model = model_class(config).eval()
    # Random non-trivial LayerNorm parameters, so that slicing them is tested too.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return model


def make_batch(seed=1, batch=3, length=11):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 1:] = 0  # a row with one real token
    types = torch.zeros_like(ids)
    types[0, 5:] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def hand_sliced(teacher, arch):
    """The sub-network built independently: a stock model of the arch filled by pykd.distill's sliced_state."""
    config = teacher.config.__class__(**{**teacher.config.to_dict(), "num_hidden_layers": arch.layers,
                                         "hidden_size": arch.hidden, "num_attention_heads": arch.heads,
                                         "intermediate_size": arch.intermediate})
    config._attn_implementation = "sdpa"
    student = type(teacher)(config).eval()
    student.load_state_dict(sliced_state(teacher, student))
    return student


def valid(tensor, batch):
    """Rows of real tokens only: padded positions' outputs are undefined by design."""
    return tensor[batch["attention_mask"].bool()]


ARCHS = [Architecture(1, 8, 0.5, 2), Architecture(2, 24, 1.5, 3), Architecture(3, 40, 2.0, 4),
         Architecture(4, 48, 1.0, 4)]


def test_teacher_shaped_subnetwork_equals_the_teacher():
    for kind in ("bert", "bert-cls"):
        teacher = make_teacher(kind)
        supernet = SuperLM.from_teacher(teacher, SearchSpace.autodistil(teacher)).eval()
        assert supernet.active == supernet.space.teacher_architecture()
        batch = make_batch()
        with torch.no_grad():
            expected = teacher(**batch, output_hidden_states=True)
            got = supernet(**batch, output_hidden_states=True)
        assert len(got.hidden_states) == len(expected.hidden_states) == 5
        for a, b in zip(got.hidden_states, expected.hidden_states):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        key = "logits" if kind == "bert-cls" else "pooler_output"
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-6)


def test_teacher_is_not_shared_or_modified():
    teacher = make_teacher()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    supernet = SuperLM.from_teacher(teacher, SearchSpace.autodistil(teacher))
    supernet.set_active(Architecture(2, 24, 1.0, 3))
    supernet(**make_batch()).last_hidden_state.sum().backward()
    with torch.no_grad():
        for parameter in supernet.parameters():
            parameter.add_(1.0)
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert teacher.config.hidden_size == 48 and teacher.config.num_hidden_layers == 4


@pytest.mark.parametrize("arch", ARCHS, ids=str)
def test_bottom_left_extraction_equals_the_hand_sliced_model(arch):
    teacher = make_teacher("bert-cls")
    supernet = SuperLM.from_teacher(teacher, SearchSpace.autodistil(teacher)).eval()
    supernet.set_active(arch)
    reference = hand_sliced(teacher, arch)
    batch = make_batch()
    with torch.no_grad():
        got = supernet(**batch, output_hidden_states=True)
        expected = reference(**batch, output_hidden_states=True)
    assert len(got.hidden_states) == arch.layers + 1
    for a, b in zip(got.hidden_states, expected.hidden_states):
        assert a.shape[-1] == arch.hidden
        torch.testing.assert_close(valid(a, batch), valid(b, batch), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-5)


def test_capture_sees_the_active_subnetwork():
    teacher = make_teacher()
    supernet = SuperLM.from_teacher(teacher, SearchSpace.autodistil(teacher)).eval()
    arch = Architecture(3, 40, 2.0, 4)
    supernet.set_active(arch)
    student = supernet.export(arch)
    batch = make_batch()
    with torch.no_grad(), pykd.capture(supernet) as got, pykd.capture(student) as expected:
        supernet(**batch)
        student(**batch)
    assert len(got) == len(expected) == 3
    for layer in range(3):
        for field in ("query", "key", "value"):
            tensor = getattr(got[layer], field)
            assert tensor.shape == (3, 4, 11, 10)
            torch.testing.assert_close(tensor, getattr(expected[layer], field), rtol=1e-5, atol=1e-5)
    assert torch.equal(got.attention_mask, batch["attention_mask"].bool())
    with torch.no_grad(), pykd.capture(supernet.model) as inner:
        supernet(**batch)
    assert len(inner) == 3 and inner[0].query.shape == (3, 4, 11, 10)


def test_gradients_stay_inside_the_active_slice():
    teacher = make_teacher()
    supernet = SuperLM.from_teacher(teacher, SearchSpace.autodistil(teacher))
    arch = Architecture(2, 24, 1.0, 3)
    supernet.set_active(arch)
    supernet(**make_batch()).last_hidden_state.pow(2).sum().backward()
    ffn_in = supernet.model.encoder.layer[2].intermediate.dense.weight.grad  # student layer 1 <- teacher layer 2
    assert ffn_in[:24, :24].abs().sum() > 0
    assert ffn_in[24:].abs().sum() == 0 and ffn_in[:, 24:].abs().sum() == 0
    assert supernet.model.encoder.layer[1].intermediate.dense.weight.grad is None  # not an active layer
    word = supernet.model.embeddings.word_embeddings.weight.grad
    assert word[:, 24:].abs().sum() == 0 and word[:, :24].abs().sum() > 0


@pytest.mark.parametrize("kind", ["bert", "bert-cls", "roberta", "electra-cls"])
def test_export_round_trip_with_padding(kind, tmp_path):
    teacher = make_teacher(kind)
    space = SearchSpace.autodistil(teacher)
    supernet = SuperLM.from_teacher(teacher, space).eval()
    with torch.no_grad():  # a SuperLM that is no longer the teacher
        for parameter in supernet.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    batch = make_batch()
    if kind == "roberta":
        batch.pop("token_type_ids")
    for index, arch in enumerate(ARCHS):
        supernet.set_active(arch)
        with torch.no_grad():
            expected = supernet(**batch)
        student = supernet.export(arch)
        assert supernet.active == arch
        assert type(student) is type(teacher)
        assert sum(p.numel() for p in student.parameters()) == space.params(arch)
        student.set_attn_implementation("eager")  # FlopCounterMode does not count SDPA on the CPU
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            student(input_ids=batch["input_ids"][:1])
        assert abs(space.flops(arch, batch["input_ids"].shape[1]) - counter.get_total_flops()) \
            <= 0.01 * counter.get_total_flops()
        student.set_attn_implementation("sdpa")
        path = save_student(student, None, tmp_path / f"student{index}")
        classifier = kind.endswith("-cls")
        loader = transformers.AutoModelForSequenceClassification if classifier else transformers.AutoModel
        loaded = loader.from_pretrained(path).eval()
        assert type(loaded) is type(teacher)
        with torch.no_grad():
            got = loaded(**batch)
        if classifier:
            torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(valid(got.last_hidden_state, batch), valid(expected.last_hidden_state, batch),
                                       rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got.pooler_output, expected.pooler_output, rtol=1e-5, atol=1e-5)


def test_exported_dir_serves_distill_and_finetune(tmp_path):
    teacher_path = tiny_teacher(tmp_path)
    teacher = load_pretrained(teacher_path, "unlabeled")
    supernet = SuperLM.from_teacher(teacher, SearchSpace.autodistil(teacher))
    arch = Architecture(2, 24, 1.5, 3)
    path = save_student(supernet.export(arch), load_tokenizer(teacher_path), tmp_path / "student")
    assert (path / "tokenizer.json").exists() or (path / "vocab.txt").exists()
    finetune = load_pretrained(str(path), "classification", 2)
    assert finetune.config.hidden_size == 24 and finetune.config.num_hidden_layers == 2
    assert finetune.config.num_attention_heads == 3 and finetune.config.intermediate_size == 36
    student = build_student(teacher, StudentConfig(init="checkpoint", checkpoint=str(path)))
    assert sum(p.numel() for p in student.parameters()) == supernet.space.params(arch)
    load_tokenizer(str(path))


def test_save_student_refuses_existing_path_and_leaves_nothing_half_written(tmp_path):
    teacher = make_teacher()
    student = SuperLM.from_teacher(teacher, SearchSpace.autodistil(teacher)).export(Architecture(1, 8, 1.0, 2))
    existing = tmp_path / "taken"
    existing.mkdir()
    with pytest.raises(ValueError, match="taken' already exists"):
        save_student(student, None, existing)

    class BrokenTokenizer:
        def save_pretrained(self, directory):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_student(student, BrokenTokenizer(), tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_set_active_and_export_errors():
    teacher = make_teacher()
    supernet = SuperLM.from_teacher(teacher, SearchSpace.autodistil(teacher))
    with pytest.raises(ValueError, match="hidden 64 > the teacher's 48"):
        supernet.set_active(Architecture(2, 64, 1.0, 4))
    with pytest.raises(ValueError, match="layers 5 > the teacher's 4"):
        supernet.export(Architecture(5, 48, 1.0, 4))
    with pytest.raises(TypeError, match="expected an Architecture"):
        supernet.set_active("layers=2")
    assert supernet.active == supernet.space.teacher_architecture()


def test_unsupported_teachers_and_mismatched_spaces():
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        SuperLM.from_teacher(transformers.GPT2Model(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2)),
                             SearchSpace.autodistil(transformers.BertConfig()))
    masked_lm = transformers.BertForMaskedLM(transformers.BertConfig(vocab_size=VOCAB, hidden_size=16,
                                                                     num_hidden_layers=1, num_attention_heads=2,
                                                                     intermediate_size=32))
    with pytest.raises(ValueError, match="got BertForMaskedLM"):
        SuperLM.from_teacher(masked_lm, SearchSpace.autodistil(masked_lm.config))
    teacher = make_teacher("bert-cls")
    with pytest.raises(ValueError, match="search space was built for teacher"):
        SuperLM.from_teacher(teacher, SearchSpace.autodistil(teacher.config))  # a config: no classifier head
    with pytest.raises(TypeError, match="space must be a pykd.nas.SearchSpace"):
        SuperLM.from_teacher(teacher, {"subspaces": []})


def test_config_dict_names_the_difference():
    teacher = make_teacher()
    supernet = SuperLM.from_teacher(teacher, SearchSpace.autodistil(teacher))
    saved = supernet.config_dict()
    supernet.check_config_dict(saved)
    other = SuperLM.from_teacher(teacher, SearchSpace.autodistil(teacher, k=1))
    with pytest.raises(ValueError, match="differs in 'space'"):
        other.check_config_dict(saved)
    with pytest.raises(ValueError, match="differs in 'experts': checkpoint 2, this SuperLM 1"):
        supernet.check_config_dict({**saved, "experts": 2})
