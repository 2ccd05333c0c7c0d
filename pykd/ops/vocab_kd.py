r"""Prediction-layer distillation at vocabulary scale: the output projection and the divergence, fused.

Rows i = 1..N are positions. The student's logits are z_s = h_s W_s^T + b_s (N, V); the
teacher's are z_t = h_t W_t^T + b_t, or given as a dense (N, V) tensor, or given on its top k
words only (below). With temperature T, a = z_t / T, b = z_s / T, p = softmax(a), q = softmax(b)
per row, and

    kl          D = sum_v p_v (log p_v - log q_v)                forward KL (DistilBERT's KLDivLoss)
    soft_ce     D = -sum_v p_v log q_v                           = kl + H(p): the same gradient
    reverse_kl  D = sum_v q_v (log q_v - log p_v)
    jsd         D = beta KL(p||m) + (1 - beta) KL(q||m),  m = beta p + (1 - beta) q,  0 < beta < 1

jsd is TRL's generalized_jsd_loss and Liger-Kernel's JSD (m weights the teacher by beta). The
formula itself vanishes at both ends: JSD_beta = beta KL(p||q) + O(beta^2) and
(1 - beta) KL(q||p) + O((1 - beta)^2), so JSD_beta / beta -> KL(p||q) and JSD_beta / (1 - beta)
-> KL(q||p); by TRL's and Liger's convention beta = 0 *is* forward KL and beta = 1 reverse KL
(the op runs "kl" and "reverse_kl" there). The optional hard-label term is the student's
cross-entropy at T = 1, CE = -log softmax(z_s)_y. Rows are selected by labels != ignore_index
(every row without labels); with n of them

    L = (1/n) sum_{i selected} [ kd_weight c_T D_i + hard_label_weight CE_i ],   c_T = T^2 or 1

(T^2 with scale_by_t2, as DistilBERT and Hinton et al. keep the soft gradients' scale), and L = 0
with zero gradients when no row is selected. Unselected rows are never read by the fused paths.

Gradients (teacher constant). With d_v = log q_v - log p_v, R = sum_v q_v d_v (reverse KL),
l_v = log q_v - log m_v and K = sum_v q_v l_v = KL(q||m), per row

    dD/db_v     kl, soft_ce:  q_v - p_v
                reverse_kl:   q_v (d_v - R)
                jsd:          (1 - beta) q_v (l_v - K)
    dCE/dz_v  = q1_v - [v = y],  q1 = softmax(z_s)
    G = dL/dz_s = (1/n) [ (kd_weight c_T / T) dD/db + hard_label_weight dCE/dz ]   (0 on unselected rows)
    dh_s = G W_s,   dW_s = G^T h_s,   db_s = sum_i G_i.

reverse_kl: d log q_u / d b_v = [u = v] - q_v and d q_u / d b_v = q_u ([u = v] - q_v), so
dR/db_v = q_v d_v - q_v R + q_v - q_v. jsd: D = H(m) - beta H(p) - (1 - beta) H(q), whence
dD/dq_u = (1 - beta)(log q_u - log m_u) (the log m terms of KL(p||m) and KL(q||m) combine into
sum_u m_u log m_u), and the softmax's Jacobian gives q_v (h_v - sum_u q_u h_u) for h = dD/dq.
Both need a row's R or K before any component, so those two divergences take a second pass.

No term is subtracted from a sum that holds it:
- Every row of G sums to zero (softmax is shift invariant). At the student's top word sigma =
  argmax_v z_s,v of a confident row, q_sigma = 1 - 1e-13, and q_sigma - p_sigma, d_sigma - R and
  l_sigma - K are differences of nearly equal numbers whose remainder is the whole component (the
  gradient of a confidently right, or confidently wrong, student); any precision loses them,
  float64 too past ~35 nats. So every path forms G_v for v != sigma from the formulas above and
  sets G_sigma = -sum_{v != sigma} G_v: each component keeps rounding of its own size.
- Log-normalisers keep the top apart: with x = a or b, top t = argmax x, m = x_t and rho = sum_{v
  != t} e^{x_v - m}, log Z = m + log1p(rho) and log p_v = (x_v - m) - log1p(rho). A sum that
  includes the top's 1 would round rho < 6e-8 (fp32) away, and with it the top's log-probability
  -log1p(rho) and every divergence of nearly equal peaked rows.
- jsd's log-ratios to the mixture are never formed as log q - log m with log m = log(beta p +
  (1 - beta) q): on nearly equal peaked rows log m is a sum of O(1) terms (log beta, log1p(...))
  that cancel to ~1e-11, rounding it by u. With x = log p - log q and h_c(x) = log(c e^x + 1 - c),
      log q - log m = -h_beta(x),    log p - log m = -h_{1-beta}(-x),
      h_c(x) = log1p(c expm1(x)) (x <= 30),   x + log c + log1p(((1 - c) / c) e^{-x}) (x > 30),
  each exact to rounding of its own size (h_c(0) = 0, h_c(x) ~ c x near 0; the second form only
  where expm1 would overflow and x dominates; h_beta(-inf) = log(1 - beta) off a renormalised
  top-k teacher's words).
- The value sums are direct sums of p_v (log p_v - log q_v) and the like, terms with p_v = 0 are
  0 (a renormalised top-k teacher has log p = -inf off its k words).

Top-k teachers (values (N, k), indices (N, k), distinct per row), topk_tail:
- "renormalise": p = softmax over the k words of values / T, zero elsewhere (values may be raw
  logits). kl, soft_ce and jsd with beta < 1 are defined; reverse KL is infinite and refused.
- "spread": values are the teacher's log-probabilities (log_softmax over all V words at T = 1,
  e.g. a cached top-k). Its logit vector is taken as the values on the k words and
  log(r / (V - k)) on every other word, r = max(0, 1 - sum_k e^{value}) its tail mass spread
  evenly; T then applies to that vector. At T = 1 p keeps the teacher's top-k probabilities
  exactly; every divergence is defined while r > 0.

The fused paths never hold the N x V logits:
- C++ (csrc/vocab_kd.cpp): R selected rows at a time (R from a 256 MiB budget for two R x V fp32
  strips), threads own vocabulary tiles of 256 words. Pass 1 runs the logit GEMMs tile by tile into
  the strips and keeps each tile's maxima, top words and top-split sums, merged per row exactly;
  pass 2 (reverse_kl, jsd) sums R or K; pass 3 forms G tile by tile in place and runs
  dW_s[tile] += G^T h, db_s[tile] += colsum G and dh += G W_s[tile]: forward and backward cost
  the four GEMMs of the floor, computed during the forward (the backward only scales them).
- Triton (kernels/vocab_kd.py): the forward streams vocabulary tiles per row block with an online
  log-sum-exp (top-split) for both distributions and saves per-row statistics; the backward
  recomputes the logit tiles: dh_s row-parallel (it also saves G_sigma per row) and dW_s, db_s
  vocabulary-parallel, no atomics.
"""
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .._extension import cpu_extension
from ..kernels.ids import VOCAB_DIVERGENCE_IDS, VOCAB_TEACHER_IDS
from ._backends import autocast_off, no_limits, select_backend
from ._checks import check_nonempty, check_same_device, check_tensor, int_arg, real_arg

