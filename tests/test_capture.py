"""pykd.capture: SDPA outputs unchanged, attention maps rebuilt from Q/K/mask equal eager's."""
import pytest
import torch

import pykd

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
    with pytest.raises(ValueError, match=r"supports the encoder families .*'bert'.* got model_type 'gpt2'"):
        with pykd.capture(model):
            pass
