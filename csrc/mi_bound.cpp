// Fused MI lower bounds on the CPU (math and gradient formulas: pykd/ops/mi_bound.py).
//
// Threads take contiguous ranges of row blocks. For a block of BR rows:
//   S = scale * A[rows] B^T               one GEMM into a BR x n buffer (never n x n)
//   per row: reductions, then G = dI/dS   written over S, all gradients row-local
//   dA[rows] = scale G B, dB += scale G^T A[rows]   (dB into the thread's own buffer)
// The bound's value needs one global reduction (across ranks too when b is gathered): the
// kernel returns the per-row terms and pykd/ops/mi_bound.py combines them.
// Off-diagonal reductions run over the ranges beside the diagonal (and, for alpha, beside the
// row's largest negative) instead of subtracting those entries afterwards, which would cancel
// catastrophically when one of them dominates its row.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "ids.h"
#include "vec_math.h"

namespace pykd {
namespace {

constexpr int64_t kBlockScores = 1 << 15;

// The same element math for scalars (row tails, the diagonal) and vectors.
inline float v_exp(float x) { return std::exp(x); }
inline Vec v_exp(const Vec& x) { return x.exp_u20(); }
inline float v_log(float x) { return std::log(x); }
inline Vec v_log(const Vec& x) { return x.log(); }
inline float v_log1p(float x) { return std::log1p(x); }
inline Vec v_log1p(const Vec& x) { return x.log1p(); }
inline float v_max(float x, float y) { return std::max(x, y); }
inline Vec v_max(const Vec& x, const Vec& y) { return at::vec::maximum(x, y); }
inline float v_min(float x, float y) { return std::min(x, y); }
inline Vec v_min(const Vec& x, const Vec& y) { return at::vec::minimum(x, y); }

template <typename T>
T sigmoid(T x) {
  return T(1.f) / (T(1.f) + v_exp(T(0.f) - x));
}

// log(e^x + e^y); an argument of -inf is fine for the scalar form only.
template <typename T>
T logaddexp(const T& x, const T& y) {
  const T hi = v_max(x, y);
  return hi + v_log1p(v_exp(v_min(x, y) - hi));
}

inline float softplus(float x) { return logaddexp(x, 0.f); }

// log(e^x + e^y) with the shares e^{x - log}, e^{y - log} from the same exp: with e = e^{-|x - y|}
// the larger argument's share is 1/(1 + e), the smaller's e/(1 + e) (neither is 1 minus the other).
template <typename T>
struct SumShares {
  T log, share_x, share_y;
};

inline SumShares<float> logaddexp_shares(float x, float y) {
  const float hi = std::max(x, y), e = std::exp(std::min(x, y) - hi), big = 1.f / (1.f + e), small = e * big;
  return x >= y ? SumShares<float>{hi + std::log1p(e), big, small} : SumShares<float>{hi + std::log1p(e), small, big};
}

inline SumShares<Vec> logaddexp_shares(const Vec& x, const Vec& y) {
  const Vec hi = v_max(x, y), e = v_exp(v_min(x, y) - hi), big = Vec(1.f) / (Vec(1.f) + e), small = e * big;
  const Vec x_high = x >= y;
  return {hi + v_log1p(e), Vec::blendv(small, big, x_high), Vec::blendv(big, small, x_high)};
}

// Applies f(values, index, lanes) to x[begin, end) a vector at a time; the tail is zero-padded
// and `lanes` says how many entries are real.
template <typename F>
void for_each_vec(float* x, int64_t begin, int64_t end, F f) {
  int64_t j = begin;
  for (; j + Vec::size() <= end; j += Vec::size()) f(Vec::loadu(x + j), j, static_cast<int>(Vec::size()));
  if (j < end) f(Vec::loadu(x + j, end - j), j, static_cast<int>(end - j));
}

inline Vec real_lanes(const Vec& v, int lanes) { return lanes == Vec::size() ? v : Vec::set(Vec(0.f), v, lanes); }

float range_max(const float* x, int64_t begin, int64_t end) { return row_max(x + begin, end - begin); }

float range_sum_exp(float* x, int64_t begin, int64_t end, float shift) {
  Vec acc(0.f);
  for_each_vec(x, begin, end, [&](const Vec& v, int64_t, int lanes) { acc = acc + real_lanes(v_exp(v - Vec(shift)), lanes); });
  return horizontal_sum(acc);
}

struct RowSums {
  float lse;      // log sum_j e^{s_j}
  float log_off;  // log sum_{j != i} e^{s_j}
};

RowSums row_sums(float* s, int64_t n, int64_t i) {
  const float max_off = std::max(range_max(s, 0, i), range_max(s, i + 1, n));
  const float off = range_sum_exp(s, 0, i, max_off) + range_sum_exp(s, i + 1, n, max_off);
  const float log_off = max_off + std::log(off);
  return {logaddexp(s[i], log_off), log_off};
}

struct AlphaConst {
  float alpha, log_alpha, log_one_minus_alpha, log_n1;
};

// A row's off-diagonal statistics. Its largest negative (column top) is kept apart so that the
// sum without any one negative j is formed without subtracting e^{s_j} from a sum it dominates.
struct OffDiagonal {
  int64_t top;
  float top_score;  // s_top
  float rest;       // sum_{k != i, top} e^{s_k - s_top} (0 when n = 2)
  float log_off;    // LSE' = log sum_{k != i} e^{s_k}
};

OffDiagonal off_diagonal(float* s, int64_t n, int64_t i) {
  const float top_score = std::max(range_max(s, 0, i), range_max(s, i + 1, n));
  int64_t top = i == 0 ? 1 : 0;
  while (top == i || s[top] != top_score) ++top;
  const int64_t lo = std::min(i, top), hi = std::max(i, top);
  const float rest = range_sum_exp(s, 0, lo, top_score) + range_sum_exp(s, lo + 1, hi, top_score) +
                     range_sum_exp(s, hi + 1, n, top_score);
  return {top, top_score, rest, top_score + std::log1p(rest)};
}

// The interpolated baseline of one entry: u = log(alpha e^m + (1-alpha) e^q), w = du/dm and
// 1 - w (each as e^{. - u}, never as 1 minus the other).
template <typename T>
struct Interp {
  T u, w, one_minus_w;
};

template <typename T>
Interp<T> interpolate(const T& m, float q, const AlphaConst& k) {
  if (k.alpha == 0.f) return {T(q), T(0.f), T(1.f)};
  if (k.alpha == 1.f) return {m, T(1.f), T(0.f)};
  const SumShares<T> sum = logaddexp_shares(m + T(k.log_alpha), T(q + k.log_one_minus_alpha));
  return {sum.log, sum.share_x, sum.share_y};
}

// Entry j != i of row i given R_j = log sum_{k != i, j} e^{s_k}: log A_j = logaddexp(s_i, R_j) is
// the leave-one-out sum, which holds the positive as an added term.
template <typename T>
struct LooEntry {
  Interp<T> b;
  T g_diag;  // the entry's part of N dI/ds_i: (1 - w_j) + w_j e^{R_j - log A_j}
};

template <typename T>
LooEntry<T> loo_entry(const T& without, float diag, float q, const AlphaConst& k) {
  const SumShares<T> a = logaddexp_shares(T(diag), without);
  const Interp<T> b = interpolate(a.log - T(k.log_n1), q, k);
  return {b, b.one_minus_w + b.w * a.share_y};
}

struct RowResult {
  double joint;      // the row's part of the joint (positive-pair) term
  float log_marg;    // log of the row's sum of e^{...} in the marginal term
  float grad_q;      // dI/dq_i
};

// Each row function turns the scaled scores s (length n, positive at i) into G = dI/ds in place.
RowResult infonce_row(float* s, int64_t n, int64_t i) {
  const RowSums sums = row_sums(s, n, i);
  const float inv_n = 1.f / n;
  // s_i - LSE = -softplus(LSE' - s_i), and dI/ds_i = (1 - p_ii)/n with 1 - p_ii = e^{LSE' - LSE}:
  // forming 1 - p_ii would cancel once the positive dominates.
  const double joint = -softplus(sums.log_off - s[i]);
  const float g_diag = inv_n * std::exp(sums.log_off - sums.lse);
  for_each_vec(s, 0, n, [&](const Vec& v, int64_t j, int lanes) {
    (Vec(-inv_n) * v_exp(v - Vec(sums.lse))).store(s + j, lanes);
  });
  s[i] = g_diag;
  return {joint, 0.f, 0.f};
}

// TUBA with log-baseline c (NWJ: c = 1). JS shares NWJ's value but takes the f-GAN gradient.
RowResult tuba_row(float* s, int64_t n, int64_t i, float c, bool js) {
  const RowSums sums = row_sums(s, n, i);
  const float inv_n = 1.f / n, inv_pairs = 1.f / (static_cast<float>(n) * (n - 1));
  const float diag = s[i];
  for_each_vec(s, 0, n, [&](const Vec& v, int64_t j, int lanes) {
    const Vec g = js ? Vec(-inv_pairs) * sigmoid(v) : Vec(-inv_pairs) * v_exp(v - Vec(c));
    g.store(s + j, lanes);
  });
  s[i] = js ? inv_n * sigmoid(-diag) : inv_n;
  const float log_marg = sums.log_off - c;
  return {static_cast<double>(diag - c), log_marg, -inv_n + std::exp(log_marg) * inv_pairs};
}

// Visits x[0, n) but for the columns skip1 != skip2, a vector at a time.
template <typename F>
void for_each_vec_except(float* x, int64_t n, int64_t skip1, int64_t skip2, F f) {
  const int64_t lo = std::min(skip1, skip2), hi = std::max(skip1, skip2);
  for_each_vec(x, 0, lo, f);
  for_each_vec(x, lo + 1, hi, f);
  for_each_vec(x, hi + 1, n, f);
}

// N dI/ds (formulas: pykd/ops/mi_bound.py) from one pass over the negatives j other than top,
// which sums the value, N dI/ds_i, N dI/dq and V = sum_j t_j with t_j = e^{s_top + c - u_j} <= 1
// (c = log(alpha/(n-1))), keeping t_j in scratch; top's own terms come from the row statistics.
RowResult alpha_row(float* s, float* scratch, int64_t n, int64_t i, float q, const AlphaConst& k) {
  const OffDiagonal off = off_diagonal(s, n, i);
  const float diag = s[i], inv_pairs = 1.f / (static_cast<float>(n) * (n - 1));
  const float top_score = off.top_score, log_scale = k.log_alpha - k.log_n1;
  const bool has_loo = k.alpha > 0.f, has_baseline = k.alpha < 1.f;
  Vec sum_joint(0.f), sum_g_diag(0.f), sum_one_minus_w(0.f), sum_t(0.f);
  for_each_vec_except(s, n, i, off.top, [&](const Vec& v, int64_t j, int lanes) {
    // R_j = log(sum_{k != i, top} e^{s_k} + e^{s_top} - e^{s_j}) >= s_top: no cancellation.
    const Vec without = Vec(top_score) + v_log1p(v_max(Vec(off.rest) - v_exp(v - Vec(top_score)), Vec(0.f)));
    const LooEntry<Vec> entry = loo_entry(without, diag, q, k);
    sum_joint = sum_joint + real_lanes(Vec(diag) - entry.b.u, lanes);
    sum_g_diag = sum_g_diag + real_lanes(entry.g_diag, lanes);
    sum_one_minus_w = sum_one_minus_w + real_lanes(entry.b.one_minus_w, lanes);
    if (has_loo) {
      const Vec t = v_exp(Vec(top_score + log_scale) - entry.b.u);
      sum_t = sum_t + real_lanes(t, lanes);
      t.store(scratch + j, lanes);
    }
  });
  const LooEntry<float> top = loo_entry(top_score + std::log(off.rest), diag, q, k);  // R_top = LSE''
  const Interp<float> own = interpolate(off.log_off - k.log_n1, q, k);                 // u_ii
  const float v_sum = horizontal_sum(sum_t);
  // e^{s_k + log_first} = (alpha/(n-1)) e^{s_k - u_top} <= 1 for k != top;
  // e^{s_k + log_second} = e^{s_k - u_ii} (1 - w_ii), the marginal term's part.
  const float log_first = log_scale - top.b.u;
  const float log_second = k.log_one_minus_alpha + q - 2.f * own.u;
  const float first_at_top = has_loo ? std::exp(top_score + log_first) : 0.f;
  const float second_at_top = has_baseline ? std::exp(top_score + log_second) : 0.f;
  auto others = [&](int64_t j, int lanes) {
    return has_loo ? v_max(Vec(v_sum) - Vec::loadu(scratch + j, lanes), Vec(0.f)) : Vec(0.f);
  };
  if (first_at_top <= 1.f && second_at_top <= 1e30f) {
    // Both terms are e^{s_k - s_top} times a row constant that fits fp32: one exp per score.
    const Vec at_top(first_at_top + second_at_top);
    for_each_vec_except(s, n, i, off.top, [&](const Vec& v, int64_t j, int lanes) {
      (Vec(-inv_pairs) * v_exp(v - Vec(top_score)) * (at_top + others(j, lanes))).store(s + j, lanes);
    });
  } else {
    // The top negative dominates the positive by tens of nats (or q lies far below it): each
    // exponent on its own, as the product e^{s_k - s_top} e^{s_top + ...} could overflow.
    for_each_vec_except(s, n, i, off.top, [&](const Vec& v, int64_t j, int lanes) {
      Vec g(0.f);
      if (has_loo) g = v_exp(v + Vec(log_first)) + v_exp(v - Vec(top_score)) * others(j, lanes);
      if (has_baseline) g = g + v_exp(v + Vec(log_second));
      (Vec(-inv_pairs) * g).store(s + j, lanes);
    });
  }
  s[off.top] = -inv_pairs * (v_sum + second_at_top);
  s[i] = (horizontal_sum(sum_g_diag) + top.g_diag) * inv_pairs;
  const double joint = static_cast<double>(horizontal_sum(sum_joint)) + (diag - top.b.u);
  const float marginal_q = has_baseline ? std::exp(off.log_off + log_second) : 0.f;  // M_i (1 - w_ii)
  const float grad_q = (marginal_q - horizontal_sum(sum_one_minus_w) - top.b.one_minus_w) * inv_pairs;
  return {joint, off.log_off - own.u, grad_q};
}

struct BoundInputs {
  Bound bound;
  AlphaConst alpha;
  const float* log_q;  // null when absent (baseline 0)
};

RowResult bound_row(const BoundInputs& in, float* s, float* scratch, int64_t n, int64_t row, int64_t diag_offset) {
  const int64_t i = row + diag_offset;
  switch (in.bound) {
    case Bound::kInfoNCE:
      return infonce_row(s, n, i);
    case Bound::kNWJ:
      return tuba_row(s, n, i, 1.f, /*js=*/false);
    case Bound::kJS:
      return tuba_row(s, n, i, 1.f, /*js=*/true);
    case Bound::kTUBA:
      return tuba_row(s, n, i, in.log_q ? in.log_q[row] : 0.f, /*js=*/false);
    case Bound::kAlpha:
      return alpha_row(s, scratch, n, i, in.log_q ? in.log_q[row] : 0.f, in.alpha);
  }
  TORCH_CHECK(false, "unknown bound id ", static_cast<int64_t>(in.bound));
}

}  // namespace

// Rows are this process's pairs, columns every pair (b may hold other ranks' rows): row r's
// positive sits in column diag_offset + r. Returns (joint, log_marg, dI/da, dI/db, dI/dlog_q):
// joint (float64 scalar) and log_marg (per row) are this block's parts of the value; gradients
// are undefined when need_grad is false, and dI/dlog_q without log_q.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mi_bound_forward(
    const at::Tensor& a_in, const at::Tensor& b_in, const std::optional<at::Tensor>& log_q_in, int64_t bound_id,
    double alpha, double scale, bool need_grad, int64_t diag_offset) {
  TORCH_CHECK(known_id(kBoundNames, bound_id), "unknown bound id ", bound_id);
  const at::Tensor a = a_in.detach().to(at::kFloat).contiguous();
  const at::Tensor b = b_in.detach().to(at::kFloat).contiguous();
  const at::Tensor log_q = log_q_in.has_value() ? log_q_in->detach().to(at::kFloat).contiguous() : at::Tensor();
  const int64_t rows_total = a.size(0), n = b.size(0), e = a.size(1);
  TORCH_CHECK(diag_offset >= 0 && diag_offset + rows_total <= n, "diag_offset out of range");
  const float a_f = static_cast<float>(alpha);
  const BoundInputs in{static_cast<Bound>(bound_id),
                       {a_f, std::log(a_f), std::log1p(-a_f), std::log(static_cast<float>(n - 1))},
                       log_q.defined() ? log_q.data_ptr<float>() : nullptr};
  const int64_t rows_per_block = std::clamp<int64_t>(kBlockScores / n, 16, 256);
  const int64_t blocks = (rows_total + rows_per_block - 1) / rows_per_block;

  at::Tensor grad_a = need_grad ? at::empty({rows_total, e}, at::kFloat) : at::Tensor();
  at::Tensor grad_q = at::empty({rows_total}, at::kFloat);
  at::Tensor log_marg = at::zeros({rows_total}, at::kFloat);
  std::vector<at::Tensor> grad_b_parts(at::get_num_threads());
  std::vector<double> joint_parts(blocks, 0.0);
  float* grad_q_ptr = grad_q.data_ptr<float>();
  float* log_marg_ptr = log_marg.data_ptr<float>();

  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    at::Tensor s_buf = at::empty({rows_per_block, n}, at::kFloat);
    at::Tensor scratch = at::empty({n}, at::kFloat);
    at::Tensor& grad_b_part = grad_b_parts[at::get_thread_num()];
    if (need_grad && !grad_b_part.defined()) grad_b_part = at::zeros({n, e}, at::kFloat);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t r0 = blk * rows_per_block, rows = std::min(rows_per_block, rows_total - r0);
      at::Tensor s_blk = s_buf.narrow(0, 0, rows);
      at::mm_out(s_blk, a.narrow(0, r0, rows), b.t());
      s_blk.mul_(scale);
      float* s_ptr = s_blk.data_ptr<float>();
      for (int64_t r = 0; r < rows; ++r) {
        const RowResult row = bound_row(in, s_ptr + r * n, scratch.data_ptr<float>(), n, r0 + r, diag_offset);
        joint_parts[blk] += row.joint;
        log_marg_ptr[r0 + r] = row.log_marg;
        grad_q_ptr[r0 + r] = row.grad_q;
      }
      if (need_grad) {
        grad_a.narrow(0, r0, rows).copy_(at::mm(s_blk, b).mul_(scale));
        grad_b_part.addmm_(s_blk.t(), a.narrow(0, r0, rows), 1.0, scale);
      }
    }
  });

  double joint_sum = 0.0;
  for (double part : joint_parts) joint_sum += part;
  at::Tensor joint = at::scalar_tensor(joint_sum, at::kDouble);
  if (!need_grad) return {joint, log_marg, at::Tensor(), at::Tensor(), at::Tensor()};
  at::Tensor grad_b = at::zeros({n, e}, at::kFloat);
  for (const at::Tensor& part : grad_b_parts)
    if (part.defined()) grad_b.add_(part);
  return {joint, log_marg, grad_a, grad_b, log_q.defined() ? grad_q : at::Tensor()};
}

}  // namespace pykd
