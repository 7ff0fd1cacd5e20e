// CPU encoder_layer_native: one pre-norm encoder layer (ModernBERT's) in one native call: LayerNorm
// and Wqkv, RoPE on q and k in place, the block-sparse attention of the packed tokens reading q, k
// and v where Wqkv wrote them, Wo plus the residual, LayerNorm and the gated Wi, Wo plus the
// residual. Each linear is the streamed GEMM's (fp32 / bf16, a LayerNorm in its prologue) or the
// int8 linear's (quantizing its input, a LayerNorm without bias folded in). A few-token forward
// spends as long between its kernels as in them when each of a layer's seven ops is a call from
// Python: every streamed weight evicts the interpreter's and the dispatcher's working set, so each
// call costs 30-50 us more than its kernel (NOTES "The streamed GEMM's bf16 on AMX tiles, and one
// call a layer"). Here the ops call each other's C++ entry points (cpu_ops.h).
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

// A linear given as [packed] (the streamed GEMM: out in x's dtype) or [w_q, w_scale, w_packed] /
// [w_q, w_scale, w_packed, smooth] (the int8 linear), with x's rows layer-normed first where
// norm_weight is given. activation: the streamed GEMM's gate, or the int8 epilogue's activation.
Tensor linear(const char* name, const std::vector<Tensor>& weight, const std::optional<Tensor>& bias, const Tensor& x,
              int64_t out_features, const std::string& activation, ScalarType out_dtype,
              const std::optional<Tensor>& residual, const std::optional<Tensor>& norm_weight,
              const std::optional<Tensor>& norm_bias, double eps) {
  if (weight.size() == 1) {
    MBK_CHECK(out_dtype == x.scalar_type(), name, ": a streamed linear writes its input's dtype, ", x.scalar_type(),
              ", not ", out_dtype);
    return cpu::streamed_linear(x, weight[0], out_features, bias, activation, residual, norm_weight, norm_bias, eps);
  }
  MBK_CHECK(weight.size() == 3 || weight.size() == 4, name,
            " must be [packed] (streamed) or [w_q, w_scale, w_packed(, smooth)] (int8), got ", weight.size(),
            " tensors");
  MBK_CHECK(!norm_bias.has_value(), name, ": an int8 linear folds a LayerNorm without bias only");
  const std::optional<Tensor> smooth = weight.size() == 4 ? std::optional<Tensor>(weight[3]) : std::nullopt;
  return cpu::int8_linear_dynamic(x, norm_weight, eps, smooth, weight[0], weight[1], bias, activation, out_dtype,
                                  residual, weight[2]);
}

