// The native ops' entry points, written once for every device. A kernel family instantiates them
// with a struct naming its device and its kernels, then registers them in its own
// TORCH_LIBRARY_IMPL (cpu/*_op.cpp, cuda/*_op.cpp); the schemas are in ops.cpp.
//
//   struct Kernels {
//     static constexpr at::DeviceType kDevice = ...;
//     static void attention_forward(const AttentionParams&);           // attention families
//     static void attention_backward(const AttentionBackwardParams&);
//     static void int8_linear(const Int8LinearParams&, const at::Tensor& x_q, const at::Tensor& w_q);  // int8
//     static void quantize(const QuantizeParams&);
//     static void rotary(const RotaryParams&);                          // rotary
//   };
#pragma once

#include <c10/core/DeviceGuard.h>

#include <tuple>

#include "tensor_params.h"

namespace modernbert_kernels {

template <typename Kernels>
std::tuple<at::Tensor, at::Tensor> attention_forward_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                        const at::Tensor& row_offsets, const at::Tensor& col_indices,
                                                        int64_t block_size, int64_t window_left,
                                                        int64_t window_right, double scale,
                                                        const std::optional<at::Tensor>& key_padding_mask,
                                                        const std::optional<at::Tensor>& cu_seqlens,
                                                        int64_t max_seqlen) {
  const c10::DeviceGuard guard(q.device());
  const AttentionForward call =
      attention_forward_outputs(attention_params(q, k, v, row_offsets, col_indices, block_size, window_left,
                                                 window_right, scale, key_padding_mask, cu_seqlens, max_seqlen,
                                                 Kernels::kDevice),
                                q);
  if (q.numel() > 0) Kernels::attention_forward(call.params);
  return {call.out, call.lse};
}

template <typename Kernels>
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_op(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& row_offsets, const at::Tensor& col_indices, const at::Tensor& col_offsets,
    const at::Tensor& row_indices, int64_t block_size, int64_t window_left, int64_t window_right, double scale,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen) {
  const c10::DeviceGuard guard(q.device());
  const AttentionBackward call = attention_backward_outputs(
      attention_params(q, k, v, row_offsets, col_indices, block_size, window_left, window_right, scale,
                       key_padding_mask, cu_seqlens, max_seqlen, Kernels::kDevice),
      dout, q, out, lse, col_offsets, row_indices);
  if (q.numel() > 0) Kernels::attention_backward(call.params);
  return {call.dq, call.dk, call.dv};
}

template <typename Kernels>
at::Tensor int8_linear_op(const at::Tensor& x_q, const at::Tensor& x_scale, const at::Tensor& w_q,
                          const at::Tensor& w_scale, const std::optional<at::Tensor>& bias, c10::string_view activation,
                          at::ScalarType out_dtype) {
  const c10::DeviceGuard guard(x_q.device());
  const Int8Linear call = prepare_int8_linear(x_q, x_scale, w_q, w_scale, bias, activation, out_dtype, Kernels::kDevice);
  if (call.params.m > 0 && call.params.n > 0) Kernels::int8_linear(call.params, x_q, w_q);
  return call.out;
}

template <typename Kernels>
std::tuple<at::Tensor, at::Tensor> quantize_per_token_op(const at::Tensor& x, const std::optional<at::Tensor>& norm_weight,
                                                         double eps, const std::optional<at::Tensor>& smooth) {
  const c10::DeviceGuard guard(x.device());
  const Quantize call = prepare_quantize(x, norm_weight, eps, smooth, Kernels::kDevice);
  if (call.params.rows > 0) Kernels::quantize(call.params);
  return {call.q, call.scale};
}

template <typename Kernels>
void rotary_embedding_op(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& out) {
  const c10::DeviceGuard guard(x.device());
  const RotaryParams params = rotary_params(x, cos, sin, out, Kernels::kDevice);
  if (x.numel() > 0) Kernels::rotary(params);
}

}  // namespace modernbert_kernels
