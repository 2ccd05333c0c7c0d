// Fused attention-relation distillation loss on the CPU (math: pykd/ops/attention_relation.py).
//
// Padding is removed up front: each example's valid tokens are gathered into dense (n_b, D)
// fp32 matrices, so no masked score is ever computed. Work is split into tasks of
// (example, relation head, row range); a task walks its rows in blocks of BR rows:
//   T = Xt Yt^T, S = Xs Ys^T             two GEMMs into BR x n_b buffers (never L x L)
//   one fused pass per row               softmaxes, loss and G = dL/dS, written over S
//   dXs[rows] = G Ys, dYs += G^T Xs      two GEMMs, so forward and backward cost four GEMMs
// The student gradient is produced during the forward (Liger's trick): recomputing the tiles
// in a separate backward would cost two more GEMMs and a second pass over the scores.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "ids.h"
#include "vec_math.h"

namespace pykd {
namespace {

// Scores per buffer in a row block; two buffers stay resident in a core's L2.
constexpr int64_t kBlockScores = 1 << 15;

int64_t block_rows(int64_t n_keys) {
  return std::clamp<int64_t>(kBlockScores / n_keys, 16, 256);
}

struct RowSoftmax {
  float log_zt;  // log of sum_j exp(t_j - max t)
  float log_zs;
  float inv_zt;
  float inv_zs;
  float cross;  // sum_j e_t,j * (a_j - b_j) for KL, sum_j e_t,j * b_j for CE (a, b: max-shifted scores)
};

// Replaces raw dot products t, s (row of n) by e_t = exp(scale_t t - max), e_s likewise.
RowSoftmax exponentiate_row(float* t, float* s, int64_t n, float scale_t, float scale_s, bool ce) {
  const float max_t = scale_t * row_max(t, n);
  const float max_s = scale_s * row_max(s, n);
  const Vec v_scale_t(scale_t), v_scale_s(scale_s), v_max_t(max_t), v_max_s(max_s);
  Vec zt(0.f), zs(0.f), cross(0.f);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    const Vec shifted_t = Vec::loadu(t + j) * v_scale_t - v_max_t;
    const Vec shifted_s = Vec::loadu(s + j) * v_scale_s - v_max_s;
    const Vec et = shifted_t.exp_u20();
    const Vec es = shifted_s.exp_u20();
    zt = zt + et;
    zs = zs + es;
    cross = at::vec::fmadd(et, ce ? shifted_s : shifted_t - shifted_s, cross);
    et.store(t + j);
    es.store(s + j);
  }
  float sum_t = horizontal_sum(zt), sum_s = horizontal_sum(zs), sum_cross = horizontal_sum(cross);
  for (; j < n; ++j) {
    const float shifted_t = t[j] * scale_t - max_t;
    const float shifted_s = s[j] * scale_s - max_s;
    const float et = std::exp(shifted_t);
    const float es = std::exp(shifted_s);
    sum_t += et;
    sum_s += es;
    sum_cross += et * (ce ? shifted_s : shifted_t - shifted_s);
    t[j] = et;
    s[j] = es;
  }
  return {std::log(sum_t), std::log(sum_s), 1.f / sum_t, 1.f / sum_s, sum_cross};
}

// KL(p||q) = sum_j p_j (a_j - b_j) - log Zt + log Zs; CE = -sum_j p_j b_j + log Zs.
// dL/ds_j = c (q_j - p_j), written over s already multiplied by scale_s.
float kl_ce_row(float* t, float* s, int64_t n, float scale_t, float scale_s, float weight, bool ce,
                bool need_grad) {
  const RowSoftmax r = exponentiate_row(t, s, n, scale_t, scale_s, ce);
  const float loss = ce ? -r.cross * r.inv_zt + r.log_zs : r.cross * r.inv_zt - r.log_zt + r.log_zs;
  if (need_grad) {
    const float coef_q = weight * scale_s * r.inv_zs, coef_p = weight * scale_s * r.inv_zt;
    const Vec v_q(coef_q), v_p(coef_p);
    int64_t j = 0;
    for (; j + Vec::size() <= n; j += Vec::size())
      (Vec::loadu(s + j) * v_q - Vec::loadu(t + j) * v_p).store(s + j);
    for (; j < n; ++j) s[j] = s[j] * coef_q - t[j] * coef_p;
  }
  return weight * loss;
}

// sum_j (q_j - p_j)^2 and dL/ds_j = 2c q_j D_j in the stable form of the op's docstring: with m the
// student's peak, d_m from the complements 1 - q_m, 1 - p_m when q_m + p_m > 1, R = sum_{k != m} q_k d_k,
// D_m = (1 - q_m) d_m - R and D_j = d_j - (q_m d_m + R) elsewhere. The peak leaves the vector loops
// (its exps set to 0 add nothing to any sum and get G = 0 there) and is handled on its own.
float mse_prob_row(float* t, float* s, int64_t n, float scale_t, float scale_s, float weight, bool need_grad) {
  const int64_t peak = first_argmax(s, n);
  const RowSoftmax r = exponentiate_row(t, s, n, scale_t, scale_s, /*ce=*/false);
  const float e_s_peak = s[peak], e_t_peak = t[peak];
  s[peak] = 0.f;
  t[peak] = 0.f;
  const Vec v_inv_zt(r.inv_zt), v_inv_zs(r.inv_zs);
  Vec sq(0.f), qd(0.f), rest_s(0.f), rest_t(0.f);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    const Vec e_s = Vec::loadu(s + j), e_t = Vec::loadu(t + j);
    const Vec q = e_s * v_inv_zs;
    const Vec d = q - e_t * v_inv_zt;
    sq = at::vec::fmadd(d, d, sq);
    qd = at::vec::fmadd(d, q, qd);
    rest_s = rest_s + e_s;
    rest_t = rest_t + e_t;
  }
  float sum_sq = horizontal_sum(sq), rest = horizontal_sum(qd);
  float sum_rest_s = horizontal_sum(rest_s), sum_rest_t = horizontal_sum(rest_t);
  for (int64_t k = j; k < n; ++k) {
    const float q = s[k] * r.inv_zs, d = q - t[k] * r.inv_zt;
    sum_sq += d * d;
    rest += d * q;
    sum_rest_s += s[k];
    sum_rest_t += t[k];
  }
  const float q_peak = e_s_peak * r.inv_zs, p_peak = e_t_peak * r.inv_zt;
  const float q_rest = sum_rest_s * r.inv_zs, p_rest = sum_rest_t * r.inv_zt;  // 1 - q_m, 1 - p_m
  const float d_peak = q_peak + p_peak > 1.f ? p_rest - q_rest : q_peak - p_peak;
  if (need_grad) {
    const float coef = 2.f * weight * scale_s, delta = q_peak * d_peak + rest;
    const Vec v_coef(coef), v_delta(delta);
    for (j = 0; j + Vec::size() <= n; j += Vec::size()) {
      const Vec q = Vec::loadu(s + j) * v_inv_zs;
      const Vec d = q - Vec::loadu(t + j) * v_inv_zt;
      (v_coef * q * (d - v_delta)).store(s + j);
    }
    for (; j < n; ++j) {
      const float q = s[j] * r.inv_zs, d = q - t[j] * r.inv_zt;
      s[j] = coef * q * (d - delta);
    }
    s[peak] = coef * q_peak * (q_rest * d_peak - rest);
  }
  return weight * (sum_sq + d_peak * d_peak);
}