Tensor encoder_layer(const Tensor& hidden, const std::optional<Tensor>& attn_norm_weight,
                     const std::optional<Tensor>& attn_norm_bias, const std::vector<Tensor>& wqkv,
                     const std::optional<Tensor>& wqkv_bias, ScalarType qkv_dtype, const Tensor& cos, const Tensor& sin,
                     int64_t heads, const Tensor& row_offsets, const Tensor& col_indices, int64_t block_size,
                     int64_t window_left, int64_t window_right, double scale, const Tensor& cu_seqlens,
                     int64_t max_seqlen, const std::vector<Tensor>& wo, const std::optional<Tensor>& wo_bias,
                     const std::optional<Tensor>& mlp_norm_weight, const std::optional<Tensor>& mlp_norm_bias,
                     const std::vector<Tensor>& wi, const std::optional<Tensor>& wi_bias, std::string wi_activation,
                     int64_t intermediate, const std::vector<Tensor>& wo2, const std::optional<Tensor>& wo2_bias,
                     double eps) {
  check_device(hidden, DeviceType::CPU, "hidden");
  MBK_CHECK(hidden.dim() == 2 && hidden.is_contiguous(), "hidden must be a contiguous [tokens, hidden_size] tensor, got ",
            shape(hidden));
  MBK_CHECK(hidden.scalar_type() == ScalarType::Float || hidden.scalar_type() == ScalarType::BFloat16,
            "hidden must be fp32 or bf16, got ", hidden.scalar_type());
  MBK_CHECK(qkv_dtype == ScalarType::Float || qkv_dtype == ScalarType::BFloat16, "qkv_dtype must be fp32 or bf16");
  MBK_CHECK(heads > 0, "heads must be positive, got ", heads);
  MBK_CHECK(wi_activation != "none", "the encoder layer's Wi is a gated projection: name its activation");
  MBK_CHECK(!wo.empty() && !wqkv.empty(), "Wqkv and Wo must be given");
  const int64_t tokens = hidden.size(0), width = hidden.size(1);
  // The attention's width, heads x head_dim, is Wo's input width: K of the int8 weight, or of the
  // packed streamed one (in pairs for bf16).
  const Tensor& wo_weight = wo[0];
  MBK_CHECK(wo_weight.dim() == (wo.size() == 1 ? 4 : 2), "Wo's weight must be a pack_streamed_weight copy or an int8 "
            "[out, in] matrix, got ", shape(wo_weight));
  const int64_t inner = wo.size() == 1 ? wo_weight.size(2) * (wo_weight.scalar_type() == ScalarType::Float ? 1 : 2)
                                       : wo_weight.size(1);
  MBK_CHECK(inner % heads == 0, "Wo's input width ", inner, " is not a multiple of heads = ", heads);
  const int64_t head_dim = inner / heads;
  MBK_CHECK(cos.dim() == 2 && cos.size(1) * 2 == head_dim, "cos and sin must be [tokens, head_dim / 2] = [", tokens,
            ", ", head_dim / 2, "], got ", shape(cos));
  // The attention reads the lengths without checks of its own (its Python op checks them): here,
  // where they meet hidden's tokens, they are checked once.
  MBK_CHECK(cu_seqlens.scalar_type() == ScalarType::Int && cu_seqlens.dim() == 1 && cu_seqlens.is_contiguous() &&
                cu_seqlens.numel() >= 2 && cu_seqlens.device() == hidden.device(),
            "cu_seqlens must be a contiguous 1-D int32 tensor [batch + 1] on hidden's device");
  const auto* bounds = static_cast<const int32_t*>(cu_seqlens.data_ptr());
  MBK_CHECK(bounds[0] == 0 && bounds[cu_seqlens.numel() - 1] == tokens, "cu_seqlens must run from 0 to the ", tokens,
            " tokens of hidden, got ", bounds[0], " to ", bounds[cu_seqlens.numel() - 1]);
  for (int64_t i = 1; i < cu_seqlens.numel(); ++i)
    MBK_CHECK(bounds[i] >= bounds[i - 1] && bounds[i] - bounds[i - 1] <= max_seqlen,
              "cu_seqlens must not decrease, and no sequence may be longer than max_seqlen = ", max_seqlen);
  const Tensor qkv = linear("Wqkv", wqkv, wqkv_bias, hidden, 3 * inner, "none", qkv_dtype, std::nullopt,
                            attn_norm_weight, attn_norm_bias, eps);  // [tokens, 3, heads, head_dim]
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
  const ScalarType dtype = hidden.scalar_type();
  const Tensor after_attention =
      linear("Wo", wo, wo_bias, attended, width, "none", dtype, hidden, std::nullopt, std::nullopt, eps);
  const Tensor activated = linear("Wi", wi, wi_bias, after_attention, intermediate, wi_activation, dtype, std::nullopt,
                                  mlp_norm_weight, mlp_norm_bias, eps);
  return linear("Wo2", wo2, wo2_bias, activated, width, "none", dtype, after_attention, std::nullopt, std::nullopt,
                eps);
}

}  // namespace

MODERNBERT_KERNELS_LIBRARY_IMPL(CPU, m) { m.impl("encoder_layer_native", TORCH_BOX(&encoder_layer)); }

}  // namespace modernbert_kernels
