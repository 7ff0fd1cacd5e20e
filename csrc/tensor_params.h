// Tensors -> the kernels' parameter structs (params.h), with every argument check, for the CPU
// and the CUDA entry points alike (ops.h). The op's outputs are allocated here too, so both
// devices return the same shapes. Written against PyTorch's stable ABI (torch/csrc/stable), so the
// built library needs no C++ symbol of libtorch and one binary serves every torch from the target
// version on (TORCH_TARGET_VERSION, set by setup.py).
#pragma once

#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <optional>
#include <sstream>
#include <string>
#include <string_view>

#include "params.h"

namespace modernbert_kernels {

using Tensor = torch::stable::Tensor;
using torch::headeronly::DeviceType;
using torch::headeronly::ScalarType;

// Argument errors reach Python as RuntimeError with this message.
#define MBK_CHECK(cond, ...) STD_TORCH_CHECK(cond, __VA_ARGS__)

inline std::string shape(const Tensor& t) {
  std::ostringstream out;
  out << "[";
  for (int64_t d = 0; d < t.dim(); ++d) out << (d ? ", " : "") << t.size(d);
  out << "]";
  return out.str();
}

inline const char* device_name(DeviceType device) {
  switch (device) {
    case DeviceType::CPU: return "cpu";
    case DeviceType::CUDA: return "cuda";
    default: return "non-CPU/CUDA";
  }
}

inline bool same_shape(const Tensor& a, const Tensor& b) { return a.sizes() == b.sizes(); }

inline int64_t last_stride(const Tensor& t) { return t.stride(t.dim() - 1); }

inline Tensor empty(std::initializer_list<int64_t> sizes, ScalarType dtype, torch::stable::Device device) {
  return torch::stable::empty(torch::headeronly::IntHeaderOnlyArrayRef(sizes.begin(), sizes.size()), dtype,
                              std::nullopt, device);
}
inline Tensor empty(std::initializer_list<int64_t> sizes, ScalarType dtype, const Tensor& like) {
  return empty(sizes, dtype, like.device());
}

// A contiguous tensor of t's shape, dtype and device (empty_like would keep t's strides).
inline Tensor empty_like_shape(const Tensor& t) {
  return torch::stable::empty(t.sizes(), t.scalar_type(), std::nullopt, t.device());
}

// A contiguous fp32 copy of a small vector (bias, norm weight, smoothing), kept alive by its owner;
// t itself where it already is one (the usual case: callers pass fp32), without the two dispatcher
// round trips of to() and contiguous() on every call.
inline Tensor contiguous_float(const Tensor& t) {
  if (t.scalar_type() == ScalarType::Float && t.is_contiguous()) return t;
  return torch::stable::contiguous(torch::stable::to(t, ScalarType::Float));
}

inline ElementType element_type(ScalarType dtype) {
  switch (dtype) {
    case ScalarType::Float: return ElementType::Float32;
    case ScalarType::BFloat16: return ElementType::BFloat16;
    case ScalarType::Half: return ElementType::Float16;
    default: MBK_CHECK(false, "expected fp32, bf16 or fp16, got ", dtype);
  }
  return ElementType::Float32;
}

inline Activation parse_activation(std::string_view name) {
  if (name == "none") return Activation::None;
  if (name == "gelu") return Activation::Gelu;
  if (name == "gelu_tanh") return Activation::GeluTanh;
  if (name == "geglu") return Activation::Geglu;
  MBK_CHECK(false, "activation must be none, gelu, gelu_tanh or geglu, got ", name);
  return Activation::None;
}

inline void check_device(const Tensor& t, DeviceType device, const char* name) {
  MBK_CHECK(t.device().type() == device, name, ": expected a ", device_name(device), " tensor, got a ",
            device_name(t.device().type()), " one");
}

// (batch, head, token) strides of [batch, heads, seq, dim], or of [tokens, heads, dim] (varlen).
inline void token_strides(const Tensor& t, bool varlen, int64_t* stride) {
  stride[0] = varlen ? 0 : t.stride(0);
  stride[1] = t.stride(1);
  stride[2] = t.stride(varlen ? 0 : 2);
}

struct AttentionForward {
  Tensor out, lse;
  AttentionParams params;
};

struct AttentionBackward {
  Tensor dq, dk, dv, delta;
  AttentionBackwardParams params;
};

namespace detail {

inline void check_attention_inputs(const Tensor& q, const Tensor& k, const Tensor& v,
                                   const Tensor& row_offsets, const Tensor& col_indices, int64_t block_size,
                                   const std::optional<Tensor>& key_padding_mask,
                                   const std::optional<Tensor>& cu_seqlens, DeviceType device) {
  const bool varlen = cu_seqlens.has_value();
  MBK_CHECK(q.dim() == (varlen ? 3 : 4), "q must be ", varlen ? "[total_tokens, heads, head_dim]" : "[batch, heads, seq, head_dim]",
              ", got ", shape(q));
  for (const Tensor* t : {&k, &v}) {
    MBK_CHECK(same_shape(*t, q), "k and v must have q's shape ", shape(q), ", got ", shape(*t));
    MBK_CHECK(t->scalar_type() == q.scalar_type(), "q, k and v must share a dtype");
  }
  for (const Tensor* t : {&q, &k, &v}) {
    check_device(*t, device, "q, k and v");
    MBK_CHECK(t->device() == q.device(), "q, k and v must be on one device");
    MBK_CHECK(last_stride(*t) == 1, "q, k and v need unit stride along head_dim");
  }
  MBK_CHECK(q.scalar_type() == ScalarType::Float || q.scalar_type() == ScalarType::BFloat16 || q.scalar_type() == ScalarType::Half,
              "q must be fp32, bf16 or fp16, got ", q.scalar_type());
  const int64_t head_dim = q.size(q.dim() - 1);
  MBK_CHECK(head_dim == 32 || head_dim == 64 || head_dim == 128 || head_dim == 256,
            "head_dim must be 32, 64, 128 or 256, got ", head_dim);
  MBK_CHECK(block_size >= 16 && block_size <= kMaxBlockSize && (block_size & (block_size - 1)) == 0,
              "block_size must be a power of two in [16, 128], got ", block_size);
  for (const Tensor* t : {&row_offsets, &col_indices}) {
    MBK_CHECK(t->scalar_type() == ScalarType::Int && t->is_contiguous() && t->device() == q.device(),
                "layout tensors must be contiguous int32 on q's device");
  }
  MBK_CHECK(row_offsets.dim() == 2, "row_offsets must be [layout_heads, num_blocks + 1]");
  const int64_t heads = q.size(1);
  MBK_CHECK(row_offsets.size(0) == 1 || row_offsets.size(0) == heads, "the layout has ", row_offsets.size(0),
              " heads; q has ", heads);
  if (varlen) {
    MBK_CHECK(!key_padding_mask.has_value(), "key_padding_mask and cu_seqlens exclude each other");
    MBK_CHECK(cu_seqlens->scalar_type() == ScalarType::Int && cu_seqlens->dim() == 1 && cu_seqlens->is_contiguous() &&
                    cu_seqlens->numel() >= 2 && cu_seqlens->device() == q.device(),
                "cu_seqlens must be a contiguous 1-D int32 tensor [batch + 1] on q's device");
  }
  if (key_padding_mask.has_value()) {
    MBK_CHECK(key_padding_mask->scalar_type() == ScalarType::Bool && key_padding_mask->is_contiguous() &&
                    key_padding_mask->device() == q.device(),
                "key_padding_mask must be a contiguous bool tensor on q's device");
    MBK_CHECK(key_padding_mask->dim() == 2 && key_padding_mask->size(0) == q.size(0) &&
                    key_padding_mask->size(1) == q.size(2),
                "key_padding_mask must be [batch, seq]");
  }
}

}  // namespace detail

// Checks the inputs of block_sparse_attention_{forward,backward}_native for `device` tensors.
inline AttentionParams attention_params(const Tensor& q, const Tensor& k, const Tensor& v,
                                        const Tensor& row_offsets, const Tensor& col_indices,
                                        int64_t block_size, int64_t window_left, int64_t window_right,
                                        double scale, double softcap,
                                        const std::optional<Tensor>& key_padding_mask,
                                        const std::optional<Tensor>& cu_seqlens, int64_t max_seqlen,
                                        DeviceType device) {
  detail::check_attention_inputs(q, k, v, row_offsets, col_indices, block_size, key_padding_mask, cu_seqlens, device);
  const bool varlen = cu_seqlens.has_value();
  AttentionParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.dtype = element_type(q.scalar_type());
  p.batch = varlen ? cu_seqlens->numel() - 1 : q.size(0);
  p.heads = q.size(1);
  p.head_dim = q.size(q.dim() - 1);
  p.seq_len = varlen ? max_seqlen : q.size(2);
  const int64_t num_blocks = row_offsets.size(1) - 1;
  MBK_CHECK(p.seq_len <= num_blocks * block_size, "the layout covers ", num_blocks * block_size,
              " tokens but the sequence length is ", p.seq_len);
  token_strides(q, varlen, p.q_stride);
  token_strides(k, varlen, p.k_stride);
  token_strides(v, varlen, p.v_stride);
  p.cu_seqlens = varlen ? static_cast<int32_t*>(cu_seqlens->data_ptr()) : nullptr;
  p.key_padding = key_padding_mask.has_value() ? static_cast<const uint8_t*>(key_padding_mask->data_ptr())
                                               : nullptr;
  p.row_offsets = static_cast<int32_t*>(row_offsets.data_ptr());
  p.col_indices = static_cast<int32_t*>(col_indices.data_ptr());
  p.layout_head_stride = row_offsets.size(0) == 1 ? 0 : row_offsets.size(1);
  p.block_size = static_cast<int>(block_size);
  // The op's schema says -1 for an unbounded side (as FlashAttention's window_size does).
  p.window_left = window_left < 0 ? kUnboundedWindow : window_left;
  p.window_right = window_right < 0 ? kUnboundedWindow : window_right;
  p.banded = window_left >= 0 || window_right >= 0;
  p.scale = static_cast<float>(scale);
  MBK_CHECK(softcap >= 0 && softcap < __builtin_inf(), "softcap must be 0 (no cap) or finite and > 0, got ", softcap);
  p.softcap = static_cast<float>(softcap);
  return p;
}

inline void set_lse(AttentionParams& p, const Tensor& lse) {
  const bool varlen = p.cu_seqlens != nullptr;
  p.lse = static_cast<float*>(lse.data_ptr());
  p.lse_stride[0] = varlen ? 0 : lse.stride(0);
  p.lse_stride[1] = lse.stride(varlen ? 0 : 1);
}

// The forward's outputs: out like q; lse [batch, heads, seq] (or [heads, total_tokens] for a
// varlen batch), fp32.
inline AttentionForward attention_forward_outputs(const AttentionParams& params, const Tensor& q) {
  const bool varlen = params.cu_seqlens != nullptr;
  AttentionForward call{empty_like_shape(q),
                        varlen ? empty({params.heads, q.size(0)}, ScalarType::Float, q)
                               : empty({params.batch, params.heads, params.seq_len}, ScalarType::Float, q),
                        params};
  call.params.out = call.out.data_ptr();
  token_strides(call.out, varlen, call.params.out_stride);
  set_lse(call.params, call.lse);
  return call;
}

// The backward's inputs beyond the forward's (checked) and outputs: dq, dk, dv like q; delta like
// lse (written by the dq pass, read by the dk / dv pass).
inline AttentionBackward attention_backward_outputs(const AttentionParams& params, const Tensor& dout,
                                                    const Tensor& q, const Tensor& out, const Tensor& lse,
                                                    const Tensor& col_offsets, const Tensor& row_indices) {
  for (const Tensor* t : {&dout, &out}) {
    MBK_CHECK(same_shape(*t, q) && t->scalar_type() == q.scalar_type() && last_stride(*t) == 1 &&
                    t->device() == q.device(),
                "dout and out must match q's shape, dtype and device with unit stride along head_dim");
  }
  MBK_CHECK(lse.scalar_type() == ScalarType::Float && lse.is_contiguous() && lse.device() == q.device(),
              "lse must be contiguous fp32 on q's device");
  for (const Tensor* t : {&col_offsets, &row_indices}) {
    MBK_CHECK(t->scalar_type() == ScalarType::Int && t->is_contiguous() && t->device() == q.device(),
                "layout tensors must be contiguous int32 on q's device");
  }
  const bool varlen = params.cu_seqlens != nullptr;
  AttentionBackward call;
  AttentionBackwardParams& p = call.params;
  static_cast<AttentionParams&>(p) = params;
  call.dq = empty_like_shape(q);
  call.dk = empty_like_shape(q);
  call.dv = empty_like_shape(q);
  call.delta = empty_like_shape(lse);
  p.out = const_cast<void*>(out.data_ptr());
  token_strides(out, varlen, p.out_stride);
  set_lse(p, lse);
  p.dout = dout.data_ptr();
  token_strides(dout, varlen, p.dout_stride);
  p.dq = call.dq.data_ptr();
  p.dk = call.dk.data_ptr();
  p.dv = call.dv.data_ptr();
  token_strides(call.dq, varlen, p.grad_stride);
  p.delta = static_cast<float*>(call.delta.data_ptr());
  p.col_offsets = static_cast<int32_t*>(col_offsets.data_ptr());
  p.row_indices = static_cast<int32_t*>(row_indices.data_ptr());
  return call;
}

struct Int8Linear {
  Tensor out, bias;  // bias as contiguous fp32 (kept alive for the kernel)
  Int8LinearParams params;
};

// K x 128^2 <= 2^31: the int32 sums of K int8 products cannot overflow (as int8.MAX_K). The int8
// linear and the packing of its weight (whose gather offsets, up to 15 K, must fit int32) check it.
inline void check_int8_k(int64_t k) {
  MBK_CHECK(k <= (int64_t(1) << 17), "K = ", k, " is above 131072: int32 sums of K int8 products could overflow");
}

// x_q [M, K] and w_q [N, K] int8, contiguous; x_scale [M] and w_scale [N] fp32; out [M, N] (or
// [M, N / 2] for geglu) in out_dtype, and residual (if given) like out, contiguous.
inline Int8Linear prepare_int8_linear(const Tensor& x_q, const Tensor& x_scale, const Tensor& w_q,
                                      const Tensor& w_scale, const std::optional<Tensor>& bias,
                                      std::string_view activation, ScalarType out_dtype,
                                      const std::optional<Tensor>& residual, DeviceType device) {
  MBK_CHECK(x_q.scalar_type() == ScalarType::Char && w_q.scalar_type() == ScalarType::Char, "x_q and w_q must be int8");
  MBK_CHECK(x_q.dim() == 2 && w_q.dim() == 2 && x_q.size(1) == w_q.size(1),
              "x_q [M, K] and w_q [N, K] must share K, got ", shape(x_q), " and ", shape(w_q));
  MBK_CHECK(x_q.is_contiguous() && w_q.is_contiguous(), "x_q and w_q must be contiguous");
  check_int8_k(x_q.size(1));
  MBK_CHECK(x_scale.scalar_type() == ScalarType::Float && w_scale.scalar_type() == ScalarType::Float &&
                  x_scale.is_contiguous() && w_scale.is_contiguous(),
              "scales must be contiguous fp32");
  MBK_CHECK(x_scale.numel() == x_q.size(0) && w_scale.numel() == w_q.size(0), "x_scale must be [M], w_scale [N]");
  check_device(x_q, device, "x_q");
  for (const Tensor* t : {&x_scale, &w_q, &w_scale})
    MBK_CHECK(t->device() == x_q.device(), "x_q, x_scale, w_q and w_scale must be on one device");
  if (bias.has_value())
    MBK_CHECK(bias->dim() == 1 && bias->numel() == w_q.size(0) && bias->device() == x_q.device(),
                "bias must be [N] on x_q's device");
  Int8Linear call;
  Int8LinearParams& p = call.params;
  p.activation = parse_activation(activation);
  MBK_CHECK(p.activation != Activation::Geglu || w_q.size(0) % 2 == 0, "geglu needs an even number of weight rows");
  p.out_dtype = element_type(out_dtype);
  p.m = x_q.size(0);
  p.n = w_q.size(0);
  p.k = x_q.size(1);
  const int64_t out_cols = p.activation == Activation::Geglu ? p.n / 2 : p.n;
  if (residual.has_value())
    MBK_CHECK(residual->dim() == 2 && residual->size(0) == p.m && residual->size(1) == out_cols &&
                  residual->scalar_type() == out_dtype && residual->is_contiguous() && residual->device() == x_q.device(),
              "residual must be a contiguous [", p.m, ", ", out_cols, "] tensor of the output's dtype on x_q's device, got ",
              shape(*residual));
  call.out = empty({p.m, out_cols}, out_dtype, x_q);
  if (bias.has_value()) call.bias = contiguous_float(*bias);
  p.x_q = static_cast<int8_t*>(x_q.data_ptr());
  p.w_q = static_cast<int8_t*>(w_q.data_ptr());
  p.x_scale = static_cast<float*>(x_scale.data_ptr());
  p.w_scale = static_cast<float*>(w_scale.data_ptr());
  p.bias = call.bias.defined() ? static_cast<float*>(call.bias.data_ptr()) : nullptr;
  p.out = call.out.data_ptr();
  p.residual = residual.has_value() ? residual->data_ptr() : nullptr;
  return call;
}

struct Quantize {
  Tensor q, scale, norm_weight, smooth;  // the vectors as contiguous fp32
  QuantizeParams params;
};

// x [M, K] with unit stride along K; q [M, K] int8 and scale [M] fp32.
inline Quantize prepare_quantize(const Tensor& x, const std::optional<Tensor>& norm_weight, double eps,
                                 const std::optional<Tensor>& smooth, DeviceType device) {
  MBK_CHECK(x.dim() == 2, "x must be [M, K], got ", shape(x));
  MBK_CHECK(x.stride(1) == 1, "x needs unit stride along K");
  check_device(x, device, "x");
  Quantize call;
  QuantizeParams& p = call.params;
  p.dtype = element_type(x.scalar_type());
  p.rows = x.size(0);
  p.k = x.size(1);
  if (norm_weight.has_value()) call.norm_weight = contiguous_float(*norm_weight);
  if (smooth.has_value()) call.smooth = contiguous_float(*smooth);
  for (const Tensor* t : {&call.norm_weight, &call.smooth})
    MBK_CHECK(!t->defined() || (t->numel() == p.k && t->device() == x.device()),
                "norm_weight and smooth must be [K] on x's device");
  call.q = empty({p.rows, p.k}, ScalarType::Char, x);
  call.scale = empty({p.rows}, ScalarType::Float, x);
  p.x = x.data_ptr();
  p.x_stride = x.stride(0);
  p.norm_weight = call.norm_weight.defined() ? static_cast<float*>(call.norm_weight.data_ptr()) : nullptr;
  p.eps = static_cast<float>(eps);
  p.smooth = call.smooth.defined() ? static_cast<float*>(call.smooth.data_ptr()) : nullptr;
  p.q = static_cast<int8_t*>(call.q.data_ptr());
  p.scale = static_cast<float*>(call.scale.data_ptr());
  return call;
}

// x and out [tokens, groups, head_dim] (unit stride along head_dim, same dtype), cos and sin
// contiguous fp32 [tokens, head_dim / 2] on x's device.
inline RotaryParams rotary_params(const Tensor& x, const Tensor& cos, const Tensor& sin,
                                  const Tensor& out, DeviceType device) {
  MBK_CHECK(x.dim() == 3, "x must be [tokens, groups, head_dim], got ", shape(x));
  check_device(x, device, "x");
  MBK_CHECK(same_shape(out, x) && out.scalar_type() == x.scalar_type() && out.device() == x.device(),
              "out must match x's shape, dtype and device");
  MBK_CHECK(x.stride(2) == 1 && out.stride(2) == 1, "x and out need unit stride along head_dim");
  MBK_CHECK(x.size(2) % 2 == 0, "head_dim must be even, got ", x.size(2));
  for (const Tensor* t : {&cos, &sin}) {
    MBK_CHECK(t->scalar_type() == ScalarType::Float && t->is_contiguous() && t->device() == x.device(),
                "cos and sin must be contiguous fp32 on x's device");
    MBK_CHECK(t->dim() == 2 && t->size(0) == x.size(0) && t->size(1) == x.size(2) / 2,
                "cos and sin must be [tokens, head_dim / 2] = [", x.size(0), ", ", x.size(2) / 2, "], got ", shape(*t));
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
  p.cos = static_cast<float*>(cos.data_ptr());
  p.sin = static_cast<float*>(sin.data_ptr());
  return p;
}

}  // namespace modernbert_kernels
