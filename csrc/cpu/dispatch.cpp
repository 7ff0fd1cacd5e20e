// Picks the widest kernel build the running CPU supports, once.
#include "kernels.h"

#include <cstdlib>
#include <cstring>

#if MBK_AMX_BUILD && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace modernbert_kernels::cpu {

extern const KernelTable kBaselineKernels;
#if defined(__x86_64__)
extern const KernelTable kAvx2Kernels;
extern const KernelTable kAvx512Kernels;
extern const KernelTable kAvx512Bf16Kernels;
#endif
#if MBK_AMX_BUILD
extern const Int8Gemm kAmxInt8Gemm;
#endif

static const KernelTable& choose() {
  // MODERNBERT_KERNELS_CPU_ISA=amx|avx512_bf16|avx512|avx2|baseline caps the choice (to test the
  // narrower builds).
  const char* cap = std::getenv("MODERNBERT_KERNELS_CPU_ISA");
  const bool allow_avx512_bf16 =
      cap == nullptr || std::strcmp(cap, "amx") == 0 || std::strcmp(cap, "avx512_bf16") == 0;
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

const Int8Gemm* amx_int8_gemm() {
  static const Int8Gemm* const gemm = []() -> const Int8Gemm* {
    const char* cap = std::getenv("MODERNBERT_KERNELS_CPU_ISA");
    if (cap != nullptr && std::strcmp(cap, "amx") != 0) return nullptr;
#if MBK_AMX_BUILD && defined(__linux__)
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-int8")) return nullptr;
    // Linux hands out the tile registers' state (8 KB a thread) only to a process that asks first;
    // a tile instruction without it is killed with SIGILL. A refusal (an old kernel, a seccomp
    // policy) leaves AMX unused. Asking again after oneDNN has asked is harmless.
    constexpr long kArchRequestXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    if (syscall(SYS_arch_prctl, kArchRequestXcompPerm, kXfeatureXtiledata) != 0) return nullptr;
    return &kAmxInt8Gemm;
#else
    return nullptr;
#endif
  }();
  return gemm;
}

const KernelTable& kernels() {
  static const KernelTable& table = choose();
  return table;
}

}  // namespace modernbert_kernels::cpu
