// CPU encoder_layers_native: pre-norm encoder layers (ModernBERT's) in one native call, each: LayerNorm
// and Wqkv, RoPE on q and k in place, the block-sparse attention of the packed tokens reading q, k
// and v where Wqkv wrote them, Wo plus the residual, LayerNorm and the gated Wi, Wo plus the
// residual. Each linear is the streamed GEMM's (fp32 / bf16, a LayerNorm in its prologue) or the
// int8 linear's (quantizing its input, a LayerNorm without bias folded in). A few-token forward
// spends as long between its kernels as in them when each of a layer's seven ops is a call from
// Python: every streamed weight evicts the interpreter's and the dispatcher's working set, so each
// call costs 30-50 us more than its kernel (NOTES "The streamed GEMM's bf16 on AMX tiles, and one
// call a layer"), and a call a layer still ~80 us a layer (NOTES "All the layers in one call"). Here
// the ops call each other's C++ entry points (cpu_ops.h), and the layers follow one another in C++.
#include <optional>
#include <string>
#include <vector>

#include "../library.h"
#include "cpu_ops.h"

namespace modernbert_kernels {
namespace {

// A strided view of memory that `owner` holds, made by the shim directly (no dispatcher round trip).
Tensor view_of(const Tensor& owner, int64_t offset, std::initializer_list<int64_t> sizes,
               std::initializer_list<int64_t> strides) {
  const int64_t element_bytes = owner.scalar_type() == ScalarType::Float ? 4 : 2;
  void* data = static_cast<char*>(owner.data_ptr()) + offset * element_bytes;
  return torch::stable::from_blob(data, {sizes.begin(), sizes.size()}, {strides.begin(), strides.size()},
                                  owner.device(), owner.scalar_type());
}

// One linear of a layer: its tensors, [packed] (the streamed GEMM: out in x's dtype) or [w_q, w_scale,
// w_packed] / [w_q, w_scale, w_packed, smooth] (the int8 linear), and its bias.
struct LinearOperands {
  const Tensor* weights;
  size_t count;
  const std::optional<Tensor>* bias;
};

// The linear of x, its rows layer-normed first where norm_weight is given. activation: the streamed
// GEMM's gate, or the int8 epilogue's activation.
Tensor linear(const char* name, const LinearOperands& operands, const Tensor& x, int64_t out_features,
              const std::string& activation, ScalarType out_dtype, const std::optional<Tensor>& residual,
              const std::optional<Tensor>& norm_weight, const std::optional<Tensor>& norm_bias, double eps) {
  const Tensor* weight = operands.weights;
  if (operands.count == 1) {
    MBK_CHECK(out_dtype == x.scalar_type(), name, ": a streamed linear writes its input's dtype, ", x.scalar_type(),
              ", not ", out_dtype);
    return cpu::streamed_linear(x, weight[0], out_features, *operands.bias, activation, residual, norm_weight,
                                norm_bias, eps);
  }
  MBK_CHECK(operands.count == 3 || operands.count == 4, name,
            " must be [packed] (streamed) or [w_q, w_scale, w_packed(, smooth)] (int8), got ", operands.count,
            " tensors");
  MBK_CHECK(!norm_bias.has_value(), name, ": an int8 linear folds a LayerNorm without bias only");
  const std::optional<Tensor> smooth = operands.count == 4 ? std::optional<Tensor>(weight[3]) : std::nullopt;
  return cpu::int8_linear_dynamic(x, norm_weight, eps, smooth, weight[0], weight[1], *operands.bias, activation,
                                  out_dtype, residual, weight[2]);
}

// What one layer takes besides the hidden states and what all layers share.
struct LayerOperands {
  const std::optional<Tensor>* norms;  // attn weight, attn bias, mlp weight, mlp bias
  LinearOperands wqkv, wo, wi, wo2;
  int64_t heads, intermediate;
  const Tensor &cos, &sin, &row_offsets, &col_indices;
  int64_t block_size, window_left, window_right;
  double scale;
};

Tensor encoder_layer(const Tensor& hidden, const LayerOperands& layer, const Tensor& cu_seqlens, int64_t max_seqlen,
                     ScalarType qkv_dtype, const std::string& wi_activation, double eps) {
  const int64_t heads = layer.heads;
  MBK_CHECK(heads > 0, "heads must be positive, got ", heads);
  MBK_CHECK(layer.wo.count > 0 && layer.wqkv.count > 0, "Wqkv and Wo must be given");
  const int64_t tokens = hidden.size(0), width = hidden.size(1);
  // The attention's width, heads x head_dim, is Wo's input width: K of the int8 weight, or of the
  // packed streamed one (in pairs for bf16).
  const Tensor& wo_weight = layer.wo.weights[0];
  const bool wo_streamed = layer.wo.count == 1;
  MBK_CHECK(wo_weight.dim() == (wo_streamed ? 4 : 2), "Wo's weight must be a pack_streamed_weight copy or an int8 "
            "[out, in] matrix, got ", shape(wo_weight));
  const int64_t inner = wo_streamed ? wo_weight.size(2) * (wo_weight.scalar_type() == ScalarType::Float ? 1 : 2)
                                    : wo_weight.size(1);
  MBK_CHECK(inner % heads == 0, "Wo's input width ", inner, " is not a multiple of heads = ", heads);
  const int64_t head_dim = inner / heads;
  const Tensor &cos = layer.cos, &sin = layer.sin;
  MBK_CHECK(cos.dim() == 2 && cos.size(1) * 2 == head_dim, "cos and sin must be [tokens, head_dim / 2] = [", tokens,
            ", ", head_dim / 2, "], got ", shape(cos));
  const std::optional<Tensor>* norms = layer.norms;
  const Tensor qkv = linear("Wqkv", layer.wqkv, hidden, 3 * inner, "none", qkv_dtype, std::nullopt, norms[0], norms[1],
                            eps);  // [tokens, 3, heads, head_dim]
  const Tensor qk = view_of(qkv, 0, {tokens, 2 * heads, head_dim}, {3 * inner, head_dim, 1});
  cpu::rotary(rotary_params(qk, cos, sin, qk, DeviceType::CPU));
  const Tensor q = view_of(qkv, 0, {tokens, heads, head_dim}, {3 * inner, head_dim, 1});
  const Tensor k = view_of(qkv, inner, {tokens, heads, head_dim}, {3 * inner, head_dim, 1});
  const Tensor v = view_of(qkv, 2 * inner, {tokens, heads, head_dim}, {3 * inner, head_dim, 1});
  const AttentionForward attention = attention_forward_outputs(
      attention_params(q, k, v, layer.row_offsets, layer.col_indices, layer.block_size, layer.window_left,
                       layer.window_right, layer.scale, 0.0, std::nullopt, cu_seqlens, max_seqlen, DeviceType::CPU),
      q);
  if (tokens > 0) cpu::attention_forward(attention.params);
  const Tensor attended = view_of(attention.out, 0, {tokens, inner}, {inner, 1});
  const ScalarType dtype = hidden.scalar_type();
  const Tensor after_attention =
      linear("Wo", layer.wo, attended, width, "none", dtype, hidden, std::nullopt, std::nullopt, eps);
  const Tensor activated = linear("Wi", layer.wi, after_attention, layer.intermediate, wi_activation, dtype,
                                  std::nullopt, norms[2], norms[3], eps);
  return linear("Wo2", layer.wo2, activated, width, "none", dtype, after_attention, std::nullopt, std::nullopt, eps);
}

// The layers one after the other, each given by its entries of the per-layer lists (norms and
// biases: 4 a layer; weight_counts: how many of `weights` each of a layer's 4 linears takes).
Tensor encoder_layers(const Tensor& hidden, const std::vector<std::optional<Tensor>>& norms,
                      const std::vector<Tensor>& weights, const std::vector<int64_t>& weight_counts,
                      const std::vector<std::optional<Tensor>>& biases, const std::vector<int64_t>& heads,
                      const std::vector<int64_t>& intermediate, const std::vector<Tensor>& cos,
                      const std::vector<Tensor>& sin, const std::vector<Tensor>& row_offsets,
                      const std::vector<Tensor>& col_indices, const std::vector<int64_t>& block_size,
                      const std::vector<int64_t>& window_left, const std::vector<int64_t>& window_right,
                      const std::vector<double>& scale, const Tensor& cu_seqlens, int64_t max_seqlen,
                      ScalarType qkv_dtype, std::string wi_activation, double eps) {
  check_device(hidden, DeviceType::CPU, "hidden");
  MBK_CHECK(hidden.dim() == 2 && hidden.is_contiguous(), "hidden must be a contiguous [tokens, hidden_size] tensor, got ",
            shape(hidden));
  MBK_CHECK(hidden.scalar_type() == ScalarType::Float || hidden.scalar_type() == ScalarType::BFloat16,
            "hidden must be fp32 or bf16, got ", hidden.scalar_type());
  MBK_CHECK(qkv_dtype == ScalarType::Float || qkv_dtype == ScalarType::BFloat16, "qkv_dtype must be fp32 or bf16");
  MBK_CHECK(wi_activation != "none", "the encoder layer's Wi is a gated projection: name its activation");
  const size_t layers = heads.size();
  MBK_CHECK(layers > 0, "no layers given");
  MBK_CHECK(norms.size() == 4 * layers && biases.size() == 4 * layers && weight_counts.size() == 4 * layers,
            "norms, biases and weight_counts must hold 4 entries a layer for ", layers, " layers, got ", norms.size(),
            ", ", biases.size(), " and ", weight_counts.size());
  for (const size_t count : {intermediate.size(), cos.size(), sin.size(), row_offsets.size(), col_indices.size(),
                             block_size.size(), window_left.size(), window_right.size(), scale.size()})
    MBK_CHECK(count == layers, "every per-layer list must hold one entry a layer for ", layers, " layers, got ", count);
  int64_t weights_given = 0;
  for (const int64_t count : weight_counts) {
    MBK_CHECK(count >= 0, "weight_counts must not be negative");
    weights_given += count;
  }
  MBK_CHECK(weights_given == int64_t(weights.size()), "weight_counts add up to ", weights_given, " tensors, but ",
            weights.size(), " weights are given");
  const int64_t tokens = hidden.size(0);
  // The attention reads the lengths without checks of its own (its Python op checks them): here,
  // where they meet hidden's tokens, they are checked once for all the layers.
  MBK_CHECK(cu_seqlens.scalar_type() == ScalarType::Int && cu_seqlens.dim() == 1 && cu_seqlens.is_contiguous() &&
                cu_seqlens.numel() >= 2 && cu_seqlens.device() == hidden.device(),
            "cu_seqlens must be a contiguous 1-D int32 tensor [batch + 1] on hidden's device");
  const auto* bounds = static_cast<const int32_t*>(cu_seqlens.data_ptr());
  MBK_CHECK(bounds[0] == 0 && bounds[cu_seqlens.numel() - 1] == tokens, "cu_seqlens must run from 0 to the ", tokens,
            " tokens of hidden, got ", bounds[0], " to ", bounds[cu_seqlens.numel() - 1]);
  for (int64_t i = 1; i < cu_seqlens.numel(); ++i)
    MBK_CHECK(bounds[i] >= bounds[i - 1] && bounds[i] - bounds[i - 1] <= max_seqlen,
              "cu_seqlens must not decrease, and no sequence may be longer than max_seqlen = ", max_seqlen);
  Tensor out = hidden;
  const Tensor* next_weight = weights.data();
  for (size_t i = 0; i < layers; ++i) {
    LinearOperands linears[4];
    for (size_t j = 0; j < 4; ++j) {
      const size_t count = size_t(weight_counts[4 * i + j]);
      linears[j] = {next_weight, count, &biases[4 * i + j]};
      next_weight += count;
    }
    const LayerOperands layer{&norms[4 * i], linears[0], linears[1], linears[2], linears[3], heads[i],
                              intermediate[i], cos[i], sin[i], row_offsets[i], col_indices[i], block_size[i],
                              window_left[i], window_right[i], scale[i]};
    out = encoder_layer(out, layer, cu_seqlens, max_seqlen, qkv_dtype, wi_activation, eps);
  }
  return out;
}

}  // namespace

MODERNBERT_KERNELS_LIBRARY_IMPL(CPU, m) { m.impl("encoder_layers_native", TORCH_BOX(&encoder_layers)); }

}  // namespace modernbert_kernels
