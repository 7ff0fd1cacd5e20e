// CUDA rotary_embedding_native: tensors -> params (../tensor_params.h), then the kernel of
// rotary.cu on the current stream.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../tensor_params.h"
#include "kernels.h"
#include "launch_check.h"

namespace modernbert_kernels {
namespace {

void rotary_embedding_cuda(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(x.device());
  const RotaryParams params = rotary_params(x, cos, sin, out, at::kCUDA);
  check_launch(cuda::launch_rotary(params, c10::cuda::getCurrentCUDAStream()), "rotary embedding");
}

}  // namespace

TORCH_LIBRARY_IMPL(modernbert_kernels, CUDA, m) { m.impl("rotary_embedding_native", &rotary_embedding_cuda); }

}  // namespace modernbert_kernels
