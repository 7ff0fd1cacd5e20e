// CPU implementations of int8_linear_native and quantize_per_token_native.
//
// The GEMM is oneDNN's int8 matmul (AMX / VNNI where present) through at::_int_mm, run over
// row chunks whose int32 result stays in cache: each chunk's epilogue (scales, bias, activation,
// cast) runs right after its GEMM, so the int32 accumulator never makes a round trip to DRAM.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_int_mm.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "kernels.h"

namespace modernbert_kernels {
namespace {

cpu::ElementType element_type(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return cpu::ElementType::Float32;
    case at::kBFloat16: return cpu::ElementType::BFloat16;
    case at::kHalf: return cpu::ElementType::Float16;
    default: TORCH_CHECK(false, "expected fp32, bf16 or fp16, got ", dtype);
  }
}

cpu::Activation parse_activation(c10::string_view name) {
  if (name == "gelu") return cpu::Activation::Gelu;
  if (name == "gelu_tanh") return cpu::Activation::GeluTanh;
  if (name == "geglu") return cpu::Activation::Geglu;
  return cpu::Activation::None;
}

// Rows per GEMM call: the int32 chunk (rows x N x 4 bytes) should stay in L2 for the epilogue
// while leaving oneDNN enough rows to block well.
int64_t chunk_rows(int64_t n) {
  const int64_t target_bytes = int64_t(1) << 20;
  int64_t rows = target_bytes / (4 * n);
  rows = rows < 64 ? 64 : rows;
  return (rows + 31) / 32 * 32;
}

at::Tensor int8_linear_cpu(const at::Tensor& x_q, const at::Tensor& x_scale, const at::Tensor& w_q,
                           const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                           c10::string_view activation, at::ScalarType out_dtype) {
  check_int8_linear_inputs(x_q, x_scale, w_q, w_scale, bias, activation);
  const int64_t m = x_q.size(0), n = w_q.size(0);
  const cpu::Activation act = parse_activation(activation);
  const int64_t out_cols = act == cpu::Activation::Geglu ? n / 2 : n;
  at::Tensor out = at::empty({m, out_cols}, x_q.options().dtype(out_dtype));
  if (m == 0 || n == 0) return out;
  at::Tensor bias_f32 = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();

  const at::Tensor w_t = w_q.t();
  cpu::Int8EpilogueArgs args{};
  args.acc_stride = n;
  args.w_scale = w_scale.data_ptr<float>();
  args.bias = bias_f32.defined() ? bias_f32.data_ptr<float>() : nullptr;
  args.out_stride = out_cols;
  args.out_dtype = element_type(out_dtype);
  args.activation = act;
  args.n = n;
  const auto epilogue = cpu::kernels().int8_epilogue;
  char* const out_base = static_cast<char*>(out.data_ptr());
  const size_t out_row_bytes = out_cols * out.element_size();
  const float* const x_scale_base = x_scale.data_ptr<float>();
  // One parallel region over row chunks: each thread runs the GEMM of its chunk on its own
  // (oneDNN inside a parallel region stays single-threaded) and its epilogue while the int32
  // result is still in L2. No barrier between GEMM and epilogue, no int32 tensor in DRAM.
  const int64_t chunk = std::min(m, chunk_rows(n));
  const int64_t chunks = (m + chunk - 1) / chunk;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    at::Tensor acc = at::empty({chunk, n}, x_q.options().dtype(at::kInt));
    for (int64_t c = begin; c < end; ++c) {
      const int64_t m0 = c * chunk, rows = std::min(chunk, m - m0);
      at::Tensor acc_rows = acc.narrow(0, 0, rows);
      at::_int_mm_out(acc_rows, x_q.narrow(0, m0, rows), w_t);
      cpu::Int8EpilogueArgs chunk_args = args;
      chunk_args.acc = acc_rows.data_ptr<int32_t>();
      chunk_args.x_scale = x_scale_base + m0;
      chunk_args.out = out_base + m0 * out_row_bytes;
      epilogue(chunk_args, 0, rows);
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> quantize_per_token_cpu(const at::Tensor& x, const std::optional<at::Tensor>& norm_weight,
                                                          double eps, const std::optional<at::Tensor>& smooth) {
  TORCH_CHECK(x.dim() == 2, "x must be [M, K], got ", x.sizes());
  TORCH_CHECK(x.stride(1) == 1, "x needs unit stride along K");
  const int64_t m = x.size(0), k = x.size(1);
  at::Tensor weight = norm_weight.has_value() ? norm_weight->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor smooth_f32 = smooth.has_value() ? smooth->to(at::kFloat).contiguous() : at::Tensor();
  for (const at::Tensor* t : {&weight, &smooth_f32})
    TORCH_CHECK(!t->defined() || t->numel() == k, "norm_weight and smooth must be [K]");
  at::Tensor q = at::empty({m, k}, x.options().dtype(at::kChar));
  at::Tensor scale = at::empty({m}, x.options().dtype(at::kFloat));
  if (m == 0) return {q, scale};
  cpu::QuantizeArgs args{};
  args.x = x.data_ptr();
  args.x_stride = x.stride(0);
  args.dtype = element_type(x.scalar_type());
  args.k = k;
  args.norm_weight = weight.defined() ? weight.data_ptr<float>() : nullptr;
  args.eps = static_cast<float>(eps);
  args.smooth = smooth_f32.defined() ? smooth_f32.data_ptr<float>() : nullptr;
  args.q = q.data_ptr<int8_t>();
  args.scale = scale.data_ptr<float>();
  const auto quantize = cpu::kernels().quantize_rows;
  at::parallel_for(0, m, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> row(k);
    quantize(args, begin, end, row.data());
  });
  return {q, scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(modernbert_kernels, CPU, m) {
  m.impl("int8_linear_native", &int8_linear_cpu);
  m.impl("quantize_per_token_native", &quantize_per_token_cpu);
}

}  // namespace modernbert_kernels
