// Fused output projection + vocabulary divergence on the CPU (math: pykd/ops/vocab_kd.py).
//
// The selected rows are taken R at a time. Two R x V fp32 strips hold a block's student and
// teacher logits tile-major (tile t's R x w_t block is contiguous, so a GEMM writes it in place);
// no N x V tensor exists. Threads own contiguous ranges of vocabulary tiles:
//   pass 1  Z_s[tile] = H_s W_s[tile]^T + b_s, Z_t[tile] likewise (or gathered from the teacher's
//           logits, or filled from its top-k), and per (row, tile) the maximum, its first word and
//           the sum of the tile's other exponentials; merged per row exactly once all tiles are in
//           (a two-level log-sum-exp with the top word kept apart).
//   pass 2  (reverse_kl, jsd, or no gradient wanted) each row's value, and R or K.
//   pass 3  G[tile] over Z_s[tile] in place, with the row's top word left at 0; then
//           dW_s[tile] += G^T H_s and db_s[tile] += colsum G (rows of dW_s the thread owns) and
//           dH += G W_s[tile] into the thread's buffer.
// Last, each row's top-word component G_sigma = -(sum of its others) is added as a rank-one term.
// The GEMMs are the floor's four (two logit products, two gradient products), run during the
// forward: the backward only scales the saved gradients.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "ids.h"
#include "vec_math.h"

