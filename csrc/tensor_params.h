// Tensors -> the kernels' parameter structs (params.h), with every argument check, for the CPU
// and the CUDA entry points alike (ops.h). The op's outputs are allocated here too, so both
// devices return the same shapes.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <optional>

#include "params.h"

namespace modernbert_kernels {

inline ElementType element_type(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return ElementType::Float32;
    case at::kBFloat16: return ElementType::BFloat16;
    case at::kHalf: return ElementType::Float16;
    default: TORCH_CHECK(false, "expected fp32, bf16 or fp16, got ", dtype);
  }
}

inline Activation parse_activation(c10::string_view name) {
  if (name == "none") return Activation::None;
  if (name == "gelu") return Activation::Gelu;
  if (name == "gelu_tanh") return Activation::GeluTanh;
  if (name == "geglu") return Activation::Geglu;
  TORCH_CHECK(false, "activation must be none, gelu, gelu_tanh or geglu, got ", name);
}

inline void check_device(const at::Tensor& t, at::DeviceType device, const char* name) {
  TORCH_CHECK(t.device().type() == device, name, ": expected a ", device, " tensor, got ", t.device());
}

// (batch, head, token) strides of [batch, heads, seq, dim], or of [tokens, heads, dim] (varlen).
inline void token_strides(const at::Tensor& t, bool varlen, int64_t* stride) {
  stride[0] = varlen ? 0 : t.stride(0);
  stride[1] = t.stride(1);
  stride[2] = t.stride(varlen ? 0 : 2);
}

struct AttentionForward {
  at::Tensor out, lse;
  AttentionParams params;
};

struct AttentionBackward {
  at::Tensor dq, dk, dv, delta;
  AttentionBackwardParams params;
};

namespace detail {

inline void check_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& row_offsets, const at::Tensor& col_indices, int64_t block_size,
                                   const std::optional<at::Tensor>& key_padding_mask,
                                   const std::optional<at::Tensor>& cu_seqlens, at::DeviceType device) {
  const bool varlen = cu_seqlens.has_value();
  TORCH_CHECK(q.dim() == (varlen ? 3 : 4), "q must be ", varlen ? "[total_tokens, heads, head_dim]" : "[batch, heads, seq, head_dim]",
              ", got ", q.sizes());
  for (const at::Tensor* t : {&k, &v}) {
    TORCH_CHECK(t->sizes() == q.sizes(), "k and v must have q's shape ", q.sizes(), ", got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "q, k and v must share a dtype");
  }
  for (const at::Tensor* t : {&q, &k, &v}) {
    check_device(*t, device, "q, k and v");
    TORCH_CHECK(t->device() == q.device(), "q, k and v must be on one device");
    TORCH_CHECK(t->stride(-1) == 1, "q, k and v need unit stride along head_dim");
  }
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf,
              "q must be fp32, bf16 or fp16, got ", q.scalar_type());
  const int64_t head_dim = q.size(-1);
  TORCH_CHECK(head_dim == 32 || head_dim == 64 || head_dim == 128, "head_dim must be 32, 64 or 128, got ", head_dim);
  TORCH_CHECK(block_size >= 16 && block_size <= kMaxBlockSize && (block_size & (block_size - 1)) == 0,
              "block_size must be a power of two in [16, 128], got ", block_size);
  for (const at::Tensor* t : {&row_offsets, &col_indices}) {
    TORCH_CHECK(t->scalar_type() == at::kInt && t->is_contiguous() && t->device() == q.device(),
                "layout tensors must be contiguous int32 on ", q.device());
  }
  TORCH_CHECK(row_offsets.dim() == 2, "row_offsets must be [layout_heads, num_blocks + 1]");
  const int64_t heads = q.size(1);
  TORCH_CHECK(row_offsets.size(0) == 1 || row_offsets.size(0) == heads, "the layout has ", row_offsets.size(0),
              " heads; q has ", heads);
  if (varlen) {
    TORCH_CHECK(!key_padding_mask.has_value(), "key_padding_mask and cu_seqlens exclude each other");
    TORCH_CHECK(cu_seqlens->scalar_type() == at::kInt && cu_seqlens->dim() == 1 && cu_seqlens->is_contiguous() &&
                    cu_seqlens->numel() >= 2 && cu_seqlens->device() == q.device(),
                "cu_seqlens must be a contiguous 1-D int32 tensor [batch + 1] on ", q.device());
  }
  if (key_padding_mask.has_value()) {
    TORCH_CHECK(key_padding_mask->scalar_type() == at::kBool && key_padding_mask->is_contiguous() &&
                    key_padding_mask->device() == q.device(),
                "key_padding_mask must be a contiguous bool tensor on ", q.device());
    TORCH_CHECK(key_padding_mask->dim() == 2 && key_padding_mask->size(0) == q.size(0) &&
                    key_padding_mask->size(1) == q.size(2),
                "key_padding_mask must be [batch, seq]");
  }
}

}  // namespace detail

