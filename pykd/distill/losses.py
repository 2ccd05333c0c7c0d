r"""Distiller's loss stages on captured teacher and student forwards.

Every term is computed on a `ForwardView` (logits, hidden states, the attention capture and the
(B, L) padding mask) of the teacher and of the student. With h = hidden states, m the padding
mask, P a learned projection d_s -> d_t (identity when the widths agree), n the number of valid
tokens and T the temperature:

    prediction  soft_ce   -(1/B) sum_b sum_c softmax(z_T / T)_bc log softmax(z_S / T)_bc  (x T^2 optionally)
                mse       mean (z_S - z_T)^2
                hard      cross-entropy (classification) or MSE (regression) against the labels
    hidden      mse       (1/B) sum_b (1/n_b) sum_{valid tokens of b} mean_k (P h_S - h_T)_k^2
                cosine    (1/B) sum_b (1/n_b) sum_{valid tokens of b} (1 - cos(P h_S, h_T))
                pkd       (1/B) sum_b || P h_S[CLS] / ||P h_S[CLS]|| - h_T[CLS] / ||h_T[CLS]|| ||^2
    relation  sum over the chosen relations (QK, QQ, KK, VV) of pykd.attention_relation_loss,
              averaged over the mapped attention layers
    mlm       data.kind mlm: pykd.vocab_kd_loss on the two masked-LM heads' decoder inputs h (the transformed
              final hidden states) and decoder weights and biases, never forming the N x V logits:
              (1/n) sum_{selected i} [weight c_T D_i + hard_weight CE_i] with D the divergence of type
              (soft_ce, kl, reverse_kl, jsd) between softmax(z_T / T) and softmax(z_S / T), c_T = T^2 with
              t_squared, CE the student's cross-entropy against the masked words (T = 1); rows: the masked
              positions (positions masked, one fused pass), or every valid token for D and the masked ones
              for CE (positions all, two passes); means over the batch's selected tokens, as DistilBERT's
    mi        -I, I = pykd.mi_lower_bound(g(h_T), k(h_S), log_q) with MLP critics g, k and a learned
              log-baseline log_q = w . h_T + c; samples are the examples (masked-mean pooled) or
              the valid tokens; averaged over the mapped hidden layers

A relation term reads the captured queries, keys and values of a pair of attention layers with
the heads concatenated, (B, L, H d), once per layer and field (`layer_qkv`), and sums its
relations (`RelationTerms`); the architecture search (pykd.nas) scores and trains sub-networks
with the same terms, and with the masked mean squared error and soft cross-entropy below.

Hidden-type terms average over their mapped layer pairs. With mapping emd (pykd.distill.mapping,
BERT-EMD) the hidden and relation terms are instead the earth mover's distance over the matrix of
pair losses D_ij between every student layer i and every teacher layer j (hidden: the student's
projection of layer i is shared by all its pairs; include_embeddings adds the embedding pair's
loss to the EMD, as BERT-EMD does). Projections, critics, baselines and the EMD layer weights
belong to the objective: they train (or update) with the student and are saved with it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import attention_relation_loss, mi_lower_bound, vocab_kd_loss
from ..ops.mi_bound import BASELINE_BOUNDS, BOUNDS
from ..ops.vocab_kd import DIVERGENCES as VOCAB_DIVERGENCES
from .distributed import world
from .mapping import MAPPINGS, EarthMoverMapping, attention_pairs, hidden_pairs
from .masking import IGNORE_INDEX

# The divergences only masked-LM KD takes (pykd.vocab_kd_loss's; its soft_ce is the classification term's too).
VOCAB_ONLY_TYPES = tuple(d for d in VOCAB_DIVERGENCES if d != "soft_ce")
PREDICTION_TYPES = ("soft_ce", "mse", *VOCAB_ONLY_TYPES, "none")  # losses.prediction.type
MLM_POSITIONS = ("masked", "all")  # losses.prediction.positions (data.kind mlm)
HIDDEN_TYPES = ("mse", "cosine", "pkd", "none")  # losses.hidden.type
RELATIONS = ("qk", "qq", "kk", "vv")  # first and second tensor of a relation: q(uery), k(ey), v(alue)
MI_BOUND_CHOICES = (*BOUNDS, "none")  # losses.mi.bound
MI_SAMPLES = ("examples", "tokens")  # losses.mi.samples
# The MI critics are trained per layer pair, so MI has no EMD mapping (it needs a loss for every pair).
MI_MAPPINGS = tuple(m for m in MAPPINGS if m != "emd")
CAPTURED_FIELDS = {"q": "query", "k": "key", "v": "value"}  # LayerCapture attribute of each relation letter


@dataclass
class DecoderView:
    """A masked-LM head's output projection as one forward used it (pykd.distill.mlm.decoder_inputs)."""
    inputs: torch.Tensor  # (B, L, d): what the decoder was applied to (the head's transformed hidden states)
    weight: torch.Tensor  # (V, d)
    bias: torch.Tensor | None  # (V,)


