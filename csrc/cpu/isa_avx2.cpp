// The CPU kernels built for AVX2 + FMA (8 floats per vector); chosen at run time by dispatch.cpp.
#include "kernels.h"

#if defined(__x86_64__)
#pragma GCC target("avx2,fma")
#include <immintrin.h>
#define MBK_LANES 8
#include "vec.h"
#include "attention_kernel.h"
#include "attention_backward_kernel.h"
#include "int8_kernel.h"
#include "int8_gemm_kernel.h"
#include "rotary_kernel.h"
#include "streamed_gemm_kernel.h"

namespace modernbert_kernels::cpu {
extern const KernelTable kAvx2Kernels = {"avx2", attention_forward_items, attention_backward_items,
                                      int8_epilogue_rows, quantize_rows, rotary_rows,
                                      {kGemmCols, kGemmRows, 2, int8_gemm_pack_weight, int8_gemm_rows,
                                       int8_gemm_workspace_ints}, streamed_linear_panels, layer_norm_rows};
}
#endif  // __x86_64__