// Checks the inputs of block_sparse_attention_{forward,backward}_native for `device` tensors.
inline AttentionParams attention_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                        const at::Tensor& row_offsets, const at::Tensor& col_indices,
                                        int64_t block_size, int64_t window_left, int64_t window_right,
                                        double scale,
                                        const std::optional<at::Tensor>& key_padding_mask,
                                        const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen,
                                        at::DeviceType device) {
  detail::check_attention_inputs(q, k, v, row_offsets, col_indices, block_size, key_padding_mask, cu_seqlens, device);
  const bool varlen = cu_seqlens.has_value();
  AttentionParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.dtype = element_type(q.scalar_type());
  p.batch = varlen ? cu_seqlens->numel() - 1 : q.size(0);
  p.heads = q.size(1);
  p.head_dim = q.size(-1);
  p.seq_len = varlen ? max_seqlen : q.size(2);
  const int64_t num_blocks = row_offsets.size(1) - 1;
  TORCH_CHECK(p.seq_len <= num_blocks * block_size, "the layout covers ", num_blocks * block_size,
              " tokens but the sequence length is ", p.seq_len);
  token_strides(q, varlen, p.q_stride);
  token_strides(k, varlen, p.k_stride);
  token_strides(v, varlen, p.v_stride);
  p.cu_seqlens = varlen ? cu_seqlens->data_ptr<int32_t>() : nullptr;
  p.key_padding = key_padding_mask.has_value() ? reinterpret_cast<const uint8_t*>(key_padding_mask->data_ptr<bool>())
                                               : nullptr;
  p.row_offsets = row_offsets.data_ptr<int32_t>();
  p.col_indices = col_indices.data_ptr<int32_t>();
  p.layout_head_stride = row_offsets.size(0) == 1 ? 0 : row_offsets.size(1);
  p.block_size = static_cast<int>(block_size);
  // The op's schema says -1 for an unbounded side (as FlashAttention's window_size does).
  p.window_left = window_left < 0 ? kUnboundedWindow : window_left;
  p.window_right = window_right < 0 ? kUnboundedWindow : window_right;
  p.banded = window_left >= 0 || window_right >= 0;
  p.scale = static_cast<float>(scale);
  return p;
}

inline void set_lse(AttentionParams& p, const at::Tensor& lse) {
  const bool varlen = p.cu_seqlens != nullptr;
  p.lse = lse.data_ptr<float>();
  p.lse_stride[0] = varlen ? 0 : lse.stride(0);
  p.lse_stride[1] = lse.stride(varlen ? 0 : 1);
}

// The forward's outputs: out like q; lse [batch, heads, seq] (or [heads, total_tokens] for a
// varlen batch), fp32.
inline AttentionForward attention_forward_outputs(const AttentionParams& params, const at::Tensor& q) {
  const bool varlen = params.cu_seqlens != nullptr;
  AttentionForward call{at::empty(q.sizes(), q.options()),
                        varlen ? at::empty({params.heads, q.size(0)}, q.options().dtype(at::kFloat))
                               : at::empty({params.batch, params.heads, params.seq_len}, q.options().dtype(at::kFloat)),
                        params};
  call.params.out = call.out.data_ptr();
  token_strides(call.out, varlen, call.params.out_stride);
  set_lse(call.params, call.lse);
  return call;
}

