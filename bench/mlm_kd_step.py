"""One DistilBERT-style masked-LM KD training step on real models: pykd's engine vs the eager way.

Teacher: all-MiniLM-L6-v2 as a BertForMaskedLM (the head as `pykd mlm-head` would fit it; here its
random initialisation: the timings do not depend on the weights), eval, no_grad. Student: 3 layers
cut from it with its head (every other layer, same width and heads). Text: the pydocs paragraphs of
kd_step.kd_batch, masked as data.kind mlm masks (15%, 80/10/10, pykd.distill.masking). Loss:
DistilBERT's, restricted to the masked positions: 5 x KL(softmax(z_t / 2) || softmax(z_s / 2)) x 4
+ 2 x the student's MLM cross-entropy + 1 x the cosine loss of the last hidden states; forward and
backward.

    pykd            the engine's DistillStep with losses.prediction kl (pykd.vocab_kd_loss on the heads'
                    decoder inputs: no logits formed) and losses.hidden cosine
    eager           DistilBERT's distiller.py: both models' MaskedLM forwards return the (B, L, V) logits,
                    masked_select of the masked rows, KLDivLoss(batchmean) x T^2 and CrossEntropyLoss
    eager_selected  the careful eager way: the heads' logits on the masked rows only (the head applied
                    to the selected decoder inputs), then the same formula
"""
import functools

import torch
import torch.nn.functional as F

from pykd.distill.config import MaskingConfig, StudentConfig, from_dict
from pykd.distill.losses import DistillationObjective, ModelShape, masked_token_mean
from pykd.distill.masking import Masking, mask_batch
from pykd.distill.models import build_student, decoder_inputs, load_masked_lm, load_tokenizer
from pykd.distill.steps import DistillStep, model_inputs

TEMPERATURE, KD_WEIGHT, HARD_WEIGHT, COSINE_WEIGHT = 2.0, 5.0, 2.0, 1.0
VARIANTS = ("pykd", "eager", "eager_selected")


@functools.lru_cache(maxsize=1)
def _models():
    teacher = load_masked_lm("minilm-l6", require_head=False).eval().requires_grad_(False)
    spec = StudentConfig(init="teacher", num_hidden_layers=3, hidden_size=384, num_attention_heads=12,
                         intermediate_size=1536, dropout=0.0)
    return teacher, build_student(teacher, spec).train()


def mlm_batch(batch: int, length: int) -> dict:
    from kd_step import kd_batch

    tokenizer = load_tokenizer("minilm-l6")
    tokens = kd_batch(batch, length)
    special = torch.tensor([tokenizer.get_special_tokens_mask(ids, already_has_special_tokens=True)
                            for ids in tokens["input_ids"].tolist()])
    masking = Masking.of(MaskingConfig(), tokenizer)  # not whole words: the encoding's word_ids are not needed
    input_ids, labels = mask_batch({**tokens, "special_tokens_mask": special}, masking, 0, "train", range(batch))
    return {**tokens, "input_ids": input_ids, "labels": labels}


def _objective(teacher, student) -> DistillationObjective:
    losses = from_dict({"data": {"kind": "mlm"}, "losses": {
        "prediction": {"type": "kl", "temperature": TEMPERATURE, "t_squared": True, "weight": KD_WEIGHT,
                       "hard_weight": HARD_WEIGHT},
        "hidden": {"type": "cosine", "mapping": "last", "weight": COSINE_WEIGHT},
        "relation": {"relations": []}}}).losses
    return DistillationObjective(losses, ModelShape.of(teacher), ModelShape.of(student), "mlm")


def pykd_step(batch: dict):
    teacher, student = _models()
    step = DistillStep(teacher, student, _objective(teacher, student))

    def run():
        _, loss = step(batch)
        loss.backward()
        student.zero_grad(set_to_none=True)
        return float(loss.detach())

    return run


def _distilbert_loss(s_logits, t_logits, labels, s_last, t_last, mask):
    """DistilBERT's distiller.py with restrict_ce_to_mask: logits of the masked rows (N_masked, V)."""
    loss_ce = F.kl_div(F.log_softmax(s_logits / TEMPERATURE, dim=-1), F.softmax(t_logits / TEMPERATURE, dim=-1),
                       reduction="batchmean") * TEMPERATURE**2
    loss_mlm = F.cross_entropy(s_logits, labels)
    cosine = masked_token_mean(1.0 - F.cosine_similarity(s_last, t_last, dim=-1), mask)
    return KD_WEIGHT * loss_ce + HARD_WEIGHT * loss_mlm + COSINE_WEIGHT * cosine


def eager_step(batch: dict):
    teacher, student = _models()
    inputs, labels, mask = model_inputs(batch), batch["labels"], batch["attention_mask"].bool()
    selected = labels != -100

    def run():
        with torch.no_grad():
            t_out = teacher(**inputs, output_hidden_states=True)
        s_out = student(**inputs, output_hidden_states=True)
        vocab = s_out.logits.size(-1)
        rows = selected.unsqueeze(-1).expand_as(s_out.logits)
        s_logits = torch.masked_select(s_out.logits, rows).view(-1, vocab)
        t_logits = torch.masked_select(t_out.logits, rows).view(-1, vocab)
        loss = _distilbert_loss(s_logits, t_logits, labels[selected], s_out.hidden_states[-1],
                                t_out.hidden_states[-1], mask)
        loss.backward()
        student.zero_grad(set_to_none=True)
        return float(loss.detach())

    return run


def eager_selected_step(batch: dict):
    teacher, student = _models()
    inputs, labels, mask = model_inputs(batch), batch["labels"], batch["attention_mask"].bool()
    selected = labels != -100

    def logits_of(model):
        with decoder_inputs(model) as record:
            out = model(**inputs, output_hidden_states=True)
        decoder = model.get_output_embeddings()
        return F.linear(record.inputs[selected], decoder.weight, decoder.bias), out.hidden_states[-1]

    def run():
        with torch.no_grad():
            t_logits, t_last = logits_of(teacher)
        s_logits, s_last = logits_of(student)
        loss = _distilbert_loss(s_logits, t_logits, labels[selected], s_last, t_last, mask)
        loss.backward()
        student.zero_grad(set_to_none=True)
        return float(loss.detach())

    return run


def mlm_kd_step(variant: str, batch_size: int, length: int):
    """The step callable of `variant` (VARIANTS); it returns the loss as a float."""
    batch = mlm_batch(batch_size, length)
    return {"pykd": pykd_step, "eager": eager_step, "eager_selected": eager_selected_step}[variant](batch)