// sum_j (scale_s s_j - scale_t t_j)^2; dL/ds_j = 2c (scale_s s_j - scale_t t_j).
float mse_logit_row(const float* t, float* s, int64_t n, float scale_t, float scale_s, float weight,
                    bool need_grad) {
  const Vec v_scale_t(scale_t), v_scale_s(scale_s), v_coef(2.f * weight * scale_s);
  Vec sq(0.f);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    const Vec d = Vec::loadu(s + j) * v_scale_s - Vec::loadu(t + j) * v_scale_t;
    sq = at::vec::fmadd(d, d, sq);
    if (need_grad) (d * v_coef).store(s + j);
  }
  float sum_sq = horizontal_sum(sq);
  for (; j < n; ++j) {
    const float d = s[j] * scale_s - t[j] * scale_t;
    sum_sq += d * d;
    if (need_grad) s[j] = 2.f * weight * scale_s * d;
  }
  return weight * sum_sq;
}

float loss_row(RelationLoss loss, float* t, float* s, int64_t n, float scale_t, float scale_s, float weight,
               bool need_grad) {
  switch (loss) {
    case RelationLoss::kKL:
      return kl_ce_row(t, s, n, scale_t, scale_s, weight, /*ce=*/false, need_grad);
    case RelationLoss::kCE:
      return kl_ce_row(t, s, n, scale_t, scale_s, weight, /*ce=*/true, need_grad);
    case RelationLoss::kMseProb:
      return mse_prob_row(t, s, n, scale_t, scale_s, weight, need_grad);
    case RelationLoss::kMseLogit:
      return mse_logit_row(t, s, n, scale_t, scale_s, weight, need_grad);
  }
  TORCH_CHECK(false, "unknown relation loss id ", static_cast<int64_t>(loss));
}