DIVERGENCES = tuple(VOCAB_DIVERGENCE_IDS)
TOPK_TAILS = ("renormalise", "spread")
INDEX_DTYPES = (torch.int64, torch.int32)
# Two fp32 strips of R x V logits (student and teacher) on the C++ path stay within this.
CPP_STRIP_BYTES = 256 * 2**20
CPP_TILE_WORDS = 256
# "spread" reads the top-k values as log-probabilities: their probabilities may sum above 1 by
# rounding only (bf16 log-probabilities err by ~2^-8 of their size); beyond this they are logits.
SPREAD_MASS_SLACK = 1e-2


@dataclass(frozen=True)
class VocabSpec:
    teacher: str           # "projected", "logits" or "topk"
    divergence: str        # the kernels' divergence: jsd at beta 0 / 1 runs as kl / reverse_kl
    beta: float
    temperature: float
    kd_value: float        # kd_weight c_T: the divergence's weight in a row's loss
    hard_value: float      # hard_label_weight
    ignore_index: int
    spread: bool           # top-k teachers: spread the tail mass (else renormalise over the k words)
    vocab: int

    def op_args(self) -> tuple:
        """(teacher id, divergence id, beta, T, kd_value, hard_value, ignore_index, spread) as the ops take them."""
        return (VOCAB_TEACHER_IDS[self.teacher], VOCAB_DIVERGENCE_IDS[self.divergence], self.beta,
                self.temperature, self.kd_value, self.hard_value, self.ignore_index, self.spread)


