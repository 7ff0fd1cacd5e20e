// CUDA block_sparse_attention_{forward,backward}_native: tensors -> params (../tensor_params.h),
// then the kernels of attention.cu on the current stream.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../tensor_params.h"
#include "kernels.h"
#include "launch_check.h"

namespace modernbert_kernels {
namespace {

std::tuple<at::Tensor, at::Tensor> attention_forward_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& row_offsets,
    const at::Tensor& col_indices, int64_t block_size, int64_t window, double scale,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen) {
  const c10::cuda::CUDAGuard guard(q.device());
  const AttentionForward call = prepare_attention_forward(q, k, v, row_offsets, col_indices, block_size, window, scale,
                                                          key_padding_mask, cu_seqlens, max_seqlen, at::kCUDA);
  check_launch(cuda::launch_attention_forward(call.params, c10::cuda::getCurrentCUDAStream()), "attention forward");
  return {call.out, call.lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& row_offsets, const at::Tensor& col_indices, const at::Tensor& col_offsets,
    const at::Tensor& row_indices, int64_t block_size, int64_t window, double scale,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen) {
  const c10::cuda::CUDAGuard guard(q.device());
  const AttentionBackward call =
      prepare_attention_backward(dout, q, k, v, out, lse, row_offsets, col_indices, col_offsets, row_indices,
                                 block_size, window, scale, key_padding_mask, cu_seqlens, max_seqlen, at::kCUDA);
  check_launch(cuda::launch_attention_backward(call.params, c10::cuda::getCurrentCUDAStream()), "attention backward");
  return {call.dq, call.dk, call.dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(modernbert_kernels, CUDA, m) {
  m.impl("block_sparse_attention_forward_native", &attention_forward_cuda);
  m.impl("block_sparse_attention_backward_native", &attention_backward_cuda);
}

}  // namespace modernbert_kernels
