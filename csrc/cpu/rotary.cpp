// CPU implementation of rotary_embedding_native: rows of tokens spread over at::parallel_for.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "checks.h"
#include "kernels.h"

namespace modernbert_kernels {
namespace {

void rotary_embedding_cpu(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& out) {
  TORCH_CHECK(x.device().is_cpu(), "expected CPU tensors, got ", x.device());
  cpu::RotaryArgs args{};
  set_rotary_args(args, x, cos, sin, out);
  args.dtype = x.scalar_type() == at::kFloat      ? cpu::ElementType::Float32
               : x.scalar_type() == at::kBFloat16 ? cpu::ElementType::BFloat16
                                                  : cpu::ElementType::Float16;
  const auto rotary = cpu::kernels().rotary;
  // ~16 KiB of a token's rows per grain at ModernBERT-base shapes.
  at::parallel_for(0, args.tokens, 16, [&](int64_t begin, int64_t end) { rotary(args, begin, end); });
}

}  // namespace

TORCH_LIBRARY_IMPL(modernbert_kernels, CPU, m) { m.impl("rotary_embedding_native", &rotary_embedding_cpu); }

}  // namespace modernbert_kernels