namespace pykd {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

struct Settings {
  VocabDivergence divergence;
  VocabTeacher teacher;
  float inv_t;
  float beta, log_beta, log_one_minus_beta;
  double kd_value, hard_value;  // weights of D and CE in a row's loss
  float grad_kd, grad_hard;     // their coefficients in G: kd_value / (n T) and hard_value / n
  bool hard;                    // a hard-label term
  bool separate_hard;           // T != 1: the hard term has its own normaliser
  double scale;                 // 1 / n
};

struct Tiling {
  int64_t vocab, tile, count;
  int64_t begin(int64_t t) const { return t * tile; }
  int64_t width(int64_t t) const { return std::min(tile, vocab - t * tile); }
};

// A row's maximum over some words, the first word reaching it (a vocabulary index) and the sum of
// e^{(x_v - max) scale} over the other words.
struct TopSplit {
  float max = -kInf;
  int64_t top = -1;
  double rest = 0.0;
};

// The row statistics every later pass reads.
struct RowStats {
  float max_s = 0.f, log_zs = 0.f, log_z1 = 0.f;  // student: max z, log1p(rest) at 1/T and at 1
  int64_t top_s = 0;
  float max_t = 0.f, log_zt = 0.f;  // teacher
  float label_logit = 0.f;
  float aux = 0.f;  // R (reverse_kl) or K (jsd)
};

// sum over j < n of e^{(x_j - m) scale}, the lanes past n of the last vector left out.
float sum_exp(const float* x, int64_t n, float m, float scale) {
  const Vec v_m(m), v_scale(scale);
  Vec acc(0.f);
  for (int64_t j = 0; j < n; j += Vec::size()) {
    const int64_t lanes = std::min<int64_t>(Vec::size(), n - j);
    const Vec e = ((Vec::loadu(x + j, lanes) - v_m) * v_scale).exp_u20();
    acc = acc + (lanes == Vec::size() ? e : Vec::set(Vec(0.f), e, lanes));
  }
  return horizontal_sum(acc);
}

int64_t first_index_of(const float* x, int64_t n, float value) {
  for (int64_t j = 0; j < n; ++j)
    if (x[j] == value) return j;
  return 0;
}

// A tile row's statistics; `offset` turns the top word into a vocabulary index.
TopSplit top_split(const float* x, int64_t n, float scale, int64_t offset) {
  TopSplit s;
  s.max = row_max(x, n);
  if (s.max == -kInf) return s;  // no mass here (a renormalised top-k teacher off its words)
  const int64_t top = first_index_of(x, n, s.max);
  s.top = offset + top;
  s.rest = static_cast<double>(sum_exp(x, top, s.max, scale)) +
           sum_exp(x + top + 1, n - top - 1, s.max, scale);
  return s;
}

// A row's statistics from its tiles': the first tile reaching the maximum holds the top word,
// every other tile joins the rest with all of its mass (1 + rest, rescaled).
TopSplit merge_tiles(const TopSplit* tiles, int64_t count, float scale) {
  int64_t best = -1;
  for (int64_t t = 0; t < count; ++t)
    if (tiles[t].max > (best < 0 ? -kInf : tiles[best].max)) best = t;
  TopSplit row;
  if (best < 0) return row;
  row.max = tiles[best].max;
  row.top = tiles[best].top;
  row.rest = tiles[best].rest;
  for (int64_t t = 0; t < count; ++t)
    if (t != best && tiles[t].max != -kInf)
      row.rest += std::exp(static_cast<double>(tiles[t].max - row.max) * scale) * (1.0 + tiles[t].rest);
  return row;
}

// The rest of a row's mass with the top word's logit (the T = 1 normaliser of the hard term), from
// each tile's rest at scale 1 and its maximum.
double merge_rest(const TopSplit* tiles, const float* rest1, int64_t count, const TopSplit& row) {
  double rest = 0.0;
  for (int64_t t = 0; t < count; ++t) {
    if (tiles[t].top == row.top) rest += rest1[t];
    else rest += std::exp(static_cast<double>(tiles[t].max - row.max)) * (1.0 + rest1[t]);
  }
  return rest;
}

// h_c(x) = log(c e^x + 1 - c), 0 < c < 1, each branch free of cancellation (see the module
// docstring): jsd's log q - log m = -h_beta(log p - log q), log p - log m = -h_{1-beta}(log q - log p).
constexpr float kMixtureSwitch = 30.f;  // beyond, expm1 nears overflow and x dominates log c

struct LogMix {
  float c, log_c, odds;  // c, log c, (1 - c) / c
  Vec operator()(const Vec& x) const {
    const Vec edge(kMixtureSwitch), large = at::vec::maximum(x, edge);
    const Vec below = (Vec(c) * at::vec::minimum(x, edge).expm1()).log1p();
    const Vec above = large + Vec(log_c) + (Vec(odds) * large.neg().exp_u20()).log1p();
    return Vec::blendv(above, below, x <= edge);
  }
};

// Per-word log-probabilities of one tile row.
struct LogProbs {
  Vec ls, lt;
};

struct RowVecs {
  Vec inv_t, max_s, log_zs, max_t, log_zt, log_z1_shift, aux;
  LogMix mix_q, mix_p;  // h_beta and h_{1-beta}
  explicit RowVecs(const Settings& s, const RowStats& r)
      : inv_t(s.inv_t), max_s(r.max_s), log_zs(r.log_zs), max_t(r.max_t), log_zt(r.log_zt),
        log_z1_shift(r.max_s + r.log_z1), aux(r.aux),
        mix_q{s.beta, s.log_beta, (1.f - s.beta) / s.beta},
        mix_p{1.f - s.beta, s.log_one_minus_beta, s.beta / (1.f - s.beta)} {}
  LogProbs at(const Vec& zs, const Vec& zt) const {
    return {(zs - max_s) * inv_t - log_zs, (zt - max_t) * inv_t - log_zt};
  }
  // (log p - log m, log q - log m) of jsd's mixture m = beta p + (1 - beta) q.
  std::pair<Vec, Vec> mixture_ratios(const LogProbs& l) const {
    const Vec x = l.lt - l.ls;
    return {Vec(0.f) - mix_p(Vec(0.f) - x), Vec(0.f) - mix_q(x)};
  }
};

Vec masked(const Vec& x, int64_t lanes) {
  return lanes == Vec::size() ? x : Vec::set(Vec(0.f), x, lanes);
}

// p (log p - log q) etc. with the terms of p = 0 (log p = -inf) set to 0.
Vec where_teacher_mass(const Vec& p, const Vec& term) {
  return Vec::blendv(Vec(0.f), term, p > Vec(0.f));
}

// A tile row's part of D (value) and of R or K (aux).
template <VocabDivergence kDiv>
void value_terms(const float* zs, const float* zt, int64_t n, const Settings& s, const RowVecs& v, double& value,
                 double& aux) {
  Vec acc(0.f), acc_aux(0.f);
  const Vec beta(s.beta), one_minus_beta(1.f - s.beta);
  for (int64_t j = 0; j < n; j += Vec::size()) {
    const int64_t lanes = std::min<int64_t>(Vec::size(), n - j);
    const LogProbs l = v.at(Vec::loadu(zs + j, lanes), Vec::loadu(zt + j, lanes));
    const Vec q = l.ls.exp_u20();
    if constexpr (kDiv == VocabDivergence::kKL) {
      const Vec p = l.lt.exp_u20();
      acc = acc + masked(where_teacher_mass(p, p * (l.lt - l.ls)), lanes);
    } else if constexpr (kDiv == VocabDivergence::kSoftCE) {
      const Vec p = l.lt.exp_u20();
      acc = acc - masked(where_teacher_mass(p, p * l.ls), lanes);
    } else if constexpr (kDiv == VocabDivergence::kReverseKL) {
      acc = acc + masked(q * (l.ls - l.lt), lanes);
    } else {
      const Vec p = l.lt.exp_u20();
      const auto [ratio_p, ratio_q] = v.mixture_ratios(l);
      const Vec kl_qm = masked(q * ratio_q, lanes);
      acc = acc + beta * masked(where_teacher_mass(p, p * ratio_p), lanes) + one_minus_beta * kl_qm;
      acc_aux = acc_aux + kl_qm;
    }
  }
  value += horizontal_sum(acc);
  aux += kDiv == VocabDivergence::kReverseKL ? horizontal_sum(acc) : horizontal_sum(acc_aux);
}

// Writes G over zs for every word of a tile row from the closed forms (the top word and the label
// are fixed by the caller) and adds kl's or soft_ce's value terms when `value` is given.
template <VocabDivergence kDiv>
void gradient_terms(float* zs, const float* zt, int64_t n, const Settings& s, const RowVecs& v, double* value) {
  const Vec grad_kd(s.grad_kd), grad_hard(s.grad_hard), one_minus_beta(1.f - s.beta);
  Vec acc(0.f);
  for (int64_t j = 0; j < n; j += Vec::size()) {
    const int64_t lanes = std::min<int64_t>(Vec::size(), n - j);
    const Vec z = Vec::loadu(zs + j, lanes);
    const LogProbs l = v.at(z, Vec::loadu(zt + j, lanes));
    const Vec q = l.ls.exp_u20();
    Vec g;
    if constexpr (kDiv == VocabDivergence::kKL || kDiv == VocabDivergence::kSoftCE) {
      const Vec p = l.lt.exp_u20();
      g = q - p;
      if (value != nullptr) {
        const Vec term = kDiv == VocabDivergence::kKL ? p * (l.lt - l.ls) : Vec(0.f) - p * l.ls;
        acc = acc + masked(where_teacher_mass(p, term), lanes);
      }
    } else if constexpr (kDiv == VocabDivergence::kReverseKL) {
      g = q * (l.ls - l.lt - v.aux);
    } else {
      g = one_minus_beta * q * (v.mixture_ratios(l).second - v.aux);
    }
    Vec grad = g * grad_kd;
    if (s.hard) grad = at::vec::fmadd(s.separate_hard ? (z - v.log_z1_shift).exp_u20() : q, grad_hard, grad);
    grad.store(zs + j, lanes);
  }
  if (value != nullptr) *value += horizontal_sum(acc);
}

float row_sum(const float* x, int64_t n) {
  Vec acc(0.f);
  for (int64_t j = 0; j < n; j += Vec::size()) acc = acc + Vec::loadu(x + j, std::min<int64_t>(Vec::size(), n - j));
  return horizontal_sum(acc);
}

// One block of rows: its inputs as dense fp32 and the strips' tiles.
struct Block {
  int64_t rows;
  at::Tensor index;   // (rows,) positions in h_s
  at::Tensor hs, ht;  // (rows, d) fp32
  std::vector<int64_t> labels;
  float* strip_s;
  float* strip_t;
  const Tiling* tiling;
  float* tile_s(int64_t t) const { return strip_s + t * rows * tiling->tile; }
  float* tile_t(int64_t t) const { return strip_t + t * rows * tiling->tile; }
};

struct Inputs {
  at::Tensor ws, bs, wt, bt, logits, topk_values, topk_indices, fill, labels;
};

// Splits the tiles into contiguous ranges, one per chunk.
struct Chunks {
  int64_t count, tiles;
  int64_t first(int64_t c) const { return c * tiles / count; }
  int64_t last(int64_t c) const { return (c + 1) * tiles / count; }
};

template <typename Fn>
void for_each_chunk(const Chunks& chunks, const Fn& fn) {
  at::parallel_for(0, chunks.count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) fn(c);
  });
}

