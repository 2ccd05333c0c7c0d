"""pykd.capture: SDPA outputs unchanged, attention maps rebuilt from Q/K/mask equal eager's."""
import pytest
import torch

import pykd
from pykd.capture import IMPLEMENTATION

transformers = pytest.importorskip("transformers")

FAMILIES = {
    "bert": lambda: transformers.BertConfig(**_common()),
    "roberta": lambda: transformers.RobertaConfig(**_common()),
    "electra": lambda: transformers.ElectraConfig(**_common(), embedding_size=16),
    "albert": lambda: transformers.AlbertConfig(**_common(), embedding_size=16),
    "distilbert": lambda: transformers.DistilBertConfig(vocab_size=61, dim=24, n_layers=3, n_heads=4, hidden_dim=37,
                                                        max_position_embeddings=40),
}


def _common():
    return dict(vocab_size=61, hidden_size=24, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37,
                max_position_embeddings=40)


def _padded_batch(vocab: int, lengths=(11, 7, 1)):
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(5, vocab, (len(lengths), max(lengths)), generator=gen)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _maps_from_capture(cap):
    maps = []
    for layer in cap.layers:
        scores = layer.query.double() @ layer.key.double().transpose(-1, -2) / layer.query.shape[-1] ** 0.5
        scores = scores.masked_fill(~cap.attention_mask[:, None, None, :], float("-inf"))
        maps.append(scores.softmax(-1))
    return maps


def _check_against_eager(model, batch):
    model.eval()
    with torch.no_grad():
        plain = model(**batch).last_hidden_state
        with pykd.capture(model) as cap:
            captured = model(**batch).last_hidden_state
        model.set_attn_implementation("eager")
        eager = model(**batch, output_attentions=True).attentions
        model.set_attn_implementation("sdpa")
    assert torch.equal(plain, captured)
    assert len(cap) == len(eager)
    assert torch.equal(cap.attention_mask, batch["attention_mask"].bool())
    valid = batch["attention_mask"].bool()[:, None, :, None]
    for got, want in zip(_maps_from_capture(cap), eager):
        # eager leaves padded query rows as softmax over all-masked keys; they carry nothing
        err = ((got - want.double()).abs() * valid).max()
        assert err <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tiny_models_of_every_family(family):
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(FAMILIES[family](), attn_implementation="sdpa")
    _check_against_eager(model, _padded_batch(61))


def test_real_teacher_minilm_l6():
    from pykd.distill.models import load_pretrained, load_tokenizer

    model = load_pretrained("minilm-l6", "unlabeled")
    tokenizer = load_tokenizer("minilm-l6")
    batch = tokenizer(["Knowledge distillation compresses a large teacher into a small student.",
                       "Short.", "A third sentence of middling length, with some punctuation!"],
                      padding=True, return_tensors="pt")
    assert not batch["attention_mask"].all()
    _check_against_eager(model, dict(batch))


def test_records_per_call_and_restores_the_implementation():
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(FAMILIES["bert"](), attn_implementation="sdpa").eval()
    batch = _padded_batch(61)
    with pykd.capture(model) as cap:
        model(**batch)
        first = cap[0].query
        model(input_ids=batch["input_ids"][:1, :5])
    assert len(cap) == 3 and cap[0].query.shape[0] == 1 and first.shape[0] == 3
    assert model.config._attn_implementation == "sdpa"
    with pykd.capture(model) as nothing:
        pass
    with pytest.raises(IndexError, match="nothing was captured"):
        nothing[0]


def test_gradient_checkpointing_adds_no_entries_and_gradients_flow():
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(FAMILIES["bert"](), attn_implementation="sdpa")
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    model.train()
    batch = _padded_batch(61)
    with pykd.capture(model) as cap:
        model(**batch)
    loss = sum(layer.query.square().mean() for layer in cap.layers)
    loss.backward()
    assert len(cap) == 3
    assert model.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0


def test_unsupported_family_is_a_clear_error():
    model = transformers.GPT2Model(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=30))
    with pytest.raises(ValueError, match=r"supports the encoder families .*'bert'.* got model_type 'gpt2'"), \
            pykd.capture(model):
        pass


def _tiny_bert(seed: int = 0, layers: int = 3):
    torch.manual_seed(seed)
    config = transformers.BertConfig(**{**_common(), "num_hidden_layers": layers})
    return transformers.AutoModel.from_config(config, attn_implementation="sdpa").eval()


