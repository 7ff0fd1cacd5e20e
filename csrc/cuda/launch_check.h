// A failed kernel launch as a torch error naming the op.
#pragma once

#include <c10/util/Exception.h>
#include <cuda_runtime.h>

namespace modernbert_kernels {

inline void check_launch(cudaError_t status, const char* what) {
  TORCH_CHECK(status == cudaSuccess, what, " failed: ", cudaGetErrorString(status));
}

}  // namespace modernbert_kernels
