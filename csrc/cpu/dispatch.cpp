// Picks the widest kernel build the running CPU supports, once.
#include "kernels.h"

#include <cstdlib>
#include <cstring>

namespace modernbert_kernels::cpu {

extern const KernelTable kBaselineKernels;
#if defined(__x86_64__)
extern const KernelTable kAvx2Kernels;
extern const KernelTable kAvx512Kernels;
extern const KernelTable kAvx512Bf16Kernels;
#endif

static const KernelTable& choose() {
  // MODERNBERT_KERNELS_CPU_ISA=avx512|avx2|baseline caps the choice (to test the narrower builds).
  const char* cap = std::getenv("MODERNBERT_KERNELS_CPU_ISA");
  const bool allow_avx512_bf16 = cap == nullptr || std::strcmp(cap, "avx512_bf16") == 0;
  const bool allow_avx512 = allow_avx512_bf16 || std::strcmp(cap, "avx512") == 0;
  const bool allow_avx2 = allow_avx512 || std::strcmp(cap, "avx2") == 0;
#if defined(__x86_64__)
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (allow_avx512_bf16 && avx512 && __builtin_cpu_supports("avx512bf16")) return kAvx512Bf16Kernels;
  if (allow_avx512 && avx512) return kAvx512Kernels;
  if (allow_avx2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2Kernels;
#endif
  (void)allow_avx2;
  (void)allow_avx512;
  return kBaselineKernels;
}

const KernelTable& kernels() {
  static const KernelTable& table = choose();
  return table;
}

}  // namespace modernbert_kernels::cpu