at::Tensor tile_tensor(float* data, int64_t rows, int64_t width) {
  return at::from_blob(data, {rows, width}, at::TensorOptions().dtype(at::kFloat));
}

void logits_tile(at::Tensor out, const at::Tensor& h, const at::Tensor& w, const at::Tensor& b, int64_t begin,
                 int64_t width) {
  const at::Tensor w_tile = w.narrow(0, begin, width);
  if (b.defined()) at::addmm_out(out, b.narrow(0, begin, width), h, w_tile.t());
  else at::mm_out(out, h, w_tile.t());
}

// The teacher strip of a top-k teacher: every word at its row's fill logit, then the k values.
void fill_topk_strip(const Block& block, const Inputs& in, const Chunks& chunks) {
  const Tiling& tiling = *block.tiling;
  const at::Tensor fill = in.fill.index_select(0, block.index).contiguous();
  const float* fill_ptr = fill.data_ptr<float>();
  for_each_chunk(chunks, [&](int64_t c) {
    for (int64_t t = chunks.first(c); t < chunks.last(c); ++t) {
      const int64_t width = tiling.width(t);
      for (int64_t r = 0; r < block.rows; ++r) std::fill_n(block.tile_t(t) + r * width, width, fill_ptr[r]);
    }
  });
  const at::Tensor values = in.topk_values.index_select(0, block.index).to(at::kFloat).contiguous();
  const at::Tensor indices = in.topk_indices.index_select(0, block.index).to(at::kLong).contiguous();
  const int64_t k = values.size(1);
  const float* value_ptr = values.data_ptr<float>();
  const int64_t* index_ptr = indices.data_ptr<int64_t>();
  for (int64_t r = 0; r < block.rows; ++r) {
    for (int64_t j = 0; j < k; ++j) {
      const int64_t word = index_ptr[r * k + j], t = word / tiling.tile;
      block.tile_t(t)[r * tiling.width(t) + word - tiling.begin(t)] = value_ptr[r * k + j];
    }
  }
}

