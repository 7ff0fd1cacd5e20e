// CPU block_sparse_attention_{forward,backward}_native: the work items spread over
// at::parallel_for, each thread with its own workspace.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../tensor_params.h"
#include "kernels.h"

namespace modernbert_kernels {
namespace {

std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                         const at::Tensor& row_offsets, const at::Tensor& col_indices,
                                                         int64_t block_size, int64_t window, double scale,
                                                         const std::optional<at::Tensor>& key_padding_mask,
                                                         const std::optional<at::Tensor>& cu_seqlens,
                                                         int64_t max_seqlen) {
  const AttentionForward call = prepare_attention_forward(q, k, v, row_offsets, col_indices, block_size, window, scale,
                                                          key_padding_mask, cu_seqlens, max_seqlen, at::kCPU);
  if (q.numel() == 0) return {call.out, call.lse};
  const AttentionParams& p = call.params;
  const int64_t blocks = (p.seq_len + block_size - 1) / block_size;
  const size_t slot_floats =
      cpu::attention_slot_floats(p.block_size, static_cast<int>(p.head_dim), p.dtype == ElementType::Float32);
  const int cache_slots = cpu::attention_cache_slots(blocks, slot_floats);
  const size_t workspace_floats = cpu::attention_workspace_floats(cache_slots, slot_floats);
  const auto forward = cpu::kernels().attention_forward;
  at::parallel_for(0, p.batch * p.heads * blocks, 1, [&](int64_t begin, int64_t end) {
    // Kept per thread: allocating (and page-faulting) it on every call costs more than small problems.
    thread_local std::vector<float> workspace;
    if (workspace.size() < workspace_floats) workspace.resize(workspace_floats);
    forward(p, cache_slots, begin, end, workspace.data());
  });
  return {call.out, call.lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& row_offsets, const at::Tensor& col_indices, const at::Tensor& col_offsets,
    const at::Tensor& row_indices, int64_t block_size, int64_t window, double scale,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen) {
  const AttentionBackward call =
      prepare_attention_backward(dout, q, k, v, out, lse, row_offsets, col_indices, col_offsets, row_indices,
                                 block_size, window, scale, key_padding_mask, cu_seqlens, max_seqlen, at::kCPU);
  if (q.numel() == 0) return {call.dq, call.dk, call.dv};
  const AttentionBackwardParams& p = call.params;
  const int64_t items = p.batch * p.heads * ((p.seq_len + block_size - 1) / block_size);
  const auto backward = cpu::kernels().attention_backward;
  // dq (and delta) first; dk / dv read delta.
  for (const cpu::BackwardPass pass : {cpu::BackwardPass::Dq, cpu::BackwardPass::DkDv}) {
    at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
      thread_local std::vector<float> workspace(cpu::kAttentionBackwardWorkspaceFloats);
      backward(p, pass, begin, end, workspace.data());
    });
  }
  return {call.dq, call.dk, call.dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(modernbert_kernels, CPU, m) {
  m.impl("block_sparse_attention_forward_native", &attention_forward_cpu);
  m.impl("block_sparse_attention_backward_native", &attention_backward_cpu);
}

}  // namespace modernbert_kernels
