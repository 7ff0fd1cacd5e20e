// CPU implementations of block_sparse_attention_{forward,backward}_native: checks, then the work
// items spread over at::parallel_for, each thread with its own workspace.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
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
    default: return cpu::ElementType::Float16;
  }
}

void token_strides(const at::Tensor& t, bool varlen, int64_t* stride) {
  // (batch, head, token): [batch, heads, seq, dim] or [tokens, heads, dim] (batch unused).
  stride[0] = varlen ? 0 : t.stride(0);
  stride[1] = t.stride(1);
  stride[2] = t.stride(varlen ? 0 : 2);
}

cpu::AttentionArgs attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& row_offsets, const at::Tensor& col_indices, int64_t block_size,
                                  int64_t window, double scale, const std::optional<at::Tensor>& key_padding_mask,
                                  const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen) {
  check_attention_inputs(q, k, v, row_offsets, col_indices, block_size, key_padding_mask, cu_seqlens, at::kCPU);
  const bool varlen = cu_seqlens.has_value();
  cpu::AttentionArgs args{};
  args.q = q.data_ptr();
  args.k = k.data_ptr();
  args.v = v.data_ptr();
  args.dtype = element_type(q.scalar_type());
  args.batch = varlen ? cu_seqlens->numel() - 1 : q.size(0);
  args.heads = q.size(1);
  args.head_dim = q.size(-1);
  args.seq_len = varlen ? max_seqlen : q.size(2);
  const int64_t num_blocks = row_offsets.size(1) - 1;
  TORCH_CHECK(args.seq_len <= num_blocks * block_size, "the layout covers ", num_blocks * block_size,
              " tokens but the sequence length is ", args.seq_len);
  token_strides(q, varlen, args.q_stride);
  token_strides(k, varlen, args.k_stride);
  token_strides(v, varlen, args.v_stride);
  args.cu_seqlens = varlen ? cu_seqlens->data_ptr<int32_t>() : nullptr;
  args.key_padding = key_padding_mask.has_value() ? reinterpret_cast<const uint8_t*>(key_padding_mask->data_ptr<bool>())
                                                  : nullptr;
  args.row_offsets = row_offsets.data_ptr<int32_t>();
  args.col_indices = col_indices.data_ptr<int32_t>();
  args.layout_head_stride = row_offsets.size(0) == 1 ? 0 : row_offsets.size(1);
  args.block_size = static_cast<int>(block_size);
  args.window = window;
  args.scale = static_cast<float>(scale);
  return args;
}

void set_lse(cpu::AttentionArgs& args, const at::Tensor& lse, bool varlen) {
  args.lse = lse.data_ptr<float>();
  args.lse_stride[0] = varlen ? 0 : lse.stride(0);
  args.lse_stride[1] = lse.stride(varlen ? 0 : 1);
}

std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                         const at::Tensor& row_offsets, const at::Tensor& col_indices,
                                                         int64_t block_size, int64_t window, double scale,
                                                         const std::optional<at::Tensor>& key_padding_mask,
                                                         const std::optional<at::Tensor>& cu_seqlens,
                                                         int64_t max_seqlen) {
  cpu::AttentionArgs args = attention_args(q, k, v, row_offsets, col_indices, block_size, window, scale,
                                           key_padding_mask, cu_seqlens, max_seqlen);
  const bool varlen = cu_seqlens.has_value();
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = varlen ? at::empty({args.heads, q.size(0)}, q.options().dtype(at::kFloat))
                          : at::empty({args.batch, args.heads, args.seq_len}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {out, lse};
  args.out = out.data_ptr();
  token_strides(out, varlen, args.out_stride);
  set_lse(args, lse, varlen);
  const int64_t blocks = (args.seq_len + block_size - 1) / block_size;
  const size_t slot_floats = cpu::attention_slot_floats(args.block_size, static_cast<int>(args.head_dim),
                                                        args.dtype == cpu::ElementType::Float32);
  args.cache_slots = cpu::attention_cache_slots(blocks, slot_floats);
  const size_t workspace_floats = cpu::attention_workspace_floats(args.cache_slots, slot_floats);
  const auto forward = cpu::kernels().attention_forward;
  at::parallel_for(0, args.batch * args.heads * blocks, 1, [&](int64_t begin, int64_t end) {
    // Kept per thread: allocating (and page-faulting) it on every call costs more than small problems.
    thread_local std::vector<float> workspace;
    if (workspace.size() < workspace_floats) workspace.resize(workspace_floats);
    forward(args, begin, end, workspace.data());
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& row_offsets, const at::Tensor& col_indices, const at::Tensor& col_offsets,
    const at::Tensor& row_indices, int64_t block_size, int64_t window, double scale,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen) {
  cpu::AttentionArgs args = attention_args(q, k, v, row_offsets, col_indices, block_size, window, scale,
                                           key_padding_mask, cu_seqlens, max_seqlen);
  const bool varlen = cu_seqlens.has_value();
  for (const at::Tensor* t : {&dout, &out}) {
    TORCH_CHECK(t->sizes() == q.sizes() && t->scalar_type() == q.scalar_type() && t->stride(-1) == 1 && t->is_cpu(),
                "dout and out must match q's shape and dtype with unit stride along head_dim");
  }
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous(), "lse must be contiguous fp32");
  for (const at::Tensor* t : {&col_offsets, &row_indices}) {
    TORCH_CHECK(t->scalar_type() == at::kInt && t->is_contiguous() && t->is_cpu(), "layout tensors must be contiguous int32");
  }
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(q.sizes(), q.options());
  at::Tensor dv = at::empty(q.sizes(), q.options());
  if (q.numel() == 0) return {dq, dk, dv};
  at::Tensor delta = at::empty_like(lse);
  args.out = const_cast<void*>(out.data_ptr());
  args.dout = dout.data_ptr();
  token_strides(out, varlen, args.out_stride);
  token_strides(dout, varlen, args.dout_stride);
  args.dq = dq.data_ptr();
  args.dk = dk.data_ptr();
  args.dv = dv.data_ptr();
  token_strides(dq, varlen, args.grad_stride);
  set_lse(args, lse, varlen);
  args.delta = delta.data_ptr<float>();
  args.col_offsets = col_offsets.data_ptr<int32_t>();
  args.row_indices = row_indices.data_ptr<int32_t>();
  const int64_t items = args.batch * args.heads * ((args.seq_len + block_size - 1) / block_size);
  const auto backward = cpu::kernels().attention_backward;
  // dq (and delta) first; dk / dv read delta.
  for (const cpu::BackwardPass pass : {cpu::BackwardPass::Dq, cpu::BackwardPass::DkDv}) {
    at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
      thread_local std::vector<float> workspace(cpu::kAttentionBackwardWorkspaceFloats);
      backward(args, pass, begin, end, workspace.data());
    });
  }
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(modernbert_kernels, CPU, m) {
  m.impl("block_sparse_attention_forward_native", &attention_forward_cpu);
  m.impl("block_sparse_attention_backward_native", &attention_backward_cpu);
}

}  // namespace modernbert_kernels
