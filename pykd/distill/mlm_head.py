"""A masked-LM head fitted on a frozen encoder: what `pykd mlm-head` writes.

No package ships a pretrained masked-LM head for the packaged teacher (all-MiniLM-L6-v2 is a
sentence encoder; its weights hold the encoder only). Masked-LM KD (data.kind mlm) needs a teacher
whose head predicts words, so `pykd mlm-head --output DIR` loads the encoder as an
AutoModelForMaskedLM (transformers initialises the missing head: for BERT the transform dense +
GELU + LayerNorm and the output bias; the output projection is tied to the word embeddings and
so comes with the encoder), freezes everything of the encoder (the tied projection included) and
trains the rest on the masked-LM cross-entropy of the pydocs corpus, masked as data.kind mlm masks
(pykd.distill.masking), with the fused kernel (pykd.vocab_kd_loss, no N x V logits). The encoder
runs in eval mode (no dropout): the head learns the features it will see at inference. DIR/model is
then a plain AutoModelForMaskedLM directory, usable as teacher.path. The head is a probe on
frozen features, not a pretrained MLM: it predicts what the sentence encoder's last layer still
says about the masked word.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from .losses import masked_lm_cross_entropy
from .models import decoder_inputs, load_masked_lm
from .steps import TrainingStep, model_inputs

# The run `pykd mlm-head` makes of the run config (--set overrides any of it).
HEAD_RUN = ["teacher.path=minilm-l6", "data.dataset=pydocs", "data.kind=mlm", "data.max_length=128",
            "train.steps=300", "train.batch_size=32", "train.lr=1e-3", "train.warmup_fraction=0.05",
            "train.eval_every=100", "train.checkpoint_every=100", "losses.hidden.type=none",
            "losses.relation.relations=[]"]


class MaskedLMHeadStep(TrainingStep):
    """The masked-LM cross-entropy of `model`'s head on a frozen encoder (see the module docstring).

    Args:
        model: an AutoModelForMaskedLM; its base model (model.base_model_prefix) is frozen, every other
            parameter trains.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        prefix = model.base_model_prefix + "."
        for name, parameter in model.named_parameters():  # a tied projection is named once, in the encoder
            parameter.requires_grad_(not name.startswith(prefix))
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError(f"the masked LM {type(model).__name__} has no parameter outside its encoder to fit")

    def forward(self, batch: dict):
        self.model.base_model.eval()  # frozen features: no dropout in the encoder
        with decoder_inputs(self.model) as record:
            self.model(**model_inputs(batch))
        loss = masked_lm_cross_entropy(record.view(), batch["labels"])
        return {"mlm_ce": loss.detach()}, loss

    def trained_model(self) -> nn.Module:
        return self.model


def fit_head(output: str, overrides: list[str] = ()) -> Path:
    """Fits the head (HEAD_RUN with `overrides`) in `output`; returns output/model, the AutoModelForMaskedLM."""
    from .config import load
    from .trainer import Trainer

    config = load(None, [*HEAD_RUN, f"train.output_dir={output}", *overrides])
    if config.data.kind != "mlm":
        raise ValueError(f"pykd mlm-head trains on masked words: data.kind must be mlm, got {config.data.kind!r}")

    def build_step(trainer) -> MaskedLMHeadStep:
        return MaskedLMHeadStep(load_masked_lm(config.teacher.path, require_head=False))

    Trainer(config, "mlm-head", build_step=build_step).train()
    return Path(output) / "model"
