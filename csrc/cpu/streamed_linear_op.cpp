// CPU streamed_linear_native: a fp32 / bf16 linear on a weight packed for streaming
// (streamed_gemm.py packs it; cpu/streamed_gemm_kernel.h computes it), its panels spread over
// torch's parallel_for so each thread reads one contiguous part of the weight.
#include <string_view>
#include <vector>

#include "../library.h"
#include "../tensor_params.h"
#include "cpu_ops.h"
#include "kernels.h"

namespace modernbert_kernels {
namespace {

Gate parse_gate(std::string_view name) {
  if (name == "none") return Gate::None;
  if (name == "gelu") return Gate::Gelu;
  if (name == "gelu_tanh") return Gate::GeluTanh;
  if (name == "silu") return Gate::Silu;
  if (name == "relu") return Gate::Relu;
  MBK_CHECK(false, "gate must be none, gelu, gelu_tanh, silu or relu, got ", name);
  return Gate::None;
}

// x's rows layer-normed into a new [M, K] tensor of x's dtype; the rows spread over threads only
// when there are enough of them to pay for it.
Tensor layer_norm(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, double eps) {
  const int64_t k = x.size(1);
  MBK_CHECK(weight.dim() == 1 && weight.numel() == k && weight.device() == x.device(),
            "norm_weight must be [", k, "] on x's device, got ", shape(weight));
  MBK_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->numel() == k && bias->device() == x.device()),
            "norm_bias must be [", k, "] on x's device");
  MBK_CHECK(eps >= 0, "eps must be non-negative, got ", eps);
  const Tensor weight_fp32 = contiguous_float(weight);
  Tensor bias_fp32;
  LayerNormParams p{};
  p.x = x.data_ptr();
  p.x_stride = x.size(0) > 1 ? x.stride(0) : k;
  p.dtype = element_type(x.scalar_type());
  p.rows = x.size(0);
  p.k = k;
  p.weight = static_cast<const float*>(weight_fp32.data_ptr());
  if (bias.has_value()) {
    bias_fp32 = contiguous_float(*bias);
    p.bias = static_cast<const float*>(bias_fp32.data_ptr());
  }
  p.eps = float(eps);
  Tensor out = empty({p.rows, k}, x.scalar_type(), x);
  p.out = out.data_ptr();
  if (p.rows > 0 && k > 0) {
    const auto kernel = cpu::kernels().layer_norm;
    const int64_t grain = (int64_t(1) << 14) / k + 1;  // ~16K values a task
    torch::stable::parallel_for(0, p.rows, grain, [&](int64_t begin, int64_t end) {
      thread_local std::vector<float> row;
      if (int64_t(row.size()) < k) row.resize(k);
      kernel(p, begin, end, row.data());
    });
  }
  return out;
}

}  // namespace

// x [M, K] (unit stride along K) against packed, fp32 [panels, 2, K, 16] or bf16 [panels, 2, K / 2, 32];
// out [M, out_features] in x's dtype. Gated (gate not "none"), out_features is the gated width and
// a panel holds 16 of its columns. With norm_weight, x's rows are layer-normed first (eps; norm_bias
// or none), saving a LayerNorm op's call in front (~30-50 us on a few rows right after a streamed
// weight evicted its code and data from the caches; NOTES "The streamed GEMM's bf16 on AMX tiles,
// and one call a layer").
Tensor cpu::streamed_linear(const Tensor& x, const Tensor& packed, int64_t out_features,
                            const std::optional<Tensor>& bias, std::string gate, const std::optional<Tensor>& residual,
                            const std::optional<Tensor>& norm_weight, const std::optional<Tensor>& norm_bias,
                            double eps) {
  check_device(x, DeviceType::CPU, "x");
  MBK_CHECK(x.scalar_type() == ScalarType::Float || x.scalar_type() == ScalarType::BFloat16,
            "x must be fp32 or bf16, got ", x.scalar_type());
  MBK_CHECK(x.dim() == 2 && (x.size(1) <= 1 || x.stride(1) == 1), "x must be [M, K] with unit stride along K, got ",
            shape(x));
  MBK_CHECK(packed.device() == x.device() && packed.scalar_type() == x.scalar_type() && packed.is_contiguous(),
            "the packed weight must be contiguous, on x's device and of x's dtype");
  StreamedLinearParams p{};
  p.dtype = element_type(x.scalar_type());
  p.gate = parse_gate(gate);
  p.m = x.size(0);
  p.k = x.size(1);
  const bool fp32 = p.dtype == ElementType::Float32;
  MBK_CHECK(fp32 || p.k % 2 == 0, "a bf16 streamed linear needs an even K, got ", p.k);
  const int64_t half_rows = fp32 ? p.k : p.k / 2, half_row = fp32 ? 16 : 32;
  MBK_CHECK(packed.dim() == 4 && packed.size(1) == 2 && packed.size(2) == half_rows && packed.size(3) == half_row,
            "the packed weight must be [panels, 2, ", half_rows, ", ", half_row, "] for K = ", p.k, ", got ",
            shape(packed));
  p.panels = packed.size(0);
  const int64_t panel_outputs = p.gate == Gate::None ? cpu::kStreamedPanelCols : cpu::kStreamedPanelCols / 2;
  MBK_CHECK(out_features > (p.panels - 1) * panel_outputs && out_features <= p.panels * panel_outputs,
            "out_features = ", out_features, " does not fit ", p.panels, " packed panels of ", panel_outputs,
            " output columns");
  p.n = out_features;
  Tensor bias_fp32;
  if (bias.has_value()) {
    const int64_t expected = p.gate == Gate::None ? p.n : 2 * p.n;
    MBK_CHECK(bias->dim() == 1 && bias->numel() == expected && bias->device() == x.device(),
              "bias must be [", expected, "] on x's device, got ", shape(*bias));
    bias_fp32 = contiguous_float(*bias);
    p.bias = static_cast<const float*>(bias_fp32.data_ptr());
  }
  if (residual.has_value()) {
    MBK_CHECK(p.gate == Gate::None, "a gated streamed linear takes no residual");
    MBK_CHECK(residual->dim() == 2 && residual->size(0) == p.m && residual->size(1) == p.n &&
                  residual->scalar_type() == x.scalar_type() && residual->is_contiguous() &&
                  residual->device() == x.device(),
              "residual must be a contiguous [", p.m, ", ", p.n, "] tensor of x's dtype on x's device, got ",
              shape(*residual));
    p.residual = residual->data_ptr();
  }
  MBK_CHECK(norm_weight.has_value() || !norm_bias.has_value(), "norm_bias needs norm_weight");
  const Tensor normed = norm_weight.has_value() ? layer_norm(x, *norm_weight, norm_bias, eps) : x;
  Tensor out = empty({p.m, p.n}, x.scalar_type(), x);
  p.x = normed.data_ptr();
  p.x_stride = normed.size(0) > 1 ? normed.stride(0) : p.k;  // a single row's stride may be anything
  p.packed = packed.data_ptr();
  p.out = out.data_ptr();
  if (p.m > 0 && p.n > 0) {
    const auto kernel = cpu::kernels().streamed_linear;
    torch::stable::parallel_for(0, p.panels, 1, [&](int64_t begin, int64_t end) { kernel(p, begin, end); });
  }
  return out;
}

MODERNBERT_KERNELS_LIBRARY_IMPL(CPU, m) { m.impl("streamed_linear_native", TORCH_BOX(&cpu::streamed_linear)); }

}  // namespace modernbert_kernels