def _queries(cap):
    return [layer.query for layer in cap.layers]


def test_nested_captures_of_one_model_both_record_and_exit_in_any_order():
    model, batch = _tiny_bert(), _padded_batch(61)
    with torch.no_grad():
        with pykd.capture(model) as outer:
            model(**batch)
            with pykd.capture(model) as inner:
                model(**batch)
            assert model.config._attn_implementation == IMPLEMENTATION
            model(input_ids=batch["input_ids"][:1, :4])  # only the outer capture is still open
        assert model.config._attn_implementation == "sdpa"
        assert len(inner) == 3 and inner[0].query.shape[:3] == (3, 4, 11)
        assert len(outer) == 3 and outer[0].query.shape[:3] == (1, 4, 4)

        # closed outer-first: the inner capture keeps recording until it closes
        outer_block, inner_block = pykd.capture(model), pykd.capture(model)
        outer = outer_block.__enter__()
        inner = inner_block.__enter__()
        outer_block.__exit__(None, None, None)
        model(**batch)
        assert len(inner) == 3 and len(outer) == 0
        assert model.config._attn_implementation == IMPLEMENTATION
        inner_block.__exit__(None, None, None)
    assert model.config._attn_implementation == "sdpa"


def test_nested_captures_of_different_models_record_only_their_own_layers():
    teacher, student, batch = _tiny_bert(0, layers=3), _tiny_bert(1, layers=2), _padded_batch(61)
    with torch.no_grad():
        with pykd.capture(student) as s_cap:
            with pykd.capture(teacher) as t_cap:
                t_out = teacher(**batch)
            s_out = student(**batch)
        assert len(t_cap) == 3 and len(s_cap) == 2
        # recorded from their own models: each model's first query projection of its embeddings
        for model, cap, out in ((teacher, t_cap, t_out), (student, s_cap, s_out)):
            embedded = model.embeddings(input_ids=batch["input_ids"])
            want = model.encoder.layer[0].attention.self.query(embedded)
            assert torch.allclose(cap[0].query.transpose(1, 2).flatten(2), want, rtol=0, atol=0)
            assert out.last_hidden_state.shape[0] == 3
    assert teacher.config._attn_implementation == student.config._attn_implementation == "sdpa"


def test_a_forward_on_another_thread_is_not_recorded_and_can_capture_on_its_own():
    import threading

    model, batch = _tiny_bert(), _padded_batch(61)
    other_records, errors = [], []
    other_entered, main_closed = threading.Event(), threading.Event()

    def other_thread():
        try:
            with torch.no_grad():
                model(**batch)  # inside the main thread's capture, yet not its forward
                with pykd.capture(model) as own:
                    other_entered.set()
                    main_closed.wait(timeout=60)
                    model(input_ids=batch["input_ids"][:2, :5])
                other_records.append(own)
        except Exception as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)
            other_entered.set()

    with torch.no_grad(), pykd.capture(model) as main:
        worker = threading.Thread(target=other_thread)
        worker.start()
        other_entered.wait(timeout=60)
        assert len(main) == 0
    main_closed.set()  # the main capture closed first; the other thread's must still record
    worker.join(timeout=60)
    assert not errors, errors
    assert len(main) == 0
    assert len(other_records[0]) == 3 and other_records[0][0].query.shape[:3] == (2, 4, 5)
    assert model.config._attn_implementation == "sdpa"


def test_an_exception_inside_the_block_restores_the_model_and_later_captures_work():
    model, batch = _tiny_bert(), _padded_batch(61)

    def fail(*_):
        raise RuntimeError("layer 1 failed")

    failing = model.encoder.layer[1].register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="layer 1 failed"), pykd.capture(model) as broken:
        model(**batch)  # raises after layer 0 and 1 recorded
    failing.remove()
    assert len(broken) == 2
    assert model.config._attn_implementation == "sdpa"
    assert not model._forward_pre_hooks and not model._forward_hooks
    with pytest.raises(ValueError, match="raised in the block"), pykd.capture(model) as cap:
        model(**batch)
        raise ValueError("raised in the block")
    assert model.config._attn_implementation == "sdpa" and len(cap) == 3
    with torch.no_grad(), pykd.capture(model) as again:
        model(**batch)
    assert len(again) == 3 and len(broken) == 2