// The backward's inputs beyond the forward's (checked) and outputs: dq, dk, dv like q; delta like
// lse (written by the dq pass, read by the dk / dv pass).
inline AttentionBackward attention_backward_outputs(const AttentionParams& params, const at::Tensor& dout,
                                                    const at::Tensor& q, const at::Tensor& out, const at::Tensor& lse,
                                                    const at::Tensor& col_offsets, const at::Tensor& row_indices) {
  for (const at::Tensor* t : {&dout, &out}) {
    TORCH_CHECK(t->sizes() == q.sizes() && t->scalar_type() == q.scalar_type() && t->stride(-1) == 1 &&
                    t->device() == q.device(),
                "dout and out must match q's shape, dtype and device with unit stride along head_dim");
  }
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.device() == q.device(),
              "lse must be contiguous fp32 on ", q.device());
  for (const at::Tensor* t : {&col_offsets, &row_indices}) {
    TORCH_CHECK(t->scalar_type() == at::kInt && t->is_contiguous() && t->device() == q.device(),
                "layout tensors must be contiguous int32 on ", q.device());
  }
  const bool varlen = params.cu_seqlens != nullptr;
  AttentionBackward call;
  AttentionBackwardParams& p = call.params;
  static_cast<AttentionParams&>(p) = params;
  call.dq = at::empty(q.sizes(), q.options());
  call.dk = at::empty(q.sizes(), q.options());
  call.dv = at::empty(q.sizes(), q.options());
  call.delta = at::empty_like(lse);
  p.out = const_cast<void*>(out.data_ptr());
  token_strides(out, varlen, p.out_stride);
  set_lse(p, lse);
  p.dout = dout.data_ptr();
  token_strides(dout, varlen, p.dout_stride);
  p.dq = call.dq.data_ptr();
  p.dk = call.dk.data_ptr();
  p.dv = call.dv.data_ptr();
  token_strides(call.dq, varlen, p.grad_stride);
  p.delta = call.delta.data_ptr<float>();
  p.col_offsets = col_offsets.data_ptr<int32_t>();
  p.row_indices = row_indices.data_ptr<int32_t>();
  return call;
}

struct Int8Linear {
  at::Tensor out, bias;  // bias as contiguous fp32 (kept alive for the kernel)
  Int8LinearParams params;
};

// x_q [M, K] and w_q [N, K] int8, contiguous; x_scale [M] and w_scale [N] fp32; out [M, N] (or
// [M, N / 2] for geglu) in out_dtype.
inline Int8Linear prepare_int8_linear(const at::Tensor& x_q, const at::Tensor& x_scale, const at::Tensor& w_q,
                                      const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                                      c10::string_view activation, at::ScalarType out_dtype, at::DeviceType device) {
  TORCH_CHECK(x_q.scalar_type() == at::kChar && w_q.scalar_type() == at::kChar, "x_q and w_q must be int8");
  TORCH_CHECK(x_q.dim() == 2 && w_q.dim() == 2 && x_q.size(1) == w_q.size(1),
              "x_q [M, K] and w_q [N, K] must share K, got ", x_q.sizes(), " and ", w_q.sizes());
  TORCH_CHECK(x_q.is_contiguous() && w_q.is_contiguous(), "x_q and w_q must be contiguous");
  TORCH_CHECK(x_scale.scalar_type() == at::kFloat && w_scale.scalar_type() == at::kFloat &&
                  x_scale.is_contiguous() && w_scale.is_contiguous(),
              "scales must be contiguous fp32");
  TORCH_CHECK(x_scale.numel() == x_q.size(0) && w_scale.numel() == w_q.size(0), "x_scale must be [M], w_scale [N]");
  check_device(x_q, device, "x_q");
  for (const at::Tensor* t : {&x_scale, &w_q, &w_scale})
    TORCH_CHECK(t->device() == x_q.device(), "x_q, x_scale, w_q and w_scale must be on one device");
  if (bias.has_value())
    TORCH_CHECK(bias->dim() == 1 && bias->numel() == w_q.size(0) && bias->device() == x_q.device(),
                "bias must be [N] on ", x_q.device());
  Int8Linear call;
  Int8LinearParams& p = call.params;
  p.activation = parse_activation(activation);
  TORCH_CHECK(p.activation != Activation::Geglu || w_q.size(0) % 2 == 0, "geglu needs an even number of weight rows");
  p.out_dtype = element_type(out_dtype);
  p.m = x_q.size(0);
  p.n = w_q.size(0);
  p.k = x_q.size(1);
  call.out = at::empty({p.m, p.activation == Activation::Geglu ? p.n / 2 : p.n}, x_q.options().dtype(out_dtype));
  if (bias.has_value()) call.bias = bias->to(at::kFloat).contiguous();
  p.x_q = x_q.data_ptr<int8_t>();
  p.w_q = w_q.data_ptr<int8_t>();
  p.x_scale = x_scale.data_ptr<float>();
  p.w_scale = w_scale.data_ptr<float>();
  p.bias = call.bias.defined() ? call.bias.data_ptr<float>() : nullptr;
  p.out = call.out.data_ptr();
  return call;
}