struct Pass1 {
  std::vector<TopSplit> student, teacher;  // (rows, tiles)
  std::vector<float> student_rest1;        // the student's rest at scale 1 (separate hard term)
  std::vector<float> label_logit;          // (rows)
};

void run_pass1(const Block& block, const Inputs& in, const Settings& s, const Chunks& chunks, Pass1& out) {
  const Tiling& tiling = *block.tiling;
  for_each_chunk(chunks, [&](int64_t c) {
    for (int64_t t = chunks.first(c); t < chunks.last(c); ++t) {
      const int64_t begin = tiling.begin(t), width = tiling.width(t);
      logits_tile(tile_tensor(block.tile_s(t), block.rows, width), block.hs, in.ws, in.bs, begin, width);
      if (s.teacher == VocabTeacher::kProjected) {
        logits_tile(tile_tensor(block.tile_t(t), block.rows, width), block.ht, in.wt, in.bt, begin, width);
      } else if (s.teacher == VocabTeacher::kLogits) {
        const at::Tensor rows = in.logits.narrow(1, begin, width).index_select(0, block.index);
        tile_tensor(block.tile_t(t), block.rows, width).copy_(rows);
      }
      for (int64_t r = 0; r < block.rows; ++r) {
        const float* zs = block.tile_s(t) + r * width;
        const int64_t slot = r * tiling.count + t;
        out.student[slot] = top_split(zs, width, s.inv_t, begin);
        out.teacher[slot] = top_split(block.tile_t(t) + r * width, width, s.inv_t, begin);
        if (s.separate_hard) {
          const TopSplit& st = out.student[slot];
          const int64_t top = st.top - begin;
          out.student_rest1[slot] = sum_exp(zs, top, st.max, 1.f) + sum_exp(zs + top + 1, width - top - 1, st.max, 1.f);
        }
        if (s.hard) {
          const int64_t label = block.labels[r];
          if (label >= begin && label < begin + width) out.label_logit[r] = zs[label - begin];
        }
      }
    }
  });
}