def vocab_kd_loss(
    h_s: Tensor,
    w_s: Tensor,
    b_s: Tensor | None = None,
    h_t: Tensor | None = None,
    w_t: Tensor | None = None,
    b_t: Tensor | None = None,
    *,
    teacher_logits: Tensor | None = None,
    teacher_topk_logits: Tensor | None = None,
    teacher_topk_indices: Tensor | None = None,
    topk_tail: str = "renormalise",
    labels: Tensor | None = None,
    divergence: str = "kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    scale_by_t2: bool = True,
    kd_weight: float = 1.0,
    hard_label_weight: float = 0.0,
    ignore_index: int = -100,
    backend: str = "auto",
) -> Tensor:
    """Divergence between the teacher's and the student's softmax(logits / T) over the vocabulary,
    from the student's hidden states and output projection, without the N x V logits (formulas in
    the module docstring).

    Args:
        h_s, w_s, b_s: the student's final hidden states, output projection and its bias (or None).
        h_t, w_t, b_t: the teacher's, when its logits are to be projected here. Alternatively give
            teacher_logits, or teacher_topk_logits with teacher_topk_indices: exactly one teacher.
            The teacher is a constant: no gradient reaches it.
        teacher_logits: the teacher's logits.
        teacher_topk_logits, teacher_topk_indices: its top-k words (distinct indices per row) and
            their logits, read as topk_tail says.
        topk_tail: "renormalise" (the teacher's distribution over its k words) or "spread" (the
            values are log-probabilities; the rest of the mass is spread over the other words).
        labels: selects rows (label == ignore_index: left out, never read) and, with
            hard_label_weight, gives the hard targets. None selects every row.
        divergence: "kl", "soft_ce", "reverse_kl" or "jsd".
        beta: jsd's teacher weight in [0, 1] (0: forward KL, 1: reverse KL, by convention).
        temperature: T > 0, applied to both logits (not to the hard-label term).
        scale_by_t2: multiply the divergence by T^2 (DistilBERT does).
        kd_weight, hard_label_weight: the two terms' weights (finite, >= 0); the hard term needs labels.
        ignore_index: the label of unselected rows.
        backend: "auto" (C++ for CPU tensors, Triton for CUDA ones, the reference when a fused path
            declines), "reference", "cpp" or "triton"; a forced backend that cannot take the inputs
            raises ValueError saying why.
    Shapes:
        h_s (N, d_s), w_s (V, d_s), b_s (V,); h_t (N, d_t), w_t (V, d_t), b_t (V,);
        teacher_logits (N, V); teacher_topk_logits and teacher_topk_indices (N, k), 1 <= k <= V;
        labels (N,) int64 or int32, each in [0, V) or ignore_index. N, V, d >= 1.
    Returns:
        The mean over selected rows of kd_weight c_T D + hard_label_weight CE as an fp32 scalar,
        computed in fp32 whatever the input dtypes and with autocast off (the reference path
        computes and returns float64 for float64 inputs); 0 (zero gradients) if no row is
        selected. Gradients reach h_s, w_s and b_s in their dtypes.
    """
    teacher = (h_t, w_t, b_t, teacher_logits, teacher_topk_logits, teacher_topk_indices)
    spec = validate_vocab_args(h_s, w_s, b_s, teacher, labels, topk_tail, divergence, beta, temperature,
                               scale_by_t2, kd_weight, hard_label_weight, ignore_index)
    path = select_backend(backend, "h_s", h_s, no_limits)
    if path == "reference":
        return _reference_with_checks(h_s, w_s, b_s, teacher, labels, spec)
    if path == "cpp":
        needs = [torch.is_grad_enabled() and x is not None and x.requires_grad for x in (h_s, w_s, b_s)]
        return torch.ops.pykd.vocab_kd_cpp(h_s, w_s, b_s, *teacher, labels, *spec.op_args(), needs)[0]
    return torch.ops.pykd.vocab_kd_triton(h_s, w_s, b_s, *teacher, labels, *spec.op_args())[0]


def vocab_kd_loss_reference(h_s: Tensor, w_s: Tensor, b_s: Tensor | None = None, h_t: Tensor | None = None,
                            w_t: Tensor | None = None, b_t: Tensor | None = None, *,
                            teacher_logits: Tensor | None = None, teacher_topk_logits: Tensor | None = None,
                            teacher_topk_indices: Tensor | None = None, topk_tail: str = "renormalise",
                            labels: Tensor | None = None, divergence: str = "kl", beta: float = 0.5,
                            temperature: float = 1.0, scale_by_t2: bool = True, kd_weight: float = 1.0,
                            hard_label_weight: float = 0.0, ignore_index: int = -100) -> Tensor:
    """Plain PyTorch vocabulary KD loss that materialises the (N, V) logits; gradients by autograd.

    Args:
        as in vocab_kd_loss.
    Shapes:
        as in vocab_kd_loss.
    Returns:
        The loss as a scalar tensor, computed and returned in float64 when any floating input is
        float64, else in float32 (with autocast off).
    """
    teacher = (h_t, w_t, b_t, teacher_logits, teacher_topk_logits, teacher_topk_indices)
    spec = validate_vocab_args(h_s, w_s, b_s, teacher, labels, topk_tail, divergence, beta, temperature,
                               scale_by_t2, kd_weight, hard_label_weight, ignore_index)
    return _reference_with_checks(h_s, w_s, b_s, teacher, labels, spec)


# ---- argument checks that read no values ----

