// The CUDA kernels' launchers, over the shared parameter structs of ../params.h. The .cu files
// include only the CUDA runtime (they build in about a second); ops.cpp registers them as the
// native ops (../ops.h fills the structs from tensors).
#pragma once

#include <cuda_runtime.h>

#include "../params.h"

namespace modernbert_kernels::cuda {

cudaError_t launch_attention_forward(const AttentionParams& params, cudaStream_t stream);
// Two kernels: dq (which also writes delta), then dk and dv over the transposed layout.
cudaError_t launch_attention_backward(const AttentionBackwardParams& params, cudaStream_t stream);

// k a multiple of 16; x_q and w_q 16-byte aligned.
cudaError_t launch_int8_linear(const Int8LinearParams& params, cudaStream_t stream);

cudaError_t launch_quantize_rows(const QuantizeParams& params, cudaStream_t stream);

cudaError_t launch_rotary(const RotaryParams& params, cudaStream_t stream);

}  // namespace modernbert_kernels::cuda
