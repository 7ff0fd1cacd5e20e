// The native ops' entry points, written once for every device. A kernel family instantiates them
// with a struct naming its device and its kernels, then registers them in its own
// TORCH_LIBRARY_IMPL (cpu/*_op.cpp, cuda/*_op.cpp); the schemas are in ops.cpp.
//
//   struct Kernels {
//     static constexpr DeviceType kDevice = ...;
//     static void attention_forward(const AttentionParams&);           // attention families
//     static void attention_backward(const AttentionBackwardParams&);
//     static void int8_linear(const Int8LinearParams&, const Tensor& x_q, const Tensor& w_q,  // int8
//                             const std::optional<Tensor>& w_packed);
//     static void quantize(const QuantizeParams&);
//     static void rotary(const RotaryParams&);                          // rotary
//   };
#pragma once

#include <torch/csrc/stable/accelerator.h>

#include <optional>
#include <string>
#include <tuple>
#include <utility>

#include "tensor_params.h"

namespace modernbert_kernels {

// Makes t's device current for a CUDA call (kernels launch on the current device's stream); no-op
// on the CPU.
struct DeviceScope {
  explicit DeviceScope(const Tensor& t) {
    if (t.device().type() == DeviceType::CUDA) guard.emplace(t.get_device_index());
  }
  std::optional<torch::stable::accelerator::DeviceGuard> guard;
};

template <typename Kernels>
std::tuple<Tensor, Tensor> attention_forward_op(const Tensor& q, const Tensor& k, const Tensor& v,
                                                        const Tensor& row_offsets, const Tensor& col_indices,
                                                        int64_t block_size, int64_t window_left,
                                                        int64_t window_right, double scale, double softcap,
                                                        const std::optional<Tensor>& key_padding_mask,
                                                        const std::optional<Tensor>& cu_seqlens,
                                                        int64_t max_seqlen) {
  const DeviceScope scope(q);
  const AttentionForward call =
      attention_forward_outputs(attention_params(q, k, v, row_offsets, col_indices, block_size, window_left,
                                                 window_right, scale, softcap, key_padding_mask, cu_seqlens, max_seqlen,
                                                 Kernels::kDevice),
                                q);
  if (q.numel() > 0) Kernels::attention_forward(call.params);
  return {call.out, call.lse};
}

template <typename Kernels>
std::tuple<Tensor, Tensor, Tensor> attention_backward_op(
    const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
    const Tensor& lse, const Tensor& row_offsets, const Tensor& col_indices, const Tensor& col_offsets,
    const Tensor& row_indices, int64_t block_size, int64_t window_left, int64_t window_right, double scale,
    double softcap, const std::optional<Tensor>& key_padding_mask, const std::optional<Tensor>& cu_seqlens, int64_t max_seqlen) {
  const DeviceScope scope(q);
  const AttentionBackward call = attention_backward_outputs(
      attention_params(q, k, v, row_offsets, col_indices, block_size, window_left, window_right, scale, softcap,
                       key_padding_mask, cu_seqlens, max_seqlen, Kernels::kDevice),
      dout, q, out, lse, col_offsets, row_indices);
  if (q.numel() > 0) Kernels::attention_backward(call.params);
  return {call.dq, call.dk, call.dv};
}

template <typename Kernels>
Tensor int8_linear_op(const Tensor& x_q, const Tensor& x_scale, const Tensor& w_q,
                          const Tensor& w_scale, const std::optional<Tensor>& bias, std::string activation,
                          ScalarType out_dtype, const std::optional<Tensor>& residual,
                          const std::optional<Tensor>& w_packed) {
  const DeviceScope scope(x_q);
  const Int8Linear call =
      prepare_int8_linear(x_q, x_scale, w_q, w_scale, bias, activation, out_dtype, residual, Kernels::kDevice);
  if (call.params.m > 0 && call.params.n > 0) Kernels::int8_linear(call.params, x_q, w_q, w_packed);
  return call.out;
}

template <typename Kernels>
std::tuple<Tensor, Tensor> quantize_per_token_op(const Tensor& x, const std::optional<Tensor>& norm_weight,
                                                         double eps, const std::optional<Tensor>& smooth) {
  const DeviceScope scope(x);
  const Quantize call = prepare_quantize(x, norm_weight, eps, smooth, Kernels::kDevice);
  if (call.params.rows > 0) Kernels::quantize(call.params);
  return {call.q, call.scale};
}

// quantize_per_token then int8_linear in one call: x [M, K] float -> act(dequantized products) in
// out_dtype, the op's own int8 copy of x in between (one boxed call instead of two at a few tokens).
template <typename Kernels>
Tensor int8_linear_dynamic_op(const Tensor& x, const std::optional<Tensor>& norm_weight, double eps,
                              const std::optional<Tensor>& smooth, const Tensor& w_q, const Tensor& w_scale,
                              const std::optional<Tensor>& bias, std::string activation, ScalarType out_dtype,
                              const std::optional<Tensor>& residual, const std::optional<Tensor>& w_packed) {
  const auto quantized = quantize_per_token_op<Kernels>(x, norm_weight, eps, smooth);
  return int8_linear_op<Kernels>(std::get<0>(quantized), std::get<1>(quantized), w_q, w_scale, bias,
                                 std::move(activation), out_dtype, residual, w_packed);
}

template <typename Kernels>
void rotary_embedding_op(const Tensor& x, const Tensor& cos, const Tensor& sin, const Tensor& out) {
  const DeviceScope scope(x);
  const RotaryParams params = rotary_params(x, cos, sin, out, Kernels::kDevice);
  if (x.numel() > 0) Kernels::rotary(params);
}

}  // namespace modernbert_kernels
