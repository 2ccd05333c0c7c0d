"""One task-agnostic KD training step on real models, done the pykd way and the way peers do it.

Teacher: all-MiniLM-L6-v2 (6 layers, hidden 384, 12 heads), eval, no_grad. Student: 3 layers cut
from it (every other layer, same width and heads). Losses: QK and VV relations of the last layers
(KL, 12 relation heads) and hidden-state MSE on the mapped layers; forward and backward.

- pykd:  SDPA attention for both models, Q/K/V recorded by pykd.capture, fused relation loss.
- peers: eager attention with output_attentions=True (every layer's L x L map is materialised and
         returned), KL between the teacher's and student's last attention maps, the VV relation
         materialised from values caught with forward hooks, the same hidden MSE.

Both run on any device (tools/gpu_check.py times them on a GPU). Lengths past the models' 512
positions (L=2048 on the GPU) tile the position embeddings to the length: a timing device only, the
teacher was trained to 512. Where the packaged teacher or its
tokenizer is not installed, the models are randomly initialised with the same configuration and the
tokens are random ids (MODEL_SOURCE says which): the timings do not depend on the weights.
"""
import functools

import torch

import pykd
from pykd.distill.config import StudentConfig
from pykd.distill.models import build_student, load_pretrained, load_tokenizer

RELATION_HEADS = 12


MODEL_SOURCE = {"teacher": "packaged all-MiniLM-L6-v2"}


def _teacher():
    try:
        return load_pretrained("minilm-l6", "unlabeled")
    except (ImportError, OSError) as missing:  # the packaged teacher is not installed
        from transformers import BertConfig, BertModel

        MODEL_SOURCE["teacher"] = f"random init, MiniLM-L6 configuration ({type(missing).__name__}: {missing})"
        return BertModel(BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                    intermediate_size=1536), add_pooling_layer=False)


@functools.lru_cache(maxsize=2)
def _models(device: str = "cpu"):
    teacher = _teacher().eval().requires_grad_(False)
    spec = StudentConfig(init="teacher", num_hidden_layers=3, hidden_size=384, num_attention_heads=12,
                         intermediate_size=1536, dropout=0.0)
    return teacher.to(device), build_student(teacher, spec).train().to(device)


@functools.lru_cache(maxsize=1)
def _paragraphs() -> tuple:
    from pykd.distill.corpora import pydocs_paragraphs

    return tuple(pydocs_paragraphs())  # reads every standard-library docstring: once per process


def kd_batch(batch: int, length: int, seed: int = 0) -> dict:
    """Real text: paragraphs of the Python docs, padded/truncated to `length` tokens, ragged masks."""
    gen = torch.Generator().manual_seed(seed)
    try:
        tokenizer = load_tokenizer("minilm-l6")
    except (ImportError, OSError):  # no packaged tokenizer: random ids of BERT's vocabulary
        MODEL_SOURCE["tokens"] = "random ids"
        tokens = {"input_ids": torch.randint(1000, 30000, (batch, length), generator=gen),
                  "attention_mask": torch.ones(batch, length, dtype=torch.long)}
    else:
        paragraphs = _paragraphs()
        picks = torch.randint(len(paragraphs), (batch,), generator=gen).tolist()
        texts = [" ".join(paragraphs[(i + k) % len(paragraphs)] for k in range(8)) for i in picks]
        tokens = tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    for row in range(0, batch, 3):  # every third example is shorter: the masks must matter
        cut = length // 2 + row
        tokens["attention_mask"][row, cut:] = 0
    return dict(tokens)


def _hidden_mse(teacher_states, student_states, mask):
    weights = mask.to(torch.float32)[..., None]
    pairs = [(1, 2), (2, 4), (3, 6)]
    width = student_states[0].shape[-1]
    terms = [((student_states[s] - teacher_states[t]).pow(2) * weights).sum() / (weights.sum() * width)
             for s, t in pairs]
    return torch.stack(terms).mean()


def _models_with(attention: str, device: str):
    teacher, student = _models(device)
    for model in (teacher, student):
        model.set_attn_implementation(attention)
    return teacher, student


