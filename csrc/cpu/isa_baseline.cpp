// The CPU kernels for any x86-64 (SSE2, 4 floats per vector) or other architectures.
#include "kernels.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif
#define MBK_LANES 4
#include "vec.h"
#include "attention_kernel.h"
#include "attention_backward_kernel.h"
#include "int8_kernel.h"
#if defined(__x86_64__)
#include "int8_gemm_kernel.h"
#endif
#include "rotary_kernel.h"
#include "streamed_gemm_kernel.h"

namespace modernbert_kernels::cpu {
extern const KernelTable kBaselineKernels = {"baseline", attention_forward_items, attention_backward_items,
                                      int8_epilogue_rows, quantize_rows, rotary_rows,
#if defined(__x86_64__)
                                      {kGemmCols, kGemmRows, 2, int8_gemm_pack_weight, int8_gemm_rows,
                                       int8_gemm_workspace_ints}, streamed_linear_panels, layer_norm_rows};
#else
                                      {0, 0, 0, nullptr, nullptr, nullptr}, streamed_linear_panels, layer_norm_rows};
#endif
}