// One example with padding removed: rows of the four operands as dense fp32 (n, D) matrices.
struct Example {
  at::Tensor token_index;  // positions of the valid tokens; undefined when there is no mask
  at::Tensor xt, yt, xs, ys;
  at::Tensor grad_xs, grad_ys;
  int64_t n;
};

// Detached: worker threads of parallel_for run with grad mode on, and the GEMMs write into out=.
at::Tensor dense_rows(const at::Tensor& x, int64_t b, const at::Tensor& token_index) {
  const at::Tensor example = x.detach()[b];
  at::Tensor rows = token_index.defined() ? example.index_select(0, token_index) : example;
  return rows.to(at::kFloat).contiguous();
}

// grad_a, grad_b: the (B, L, D_s) outputs; without a mask each example's gradient is a view of
// them, so the kernel writes the result in place instead of scattering a copy.
std::vector<Example> gather_examples(const at::Tensor& t_a, const at::Tensor& t_b, const at::Tensor& s_a,
                                     const at::Tensor& s_b, const std::optional<at::Tensor>& mask,
                                     const at::Tensor& grad_a, const at::Tensor& grad_b) {
  const int64_t batch = t_a.size(0);
  std::vector<Example> examples(batch);
  for (int64_t b = 0; b < batch; ++b) {
    Example& ex = examples[b];
    if (mask.has_value()) ex.token_index = at::nonzero((*mask)[b]).squeeze(1);
    ex.n = ex.token_index.defined() ? ex.token_index.size(0) : t_a.size(1);
    TORCH_CHECK(ex.n > 0, "mask: example ", b, " has no valid token");
    ex.xt = dense_rows(t_a, b, ex.token_index);
    // A self-relation passes one tensor twice: gather it once.
    ex.yt = t_b.is_same(t_a) ? ex.xt : dense_rows(t_b, b, ex.token_index);
    ex.xs = dense_rows(s_a, b, ex.token_index);
    ex.ys = s_b.is_same(s_a) ? ex.xs : dense_rows(s_b, b, ex.token_index);
    if (grad_a.defined()) {
      ex.grad_xs = ex.token_index.defined() ? at::zeros_like(ex.xs) : grad_a[b];
      ex.grad_ys = ex.token_index.defined() ? at::zeros_like(ex.ys) : grad_b[b];
    }
  }
  return examples;
}

struct RowTask {
  int64_t example, head, row_begin, row_end;
  at::Tensor grad_ys_partial;  // defined when the head's rows are split over several tasks
};

// Splits (example, head) work further by rows only when there are fewer pairs than threads;
// split tasks accumulate dYs into private buffers so no two threads write the same memory.
std::vector<RowTask> plan_tasks(const std::vector<Example>& examples, int64_t heads, int64_t ds, bool need_grad) {
  const int64_t pairs = static_cast<int64_t>(examples.size()) * heads;
  const int64_t threads = at::get_num_threads();
  std::vector<RowTask> tasks;
  for (int64_t b = 0; b < static_cast<int64_t>(examples.size()); ++b) {
    const int64_t n = examples[b].n;
    const int64_t max_chunks = (n + block_rows(n) - 1) / block_rows(n);
    const int64_t chunks = std::min(max_chunks, (threads + pairs - 1) / pairs);
    const int64_t rows_per_chunk = (n + chunks - 1) / chunks;
    for (int64_t a = 0; a < heads; ++a) {
      for (int64_t r = 0; r < n; r += rows_per_chunk) {
        RowTask task{b, a, r, std::min(n, r + rows_per_chunk), at::Tensor()};
        if (need_grad && chunks > 1) task.grad_ys_partial = at::zeros({n, ds}, at::kFloat);
        tasks.push_back(std::move(task));
      }
    }
  }
  return tasks;
}