std::vector<RowStats> merge_rows(const Block& block, const Settings& s, const Pass1& p1) {
  const int64_t tiles = block.tiling->count;
  std::vector<RowStats> stats(block.rows);
  at::parallel_for(0, block.rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const TopSplit student = merge_tiles(&p1.student[r * tiles], tiles, s.inv_t);
      const TopSplit teacher = merge_tiles(&p1.teacher[r * tiles], tiles, s.inv_t);
      RowStats& row = stats[r];
      row.max_s = student.max;
      row.top_s = student.top;
      row.log_zs = static_cast<float>(std::log1p(student.rest));
      row.log_z1 = s.separate_hard
                       ? static_cast<float>(std::log1p(merge_rest(&p1.student[r * tiles], &p1.student_rest1[r * tiles],
                                                                  tiles, student)))
                       : row.log_zs;
      row.max_t = teacher.max;
      row.log_zt = static_cast<float>(std::log1p(teacher.rest));
      row.label_logit = s.hard ? p1.label_logit[r] : 0.f;
    }
  });
  return stats;
}

template <typename Fn>
auto dispatch_divergence(VocabDivergence d, const Fn& fn) {
  switch (d) {
    case VocabDivergence::kKL:
      return fn(std::integral_constant<VocabDivergence, VocabDivergence::kKL>{});
    case VocabDivergence::kSoftCE:
      return fn(std::integral_constant<VocabDivergence, VocabDivergence::kSoftCE>{});
    case VocabDivergence::kReverseKL:
      return fn(std::integral_constant<VocabDivergence, VocabDivergence::kReverseKL>{});
    case VocabDivergence::kJSD:
      return fn(std::integral_constant<VocabDivergence, VocabDivergence::kJSD>{});
  }
  TORCH_CHECK(false, "unknown vocabulary divergence id ", static_cast<int64_t>(d));
}