def _flat(x):
    return x.transpose(1, 2).flatten(2)


def pykd_step(batch: dict, device: str = "cpu"):
    teacher, student = _models_with("sdpa", device)
    mask = batch["attention_mask"].bool()

    def step():
        with torch.no_grad(), pykd.capture(teacher) as t_cap:
            t_out = teacher(**batch, output_hidden_states=True)
        with pykd.capture(student) as s_cap:
            s_out = student(**batch, output_hidden_states=True)
        t_last, s_last = t_cap[-1], s_cap[-1]
        loss = _hidden_mse(t_out.hidden_states, s_out.hidden_states, mask)
        for a, b in (("query", "key"), ("value", "value")):
            loss = loss + pykd.attention_relation_loss(
                _flat(getattr(t_last, a)), _flat(getattr(t_last, b)), _flat(getattr(s_last, a)),
                _flat(getattr(s_last, b)), RELATION_HEADS, mask=mask, loss="kl")
        loss.backward()
        student.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def _value_hooks(model, store):
    return [layer.attention.self.value.register_forward_hook(lambda m, i, out: store.append(out))
            for layer in model.encoder.layer]


def _masked_kl(p_teacher, p_student, mask):
    """MiniLM's KL of attention maps over valid rows: sum_b 1/(H n_b) sum rows KL, mean over b."""
    rows = mask[:, None, :, None].to(torch.float32)
    kl = (p_teacher * (torch.log(p_teacher.clamp_min(1e-30)) - torch.log(p_student.clamp_min(1e-30)))) * rows
    heads, valid = p_teacher.shape[1], mask.sum(1).to(torch.float32)
    return (kl.sum(dim=(1, 2, 3)) / (heads * valid)).mean()


def peers_step(batch: dict, device: str = "cpu"):
    teacher, student = _models_with("eager", device)
    mask = batch["attention_mask"].bool()

    def step():
        t_values, s_values = [], []
        hooks = _value_hooks(teacher, t_values) + _value_hooks(student, s_values)
        with torch.no_grad():
            t_out = teacher(**batch, output_hidden_states=True, output_attentions=True)
        s_out = student(**batch, output_hidden_states=True, output_attentions=True)
        for hook in hooks:
            hook.remove()
        loss = _hidden_mse(t_out.hidden_states, s_out.hidden_states, mask)
        loss = loss + _masked_kl(t_out.attentions[-1], s_out.attentions[-1], mask)
        loss = loss + pykd.attention_relation_loss(t_values[-1], t_values[-1], s_values[-1], s_values[-1],
                                                   RELATION_HEADS, mask=mask, loss="kl", backend="reference")
        loss.backward()
        student.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def _cover_positions(model, length: int) -> None:
    """Tiles the position embeddings (and the buffers sized by them) to `length` positions."""
    embeddings = model.embeddings
    table = embeddings.position_embeddings
    if table.num_embeddings >= length:
        return
    rows = torch.arange(length, device=table.weight.device) % table.num_embeddings
    wider = torch.nn.Embedding(length, table.embedding_dim, device=table.weight.device, dtype=table.weight.dtype)
    with torch.no_grad():
        wider.weight.copy_(table.weight[rows])
    wider.weight.requires_grad_(table.weight.requires_grad)
    embeddings.position_embeddings = wider
    buffers = (("position_ids", torch.arange(length)), ("token_type_ids", torch.zeros(length, dtype=torch.long)))
    for name, fill in buffers:
        if hasattr(embeddings, name):
            embeddings.register_buffer(name, fill.to(table.weight.device)[None, :], persistent=False)
    model.config.max_position_embeddings = length


def kd_step(variant: str, batch_size: int, length: int, device: str = "cpu"):
    """The step callable of `variant` ("pykd" or "peers"); it returns the loss as a float."""
    for model in _models(device):
        _cover_positions(model, length)
    batch = {name: t.to(device) for name, t in kd_batch(batch_size, length).items()}
    return {"pykd": pykd_step, "peers": peers_step}[variant](batch, device)