double run_task(const RowTask& task, std::vector<Example>& examples, RelationLoss loss, int64_t dt, int64_t ds,
                float scale_t, float scale_s, float weight, bool need_grad) {
  Example& ex = examples[task.example];
  const at::Tensor xt = ex.xt.narrow(1, task.head * dt, dt), yt = ex.yt.narrow(1, task.head * dt, dt);
  const at::Tensor xs = ex.xs.narrow(1, task.head * ds, ds), ys = ex.ys.narrow(1, task.head * ds, ds);
  at::Tensor grad_ys = task.grad_ys_partial.defined() ? task.grad_ys_partial
                       : need_grad                    ? ex.grad_ys.narrow(1, task.head * ds, ds)
                                                      : at::Tensor();
  const int64_t n = ex.n, rows_max = block_rows(n);
  at::Tensor t_buf = at::empty({rows_max, n}, at::kFloat), s_buf = at::empty({rows_max, n}, at::kFloat);
  double total = 0.0;
  for (int64_t r = task.row_begin; r < task.row_end; r += rows_max) {
    const int64_t rows = std::min(rows_max, task.row_end - r);
    at::Tensor t_blk = t_buf.narrow(0, 0, rows), s_blk = s_buf.narrow(0, 0, rows);
    at::mm_out(t_blk, xt.narrow(0, r, rows), yt.t());
    at::mm_out(s_blk, xs.narrow(0, r, rows), ys.t());
    float* t_ptr = t_blk.data_ptr<float>();
    float* s_ptr = s_blk.data_ptr<float>();
    for (int64_t i = 0; i < rows; ++i)
      total += loss_row(loss, t_ptr + i * n, s_ptr + i * n, n, scale_t, scale_s, weight, need_grad);
    if (need_grad) {
      at::Tensor grad_xs_rows = ex.grad_xs.narrow(0, r, rows).narrow(1, task.head * ds, ds);
      grad_xs_rows.copy_(at::mm(s_blk, ys));
      grad_ys.addmm_(s_blk.t(), xs.narrow(0, r, rows));
    }
  }
  return total;
}

// Per-row weight c: MiniLMv2's 1/(B A_r n_b) for KL and CE, one global mean for the MSE losses.
std::vector<float> row_weights(const std::vector<Example>& examples, int64_t heads, RelationLoss loss) {
  std::vector<float> weights(examples.size());
  const double batch = static_cast<double>(examples.size());
  double valid_entries = 0.0;
  for (const Example& ex : examples) valid_entries += static_cast<double>(ex.n) * ex.n;
  for (size_t b = 0; b < examples.size(); ++b) {
    const bool mean_over_rows = loss == RelationLoss::kKL || loss == RelationLoss::kCE;
    weights[b] = mean_over_rows ? 1.0 / (batch * heads * examples[b].n) : 1.0 / (heads * valid_entries);
  }
  return weights;
}

void scatter_rows(const std::vector<Example>& examples, at::Tensor Example::*grad, at::Tensor& out) {
  for (size_t b = 0; b < examples.size(); ++b)
    if (examples[b].token_index.defined()) out[b].index_copy_(0, examples[b].token_index, examples[b].*grad);
}

}  // namespace

// Returns (loss, dL/ds_a, dL/ds_b); the gradients are undefined when need_grad is false.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_relation_forward(
    const at::Tensor& t_a, const at::Tensor& t_b, const at::Tensor& s_a, const at::Tensor& s_b,
    const std::optional<at::Tensor>& mask, int64_t heads, int64_t loss_id, double scale_t, double scale_s,
    bool need_grad) {
  TORCH_CHECK(t_a.device().is_cpu(), "attention_relation_forward: CPU tensors expected");
  TORCH_CHECK(known_id(kRelationLossNames, loss_id), "unknown relation loss id ", loss_id);
  const RelationLoss loss = static_cast<RelationLoss>(loss_id);
  const int64_t dt = t_a.size(2) / heads, ds = s_a.size(2) / heads;
  at::Tensor grad_a, grad_b;
  if (need_grad) {
    grad_a = at::zeros(s_a.sizes(), s_a.options().dtype(at::kFloat));
    grad_b = at::zeros(s_b.sizes(), s_b.options().dtype(at::kFloat));
  }
  std::vector<Example> examples = gather_examples(t_a, t_b, s_a, s_b, mask, grad_a, grad_b);
  std::vector<RowTask> tasks = plan_tasks(examples, heads, ds, need_grad);
  const std::vector<float> weights = row_weights(examples, heads, loss);
  std::vector<double> task_loss(tasks.size(), 0.0);
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k)
      task_loss[k] = run_task(tasks[k], examples, loss, dt, ds, static_cast<float>(scale_t),
                              static_cast<float>(scale_s), weights[tasks[k].example], need_grad);
  });
  double total = 0.0;
  for (double part : task_loss) total += part;
  at::Tensor loss_value = at::scalar_tensor(total, at::kFloat);
  if (!need_grad) return {loss_value, at::Tensor(), at::Tensor()};
  for (const RowTask& task : tasks)
    if (task.grad_ys_partial.defined())
      examples[task.example].grad_ys.narrow(1, task.head * ds, ds).add_(task.grad_ys_partial);
  scatter_rows(examples, &Example::grad_xs, grad_a);
  scatter_rows(examples, &Example::grad_ys, grad_b);
  return {loss_value, grad_a, grad_b};
}

}  // namespace pykd
