// CUDA implementations of the native ops: checks, tensors -> kernel argument structs, launches on
// the current stream. The kernels themselves are in the .cu files.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../cpu/checks.h"
#include "kernels.h"

namespace modernbert_kernels {
namespace {

cuda::ElementType element_type(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return cuda::ElementType::Float32;
    case at::kBFloat16: return cuda::ElementType::BFloat16;
    case at::kHalf: return cuda::ElementType::Float16;
    default: TORCH_CHECK(false, "expected fp32, bf16 or fp16, got ", dtype);
  }
}

void token_strides(const at::Tensor& t, bool varlen, int64_t* stride) {
  stride[0] = varlen ? 0 : t.stride(0);
  stride[1] = t.stride(1);
  stride[2] = t.stride(varlen ? 0 : 2);
}

void check_launch(cudaError_t status, const char* what) {
  TORCH_CHECK(status == cudaSuccess, what, " failed: ", cudaGetErrorString(status));
}

cuda::AttentionArgs attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& row_offsets, const at::Tensor& col_indices, int64_t block_size,
                                   int64_t window, double scale, const std::optional<at::Tensor>& key_padding_mask,
                                   const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen) {
  check_attention_inputs(q, k, v, row_offsets, col_indices, block_size, key_padding_mask, cu_seqlens, at::kCUDA);
  const bool varlen = cu_seqlens.has_value();
  cuda::AttentionArgs args{};
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
  args.key_padding = key_padding_mask.has_value()
                         ? reinterpret_cast<const uint8_t*>(key_padding_mask->data_ptr<bool>())
                         : nullptr;
  args.row_offsets = row_offsets.data_ptr<int32_t>();
  args.col_indices = col_indices.data_ptr<int32_t>();
  args.layout_head_stride = row_offsets.size(0) == 1 ? 0 : row_offsets.size(1);
  args.block_size = static_cast<int>(block_size);
  args.window = window;
  args.scale = static_cast<float>(scale);
  return args;
}

void set_lse(cuda::AttentionArgs& args, const at::Tensor& lse, bool varlen) {
  args.lse = lse.data_ptr<float>();
  args.lse_stride[0] = varlen ? 0 : lse.stride(0);
  args.lse_stride[1] = lse.stride(varlen ? 0 : 1);
}

std::tuple<at::Tensor, at::Tensor> attention_forward_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& row_offsets,
    const at::Tensor& col_indices, int64_t block_size, int64_t window, double scale,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen) {
  const c10::cuda::CUDAGuard guard(q.device());
  cuda::AttentionArgs args = attention_args(q, k, v, row_offsets, col_indices, block_size, window, scale,
                                            key_padding_mask, cu_seqlens, max_seqlen);
  const bool varlen = cu_seqlens.has_value();
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = varlen ? at::empty({args.heads, q.size(0)}, q.options().dtype(at::kFloat))
                          : at::empty({args.batch, args.heads, args.seq_len}, q.options().dtype(at::kFloat));
  args.result = out.data_ptr();
  token_strides(out, varlen, args.result_stride);
  set_lse(args, lse, varlen);
  check_launch(cuda::launch_attention_forward(args, c10::cuda::getCurrentCUDAStream()), "attention forward");
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& row_offsets, const at::Tensor& col_indices, const at::Tensor& col_offsets,
    const at::Tensor& row_indices, int64_t block_size, int64_t window, double scale,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen) {
  const c10::cuda::CUDAGuard guard(q.device());
  cuda::AttentionArgs args = attention_args(q, k, v, row_offsets, col_indices, block_size, window, scale,
                                            key_padding_mask, cu_seqlens, max_seqlen);
  const bool varlen = cu_seqlens.has_value();
  for (const at::Tensor* t : {&dout, &out}) {
    TORCH_CHECK(t->sizes() == q.sizes() && t->scalar_type() == q.scalar_type() && t->stride(-1) == 1,
                "dout and out must match q's shape and dtype with unit stride along head_dim");
  }
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous(), "lse must be contiguous fp32");
  for (const at::Tensor* t : {&col_offsets, &row_indices}) {
    TORCH_CHECK(t->scalar_type() == at::kInt && t->is_contiguous() && t->device() == q.device(),
                "layout tensors must be contiguous int32 on ", q.device());
  }
  args.out = out.data_ptr();
  args.dout = dout.data_ptr();
  token_strides(out, varlen, args.out_stride);
  token_strides(dout, varlen, args.dout_stride);
  args.col_offsets = col_offsets.data_ptr<int32_t>();
  args.row_indices = row_indices.data_ptr<int32_t>();
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(q.sizes(), q.options());
  at::Tensor dv = at::empty(q.sizes(), q.options());
  at::Tensor delta = at::empty_like(lse);
  args.result = dq.data_ptr();
  args.dk = dk.data_ptr();
  args.dv = dv.data_ptr();
  token_strides(dq, varlen, args.result_stride);
  set_lse(args, lse, varlen);
  args.delta = delta.data_ptr<float>();
  check_launch(cuda::launch_attention_backward(args, c10::cuda::getCurrentCUDAStream()), "attention backward");
  return {dq, dk, dv};
}

