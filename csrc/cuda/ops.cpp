// The CUDA kernel families' native ops: the entry points of ../ops.h with the launchers of the .cu
// files, run on the current stream; each family registers its own TORCH_LIBRARY_IMPL.
#include <torch/csrc/inductor/aoti_torch/c/shim.h>

#include "../library.h"
#include "../ops.h"
#include "kernels.h"

namespace modernbert_kernels {
namespace {

// A launcher as a Kernels member: run on the current stream, a launch error raised.
template <typename Params, cudaError_t (*Launch)(const Params&, cudaStream_t)>
void on_current_stream(const Params& params) {
  void* stream = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(
      aoti_torch_get_current_cuda_stream(torch::stable::accelerator::getCurrentDeviceIndex(), &stream));
  const cudaError_t status = Launch(params, static_cast<cudaStream_t>(stream));
  MBK_CHECK(status == cudaSuccess, "CUDA kernel launch failed: ", cudaGetErrorString(status));
}

struct CudaAttention {
  static constexpr DeviceType kDevice = DeviceType::CUDA;
  static constexpr auto attention_forward = on_current_stream<AttentionParams, cuda::launch_attention_forward>;
  static constexpr auto attention_backward =
      on_current_stream<AttentionBackwardParams, cuda::launch_attention_backward>;
};

struct CudaInt8 {
  static constexpr DeviceType kDevice = DeviceType::CUDA;
  static constexpr auto quantize = on_current_stream<QuantizeParams, cuda::launch_quantize_rows>;

  static void int8_linear(const Int8LinearParams& params, const Tensor& x_q, const Tensor& w_q,
                          const std::optional<Tensor>& w_packed) {
    MBK_CHECK(!w_packed.has_value(), "w_packed is the CPU backend's layout of the weight; CUDA reads w_q itself");
    MBK_CHECK(params.k % 16 == 0, "K must be a multiple of 16, got ", params.k);
    // The kernel reads 16-byte vectors: start from 16-byte aligned storage (a fresh allocation is).
    auto aligned = [](const Tensor& t) {
      return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 ? t : torch::stable::clone(t);
    };
    const Tensor x = aligned(x_q), w = aligned(w_q);
    Int8LinearParams p = params;
    p.x_q = static_cast<const int8_t*>(x.data_ptr());
    p.w_q = static_cast<const int8_t*>(w.data_ptr());
    on_current_stream<Int8LinearParams, cuda::launch_int8_linear>(p);
  }
};

struct CudaRotary {
  static constexpr DeviceType kDevice = DeviceType::CUDA;
  static constexpr auto rotary = on_current_stream<RotaryParams, cuda::launch_rotary>;
};

}  // namespace

MODERNBERT_KERNELS_LIBRARY_IMPL(CUDA, m) {
  m.impl("block_sparse_attention_forward_native", TORCH_BOX(&attention_forward_op<CudaAttention>));
  m.impl("block_sparse_attention_backward_native", TORCH_BOX(&attention_backward_op<CudaAttention>));
  m.impl("int8_linear_native", TORCH_BOX(&int8_linear_op<CudaInt8>));
  m.impl("quantize_per_token_native", TORCH_BOX(&quantize_per_token_op<CudaInt8>));
  m.impl("rotary_embedding_native", TORCH_BOX(&rotary_embedding_op<CudaRotary>));
}

}  // namespace modernbert_kernels
