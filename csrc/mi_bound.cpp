// Fused MI lower bounds on the CPU (math and gradient formulas: pykd/ops/mi_bound.py).
//
// Threads take contiguous ranges of row blocks. For a block of BR rows:
//   S = scale * A[rows] B^T               one GEMM into a BR x n buffer (never n x n)
//   per row: reductions, then G = dI/dS   written over S, all gradients row-local
//   dA[rows] = scale G B, dB += scale G^T A[rows]   (dB into the thread's own buffer)
// The bound's value needs one global reduction (across ranks too when b is gathered): the
// kernel returns the per-row terms and pykd/ops/mi_bound.py combines them.
// Off-diagonal reductions run over the two ranges beside the diagonal instead of subtracting
// the diagonal afterwards, which would cancel catastrophically when the positive dominates.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "vec_math.h"

namespace pykd {
namespace {

enum class Bound : int64_t { kInfoNCE = 0, kNWJ = 1, kTUBA = 2, kJS = 3, kAlpha = 4 };

constexpr int64_t kBlockScores = 1 << 15;
const float kLogEMinus1 = std::log(std::exp(1.0f) - 1.0f);  // the notebook's value where d = 0

// The same element math for scalars (row tails, the diagonal) and vectors.
inline float v_exp(float x) { return std::exp(x); }
inline Vec v_exp(const Vec& x) { return x.exp_u20(); }
inline float v_expm1(float x) { return std::expm1(x); }
inline Vec v_expm1(const Vec& x) { return x.expm1(); }
inline float v_log(float x) { return std::log(x); }
inline Vec v_log(const Vec& x) { return x.log(); }
inline float v_log1p(float x) { return std::log1p(x); }
inline Vec v_log1p(const Vec& x) { return x.log1p(); }
inline float v_max(float x, float y) { return std::max(x, y); }
inline Vec v_max(const Vec& x, const Vec& y) { return at::vec::maximum(x, y); }
inline float v_min(float x, float y) { return std::min(x, y); }
inline Vec v_min(const Vec& x, const Vec& y) { return at::vec::minimum(x, y); }
inline float where_zero(float d, float if_zero, float otherwise) { return d == 0.f ? if_zero : otherwise; }
inline Vec where_zero(const Vec& d, const Vec& if_zero, const Vec& otherwise) {
  return Vec::blendv(otherwise, if_zero, d == Vec(0.f));
}

template <typename T>
T sigmoid(T x) {
  return T(1.f) / (T(1.f) + v_exp(T(0.f) - x));
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
  const float max_all = std::max(max_off, s[i]);
  const float all = off * std::exp(max_off - max_all) + std::exp(s[i] - max_all);
  return {max_all + std::log(all), max_off + std::log(off)};
}

// Leave-one-out baseline m_j and its interpolation u_j with the log-baseline q, for one entry.
struct AlphaConst {
  float alpha, log_alpha, log_one_minus_alpha, log_n1;
};

template <typename T>
struct LooTerms {
  T u, w, r;  // u = log(alpha e^m + (1-alpha) e^q), w = du/dm, r = 1/(1 - p) (0 where d = 0)
};

template <typename T>
LooTerms<T> loo_terms(const T& s, float lse, float q, const AlphaConst& k) {
  const T d = T(lse) - s;
  const T one_minus_p = T(0.f) - v_expm1(T(0.f) - d);
  const T m = where_zero(d, s + T(kLogEMinus1 - k.log_n1), T(lse - k.log_n1) + v_log(one_minus_p));
  const T r = where_zero(d, T(0.f), T(1.f) / one_minus_p);
  if (k.alpha == 0.f) return {T(q), T(0.f), r};
  if (k.alpha == 1.f) return {m, T(1.f), r};
  const T z = m + T(k.log_alpha), y = T(q + k.log_one_minus_alpha);
  const T hi = v_max(z, y), lo = v_min(z, y);
  return {hi + v_log1p(v_exp(lo - hi)), sigmoid(z - y), r};
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
  const double joint = s[i] - sums.lse;
  for_each_vec(s, 0, n, [&](const Vec& v, int64_t j, int lanes) {
    (Vec(-inv_n) * v_exp(v - Vec(sums.lse))).store(s + j, lanes);
  });
  s[i] += inv_n;
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

RowResult alpha_row(float* s, float* scratch, int64_t n, int64_t i, float q, const AlphaConst& k) {
  const RowSums sums = row_sums(s, n, i);
  const float pairs = static_cast<float>(n) * (n - 1);
  Vec sum_u(0.f), sum_wr(0.f), sum_one_minus_w(0.f);
  auto off_diagonal = [&](const Vec& v, int64_t j, int lanes) {
    const LooTerms<Vec> t = loo_terms(v, sums.lse, q, k);
    sum_u = sum_u + real_lanes(t.u, lanes);
    sum_wr = sum_wr + real_lanes(t.w * t.r, lanes);
    sum_one_minus_w = sum_one_minus_w + real_lanes(Vec(1.f) - t.w, lanes);
    (t.w * (Vec(1.f) - t.r)).store(scratch + j, lanes);
  };
  for_each_vec(s, 0, i, off_diagonal);
  for_each_vec(s, i + 1, n, off_diagonal);
  const LooTerms<float> diag = loo_terms(s[i], sums.lse, q, k);
  const float big_q = horizontal_sum(sum_wr);
  const float marg = std::exp(sums.log_off - diag.u);  // M_i
  const float c = std::exp(sums.lse - diag.u), big_k = marg * diag.w;
  const float coef = big_q + c - big_k * diag.r;
  const float diag_score = s[i];
  const float inv_pairs = 1.f / pairs;
  for_each_vec(s, 0, n, [&](const Vec& v, int64_t j, int lanes) {
    const Vec p = v_exp(v - Vec(sums.lse));
    (Vec(-inv_pairs) * (Vec::loadu(scratch + j, lanes) + p * Vec(coef))).store(s + j, lanes);
  });
  const float p_ii = std::exp(diag_score - sums.lse);
  s[i] = ((n - 1) - p_ii * big_q + big_k * (1.f - diag.r + diag.r * p_ii)) * inv_pairs;
  const double joint = static_cast<double>(n - 1) * diag_score - horizontal_sum(sum_u);
  const float grad_q = (-horizontal_sum(sum_one_minus_w) + marg * (1.f - diag.w)) * inv_pairs;
  return {joint, sums.log_off - diag.u, grad_q};
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
  TORCH_CHECK(bound_id >= 0 && bound_id <= 4, "unknown bound id ", bound_id);
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