struct Quantize {
  at::Tensor q, scale, norm_weight, smooth;  // the vectors as contiguous fp32
  QuantizeParams params;
};

// x [M, K] with unit stride along K; q [M, K] int8 and scale [M] fp32.
inline Quantize prepare_quantize(const at::Tensor& x, const std::optional<at::Tensor>& norm_weight, double eps,
                                 const std::optional<at::Tensor>& smooth, at::DeviceType device) {
  TORCH_CHECK(x.dim() == 2, "x must be [M, K], got ", x.sizes());
  TORCH_CHECK(x.stride(1) == 1, "x needs unit stride along K");
  check_device(x, device, "x");
  Quantize call;
  QuantizeParams& p = call.params;
  p.dtype = element_type(x.scalar_type());
  p.rows = x.size(0);
  p.k = x.size(1);
  if (norm_weight.has_value()) call.norm_weight = norm_weight->to(at::kFloat).contiguous();
  if (smooth.has_value()) call.smooth = smooth->to(at::kFloat).contiguous();
  for (const at::Tensor* t : {&call.norm_weight, &call.smooth})
    TORCH_CHECK(!t->defined() || (t->numel() == p.k && t->device() == x.device()),
                "norm_weight and smooth must be [K] on ", x.device());
  call.q = at::empty({p.rows, p.k}, x.options().dtype(at::kChar));
  call.scale = at::empty({p.rows}, x.options().dtype(at::kFloat));
  p.x = x.data_ptr();
  p.x_stride = x.stride(0);
  p.norm_weight = call.norm_weight.defined() ? call.norm_weight.data_ptr<float>() : nullptr;
  p.eps = static_cast<float>(eps);
  p.smooth = call.smooth.defined() ? call.smooth.data_ptr<float>() : nullptr;
  p.q = call.q.data_ptr<int8_t>();
  p.scale = call.scale.data_ptr<float>();
  return call;
}

// x and out [tokens, groups, head_dim] (unit stride along head_dim, same dtype), cos and sin
// contiguous fp32 [tokens, head_dim / 2] on x's device.
inline RotaryParams rotary_params(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                                  const at::Tensor& out, at::DeviceType device) {
  TORCH_CHECK(x.dim() == 3, "x must be [tokens, groups, head_dim], got ", x.sizes());
  check_device(x, device, "x");
  TORCH_CHECK(out.sizes() == x.sizes() && out.scalar_type() == x.scalar_type() && out.device() == x.device(),
              "out must match x's shape, dtype and device");
  TORCH_CHECK(x.stride(2) == 1 && out.stride(2) == 1, "x and out need unit stride along head_dim");
  TORCH_CHECK(x.size(2) % 2 == 0, "head_dim must be even, got ", x.size(2));
  for (const at::Tensor* t : {&cos, &sin}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->device() == x.device(),
                "cos and sin must be contiguous fp32 on ", x.device());
    TORCH_CHECK(t->dim() == 2 && t->size(0) == x.size(0) && t->size(1) == x.size(2) / 2,
                "cos and sin must be [tokens, head_dim / 2] = [", x.size(0), ", ", x.size(2) / 2, "], got ", t->sizes());
  }
  RotaryParams p{};
  p.x = x.data_ptr();
  p.out = out.data_ptr();
  p.dtype = element_type(x.scalar_type());
  p.tokens = x.size(0);
  p.groups = x.size(1);
  p.head_dim = x.size(2);
  for (int d = 0; d < 2; ++d) {
    p.x_stride[d] = x.stride(d);
    p.out_stride[d] = out.stride(d);
  }
  p.cos = cos.data_ptr<float>();
  p.sin = sin.data_ptr<float>();
  return p;
}

}  // namespace modernbert_kernels