// Pass 2: each row's D and R or K (aux); the partial sums of chunk c go to slot c * rows + r.
void run_pass2(const Block& block, const Settings& s, const Chunks& chunks, std::vector<RowStats>& stats,
               std::vector<double>& value) {
  const Tiling& tiling = *block.tiling;
  std::vector<double> value_part(chunks.count * block.rows, 0.0), aux_part(chunks.count * block.rows, 0.0);
  dispatch_divergence(s.divergence, [&](auto div) {
    for_each_chunk(chunks, [&](int64_t c) {
      for (int64_t t = chunks.first(c); t < chunks.last(c); ++t) {
        const int64_t width = tiling.width(t);
        for (int64_t r = 0; r < block.rows; ++r) {
          const RowVecs v(s, stats[r]);
          value_terms<decltype(div)::value>(block.tile_s(t) + r * width, block.tile_t(t) + r * width, width, s, v,
                                            value_part[c * block.rows + r], aux_part[c * block.rows + r]);
        }
      }
    });
    return 0;
  });
  for (int64_t r = 0; r < block.rows; ++r) {
    double total = 0.0, aux = 0.0;
    for (int64_t c = 0; c < chunks.count; ++c) {
      total += value_part[c * block.rows + r];
      aux += aux_part[c * block.rows + r];
    }
    value[r] = total;
    stats[r].aux = static_cast<float>(aux);
  }
}

struct Grads {
  at::Tensor dh, dw, db;  // (N, d_s), (V, d_s), (V,) fp32, undefined when not wanted
};

// Pass 3: G tile by tile and its GEMMs, then the rows' top-word components. `value` gets kl's and
// soft_ce's D when `with_value`.
void run_pass3(const Block& block, const Inputs& in, const Settings& s, const Chunks& chunks,
               const std::vector<RowStats>& stats, Grads& grads, bool with_value, std::vector<double>& value) {
  const Tiling& tiling = *block.tiling;
  const int64_t rows = block.rows, width_s = block.hs.size(1);
  std::vector<double> value_part(chunks.count * rows, 0.0), others(chunks.count * rows, 0.0);
  at::Tensor dh_part = grads.dh.defined() ? at::zeros({chunks.count, rows, width_s}, at::kFloat) : at::Tensor();
  dispatch_divergence(s.divergence, [&](auto div) {
    for_each_chunk(chunks, [&](int64_t c) {
      for (int64_t t = chunks.first(c); t < chunks.last(c); ++t) {
        const int64_t begin = tiling.begin(t), width = tiling.width(t);
        for (int64_t r = 0; r < rows; ++r) {
          float* g = block.tile_s(t) + r * width;
          const RowVecs v(s, stats[r]);
          gradient_terms<decltype(div)::value>(g, block.tile_t(t) + r * width, width, s, v,
                                               with_value ? &value_part[c * rows + r] : nullptr);
          const int64_t label = s.hard ? block.labels[r] : -1;
          if (label >= begin && label < begin + width) g[label - begin] -= s.grad_hard;
          const int64_t top = stats[r].top_s;
          if (top >= begin && top < begin + width) g[top - begin] = 0.f;
          others[c * rows + r] += row_sum(g, width);
        }
        const at::Tensor g_tile = tile_tensor(block.tile_s(t), rows, width);
        if (grads.dw.defined()) grads.dw.narrow(0, begin, width).addmm_(g_tile.t(), block.hs);
        if (grads.db.defined()) grads.db.narrow(0, begin, width).add_(g_tile.sum(0));
        if (dh_part.defined()) dh_part[c].addmm_(g_tile, in.ws.narrow(0, begin, width));
      }
    });
    return 0;
  });
  at::Tensor dh_rows = dh_part.defined() ? dh_part.sum(0) : at::Tensor();
  const float* hs = block.hs.data_ptr<float>();
  const float* ws = in.ws.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    double sum = 0.0;
    for (int64_t c = 0; c < chunks.count; ++c) {
      sum += others[c * rows + r];
      if (with_value) value[r] += value_part[c * rows + r];
    }
    const float g_top = static_cast<float>(-sum);
    const int64_t top = stats[r].top_s;
    if (dh_rows.defined()) {
      float* dh = dh_rows.data_ptr<float>() + r * width_s;
      for (int64_t k = 0; k < width_s; ++k) dh[k] += g_top * ws[top * width_s + k];
    }
    if (grads.dw.defined()) {
      float* dw = grads.dw.data_ptr<float>() + top * width_s;
      for (int64_t k = 0; k < width_s; ++k) dw[k] += g_top * hs[r * width_s + k];
    }
    if (grads.db.defined()) grads.db.data_ptr<float>()[top] += g_top;
  }
  if (dh_rows.defined()) grads.dh.index_copy_(0, block.index, dh_rows);
}

