// Routed (mixture-of-experts) linear layer on the CPU (math: pykd/ops/routed_linear.py).
//
// Work walks tiles of FB output features in order. A tile's weight rows are mixed from the E
// experts into an FB x d buffer (rows in parallel; each expert row read once, the full W never
// written), then one GEMM, threaded by the BLAS, produces y[:, tile]. Tiles of 512 rows keep the
// GEMMs large (x is re-read f/FB times, dx updated with inner dimension FB). The backward forms
// the tile's dW = dy[:, tile]^T x first, then one pass over the tile's expert rows mixes W for
// dx, takes d alpha = <dW, W_e> and writes each expert's gradient as a scaled copy of dW: E
// experts cost E streaming passes over their rows, not E GEMMs.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "vec_math.h"

namespace pykd {
namespace {

constexpr int64_t kTileRows = 512;

// Mixing coefficient of expert e for output feature j (layer-wise alpha ignores j).
struct Mixing {
  const float* alpha;
  int64_t num_experts;
  bool neuron_wise;
  float operator()(int64_t j, int64_t e) const { return neuron_wise ? alpha[j * num_experts + e] : alpha[e]; }
};

void axpy(float* y, const float* x, float a, int64_t n) {
  const Vec va(a);
  int64_t k = 0;
  for (; k + Vec::size() <= n; k += Vec::size()) at::vec::fmadd(va, Vec::loadu(x + k), Vec::loadu(y + k)).store(y + k);
  for (; k < n; ++k) y[k] += a * x[k];
}

void scaled_copy(float* y, const float* x, float a, int64_t n) {
  const Vec va(a);
  int64_t k = 0;
  for (; k + Vec::size() <= n; k += Vec::size()) (va * Vec::loadu(x + k)).store(y + k);
  for (; k < n; ++k) y[k] = a * x[k];
}

float dot(const float* x, const float* y, int64_t n) {
  Vec acc(0.f);
  int64_t k = 0;
  for (; k + Vec::size() <= n; k += Vec::size()) acc = at::vec::fmadd(Vec::loadu(x + k), Vec::loadu(y + k), acc);
  float total = horizontal_sum(acc);
  for (; k < n; ++k) total += x[k] * y[k];
  return total;
}

struct Experts {
  at::Tensor w;  // (E, F_max, D_max) fp32
  at::Tensor b;  // (E, F_max) fp32 or undefined
  at::Tensor alpha;
  Mixing mix;
  int64_t f, d;

  const float* row(int64_t e, int64_t j) const {
    return w.data_ptr<float>() + (e * w.size(1) + j) * w.size(2);
  }
};

Experts prepare(const at::Tensor& experts_w, const at::Tensor& alpha, const std::optional<at::Tensor>& experts_b,
                int64_t f, int64_t d) {
  Experts ex;
  ex.w = experts_w.detach().to(at::kFloat).contiguous();
  ex.b = experts_b.has_value() ? experts_b->detach().to(at::kFloat).contiguous() : at::Tensor();
  ex.alpha = alpha.detach().to(at::kFloat).contiguous();
  ex.mix = {ex.alpha.data_ptr<float>(), experts_w.size(0), alpha.dim() == 2};
  ex.f = f;
  ex.d = d;
  return ex;
}

// Row j of W = sum_e alpha W_e[j, :d] into out.
void mix_row(const Experts& ex, int64_t j, float* out) {
  std::fill(out, out + ex.d, 0.f);
  for (int64_t e = 0; e < ex.mix.num_experts; ++e) axpy(out, ex.row(e, j), ex.mix(j, e), ex.d);
}

float mixed_bias(const Experts& ex, int64_t j) {
  float total = 0.f;
  for (int64_t e = 0; e < ex.mix.num_experts; ++e) total += ex.mix(j, e) * ex.b.data_ptr<float>()[e * ex.b.size(1) + j];
  return total;
}

// Zeroes what lies outside the active (f, d) slice of an (E, F_max, D_max) gradient.
void zero_inactive(at::Tensor& grad, int64_t f, int64_t d) {
  if (f < grad.size(1)) grad.narrow(1, f, grad.size(1) - f).zero_();
  if (d < grad.size(2)) grad.narrow(1, 0, f).narrow(2, d, grad.size(2) - d).zero_();
}

}  // namespace

at::Tensor routed_linear_forward(const at::Tensor& x, const at::Tensor& experts_w, const at::Tensor& alpha,
                                 const std::optional<at::Tensor>& experts_b, int64_t f) {
  const at::Tensor xf = x.detach().to(at::kFloat).contiguous();
  const int64_t tokens = xf.size(0), d = xf.size(1);
  const Experts ex = prepare(experts_w, alpha, experts_b, f, d);
  at::Tensor y = at::empty({tokens, f}, at::kFloat);
  at::Tensor tile = at::empty({std::min(kTileRows, f), d}, at::kFloat);
  for (int64_t j0 = 0; j0 < f; j0 += kTileRows) {
    const int64_t rows = std::min(kTileRows, f - j0);
    float* tile_ptr = tile.data_ptr<float>();
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) mix_row(ex, j0 + r, tile_ptr + r * d);
    });
    at::Tensor y_tile = y.narrow(1, j0, rows);
    at::mm_out(y_tile, xf, tile.narrow(0, 0, rows).t());
    if (ex.b.defined()) {
      at::Tensor bias = at::empty({rows}, at::kFloat);
      for (int64_t r = 0; r < rows; ++r) bias.data_ptr<float>()[r] = mixed_bias(ex, j0 + r);
      y_tile.add_(bias);
    }
  }
  return y;
}