at::Tensor int8_linear_cuda(const at::Tensor& x_q, const at::Tensor& x_scale, const at::Tensor& w_q,
                            const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                            c10::string_view activation, at::ScalarType out_dtype) {
  check_int8_linear_inputs(x_q, x_scale, w_q, w_scale, bias, activation);
  TORCH_CHECK(x_q.is_cuda() && w_q.is_cuda() && x_scale.is_cuda() && w_scale.is_cuda(), "expected CUDA tensors");
  TORCH_CHECK(x_q.size(1) % 16 == 0, "K must be a multiple of 16, got ", x_q.size(1));
  const c10::cuda::CUDAGuard guard(x_q.device());
  // The kernel reads 16-byte vectors: start from 16-byte aligned storage.
  auto aligned = [](const at::Tensor& t) {
    return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 ? t : t.clone(at::MemoryFormat::Contiguous);
  };
  const at::Tensor x = aligned(x_q), w = aligned(w_q);
  const at::Tensor bias_f32 = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  cuda::Int8LinearArgs args{};
  args.x_q = x.data_ptr<int8_t>();
  args.w_q = w.data_ptr<int8_t>();
  args.x_scale = x_scale.data_ptr<float>();
  args.w_scale = w_scale.data_ptr<float>();
  args.bias = bias_f32.defined() ? bias_f32.data_ptr<float>() : nullptr;
  args.m = x.size(0);
  args.n = w.size(0);
  args.k = x.size(1);
  args.out_dtype = element_type(out_dtype);
  args.activation = activation == "gelu"        ? cuda::Activation::Gelu
                    : activation == "gelu_tanh" ? cuda::Activation::GeluTanh
                    : activation == "geglu"     ? cuda::Activation::Geglu
                                                : cuda::Activation::None;
  at::Tensor out = at::empty({args.m, args.activation == cuda::Activation::Geglu ? args.n / 2 : args.n},
                             x.options().dtype(out_dtype));
  args.out = out.data_ptr();
  check_launch(cuda::launch_int8_linear(args, c10::cuda::getCurrentCUDAStream()), "int8 linear");
  return out;
}

std::tuple<at::Tensor, at::Tensor> quantize_per_token_cuda(const at::Tensor& x,
                                                           const std::optional<at::Tensor>& norm_weight, double eps,
                                                           const std::optional<at::Tensor>& smooth) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.stride(1) == 1, "x must be a CUDA [M, K] tensor with unit stride along K");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor weight = norm_weight.has_value() ? norm_weight->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor smooth_f32 = smooth.has_value() ? smooth->to(at::kFloat).contiguous() : at::Tensor();
  for (const at::Tensor* t : {&weight, &smooth_f32})
    TORCH_CHECK(!t->defined() || (t->numel() == x.size(1) && t->is_cuda()), "norm_weight and smooth must be [K] on CUDA");
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kChar));
  at::Tensor scale = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  cuda::QuantizeArgs args{};
  args.x = x.data_ptr();
  args.x_stride = x.stride(0);
  args.dtype = element_type(x.scalar_type());
  args.rows = x.size(0);
  args.k = x.size(1);
  args.norm_weight = weight.defined() ? weight.data_ptr<float>() : nullptr;
  args.eps = static_cast<float>(eps);
  args.smooth = smooth_f32.defined() ? smooth_f32.data_ptr<float>() : nullptr;
  args.q = q.data_ptr<int8_t>();
  args.scale = scale.data_ptr<float>();
  check_launch(cuda::launch_quantize_rows(args, c10::cuda::getCurrentCUDAStream()), "quantize");
  return {q, scale};
}

void rotary_embedding_cuda(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& out) {
  TORCH_CHECK(x.is_cuda(), "expected CUDA tensors, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  cuda::RotaryArgs args{};
  set_rotary_args(args, x, cos, sin, out);
  args.dtype = element_type(x.scalar_type());
  check_launch(cuda::launch_rotary(args, c10::cuda::getCurrentCUDAStream()), "rotary embedding");
}

}  // namespace

TORCH_LIBRARY_IMPL(modernbert_kernels, CUDA, m) {
  m.impl("rotary_embedding_native", &rotary_embedding_cuda);
  m.impl("block_sparse_attention_forward_native", &attention_forward_cuda);
  m.impl("block_sparse_attention_backward_native", &attention_backward_cuda);
  m.impl("int8_linear_native", &int8_linear_cuda);
  m.impl("quantize_per_token_native", &quantize_per_token_cuda);
}

}  // namespace modernbert_kernels
