// Python bindings of pykd._C; each op's math lives in its Python module's docstring.
#include <torch/extension.h>

namespace pykd {
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_relation_forward(
    const at::Tensor& t_a, const at::Tensor& t_b, const at::Tensor& s_a, const at::Tensor& s_b,
    const std::optional<at::Tensor>& mask, int64_t heads, int64_t loss_id, double scale_t, double scale_s,
    bool need_grad);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mi_bound_forward(
    const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& log_q, int64_t bound_id,
    double alpha, double scale, bool need_grad, int64_t diag_offset);
}  // namespace pykd

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pykd fused CPU kernels";
  m.attr("cpu_capability") = PYKD_CPU_CAPABILITY;
  m.def("attention_relation_forward", &pykd::attention_relation_forward,
        "Fused attention-relation loss and student gradients (CPU)");
  m.def("mi_bound_forward", &pykd::mi_bound_forward, "Fused MI lower bound and its gradients (CPU)");
}