Settings make_settings(int64_t divergence_id, int64_t teacher_id, double beta, double temperature, double kd_value,
                       double hard_value, double scale) {
  TORCH_CHECK(known_id(kVocabDivergenceNames, divergence_id), "unknown vocabulary divergence id ", divergence_id);
  TORCH_CHECK(known_id(kVocabTeacherNames, teacher_id), "unknown vocabulary teacher id ", teacher_id);
  TORCH_CHECK(temperature > 0, "temperature must be positive, got ", temperature);
  Settings s;
  s.divergence = static_cast<VocabDivergence>(divergence_id);
  s.teacher = static_cast<VocabTeacher>(teacher_id);
  s.inv_t = static_cast<float>(1.0 / temperature);
  s.beta = static_cast<float>(beta);
  // Only jsd reads these, with 0 < beta < 1.
  s.log_beta = beta > 0 ? static_cast<float>(std::log(beta)) : 0.f;
  s.log_one_minus_beta = beta < 1 ? static_cast<float>(std::log1p(-beta)) : 0.f;
  s.kd_value = kd_value;
  s.hard_value = hard_value;
  s.scale = scale;
  s.grad_kd = static_cast<float>(scale * kd_value / temperature);
  s.grad_hard = static_cast<float>(scale * hard_value);
  s.hard = hard_value != 0.0;
  s.separate_hard = s.hard && temperature != 1.0;
  return s;
}

at::Tensor optional_float(const std::optional<at::Tensor>& x) {
  return x.has_value() ? x->detach().to(at::kFloat).contiguous() : at::Tensor();
}

at::Tensor optional_detached(const std::optional<at::Tensor>& x) {
  return x.has_value() ? x->detach() : at::Tensor();
}

}  // namespace