def validate_vocab_args(h_s, w_s, b_s, teacher, labels, topk_tail, divergence, beta, temperature, scale_by_t2,
                        kd_weight, hard_label_weight, ignore_index) -> VocabSpec:
    """Checks everything about the arguments that does not depend on the tensors' values."""
    check_tensor("h_s", h_s, ndim=2)
    check_tensor("w_s", w_s, ndim=2)
    check_nonempty("h_s", h_s, "(positions, student width)")
    check_nonempty("w_s", w_s, "(vocabulary, student width)")
    n_rows, width = h_s.shape
    vocab = w_s.shape[0]
    if w_s.shape[1] != width:
        raise ValueError(f"w_s must have shape (V, {width}) to match h_s of shape {tuple(h_s.shape)}, got "
                         f"{tuple(w_s.shape)}")
    _check_bias("b_s", b_s, vocab, "w_s", w_s)
    kind = _check_teacher(teacher, n_rows, vocab)
    _check_labels(labels, n_rows)
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    beta = real_arg("beta", beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta!r}")
    temperature = real_arg("temperature", temperature)
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    if not isinstance(scale_by_t2, bool):
        raise TypeError(f"scale_by_t2 must be a bool, got {type(scale_by_t2).__name__} {scale_by_t2!r}")
    kd_weight = _weight("kd_weight", kd_weight)
    hard_label_weight = _weight("hard_label_weight", hard_label_weight)
    if hard_label_weight > 0 and labels is None:
        raise ValueError(f"hard_label_weight={hard_label_weight!r} needs labels (the hard targets)")
    ignore_index = int_arg("ignore_index", ignore_index)
    if topk_tail not in TOPK_TAILS:
        raise ValueError(f"topk_tail must be one of {TOPK_TAILS}, got {topk_tail!r}")
    kernel_divergence = _endpoint_divergence(divergence, beta)
    if kind == "topk" and topk_tail == "renormalise" and kernel_divergence == "reverse_kl":
        raise ValueError(f"divergence={divergence!r} (beta={beta}) with a top-k teacher and topk_tail='renormalise' is "
                         "infinite: the teacher gives every other word probability 0; use topk_tail='spread' "
                         "(values as log-probabilities) or kl, soft_ce, jsd with beta < 1")
    check_same_device(h_s=h_s, w_s=w_s, b_s=b_s, h_t=teacher[0], w_t=teacher[1], b_t=teacher[2],
                      teacher_logits=teacher[3], teacher_topk_logits=teacher[4], teacher_topk_indices=teacher[5],
                      labels=labels)
    return VocabSpec(teacher=kind, divergence=kernel_divergence, beta=beta, temperature=temperature,
                     kd_value=kd_weight * (temperature**2 if scale_by_t2 else 1.0), hard_value=hard_label_weight,
                     ignore_index=ignore_index, spread=topk_tail == "spread", vocab=vocab)


def _endpoint_divergence(divergence: str, beta: float) -> str:
    """jsd's endpoints by TRL's and Liger's convention: beta = 0 forward KL, beta = 1 reverse KL."""
    if divergence == "jsd" and beta == 0.0:
        return "kl"
    if divergence == "jsd" and beta == 1.0:
        return "reverse_kl"
    return divergence


