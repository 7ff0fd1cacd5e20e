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
extern const KernelTable kAmxKernels;
extern const Int8Gemm kAmxInt8Gemm;
#endif

// MODERNBERT_KERNELS_CPU_ISA=amx|avx512_bf16|avx512|avx2|baseline caps the choice (to test the
// narrower builds); unset, nothing is capped.
static bool isa_allowed(const char* isa) {
  static const char* const order[] = {"baseline", "avx2", "avx512", "avx512_bf16", "amx"};
  const char* cap = std::getenv("MODERNBERT_KERNELS_CPU_ISA");
  if (cap == nullptr) return true;
  int cap_rank = -1, isa_rank = 0;
  for (int i = 0; i < int(sizeof(order) / sizeof(order[0])); ++i) {
    if (std::strcmp(cap, order[i]) == 0) cap_rank = i;
    if (std::strcmp(isa, order[i]) == 0) isa_rank = i;
  }
  return isa_rank <= cap_rank;
}

// Whether the CPU has AMX tiles with `unit` (amx-bf16, amx-int8) and this process may use them.
static bool amx_usable(const char* unit) {
#if MBK_AMX_BUILD && defined(__linux__)
  __builtin_cpu_init();
  const bool has = __builtin_cpu_supports("amx-tile") &&
                   (std::strcmp(unit, "amx-bf16") == 0 ? __builtin_cpu_supports("amx-bf16")
                                                       : __builtin_cpu_supports("amx-int8"));
  if (!has) return false;
  // Linux hands out the tile registers' state (8 KB a thread) only to a process that asks first;
  // a tile instruction without it is killed with SIGILL. A refusal (an old kernel, a seccomp
  // policy) leaves AMX unused. Asking again (oneDNN asks too) is harmless.
  static const bool granted = [] {
    constexpr long kArchRequestXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchRequestXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return granted;
#else
  (void)unit;
  return false;
#endif
}

static const KernelTable& choose() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  const bool avx512_bf16 = avx512 && __builtin_cpu_supports("avx512bf16");
#if MBK_AMX_BUILD
  if (isa_allowed("amx") && avx512_bf16 && amx_usable("amx-bf16")) return kAmxKernels;
#endif
  if (isa_allowed("avx512_bf16") && avx512_bf16) return kAvx512Bf16Kernels;
  if (isa_allowed("avx512") && avx512) return kAvx512Kernels;
  if (isa_allowed("avx2") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2Kernels;
#endif
  return kBaselineKernels;
}

const Int8Gemm* amx_int8_gemm() {
#if MBK_AMX_BUILD
  static const Int8Gemm* const gemm = isa_allowed("amx") && amx_usable("amx-int8") ? &kAmxInt8Gemm : nullptr;
  return gemm;
#else
  return nullptr;
#endif
}

const KernelTable& kernels() {
  static const KernelTable& table = choose();
  return table;
}

}  // namespace modernbert_kernels::cpu