// Returns (loss, dL/dh_s, dL/dw_s, dL/db_s); a gradient not asked for is undefined.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> vocab_kd_forward(
    const at::Tensor& h_s, const at::Tensor& w_s, const std::optional<at::Tensor>& b_s, int64_t teacher_id,
    const std::optional<at::Tensor>& h_t, const std::optional<at::Tensor>& w_t, const std::optional<at::Tensor>& b_t,
    const std::optional<at::Tensor>& teacher_logits, const std::optional<at::Tensor>& topk_values,
    const std::optional<at::Tensor>& topk_indices, const std::optional<at::Tensor>& topk_fill, const at::Tensor& rows,
    const std::optional<at::Tensor>& labels, int64_t divergence_id, double beta, double temperature, double kd_value,
    double hard_value, double scale, bool need_h, bool need_w, bool need_b, int64_t block_rows, int64_t tile_words) {
  TORCH_CHECK(h_s.device().is_cpu(), "vocab_kd_forward: CPU tensors expected");
  TORCH_CHECK(block_rows >= 1 && tile_words >= 1, "vocab_kd_forward: block_rows and tile_words must be positive");
  const Settings s = make_settings(divergence_id, teacher_id, beta, temperature, kd_value, hard_value, scale);
  TORCH_CHECK(!s.hard || labels.has_value(), "vocab_kd_forward: a hard-label term needs labels");
  const int64_t vocab = w_s.size(0), width_s = h_s.size(1);
  Inputs in;
  in.ws = w_s.detach().to(at::kFloat).contiguous();  // once: W is read by every block
  in.bs = optional_float(b_s);
  if (s.teacher == VocabTeacher::kProjected) {
    in.wt = optional_float(w_t);
    in.bt = optional_float(b_t);
    TORCH_CHECK(in.wt.defined() && h_t.has_value(), "vocab_kd_forward: a projected teacher needs h_t and w_t");
  } else if (s.teacher == VocabTeacher::kLogits) {
    TORCH_CHECK(teacher_logits.has_value(), "vocab_kd_forward: teacher_logits missing");
    in.logits = teacher_logits->detach();
  } else {
    TORCH_CHECK(topk_values.has_value() && topk_indices.has_value() && topk_fill.has_value(),
                "vocab_kd_forward: a top-k teacher needs values, indices and fill");
    in.topk_values = topk_values->detach();
    in.topk_indices = topk_indices->detach();
    in.fill = topk_fill->detach().to(at::kFloat);
  }
  const at::Tensor row_index = rows.to(at::kLong);
  const at::Tensor hs_all = h_s.detach(), ht_all = optional_detached(h_t);
  const at::Tensor label_all = labels.has_value() ? labels->detach().to(at::kLong) : at::Tensor();

  Grads grads;
  if (need_h) grads.dh = at::zeros({h_s.size(0), width_s}, at::kFloat);
  if (need_w) grads.dw = at::zeros({vocab, width_s}, at::kFloat);
  if (need_b) grads.db = at::zeros({vocab}, at::kFloat);
  const bool need_grad = need_h || need_w || need_b;
  const int64_t n_rows = row_index.size(0);
  if (n_rows == 0) return {at::zeros({}, at::kFloat), grads.dh, grads.dw, grads.db};

  const Tiling tiling{vocab, tile_words, (vocab + tile_words - 1) / tile_words};
  const Chunks chunks{std::min<int64_t>(at::get_num_threads(), tiling.count), tiling.count};
  const int64_t strip_rows = std::min(block_rows, n_rows);
  std::vector<float> strip_s(strip_rows * vocab), strip_t(strip_rows * vocab);
  const bool with_pass2 = !need_grad || s.divergence == VocabDivergence::kReverseKL ||
                          s.divergence == VocabDivergence::kJSD;
  double total = 0.0;
  for (int64_t r0 = 0; r0 < n_rows; r0 += strip_rows) {
    Block block;
    block.rows = std::min(strip_rows, n_rows - r0);
    block.index = row_index.narrow(0, r0, block.rows);
    block.hs = hs_all.index_select(0, block.index).to(at::kFloat).contiguous();
    if (s.teacher == VocabTeacher::kProjected)
      block.ht = ht_all.index_select(0, block.index).to(at::kFloat).contiguous();
    if (s.hard) {
      const at::Tensor l = label_all.index_select(0, block.index).contiguous();
      block.labels.assign(l.data_ptr<int64_t>(), l.data_ptr<int64_t>() + block.rows);
    }
    block.strip_s = strip_s.data();
    block.strip_t = strip_t.data();
    block.tiling = &tiling;
    if (s.teacher == VocabTeacher::kTopK) fill_topk_strip(block, in, chunks);

    Pass1 p1;
    p1.student.resize(block.rows * tiling.count);
    p1.teacher.resize(block.rows * tiling.count);
    if (s.separate_hard) p1.student_rest1.resize(block.rows * tiling.count);
    p1.label_logit.assign(block.rows, 0.f);
    run_pass1(block, in, s, chunks, p1);
    std::vector<RowStats> stats = merge_rows(block, s, p1);
    std::vector<double> value(block.rows, 0.0);
    if (with_pass2) run_pass2(block, s, chunks, stats, value);
    if (need_grad) run_pass3(block, in, s, chunks, stats, grads, !with_pass2, value);
    for (int64_t r = 0; r < block.rows; ++r) {
      total += s.kd_value * value[r];
      if (s.hard)  // CE = (max z - z_y) + log1p(rest at T = 1)
        total += s.hard_value * (static_cast<double>(stats[r].max_s) - stats[r].label_logit + stats[r].log_z1);
    }
  }
  return {at::scalar_tensor(total * s.scale, at::kFloat), grads.dh, grads.dw, grads.db};
}

}  // namespace pykd
