// Python bindings of pykd._C; each op's math lives in its Python module's docstring.
#include <torch/extension.h>

#include "ids.h"

namespace pykd {
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_relation_forward(
    const at::Tensor& t_a, const at::Tensor& t_b, const at::Tensor& s_a, const at::Tensor& s_b,
    const std::optional<at::Tensor>& mask, int64_t heads, int64_t loss_id, double scale_t, double scale_s,
    bool need_grad);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mi_bound_forward(
    const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& log_q, int64_t bound_id,
    double alpha, double scale, bool need_grad, int64_t diag_offset);
at::Tensor routed_linear_forward(const at::Tensor& x, const at::Tensor& experts_w, const at::Tensor& alpha,
                                 const std::optional<at::Tensor>& experts_b, int64_t f);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> routed_linear_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& experts_w, const at::Tensor& alpha,
    const std::optional<at::Tensor>& experts_b, int64_t f, bool need_x, bool need_w, bool need_alpha,
    bool need_b);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> vocab_kd_forward(
    const at::Tensor& h_s, const at::Tensor& w_s, const std::optional<at::Tensor>& b_s, int64_t teacher_id,
    const std::optional<at::Tensor>& h_t, const std::optional<at::Tensor>& w_t, const std::optional<at::Tensor>& b_t,
    const std::optional<at::Tensor>& teacher_logits, const std::optional<at::Tensor>& topk_values,
    const std::optional<at::Tensor>& topk_indices, const std::optional<at::Tensor>& topk_fill, const at::Tensor& rows,
    const std::optional<at::Tensor>& labels, int64_t divergence_id, double beta, double temperature, double kd_value,
    double hard_value, double scale, bool need_h, bool need_w, bool need_b, int64_t block_rows, int64_t tile_words);

// {name: id} from one of ids.h's tables, for tests/test_ids.py to compare with Python's.
template <typename Enum, size_t N>
pybind11::dict id_table(const std::array<std::pair<const char*, Enum>, N>& table) {
  pybind11::dict ids;
  for (const auto& entry : table) ids[entry.first] = static_cast<int64_t>(entry.second);
  return ids;
}
}  // namespace pykd

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pykd fused CPU kernels";
  m.attr("cpu_capability") = PYKD_CPU_CAPABILITY;
  m.attr("RELATION_LOSS_IDS") = pykd::id_table(pykd::kRelationLossNames);
  m.attr("MI_BOUND_IDS") = pykd::id_table(pykd::kBoundNames);
  m.attr("VOCAB_DIVERGENCE_IDS") = pykd::id_table(pykd::kVocabDivergenceNames);
  m.attr("VOCAB_TEACHER_IDS") = pykd::id_table(pykd::kVocabTeacherNames);
  m.def("attention_relation_forward", &pykd::attention_relation_forward,
        "Fused attention-relation loss and student gradients (CPU)");
  m.def("mi_bound_forward", &pykd::mi_bound_forward, "Fused MI lower bound and its gradients (CPU)");
  m.def("routed_linear_forward", &pykd::routed_linear_forward, "Routed MoE linear, forward (CPU)");
  m.def("routed_linear_backward", &pykd::routed_linear_backward, "Routed MoE linear, backward (CPU)");
  m.def("vocab_kd_forward", &pykd::vocab_kd_forward,
        "Fused output projection + vocabulary divergence and its student gradients (CPU)");
}
