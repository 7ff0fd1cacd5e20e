// Argument checks shared by the CPU and CUDA entry points.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace modernbert_kernels {

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
    TORCH_CHECK(t->device().type() == device, "expected ", device, " tensors, got ", t->device());
    TORCH_CHECK(t->stride(-1) == 1, "q, k and v need unit stride along head_dim");
  }
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf,
              "q must be fp32, bf16 or fp16, got ", q.scalar_type());
  const int64_t head_dim = q.size(-1);
  TORCH_CHECK(head_dim == 32 || head_dim == 64 || head_dim == 128, "head_dim must be 32, 64 or 128, got ", head_dim);
  TORCH_CHECK(block_size >= 16 && block_size <= 128 && (block_size & (block_size - 1)) == 0,
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

inline void check_int8_linear_inputs(const at::Tensor& x_q, const at::Tensor& x_scale, const at::Tensor& w_q,
                                     const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                                     c10::string_view activation) {
  TORCH_CHECK(x_q.scalar_type() == at::kChar && w_q.scalar_type() == at::kChar, "x_q and w_q must be int8");
  TORCH_CHECK(x_q.dim() == 2 && w_q.dim() == 2 && x_q.size(1) == w_q.size(1),
              "x_q [M, K] and w_q [N, K] must share K, got ", x_q.sizes(), " and ", w_q.sizes());
  TORCH_CHECK(x_q.is_contiguous() && w_q.is_contiguous(), "x_q and w_q must be contiguous");
  TORCH_CHECK(x_scale.scalar_type() == at::kFloat && w_scale.scalar_type() == at::kFloat &&
                  x_scale.is_contiguous() && w_scale.is_contiguous(),
              "scales must be contiguous fp32");
  TORCH_CHECK(x_scale.numel() == x_q.size(0) && w_scale.numel() == w_q.size(0), "x_scale must be [M], w_scale [N]");
  if (bias.has_value()) TORCH_CHECK(bias->dim() == 1 && bias->numel() == w_q.size(0), "bias must be [N]");
  TORCH_CHECK(activation == "none" || activation == "gelu" || activation == "gelu_tanh" || activation == "geglu",
              "activation must be none, gelu, gelu_tanh or geglu, got ", activation);
  TORCH_CHECK(activation != "geglu" || w_q.size(0) % 2 == 0, "geglu needs an even number of weight rows");
}

// x and out [tokens, groups, head_dim] (unit stride along head_dim, same dtype), cos and sin
// contiguous fp32 [tokens, head_dim / 2] on x's device.
inline void check_rotary_inputs(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                                const at::Tensor& out) {
  TORCH_CHECK(x.dim() == 3, "x must be [tokens, groups, head_dim], got ", x.sizes());
  TORCH_CHECK(out.sizes() == x.sizes() && out.scalar_type() == x.scalar_type() && out.device() == x.device(),
              "out must match x's shape, dtype and device");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "x must be fp32, bf16 or fp16, got ", x.scalar_type());
  TORCH_CHECK(x.stride(2) == 1 && out.stride(2) == 1, "x and out need unit stride along head_dim");
  TORCH_CHECK(x.size(2) % 2 == 0, "head_dim must be even, got ", x.size(2));
  for (const at::Tensor* t : {&cos, &sin}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->device() == x.device(),
                "cos and sin must be contiguous fp32 on ", x.device());
    TORCH_CHECK(t->dim() == 2 && t->size(0) == x.size(0) && t->size(1) == x.size(2) / 2,
                "cos and sin must be [tokens, head_dim / 2] = [", x.size(0), ", ", x.size(2) / 2, "], got ", t->sizes());
  }
}

// Checks, then fills the fields the CPU and CUDA RotaryArgs share (all but the dtype).
template <typename RotaryArgs>
void set_rotary_args(RotaryArgs& args, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                     const at::Tensor& out) {
  check_rotary_inputs(x, cos, sin, out);
  args.x = x.data_ptr();
  args.out = out.data_ptr();
  args.tokens = x.size(0);
  args.groups = x.size(1);
  args.head_dim = x.size(2);
  for (int d = 0; d < 2; ++d) {
    args.x_stride[d] = x.stride(d);
    args.out_stride[d] = out.stride(d);
  }
  args.cos = cos.data_ptr<float>();
  args.sin = sin.data_ptr<float>();
}

}  // namespace modernbert_kernels
