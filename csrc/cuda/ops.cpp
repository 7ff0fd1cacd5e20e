// The CUDA kernel families' native ops: the entry points of ../ops.h with the launchers of the .cu
// files, run on the current stream; each family registers its own TORCH_LIBRARY_IMPL.
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../ops.h"
#include "kernels.h"

namespace modernbert_kernels {
namespace {

// A launcher as a Kernels member: run on the current stream, a launch error raised.
template <typename Params, cudaError_t (*Launch)(const Params&, cudaStream_t)>
void on_current_stream(const Params& params) {
  const cudaError_t status = Launch(params, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(status == cudaSuccess, "CUDA kernel launch failed: ", cudaGetErrorString(status));
}

struct CudaAttention {
  static constexpr at::DeviceType kDevice = at::kCUDA;
  static constexpr auto attention_forward = on_current_stream<AttentionParams, cuda::launch_attention_forward>;
  static constexpr auto attention_backward =
      on_current_stream<AttentionBackwardParams, cuda::launch_attention_backward>;
};

struct CudaInt8 {
  static constexpr at::DeviceType kDevice = at::kCUDA;
  static constexpr auto quantize = on_current_stream<QuantizeParams, cuda::launch_quantize_rows>;

  static void int8_linear(const Int8LinearParams& params, const at::Tensor& x_q, const at::Tensor& w_q) {
    TORCH_CHECK(params.k % 16 == 0, "K must be a multiple of 16, got ", params.k);
    // The kernel reads 16-byte vectors: start from 16-byte aligned storage.
    auto aligned = [](const at::Tensor& t) {
      return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 ? t : t.clone(at::MemoryFormat::Contiguous);
    };
    const at::Tensor x = aligned(x_q), w = aligned(w_q);
    Int8LinearParams p = params;
    p.x_q = x.data_ptr<int8_t>();
    p.w_q = w.data_ptr<int8_t>();
    on_current_stream<Int8LinearParams, cuda::launch_int8_linear>(p);
  }
};

struct CudaRotary {
  static constexpr at::DeviceType kDevice = at::kCUDA;
  static constexpr auto rotary = on_current_stream<RotaryParams, cuda::launch_rotary>;
};

}  // namespace

TORCH_LIBRARY_IMPL(modernbert_kernels, CUDA, m) {
  m.impl("block_sparse_attention_forward_native", &attention_forward_op<CudaAttention>);
  m.impl("block_sparse_attention_backward_native", &attention_backward_op<CudaAttention>);
}

TORCH_LIBRARY_IMPL(modernbert_kernels, CUDA, m) {
  m.impl("int8_linear_native", &int8_linear_op<CudaInt8>);
  m.impl("quantize_per_token_native", &quantize_per_token_op<CudaInt8>);
}

TORCH_LIBRARY_IMPL(modernbert_kernels, CUDA, m) { m.impl("rotary_embedding_native", &rotary_embedding_op<CudaRotary>); }

}  // namespace modernbert_kernels
