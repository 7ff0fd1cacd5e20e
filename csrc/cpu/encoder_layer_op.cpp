// CPU streamed_encoder_layer_native: one pre-norm encoder layer (ModernBERT's) in one native call,
// its four linears on the streamed GEMM: LayerNorm and Wqkv, RoPE on q and k in place, the
// block-sparse attention of the packed tokens reading q, k and v where Wqkv wrote them, Wo plus the
// residual, LayerNorm and the gated Wi, Wo plus the residual. A few-token forward spends as long
// between its kernels as in them when each of a layer's seven ops is a call from Python: every
// streamed weight evicts the interpreter's and the dispatcher's working set, so each call costs
// 30-50 us more than its kernel (NOTES "A GEMM that streams its weight"). Here the ops call each
// other's C++ entry points (cpu_ops.h).
#include <optional>
#include <string>

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

Tensor streamed_encoder_layer(const Tensor& hidden, const std::optional<Tensor>& attn_norm_weight,
                              const std::optional<Tensor>& attn_norm_bias, const Tensor& wqkv,
                              const std::optional<Tensor>& wqkv_bias, const Tensor& cos, const Tensor& sin,
                              int64_t heads, const Tensor& row_offsets, const Tensor& col_indices,
                              int64_t block_size, int64_t window_left, int64_t window_right, double scale,
                              const Tensor& cu_seqlens, int64_t max_seqlen, const Tensor& wo,
                              const std::optional<Tensor>& wo_bias, const std::optional<Tensor>& mlp_norm_weight,
                              const std::optional<Tensor>& mlp_norm_bias, const Tensor& wi,
                              const std::optional<Tensor>& wi_bias, std::string gate, int64_t intermediate,
                              const Tensor& wo2, const std::optional<Tensor>& wo2_bias, double eps) {
  check_device(hidden, DeviceType::CPU, "hidden");
  MBK_CHECK(hidden.dim() == 2 && hidden.is_contiguous(), "hidden must be a contiguous [tokens, hidden_size] tensor, got ",
            shape(hidden));
  MBK_CHECK(hidden.scalar_type() == ScalarType::Float || hidden.scalar_type() == ScalarType::BFloat16,
            "hidden must be fp32 or bf16, got ", hidden.scalar_type());
  for (const Tensor* weight : {&wqkv, &wo, &wi, &wo2})
    MBK_CHECK(weight->scalar_type() == hidden.scalar_type(), "the packed weights must be of hidden's dtype, ",
              hidden.scalar_type(), "; got ", weight->scalar_type());
  MBK_CHECK(heads > 0, "heads must be positive, got ", heads);
  MBK_CHECK(gate != "none", "the encoder layer's Wi is a gated projection: gate must name its activation");
  const int64_t tokens = hidden.size(0), width = hidden.size(1);
  // The attention's width, heads x head_dim, is Wo's input width (K, in pairs for bf16).
  MBK_CHECK(wo.dim() == 4, "Wo must be packed by pack_streamed_weight, got ", shape(wo));
  const int64_t inner = wo.size(2) * (hidden.scalar_type() == ScalarType::Float ? 1 : 2);
  MBK_CHECK(inner % heads == 0, "Wo's input width ", inner, " is not a multiple of heads = ", heads);
  const int64_t head_dim = inner / heads;
  MBK_CHECK(cos.dim() == 2 && cos.size(1) * 2 == head_dim, "cos and sin must be [tokens, head_dim / 2] = [", tokens,
            ", ", head_dim / 2, "], got ", shape(cos));
  const Tensor qkv = cpu::streamed_linear(hidden, wqkv, 3 * inner, wqkv_bias, "none", std::nullopt, attn_norm_weight,
                                          attn_norm_bias, eps);  // [tokens, 3, heads, head_dim]
  const Tensor qk = view_of(qkv, 0, {tokens, 2 * heads, head_dim}, {3 * inner, head_dim, 1});
  cpu::rotary(rotary_params(qk, cos, sin, qk, DeviceType::CPU));
  const Tensor q = view_of(qkv, 0, {tokens, heads, head_dim}, {3 * inner, head_dim, 1});
  const Tensor k = view_of(qkv, inner, {tokens, heads, head_dim}, {3 * inner, head_dim, 1});
  const Tensor v = view_of(qkv, 2 * inner, {tokens, heads, head_dim}, {3 * inner, head_dim, 1});
  const AttentionForward attention = attention_forward_outputs(
      attention_params(q, k, v, row_offsets, col_indices, block_size, window_left, window_right, scale, 0.0,
                       std::nullopt, cu_seqlens, max_seqlen, DeviceType::CPU),
      q);
  if (tokens > 0) cpu::attention_forward(attention.params);
  const Tensor attended = view_of(attention.out, 0, {tokens, inner}, {inner, 1});
  const Tensor after_attention =
      cpu::streamed_linear(attended, wo, width, wo_bias, "none", hidden, std::nullopt, std::nullopt, eps);
  const Tensor activated = cpu::streamed_linear(after_attention, wi, intermediate, wi_bias, gate, std::nullopt,
                                                mlp_norm_weight, mlp_norm_bias, eps);
  return cpu::streamed_linear(activated, wo2, width, wo2_bias, "none", after_attention, std::nullopt, std::nullopt,
                              eps);
}

}  // namespace

MODERNBERT_KERNELS_LIBRARY_IMPL(CPU, m) {
  m.impl("streamed_encoder_layer_native", TORCH_BOX(&streamed_encoder_layer));
}

}  // namespace modernbert_kernels
