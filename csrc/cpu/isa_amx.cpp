// The CPU kernels built for AMX (Sapphire Rapids and later): the avx512_bf16 build, whose bf16
// attention runs both of its products on AMX-BF16 tiles (attention_kernel.h, MBK_AMX_TILES), and
// the AMX-INT8 GEMM of the int8 linear (amx_int8_gemm_kernel.h). Chosen at run time by dispatch.cpp
// where the CPU has AMX and the OS grants this process the tile registers.
#include "kernels.h"

#if MBK_AMX_BUILD
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx512bf16,amx-tile,amx-bf16,amx-int8")
#include <immintrin.h>

#include <cstring>
#define MBK_LANES 16
#define MBK_BF16_DOT 1
#define MBK_AMX_TILES 1
#include "vec.h"
#include "amx.h"
#include "attention_kernel.h"
#include "attention_backward_kernel.h"
#include "int8_kernel.h"
#include "int8_gemm_kernel.h"
#include "amx_int8_gemm_kernel.h"
#include "rotary_kernel.h"
#include "streamed_gemm_kernel.h"

namespace modernbert_kernels::cpu {
extern const KernelTable kAmxKernels = {"amx", attention_forward_items, attention_backward_items,
                                        int8_epilogue_rows, quantize_rows, rotary_rows,
                                        {kGemmCols, kGemmRows, 2, int8_gemm_pack_weight, int8_gemm_rows,
                                         int8_gemm_workspace_ints}, streamed_linear_panels, layer_norm_rows};
extern const Int8Gemm kAmxInt8Gemm = {kAmxPanelCols, kAmxBlockRows, kAmxBlockK, amx_int8_gemm_pack_weight,
                                      amx_int8_gemm_rows, amx_int8_gemm_workspace_ints};
}  // namespace modernbert_kernels::cpu
#endif
