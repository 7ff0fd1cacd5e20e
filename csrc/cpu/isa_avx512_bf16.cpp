// The CPU kernels built for AVX-512 with AVX512-BF16 (Zen 4, Cooper Lake; Sapphire Rapids and
// later run the amx build, this one plus tiles, where the OS grants them): the AVX-512 build, plus
// bf16 attention through vdpbf16ps (attention_kernel.h, MBK_BF16_DOT). Chosen at run time by
// dispatch.cpp where the CPU has the instructions.
#include "kernels.h"

#if defined(__x86_64__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx512bf16")
#include <immintrin.h>
#define MBK_LANES 16
#define MBK_BF16_DOT 1
#include "vec.h"
#include "attention_kernel.h"
#include "attention_backward_kernel.h"
#include "int8_kernel.h"
#include "int8_gemm_kernel.h"
#include "rotary_kernel.h"
#include "streamed_gemm_kernel.h"

namespace modernbert_kernels::cpu {
extern const KernelTable kAvx512Bf16Kernels = {"avx512_bf16", attention_forward_items, attention_backward_items,
                                          int8_epilogue_rows, quantize_rows, rotary_rows,
                                      {kGemmCols, kGemmRows, 2, int8_gemm_pack_weight, int8_gemm_rows,
                                       int8_gemm_workspace_ints}, streamed_linear_panels, layer_norm_rows};
}
#endif  // __x86_64__