// Returns (dx, d experts_w, d alpha, d experts_b); entries not asked for are undefined.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> routed_linear_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& experts_w, const at::Tensor& alpha,
    const std::optional<at::Tensor>& experts_b, int64_t f, bool need_x, bool need_w, bool need_alpha,
    bool need_b) {
  const at::Tensor dy = grad_y.detach().to(at::kFloat).contiguous();
  const at::Tensor xf = x.detach().to(at::kFloat).contiguous();
  const int64_t tokens = xf.size(0), d = xf.size(1), num_experts = experts_w.size(0);
  const Experts ex = prepare(experts_w, alpha, experts_b, f, d);
  const at::Tensor db = dy.sum(0);  // (f)
  const float* db_ptr = db.data_ptr<float>();

  at::Tensor grad_w = need_w ? at::empty(experts_w.sizes(), at::kFloat) : at::Tensor();
  if (need_w) zero_inactive(grad_w, f, d);
  at::Tensor grad_b = need_b && ex.b.defined() ? at::zeros(ex.b.sizes(), at::kFloat) : at::Tensor();
  at::Tensor grad_x = need_x ? at::zeros({tokens, d}, at::kFloat) : at::Tensor();
  at::Tensor grad_alpha_rows = at::zeros({f, num_experts}, at::kFloat);  // layer-wise: summed at the end
  float* grad_alpha_ptr = grad_alpha_rows.data_ptr<float>();
  const int64_t tile_rows = std::min(kTileRows, f);
  at::Tensor tile = at::empty({tile_rows, d}, at::kFloat), grad_tile = at::empty({tile_rows, d}, at::kFloat);

  for (int64_t j0 = 0; j0 < f; j0 += kTileRows) {
    const int64_t rows = std::min(kTileRows, f - j0);
    const at::Tensor dy_tile = dy.narrow(1, j0, rows);
    at::Tensor grad_rows = grad_tile.narrow(0, 0, rows);
    if (need_w || need_alpha) at::mm_out(grad_rows, dy_tile.t(), xf);
    // One pass over the tile's expert rows serves dx's mixed weight, d alpha and d experts.
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t j = j0 + r;
        const float* g = grad_tile.data_ptr<float>() + r * d;
        float* w_row = tile.data_ptr<float>() + r * d;
        if (need_x) std::fill(w_row, w_row + d, 0.f);
        for (int64_t e = 0; e < num_experts; ++e) {
          const float* expert_row = ex.row(e, j);
          const float coef = ex.mix(j, e);
          if (need_x) axpy(w_row, expert_row, coef, d);
          if (need_alpha) {
            const float bias_term = ex.b.defined() ? db_ptr[j] * ex.b.data_ptr<float>()[e * ex.b.size(1) + j] : 0.f;
            grad_alpha_ptr[j * num_experts + e] = dot(g, expert_row, d) + bias_term;
          }
          if (need_w)
            scaled_copy(grad_w.data_ptr<float>() + (e * experts_w.size(1) + j) * experts_w.size(2), g, coef, d);
          if (grad_b.defined()) grad_b.data_ptr<float>()[e * ex.b.size(1) + j] = coef * db_ptr[j];
        }
      }
    });
    if (need_x) grad_x.addmm_(dy_tile, tile.narrow(0, 0, rows));
  }
  at::Tensor grad_alpha;
  if (need_alpha) grad_alpha = alpha.dim() == 2 ? grad_alpha_rows : grad_alpha_rows.sum(0);
  return {grad_x, grad_w, grad_alpha, grad_b};
}

}  // namespace pykd
