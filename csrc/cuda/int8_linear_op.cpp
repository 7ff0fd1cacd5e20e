// CUDA int8_linear_native and quantize_per_token_native: tensors -> params
// (../tensor_params.h), then the kernels of int8_linear.cu on the current stream.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../tensor_params.h"
#include "kernels.h"
#include "launch_check.h"

namespace modernbert_kernels {
namespace {

at::Tensor int8_linear_cuda(const at::Tensor& x_q, const at::Tensor& x_scale, const at::Tensor& w_q,
                            const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                            c10::string_view activation, at::ScalarType out_dtype) {
  const c10::cuda::CUDAGuard guard(x_q.device());
  // The kernel reads 16-byte vectors: start from 16-byte aligned storage.
  auto aligned = [](const at::Tensor& t) {
    return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 ? t : t.clone(at::MemoryFormat::Contiguous);
  };
  const at::Tensor x = aligned(x_q), w = aligned(w_q);
  const Int8Linear call = prepare_int8_linear(x, x_scale, w, w_scale, bias, activation, out_dtype, at::kCUDA);
  TORCH_CHECK(call.params.k % 16 == 0, "K must be a multiple of 16, got ", call.params.k);
  check_launch(cuda::launch_int8_linear(call.params, c10::cuda::getCurrentCUDAStream()), "int8 linear");
  return call.out;
}

std::tuple<at::Tensor, at::Tensor> quantize_per_token_cuda(const at::Tensor& x,
                                                           const std::optional<at::Tensor>& norm_weight, double eps,
                                                           const std::optional<at::Tensor>& smooth) {
  const c10::cuda::CUDAGuard guard(x.device());
  const Quantize call = prepare_quantize(x, norm_weight, eps, smooth, at::kCUDA);
  check_launch(cuda::launch_quantize_rows(call.params, c10::cuda::getCurrentCUDAStream()), "quantize");
  return {call.q, call.scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(modernbert_kernels, CUDA, m) {
  m.impl("int8_linear_native", &int8_linear_cuda);
  m.impl("quantize_per_token_native", &quantize_per_token_cuda);
}

}  // namespace modernbert_kernels
