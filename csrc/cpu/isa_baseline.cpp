// The CPU kernels for any x86-64 (SSE2, 4 floats per vector) or other architectures.
#include "kernels.h"

#define MBK_LANES 4
#include "vec.h"
#include "attention_kernel.h"
#include "attention_backward_kernel.h"
#include "int8_kernel.h"
#include "rotary_kernel.h"

namespace modernbert_kernels::cpu {
extern const KernelTable kBaselineKernels = {"baseline", attention_forward_items, attention_backward_items,
                                      int8_epilogue_rows, quantize_rows, rotary_rows};
}
