// CPU rotary_embedding_native: rows of tokens spread over at::parallel_for.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../ops.h"
#include "kernels.h"

namespace modernbert_kernels {
namespace {

struct CpuRotary {
  static constexpr at::DeviceType kDevice = at::kCPU;

  static void rotary(const RotaryParams& p) {
    const auto rotary = cpu::kernels().rotary;
    // ~16 KiB of a token's rows per grain at ModernBERT-base shapes.
    at::parallel_for(0, p.tokens, 16, [&](int64_t begin, int64_t end) { rotary(p, begin, end); });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(modernbert_kernels, CPU, m) { m.impl("rotary_embedding_native", &rotary_embedding_op<CpuRotary>); }

}  // namespace modernbert_kernels