def _weight(name: str, value) -> float:
    value = real_arg(name, value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return value


def _check_bias(name: str, bias, vocab: int, weight_name: str, weight: Tensor) -> None:
    if bias is None:
        return
    check_tensor(name, bias, ndim=1)
    if bias.shape[0] != vocab:
        raise ValueError(f"{name} must have shape ({vocab},) to match {weight_name} of shape {tuple(weight.shape)}, "
                         f"got {tuple(bias.shape)}")


def _check_index_tensor(name: str, x, shape: tuple) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must have dtype torch.int64 or torch.int32, got {x.dtype}")
    if x.device.type == "meta":
        raise ValueError(f"{name} is on device meta (shape {tuple(x.shape)}): the op reads its values")
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")


def _check_labels(labels, n_rows: int) -> None:
    if labels is not None:
        _check_index_tensor("labels", labels, (n_rows,))


def _check_teacher(teacher, n_rows: int, vocab: int) -> str:
    """The teacher's kind after checking its tensors' shapes and dtypes; exactly one kind is given."""
    h_t, w_t, b_t, logits, topk_values, topk_indices = teacher
    given = [kind for kind, present in (("projected", h_t is not None or w_t is not None or b_t is not None),
                                        ("logits", logits is not None),
                                        ("topk", topk_values is not None or topk_indices is not None)) if present]
    if len(given) != 1:
        raise ValueError("give the teacher as exactly one of (h_t, w_t[, b_t]), teacher_logits or "
                         f"(teacher_topk_logits, teacher_topk_indices); got {given or 'none'}")
    kind = given[0]
    if kind == "projected":
        if h_t is None or w_t is None:
            raise ValueError(f"a projected teacher needs both h_t and w_t, got h_t={_shape(h_t)}, w_t={_shape(w_t)}")
        check_tensor("h_t", h_t, ndim=2)
        check_tensor("w_t", w_t, ndim=2)
        check_nonempty("h_t", h_t, "(positions, teacher width)")
        if h_t.shape[0] != n_rows:
            raise ValueError(f"h_t must have {n_rows} rows like h_s, got shape {tuple(h_t.shape)}")
        if tuple(w_t.shape) != (vocab, h_t.shape[1]):
            raise ValueError(f"w_t must have shape ({vocab}, {h_t.shape[1]}): the student's vocabulary (w_s) by "
                             f"h_t's width, got {tuple(w_t.shape)}")
        _check_bias("b_t", b_t, vocab, "w_t", w_t)
    elif kind == "logits":
        check_tensor("teacher_logits", logits, ndim=2)
        if tuple(logits.shape) != (n_rows, vocab):
            raise ValueError(f"teacher_logits must have shape ({n_rows}, {vocab}): h_s's rows by w_s's vocabulary, "
                             f"got {tuple(logits.shape)}")
    else:
        if topk_values is None or topk_indices is None:
            raise ValueError("a top-k teacher needs both teacher_topk_logits and teacher_topk_indices, got "
                             f"teacher_topk_logits={_shape(topk_values)}, teacher_topk_indices={_shape(topk_indices)}")
        check_tensor("teacher_topk_logits", topk_values, ndim=2)
        k = topk_values.shape[1]
        if topk_values.shape[0] != n_rows or not 1 <= k <= vocab:
            raise ValueError(f"teacher_topk_logits must have shape ({n_rows}, k) with 1 <= k <= {vocab} (h_s's rows, "
                             f"w_s's vocabulary), got {tuple(topk_values.shape)}")
        _check_index_tensor("teacher_topk_indices", topk_indices, tuple(topk_values.shape))
    return kind


def _shape(x) -> str:
    return "None" if x is None else f"shape {tuple(x.shape)}"


# ---- checks that read values: run by every path when the op runs, compiled or not ----

def checked_selection(n_rows: int, vocab: int, labels: Tensor | None, topk_values: Tensor | None,
                      topk_indices: Tensor | None, ignore_index: int, spread: bool,
                      device: torch.device) -> tuple[Tensor, Tensor | None]:
    """(selected rows (N,) bool, top-k fill logit per row (N,) fp32 or None) after the checks that
    read values: labels in [0, V) or ignore_index, top-k indices in [0, V) and distinct, and with
    spread, top-k values that are log-probabilities. Unselected rows are not looked at."""
    if labels is None:
        selected = torch.ones(n_rows, dtype=torch.bool, device=device)
    else:
        selected = labels != ignore_index
        bad = (selected & ((labels < 0) | (labels >= vocab))).nonzero().flatten()
        if bad.numel():
            row = int(bad[0])
            raise ValueError(f"labels must be in [0, {vocab}) or ignore_index={ignore_index}, got {int(labels[row])} "
                             f"at row {row}")
    if topk_indices is None:
        return selected, None
    _check_topk_indices(topk_indices, selected, vocab)
    return selected, topk_fill(topk_values, selected, vocab, spread)


def _check_topk_indices(indices: Tensor, selected: Tensor, vocab: int) -> None:
    outside = (selected[:, None] & ((indices < 0) | (indices >= vocab))).nonzero()
    if outside.numel():
        row, col = (int(x) for x in outside[0])
        raise ValueError(f"teacher_topk_indices must be in [0, {vocab}), got {int(indices[row, col])} at row {row}, "
                         f"column {col}")
    ordered = indices.sort(dim=1).values
    repeated = (selected & (ordered[:, 1:] == ordered[:, :-1]).any(dim=1)).nonzero().flatten()
    if repeated.numel():
        row = int(repeated[0])
        raise ValueError(f"teacher_topk_indices must be distinct within a row, row {row} repeats a word: "
                         f"{indices[row].tolist()[:16]}")


def topk_fill(values: Tensor, selected: Tensor, vocab: int, spread: bool) -> Tensor:
    """The teacher's logit on each row's words outside its top k (N,) fp32: -inf to renormalise over
    the k words, log(r / (V - k)) with r = max(0, 1 - sum_k e^{value}) to spread the tail mass
    (0 on unselected rows)."""
    n_rows, k = values.shape
    if not spread or k == vocab:
        return torch.full((n_rows,), float("-inf"), dtype=torch.float32, device=values.device)
    log_mass = torch.logsumexp(values.double(), dim=1)
    over = (selected & (log_mass > math.log1p(SPREAD_MASS_SLACK))).nonzero().flatten()
    if over.numel():
        row = int(over[0])
        raise ValueError(f"teacher_topk_logits with topk_tail='spread' must be the teacher's log-probabilities "
                         f"(log_softmax over all {vocab} words): row {row}'s probabilities sum to "
                         f"{math.exp(float(log_mass[row])):.4g} > 1")
    tail_mass = (-torch.expm1(log_mass.clamp(max=0.0))).clamp(min=0.0)
    fill = torch.log(tail_mass) - math.log(vocab - k)
    return torch.where(selected, fill, 0.0).float()


@torch.library.custom_op("pykd::vocab_kd_checks", mutates_args=())
def _checks_op(h_s: Tensor, labels: Tensor | None, topk_values: Tensor | None, topk_indices: Tensor | None,
               vocab: int, ignore_index: int, spread: bool) -> tuple[Tensor, Tensor]:
    """(selected rows, top-k fill): an op, so that torch.compile keeps the reference's value checks."""
    selected, fill = checked_selection(h_s.shape[0], vocab, labels, topk_values, topk_indices, ignore_index, spread,
                                       h_s.device)
    return selected, fill if fill is not None else h_s.new_empty(0, dtype=torch.float32)


@_checks_op.register_fake
def _(h_s, labels, topk_values, topk_indices, vocab, ignore_index, spread):
    fill_rows = h_s.shape[0] if topk_indices is not None else 0
    return h_s.new_empty(h_s.shape[0], dtype=torch.bool), h_s.new_empty(fill_rows, dtype=torch.float32)


# ---- reference: the materialised logits, in forms whose autograd gradient stays exact on peaked rows ----

def _reference_with_checks(h_s, w_s, b_s, teacher, labels, spec: VocabSpec) -> Tensor:
    selected, fill = _checks_op(h_s.detach(), labels, teacher[4], teacher[5], spec.vocab, spec.ignore_index,
                                spec.spread)
    with autocast_off(h_s):
        return _reference(h_s, w_s, b_s, teacher, labels, selected, fill, spec)


def _reference(h_s, w_s, b_s, teacher, labels, selected: Tensor, fill: Tensor, spec: VocabSpec) -> Tensor:
    floats = [x for x in (h_s, w_s, b_s, *teacher[:5]) if x is not None]
    dtype = torch.float64 if any(x.dtype == torch.float64 for x in floats) else torch.float32
    rows = selected[:, None]
    # Zeroing the unselected rows keeps whatever they hold (NaN included) out of the sums and gradients.
    z_s = torch.where(rows, h_s, 0).to(dtype) @ w_s.to(dtype).T
    if b_s is not None:
        z_s = z_s + b_s.to(dtype)
    z_t = _reference_teacher_logits(teacher, selected, fill, spec, dtype)
    targets = torch.where(selected, labels, 0).long() if labels is not None else None
    per_row = _reference_rows(z_s, z_t, targets, spec)
    count = selected.sum().clamp(min=1)
    return torch.where(selected, per_row, 0.0).sum() / count


def _reference_teacher_logits(teacher, selected: Tensor, fill: Tensor, spec: VocabSpec, dtype) -> Tensor:
    h_t, w_t, b_t, logits, topk_values, topk_indices = (x.detach() if x is not None else None for x in teacher)
    rows = selected[:, None]
    if spec.teacher == "projected":
        z_t = torch.where(rows, h_t, 0).to(dtype) @ w_t.to(dtype).T
        return z_t + b_t.to(dtype) if b_t is not None else z_t
    if spec.teacher == "logits":
        return torch.where(rows, logits, 0).to(dtype)
    k = topk_indices.shape[1]
    words = torch.arange(k, device=topk_indices.device).expand_as(topk_indices)
    indices = torch.where(rows, topk_indices, words).long()
    values = torch.where(rows, topk_values, 0).to(dtype)
    full = fill.to(dtype)[:, None].expand(-1, spec.vocab).clone()
    return full.scatter(1, indices, values)


def _one_hot(index: Tensor, like: Tensor) -> Tensor:
    return torch.zeros_like(like, dtype=torch.bool).scatter_(1, index[:, None], True)


def _log_softmax_top_split(x: Tensor, is_top: Tensor) -> Tensor:
    """log softmax(x) per row as (x - x_top) - log1p(sum of the others' e^{x_v - x_top}), x_top a
    row maximum (is_top marks one per row): the top's log-probability survives when the others'
    mass is below the precision's epsilon."""
    top = torch.where(is_top, x, 0).sum(dim=1, keepdim=True)
    shifted = x - top
    rest = torch.exp(shifted).masked_fill(is_top, 0).sum(dim=1, keepdim=True)
    return shifted - torch.log1p(rest)


def _reference_rows(z_s: Tensor, z_t: Tensor, targets: Tensor | None, spec: VocabSpec) -> Tensor:
    """Each row's kd_value D + hard_value CE (N,).

    The student's logits are shifted by their top word's, with that entry a constant 0: autograd
    then gives the top word's gradient as minus the sum of the others (what every row's gradient
    sums to), not as the rounding-dominated difference q_sigma - p_sigma of two numbers near 1.
    """
    is_top_s = _one_hot(z_s.detach().argmax(dim=1), z_s)
    z_s = torch.where(is_top_s, 0.0, z_s - torch.where(is_top_s, z_s, 0).sum(dim=1, keepdim=True))
    is_top_t = _one_hot(z_t.argmax(dim=1), z_t)
    log_q = _log_softmax_top_split(z_s / spec.temperature, is_top_s)
    log_p = _log_softmax_top_split(z_t / spec.temperature, is_top_t)
    value = spec.kd_value * _divergence_rows(log_p, log_q, spec)
    if spec.hard_value:
        log_q1 = _log_softmax_top_split(z_s, is_top_s)
        value = value - spec.hard_value * log_q1.gather(1, targets[:, None]).squeeze(1)
    return value


def _divergence_rows(log_p: Tensor, log_q: Tensor, spec: VocabSpec) -> Tensor:
    """D per row; terms with p_v = 0 (log p_v = -inf, a renormalised top-k teacher) are 0."""
    p, q = log_p.exp(), log_q.exp()
    teacher_terms = p > 0
    if spec.divergence == "kl":
        return torch.where(teacher_terms, p * (log_p - log_q), 0.0).sum(dim=1)
    if spec.divergence == "soft_ce":
        return torch.where(teacher_terms, -p * log_q, 0.0).sum(dim=1)
    if spec.divergence == "reverse_kl":
        return (q * (log_q - log_p)).sum(dim=1)
    kl_pm, kl_qm = mixture_log_ratios(log_p, log_q, spec.beta)
    kl_pm = torch.where(teacher_terms, p * kl_pm, 0.0).sum(dim=1)
    kl_qm = (q * kl_qm).sum(dim=1)
    return spec.beta * kl_pm + (1.0 - spec.beta) * kl_qm


MIXTURE_SWITCH = 30.0  # h_c switches to its large-x form here, where x dominates log c


def log_mixture_shift(x: Tensor, c: float) -> Tensor:
    """h_c(x) = log(c e^x + 1 - c) for 0 < c < 1, exact to rounding of its own size (module docstring)."""
    below = torch.log1p(c * torch.expm1(x.clamp(max=MIXTURE_SWITCH)))
    large = x.clamp(min=MIXTURE_SWITCH)
    above = large + math.log(c) + torch.log1p((1.0 - c) / c * torch.exp(-large))
    return torch.where(x <= MIXTURE_SWITCH, below, above)


def mixture_log_ratios(log_p: Tensor, log_q: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """(log p - log m, log q - log m) for m = beta p + (1 - beta) q, without forming log m."""
    x = log_p - log_q
    return -log_mixture_shift(-x, 1.0 - beta), -log_mixture_shift(x, beta)


# ---- the fused paths as custom ops: one graph under torch.compile, autograd registered below ----

def cpp_blocking(n_rows: int, vocab: int) -> tuple[int, int]:
    """(rows per block, words per tile) of the C++ path: two R x V fp32 strips within
    CPP_STRIP_BYTES, R a multiple of 16 in [16, 1024] and at most the rows there are."""
    rows = max(16, min(1024, CPP_STRIP_BYTES // (8 * vocab)) // 16 * 16)
    return max(1, min(rows, n_rows)), CPP_TILE_WORDS


@torch.library.custom_op("pykd::vocab_kd_cpp", mutates_args=())
def _cpp_loss(h_s: Tensor, w_s: Tensor, b_s: Tensor | None, h_t: Tensor | None, w_t: Tensor | None,
              b_t: Tensor | None, teacher_logits: Tensor | None, topk_values: Tensor | None,
              topk_indices: Tensor | None, labels: Tensor | None, teacher_id: int, divergence_id: int, beta: float,
              temperature: float, kd_value: float, hard_value: float, ignore_index: int, spread: bool,
              needs: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, dL/dh_s, dL/dw_s, dL/db_s) in one call; the gradients are fp32, empty when not in needs."""
    vocab = w_s.shape[0]
    selected, fill = checked_selection(h_s.shape[0], vocab, labels, topk_values, topk_indices, ignore_index, spread,
                                       h_s.device)
    rows = selected.nonzero().flatten()
    block_rows, tile_words = cpp_blocking(rows.numel(), vocab)
    with autocast_off(h_s):
        loss, *grads = cpu_extension().vocab_kd_forward(
            h_s, w_s, b_s, teacher_id, h_t, w_t, b_t, teacher_logits, topk_values, topk_indices, fill, rows, labels,
            divergence_id, beta, temperature, kd_value, hard_value, 1.0 / max(rows.numel(), 1), *needs, block_rows,
            tile_words)
    return (loss, *(g if need else h_s.new_empty(0, dtype=torch.float32) for g, need in zip(grads, needs)))


@_cpp_loss.register_fake
def _(h_s, w_s, b_s, h_t, w_t, b_t, teacher_logits, topk_values, topk_indices, labels, teacher_id, divergence_id,
      beta, temperature, kd_value, hard_value, ignore_index, spread, needs):
    shapes = (h_s.shape, w_s.shape, (w_s.shape[0],))
    return (h_s.new_empty((), dtype=torch.float32),
            *(h_s.new_empty(shape if need else (0,), dtype=torch.float32) for shape, need in zip(shapes, needs)))


def _cpp_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*output[1:])
    # The gradient outputs get no gradient of their own: without this autograd would hand the backward
    # a zeros_like of each, one more (V, d) tensor at the backward's peak.
    ctx.set_materialize_grads(False)
    ctx.dtypes = tuple(x.dtype if x is not None else None for x in inputs[:3])
    ctx.computed = tuple(inputs[-1])  # the gradients the forward formed (needs)
    ctx.scaled = False


def _cpp_backward(ctx, grad_loss, *_grads):
    # In eager mode the saved fp32 gradients are scaled in place, so the backward holds one (V, d) dW,
    # not two (at V = 250,002, d = 768: 732 MiB). A traced backward (torch.compile, opcheck's AOT
    # dispatch: its tensors are fake or functional subclasses) must not mutate saved tensors, which the
    # partitioner refuses, so there the product is out of place. A second eager backward through the
    # same graph (retain_graph) would scale them twice: it is refused. Always scaled: skipping the
    # product when grad_loss == 1 would read a value, which tracing cannot.
    if grad_loss is None:
        return (None,) * 19
    if ctx.scaled:  # before unpacking the saved tensors, whose version check would speak first
        raise RuntimeError("vocab_kd_loss: its backward ran already for this graph (the C++ path scales the "
                           "gradients its forward formed in place); call vocab_kd_loss again instead of "
                           "backpropagating twice with retain_graph=True")
    saved = ctx.saved_tensors
    wanted = [ctx.needs_input_grad[k] and ctx.computed[k] for k in range(3)]
    eager = all(type(x) is torch.Tensor for x in (grad_loss, *saved))
    ctx.scaled = eager
    scale = torch.Tensor.mul_ if eager else torch.Tensor.mul
    grads = [scale(grad, grad_loss).to(dtype) if want else None for grad, dtype, want in zip(saved, ctx.dtypes, wanted)]
    return (*grads,) + (None,) * 16


_cpp_loss.register_autograd(_cpp_backward, setup_context=_cpp_setup_context)


@torch.library.custom_op("pykd::vocab_kd_triton", mutates_args=())
def _triton_loss(h_s: Tensor, w_s: Tensor, b_s: Tensor | None, h_t: Tensor | None, w_t: Tensor | None,
                 b_t: Tensor | None, teacher_logits: Tensor | None, topk_values: Tensor | None,
                 topk_indices: Tensor | None, labels: Tensor | None, teacher_id: int, divergence_id: int, beta: float,
                 temperature: float, kd_value: float, hard_value: float, ignore_index: int, spread: bool
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, per-row statistics (STAT_NAMES, N) fp32, each row's student top word (N,) int32)."""
    from ..kernels import vocab_kd as kernel

    selected, fill = checked_selection(h_s.shape[0], w_s.shape[0], labels, topk_values, topk_indices, ignore_index,
                                       spread, h_s.device)
    rows = selected.nonzero().flatten()
    with autocast_off(h_s):
        return kernel.vocab_forward(h_s, w_s, b_s, (h_t, w_t, b_t, teacher_logits, topk_values, topk_indices, fill),
                                    rows, labels, teacher_id, divergence_id, beta, temperature, kd_value, hard_value)


@_triton_loss.register_fake
def _(h_s, w_s, b_s, h_t, w_t, b_t, teacher_logits, topk_values, topk_indices, labels, teacher_id, divergence_id,
      beta, temperature, kd_value, hard_value, ignore_index, spread):
    from ..kernels.vocab_kd import STAT_NAMES

    n_rows = h_s.shape[0]
    return (h_s.new_empty((), dtype=torch.float32), h_s.new_empty((len(STAT_NAMES), n_rows), dtype=torch.float32),
            h_s.new_empty(n_rows, dtype=torch.int32))


@torch.library.custom_op("pykd::vocab_kd_triton_backward", mutates_args=())
def _triton_grads(h_s: Tensor, w_s: Tensor, b_s: Tensor | None, h_t: Tensor | None, w_t: Tensor | None,
                  b_t: Tensor | None, teacher_logits: Tensor | None, topk_values: Tensor | None,
                  topk_indices: Tensor | None, labels: Tensor | None, stats: Tensor, top_words: Tensor,
                  grad_loss: Tensor, teacher_id: int, divergence_id: int, beta: float, temperature: float,
                  kd_value: float, hard_value: float, ignore_index: int, spread: bool, needs: list[bool]
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """(dL/dh_s, dL/dw_s, dL/db_s) in the inputs' dtypes, an empty tensor for one not in needs."""
    from ..kernels import vocab_kd as kernel

    selected, fill = checked_selection(h_s.shape[0], w_s.shape[0], labels, topk_values, topk_indices, ignore_index,
                                       spread, h_s.device)
    rows = selected.nonzero().flatten()
    with autocast_off(h_s):
        grads = kernel.vocab_backward(h_s, w_s, b_s, (h_t, w_t, b_t, teacher_logits, topk_values, topk_indices, fill),
                                      rows, labels, stats, top_words, grad_loss, teacher_id, divergence_id, beta,
                                      temperature, kd_value, hard_value, needs)
    return tuple(grad.to(x.dtype) if need else h_s.new_empty(0)
                 for grad, x, need in zip(grads, (h_s, w_s, b_s), needs))


@_triton_grads.register_fake
def _(h_s, w_s, b_s, h_t, w_t, b_t, teacher_logits, topk_values, topk_indices, labels, stats, top_words, grad_loss,
      teacher_id, divergence_id, beta, temperature, kd_value, hard_value, ignore_index, spread, needs):
    return tuple(torch.empty_like(x) if need else h_s.new_empty(0) for x, need in zip((h_s, w_s, b_s), needs))


def _triton_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*(x for x in inputs[:10]), output[1], output[2])
    ctx.kernel_args = inputs[10:]


def _triton_backward(ctx, grad_loss, _grad_stats, _grad_top):
    needs = [bool(ctx.needs_input_grad[k]) for k in range(3)]
    grads = _triton_grads(*ctx.saved_tensors, grad_loss, *ctx.kernel_args, needs)
    return (*(grad if need else None for grad, need in zip(grads, needs)),) + (None,) * 15


_triton_loss.register_autograd(_triton_backward, setup_context=_triton_setup_context)
