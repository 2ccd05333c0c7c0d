"""Vocabulary KD benchmark cases: inputs and the forward + backward callables of each variant.

The case is DistilBERT's prediction-layer loss on N selected (masked) positions: a projected
teacher, forward KL at T = 2 times T^2, and the student's MLM cross-entropy beside it
(alpha_ce = 5, alpha_mlm = 2 in DistilBERT's training script: kd_weight 5, hard_label_weight 2).
Student and teacher share the width d here (d_s = d_t = d).

    fused       pykd.vocab_kd_loss on the C++ path
    eager       DistilBERT's distiller.py formula: masked_select of the selected rows' logits,
                KLDivLoss(batchmean)(log_softmax(s / T), softmax(t / T)) T^2 and CrossEntropyLoss
    compiled    that formula under torch.compile
    gemm_floor  the four GEMMs any path does, with torch.matmul into one reused N x V buffer:
                Z_t = H_t W_t^T, Z_s = H_s W_s^T (the logits), dH = G W_s, dW = G^T H_s (G: Z_s)
"""
import functools

import torch
import torch.nn.functional as F

import pykd

TEMPERATURE = 2.0
KD_WEIGHT = 5.0
HARD_WEIGHT = 2.0


def vocab_inputs(n, vocab, width, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h_s = torch.randn(n, width, generator=gen)
    w_s = torch.randn(vocab, width, generator=gen) * width**-0.5
    b_s = torch.zeros(vocab)
    h_t = torch.randn(n, width, generator=gen)
    w_t = torch.randn(vocab, width, generator=gen) * width**-0.5
    b_t = torch.zeros(vocab)
    labels = torch.randint(0, vocab, (n,), generator=gen)
    return h_s.requires_grad_(), w_s.requires_grad_(), b_s.requires_grad_(), h_t, w_t, b_t, labels


def eager_loss(h_s, w_s, b_s, h_t, w_t, b_t, labels):
    """DistilBERT's distiller.py (restrict_ce_to_mask) on rows that are all selected positions."""
    s_logits = h_s @ w_s.T + b_s
    with torch.no_grad():
        t_logits = h_t @ w_t.T + b_t
    mask = (labels > -1).unsqueeze(-1).expand_as(s_logits)
    s_logits_slct = torch.masked_select(s_logits, mask).view(-1, s_logits.size(-1))
    t_logits_slct = torch.masked_select(t_logits, mask).view(-1, s_logits.size(-1))
    loss_ce = F.kl_div(F.log_softmax(s_logits_slct / TEMPERATURE, dim=-1),
                       F.softmax(t_logits_slct / TEMPERATURE, dim=-1), reduction="batchmean") * TEMPERATURE**2
    loss_mlm = F.cross_entropy(s_logits, labels, ignore_index=-100)
    return KD_WEIGHT * loss_ce + HARD_WEIGHT * loss_mlm


@functools.cache
def _compiled_eager():
    return torch.compile(eager_loss)


def fused_loss(h_s, w_s, b_s, h_t, w_t, b_t, labels):
    return pykd.vocab_kd_loss(h_s, w_s, b_s, h_t, w_t, b_t, labels=labels, divergence="kl",
                              temperature=TEMPERATURE, kd_weight=KD_WEIGHT, hard_label_weight=HARD_WEIGHT,
                              backend="cpp")


def vocab_step(variant, inputs):
    """A callable running forward and backward of one variant (gradients of h_s, w_s, b_s)."""
    students = inputs[:3]
    if variant == "gemm_floor":
        return _gemm_floor(*(x.detach() for x in inputs[:5]))
    loss = {"fused": fused_loss, "eager": eager_loss, "compiled": _compiled_eager()}[variant]
    return lambda: torch.autograd.grad(loss(*inputs), students)


def _gemm_floor(h_s, w_s, b_s, h_t, w_t):
    logits = torch.empty(h_s.shape[0], w_s.shape[0])

    def step():
        torch.matmul(h_t, w_t.T, out=logits)
        torch.matmul(h_s, w_s.T, out=logits)
        torch.matmul(logits, w_s)
        torch.matmul(logits.T, h_s)

    return step


def vocab_flops(n, vocab, width):
    """The floor's multiply-adds: 2 N V (d_s + d_t) for the logits, 4 N V d_s for dH and dW."""
    return 2 * n * vocab * (width + width) + 4 * n * vocab * width


def logits_gib(n, vocab):
    """One fp32 (N, V) tensor."""
    return 4 * n * vocab / 2**30
