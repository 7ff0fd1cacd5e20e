// The CPU ops' C++ entry points that other CPU ops call directly (the encoder layer,
// encoder_layer_op.cpp), without a round trip through the dispatcher.
#pragma once

#include <optional>
#include <string>

#include "../tensor_params.h"

namespace modernbert_kernels::cpu {

// streamed_linear_native (streamed_linear_op.cpp).
Tensor streamed_linear(const Tensor& x, const Tensor& packed, int64_t out_features, const std::optional<Tensor>& bias,
                       std::string gate, const std::optional<Tensor>& residual, const std::optional<Tensor>& norm_weight,
                       const std::optional<Tensor>& norm_bias, double eps);

// int8_linear_dynamic_native (int8_linear_op.cpp).
Tensor int8_linear_dynamic(const Tensor& x, const std::optional<Tensor>& norm_weight, double eps,
                           const std::optional<Tensor>& smooth, const Tensor& w_q, const Tensor& w_scale,
                           const std::optional<Tensor>& bias, std::string activation, ScalarType out_dtype,
                           const std::optional<Tensor>& residual, const std::optional<Tensor>& w_packed);

// The CPU attention forward and RoPE on their parameters, spread over torch's threads
// (attention_op.cpp, rotary_op.cpp).
void attention_forward(const AttentionParams& p);
void rotary(const RotaryParams& p);

}  // namespace modernbert_kernels::cpu