@dataclass
class ForwardView:
    """What the losses read from one model's forward."""
    logits: torch.Tensor | None
    hidden_states: tuple
    layers: list  # pykd.capture LayerCapture per attention layer
    mask: torch.Tensor  # (B, L) bool
    decoder: DecoderView | None = None  # masked-LM KD: the head's decoder inputs (its logits were never formed)


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int

    @classmethod
    def of(cls, model: nn.Module) -> ModelShape:
        """The layer count and hidden size of a transformers model (from its config)."""
        return cls(layers=model.config.num_hidden_layers, hidden=model.config.hidden_size)


def heads_concatenated(x: torch.Tensor) -> torch.Tensor:
    """(B, H, L, d) as the attention saw it -> (B, L, H d), the layout of the projection outputs."""
    return x.transpose(1, 2).flatten(2)


def masked_token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token values (B, L) averaged over each example's valid tokens, then over the batch
    (per-example means keep the loss of a batch split over DDP ranks equal to the whole batch's)."""
    weights = mask.to(values.dtype)
    return ((values * weights).sum(1) / weights.sum(1)).mean()


def masked_mse(guess: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean over features of (guess - target)^2 in fp32, averaged over valid tokens (masked_token_mean).

    Shapes: guess, target (B, L, d); mask (B, L) bool. Returns a scalar."""
    return masked_token_mean((guess.float() - target.float()).pow(2).mean(-1), mask)


def soft_cross_entropy(target_logits: torch.Tensor, logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """-(1/B) sum_b sum_c softmax(target / T)_bc log softmax(logits / T)_bc, in fp32.

    Shapes: target_logits, logits (B, C). Returns an fp32 scalar; detach target_logits where it is a label."""
    target = torch.softmax(target_logits.float() / temperature, dim=-1)
    return -(target * torch.log_softmax(logits.float() / temperature, dim=-1)).sum(-1).mean()


def layer_qkv(layer, letters: str = "qkv") -> dict:
    """{letter: (B, L, H d)} of one captured attention layer (a pykd.capture LayerCapture), for each
    letter of `letters` (q, k, v); each tensor is concatenated once, however many relations read it."""
    return {letter: heads_concatenated(getattr(layer, CAPTURED_FIELDS[letter])) for letter in letters}


def _crop_to_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """The first heads * floor(width / heads) features (AutoDistil's code drops the rest)."""
    usable = heads * (x.shape[-1] // heads)
    if usable == 0:
        raise ValueError(f"the relation head count {heads} (losses.relation.relation_heads or nas.relation_heads) "
                         f"exceeds an attention width of {x.shape[-1]}")
    return x if usable == x.shape[-1] else x[..., :usable]


@dataclass(frozen=True)
class RelationTerms:
    """A relation term of one pair of attention layers: the sum over `relations` (qk, qq, kk, vv) of
    pykd.attention_relation_loss with `heads` relation heads and `loss`.

    A width that `heads` does not divide is cropped to its first heads * floor(width / heads) features, as
    AutoDistil's code drops the leftover dimensions (the KD engine checks divisibility up front instead)."""
    relations: tuple
    heads: int
    loss: str

    @property
    def letters(self) -> str:
        """The captured fields the relations read (of q, k, v), each once."""
        return "".join(letter for letter in CAPTURED_FIELDS if any(letter in name for name in self.relations))

    def __call__(self, teacher: dict, student: dict, mask: torch.Tensor) -> torch.Tensor:
        """The term, from layer_qkv dicts of the teacher's and the student's layer.

        Shapes: each dict entry (B, L, H d); mask (B, L) bool. Returns an fp32 scalar."""
        total = None
        for name in self.relations:
            t_a, t_b = (_crop_to_heads(teacher[letter], self.heads) for letter in name)
            s_a, s_b = (_crop_to_heads(student[letter], self.heads) for letter in name)
            term = attention_relation_loss(t_a, t_b, s_a, s_b, num_relation_heads=self.heads, mask=mask,
                                           loss=self.loss)
            total = term if total is None else total + term
        return total


def _pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.to(hidden.dtype)[..., None]
    return (hidden * weights).sum(1) / weights.sum(1)


def _projection(student_width: int, teacher_width: int) -> nn.Module:
    return nn.Identity() if student_width == teacher_width else nn.Linear(student_width, teacher_width)


class PredictionTerm(nn.Module):
    def __init__(self, config, task_kind: str):
        super().__init__()
        if task_kind == "regression" and config.type == "soft_ce":
            raise ValueError("losses.prediction.type soft_ce needs class logits; use mse for a regression task")
        self.config = config
        self.task_kind = task_kind

    def soft(self, teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
        if self.config.type == "mse":
            return F.mse_loss(student.float(), teacher.float())
        temperature = self.config.temperature
        loss = soft_cross_entropy(teacher, student, temperature)
        return loss * temperature ** 2 if self.config.t_squared else loss

    def hard(self, student: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.task_kind == "regression":
            return F.mse_loss(student.float().squeeze(-1), labels.float())
        return F.cross_entropy(student.float(), labels)


def masked_lm_cross_entropy(decoder: DecoderView, labels: torch.Tensor) -> torch.Tensor:
    """The mean over the labelled positions (labels != IGNORE_INDEX) of -log softmax(h W^T + b)_label, by the
    fused kernel (no N x V logits); 0 when no position is labelled.

    Shapes: decoder.inputs (B, L, d); labels (B, L). pykd.vocab_kd_loss always takes a teacher: with kd_weight
    0 a one-word top-k teacher is the cheapest, and it does not enter the value."""
    inputs = decoder.inputs.reshape(-1, decoder.inputs.shape[-1])
    rows = len(inputs)
    dummy = torch.zeros(rows, 1, dtype=torch.float32, device=inputs.device)
    return vocab_kd_loss(inputs, decoder.weight, decoder.bias, teacher_topk_logits=dummy,
                         teacher_topk_indices=dummy.long(), labels=labels.reshape(-1), kd_weight=0.0,
                         hard_label_weight=1.0, ignore_index=IGNORE_INDEX)


class MaskedLMTerm(nn.Module):
    """Masked-LM KD with the fused vocabulary kernel (the "mlm" line of the module docstring).

    forward returns {name: value} with "mlm" the weighted term that enters the total; in evaluation (grad
    off) also its parts unweighted: "prediction" (c_T D), "hard_label" (the student's masked-LM
    cross-entropy) and "teacher_hard_label" (the teacher's)."""

    def __init__(self, config):
        """config: the losses.prediction section."""
        super().__init__()
        self.config = config

    def forward(self, teacher: ForwardView, student: ForwardView, labels: torch.Tensor) -> dict:
        config = self.config
        kd_weight = config.weight if config.type != "none" else 0.0
        labels = labels.reshape(-1)
        terms = {}
        if kd_weight and (config.positions == "masked" or not config.hard_weight):
            # one fused pass: the divergence and the cross-entropy on the same rows
            terms["mlm"] = self._divergence(teacher, student, self._rows(labels, student), kd_weight,
                                            config.hard_weight if config.positions == "masked" else 0.0)
        else:
            total = self._divergence(teacher, student, self._rows(labels, student), kd_weight, 0.0) \
                if kd_weight else None
            if config.hard_weight:
                hard = config.hard_weight * masked_lm_cross_entropy(student.decoder, labels)
                total = hard if total is None else total + hard
            terms["mlm"] = total
        if not torch.is_grad_enabled():
            if kd_weight:
                terms["prediction"] = self._divergence(teacher, student, self._rows(labels, student), 1.0, 0.0)
            terms["hard_label"] = masked_lm_cross_entropy(student.decoder, labels)
            terms["teacher_hard_label"] = masked_lm_cross_entropy(teacher.decoder, labels)
        return terms

    def _rows(self, labels: torch.Tensor, student: ForwardView) -> torch.Tensor:
        """The op's labels: the masked words (positions masked), or 0 on every valid token (positions all,
        where the labels only select rows: the hard term is not in that pass)."""
        if self.config.positions == "masked":
            return labels
        return torch.where(student.mask.reshape(-1), 0, IGNORE_INDEX)

    def _divergence(self, teacher: ForwardView, student: ForwardView, labels: torch.Tensor, kd_weight: float,
                    hard_weight: float) -> torch.Tensor:
        config = self.config
        h_s, h_t = (view.decoder.inputs.reshape(-1, view.decoder.inputs.shape[-1]) for view in (student, teacher))
        return vocab_kd_loss(h_s, student.decoder.weight, student.decoder.bias, h_t.detach(),
                             teacher.decoder.weight.detach(), _detached(teacher.decoder.bias), labels=labels,
                             divergence=config.type, beta=config.beta, temperature=config.temperature,
                             scale_by_t2=config.t_squared, kd_weight=kd_weight, hard_label_weight=hard_weight,
                             ignore_index=IGNORE_INDEX)


def _detached(x):
    return None if x is None else x.detach()


class HiddenTerm(nn.Module):
    def __init__(self, config, teacher: ModelShape, student: ModelShape):
        super().__init__()
        self.config = config
        self.pairs = hidden_pairs(config.mapping, student.layers, teacher.layers, config.pairs,
                                  config.include_embeddings)
        self.emd = None
        if config.mapping == "emd":
            self.emd = EarthMoverMapping(student.layers, teacher.layers, config.emd_temperature)
            # One projection per student hidden state (index 0 = embeddings), shared by all its pairs.
            self.projections = nn.ModuleList(_projection(student.hidden, teacher.hidden)
                                             for _ in range(student.layers + 1))
        else:
            self.projections = nn.ModuleList(_projection(student.hidden, teacher.hidden) for _ in self.pairs)

    def forward(self, teacher: ForwardView, student: ForwardView) -> torch.Tensor:
        if self.emd is not None:
            return self._earth_mover(teacher, student)
        terms = [self._pair(teacher.hidden_states[t].float(), project(student.hidden_states[s].float()), student.mask)
                 for (s, t), project in zip(self.pairs, self.projections)]
        return torch.stack(terms).mean()

    def _earth_mover(self, teacher: ForwardView, student: ForwardView) -> torch.Tensor:
        projected = [project(state.float()) for project, state in zip(self.projections, student.hidden_states)]
        costs = {(s, t): self._pair(teacher.hidden_states[t].float(), projected[s], student.mask)
                 for s, t in self.pairs}
        layers = self.emd.student_weights.numel(), self.emd.teacher_weights.numel()
        grid = torch.stack([torch.stack([costs[(s, t)] for t in range(1, layers[1] + 1)])
                            for s in range(1, layers[0] + 1)])
        return self.emd(grid) + costs.get((0, 0), 0.0)

    def _pair(self, target: torch.Tensor, guess: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        kind = self.config.type
        if kind == "mse":
            return masked_mse(guess, target, mask)
        if kind == "cosine":
            return masked_token_mean(1.0 - F.cosine_similarity(guess, target, dim=-1), mask)
        return (F.normalize(guess[:, 0], dim=-1) - F.normalize(target[:, 0], dim=-1)).pow(2).sum(-1).mean()


class RelationTerm(nn.Module):
    def __init__(self, config, teacher: ModelShape, student: ModelShape):
        super().__init__()
        self.config = config
        self.pairs = attention_pairs(config.mapping, student.layers, teacher.layers, config.pairs)
        self.emd = EarthMoverMapping(student.layers, teacher.layers, config.emd_temperature) \
            if config.mapping == "emd" else None
        for width, who in ((teacher.hidden, "teacher"), (student.hidden, "student")):
            if width % config.relation_heads:
                raise ValueError(f"losses.relation.relation_heads ({config.relation_heads}) must divide the "
                                 f"{who}'s attention width {width}")
        self.terms = RelationTerms(tuple(config.relations), config.relation_heads, config.loss)

    def forward(self, teacher: ForwardView, student: ForwardView) -> torch.Tensor:
        teacher_layers, student_layers = {}, {}  # each mapped layer's Q/K/V concatenated once
        per_layer = []
        for s, t in self.pairs:
            if t not in teacher_layers:
                teacher_layers[t] = layer_qkv(teacher.layers[t], self.terms.letters)
            if s not in student_layers:
                student_layers[s] = layer_qkv(student.layers[s], self.terms.letters)
            per_layer.append(self.terms(teacher_layers[t], student_layers[s], student.mask))
        if self.emd is not None:  # the pairs are the student-major grid of every layer pair
            return self.emd(torch.stack(per_layer).view(len(student.layers), len(teacher.layers)))
        return torch.stack(per_layer).mean()


def _critic(width: int, hidden: int, out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, out))


class MutualInformationTerm(nn.Module):
    def __init__(self, config, teacher: ModelShape, student: ModelShape):
        super().__init__()
        self.config = config
        if config.mapping not in MI_MAPPINGS:
            raise ValueError("losses.mi.mapping emd is not supported: the EMD mapping needs a loss for every layer "
                             "pair, and the MI bound trains critics per pair; use emd for losses.hidden or "
                             "losses.relation")
        self.pairs = hidden_pairs(config.mapping, student.layers, teacher.layers, config.pairs)
        self.teacher_critics = nn.ModuleList(
            _critic(teacher.hidden, config.critic_hidden, config.critic_dim) for _ in self.pairs)
        self.student_critics = nn.ModuleList(
            _critic(student.hidden, config.critic_hidden, config.critic_dim) for _ in self.pairs)
        uses_baseline = config.baseline and config.bound in BASELINE_BOUNDS
        self.baselines = nn.ModuleList(nn.Linear(teacher.hidden, 1) for _ in self.pairs) if uses_baseline else None

    def forward(self, teacher: ForwardView, student: ForwardView) -> torch.Tensor:
        bounds = []
        for index, (s, t) in enumerate(self.pairs):
            teacher_samples = self._samples(teacher.hidden_states[t].float(), student.mask)
            student_samples = self._samples(student.hidden_states[s].float(), student.mask)
            log_q = self.baselines[index](teacher_samples).squeeze(-1) if self.baselines is not None else None
            bounds.append(mi_lower_bound(self.teacher_critics[index](teacher_samples),
                                         self.student_critics[index](student_samples), log_q,
                                         bound=self.config.bound, alpha=self.config.alpha,
                                         gather=self.gathers()))
        return torch.stack(bounds).mean()

    def gathers(self) -> bool:
        return self.config.gather and world()[1] > 1

    def _samples(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.config.samples == "examples":
            return _pooled(hidden, mask)
        return hidden[mask][: self.config.max_tokens]


class DistillationObjective(nn.Module):
    """All configured terms; forward returns {name: unweighted value} and the weighted total."""

    def __init__(self, config, teacher: ModelShape, student: ModelShape, task_kind: str):
        """config: the `losses` section (pykd.distill.config.LossConfig); task_kind: data.kind."""
        super().__init__()
        self.config = config
        self.prediction = PredictionTerm(config.prediction, task_kind) \
            if task_kind not in ("unlabeled", "mlm") else None
        prediction = config.prediction
        self.masked_lm = MaskedLMTerm(prediction) \
            if task_kind == "mlm" and (prediction.type != "none" or prediction.hard_weight) else None
        self.hidden = HiddenTerm(config.hidden, teacher, student) if config.hidden.type != "none" else None
        self.relation = RelationTerm(config.relation, teacher, student) if config.relation.relations else None
        self.mi = MutualInformationTerm(config.mi, teacher, student) if config.mi.bound != "none" else None

    @property
    def needs_capture(self) -> bool:
        return self.relation is not None

    @property
    def needs_decoder_inputs(self) -> bool:
        """The masked-LM term reads the heads' decoder inputs (ForwardView.decoder)."""
        return self.masked_lm is not None

    def forward(self, teacher: ForwardView, student: ForwardView, labels=None, label_rows=None):
        """label_rows (N,) bool, optional: the rows whose labels enter the hard-label loss (the others are
        augmented or mixed examples, labelled by the teacher alone)."""
        terms, weighted = {}, []

        def add(name, value, weight, gradient_scale=1.0):
            terms[name] = value.detach()
            if weight:
                weighted.append(weight * gradient_scale * value)

        if self.prediction is not None:
            config = self.config.prediction
            if config.type != "none":
                add("prediction", self.prediction.soft(teacher.logits, student.logits), config.weight)
            if config.hard_weight and labels is not None:
                logits = student.logits if label_rows is None else student.logits[label_rows]
                targets = labels if label_rows is None else labels[label_rows]
                # A batch without gold rows still logs the term (0, with a graph for DDP's bookkeeping).
                hard = self.prediction.hard(logits, targets) if len(targets) else student.logits.sum() * 0.0
                add("hard_label", hard, config.hard_weight)
        if self.masked_lm is not None:
            for name, value in self.masked_lm(teacher, student, labels).items():
                add(name, value, 1.0 if name == "mlm" else 0.0)  # the weights are inside "mlm"; the rest is logged
        if self.hidden is not None:
            add("hidden", self.hidden(teacher, student), self.config.hidden.weight)
        if self.relation is not None:
            add("relation", self.relation(teacher, student), self.config.relation.weight)
        if self.mi is not None:
            # Under DDP every rank holds its samples' share of the gradient of the global bound and
            # DDP averages over ranks; scaling by the world size restores the full gradient.
            scale = world()[1] if self.mi.gathers() else 1.0
            add("mi", -self.mi(teacher, student), self.config.mi.weight, scale)
        if not weighted:
            raise ValueError("every loss term is switched off or has weight 0: nothing to distil")
        return terms, torch.stack([w.float() for w in weighted]).sum()
