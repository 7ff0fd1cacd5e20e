// CPU rotary_embedding_native: rows of tokens spread over torch's parallel_for.
#include "../library.h"
#include "../ops.h"
#include "cpu_ops.h"
#include "kernels.h"

namespace modernbert_kernels {

void cpu::rotary(const RotaryParams& p) {
  const auto rotary = kernels().rotary;
  // ~16 KiB of a token's rows per grain at ModernBERT-base shapes.
  torch::stable::parallel_for(0, p.tokens, 16, [&](int64_t begin, int64_t end) { rotary(p, begin, end); });
}

namespace {

struct CpuRotary {
  static constexpr DeviceType kDevice = DeviceType::CPU;

  static void rotary(const RotaryParams& p) { cpu::rotary(p); }
};

}  // namespace

MODERNBERT_KERNELS_LIBRARY_IMPL(CPU, m) { m.impl("rotary_embedding_native", TORCH_BOX(&rotary_embedding_op<CpuRotary>)); }

}  // namespace modernbert_kernels
