// CPU int8_linear_native and quantize_per_token_native.
//
// The GEMM is oneDNN's int8 matmul (AMX / VNNI where present) through at::_int_mm, run over
// row chunks whose int32 result stays in cache: each chunk's epilogue (scales, bias, activation,
// cast) runs right after its GEMM, so the int32 accumulator never makes a round trip to DRAM.
#include <ATen/Parallel.h>
#include <ATen/ops/_int_mm.h>
#include <torch/library.h>

#include <vector>

#include "../ops.h"
#include "kernels.h"

namespace modernbert_kernels {
namespace {

// Rows per GEMM call: the int32 chunk (rows x N x 4 bytes) should stay in L2 for the epilogue
// while leaving oneDNN enough rows to block well.
int64_t chunk_rows(int64_t n) {
  const int64_t target_bytes = int64_t(1) << 20;
  int64_t rows = target_bytes / (4 * n);
  rows = rows < 64 ? 64 : rows;
  return (rows + 31) / 32 * 32;
}

struct CpuInt8 {
  static constexpr at::DeviceType kDevice = at::kCPU;

  static void int8_linear(const Int8LinearParams& p, const at::Tensor& x_q, const at::Tensor& w_q) {
    const int64_t m = p.m, n = p.n;
    const at::Tensor w_t = w_q.t();
    const auto epilogue = cpu::kernels().int8_epilogue;
    // One parallel region over row chunks: each thread runs the GEMM of its chunk on its own
    // (oneDNN inside a parallel region stays single-threaded) and its epilogue while the int32
    // result is still in L2. No barrier between GEMM and epilogue, no int32 tensor in DRAM.
    const int64_t chunk = std::min(m, chunk_rows(n));
    const int64_t chunks = (m + chunk - 1) / chunk;
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      at::Tensor acc = at::empty({chunk, n}, x_q.options().dtype(at::kInt));
      for (int64_t c = begin; c < end; ++c) {
        const int64_t m0 = c * chunk, rows = std::min(chunk, m - m0);
        at::Tensor acc_rows = acc.narrow(0, 0, rows);
        at::_int_mm_out(acc_rows, x_q.narrow(0, m0, rows), w_t);
        epilogue(p, acc_rows.data_ptr<int32_t>(), m0, m0 + rows);
      }
    });
  }

  static void quantize(const QuantizeParams& p) {
    const auto quantize = cpu::kernels().quantize_rows;
    at::parallel_for(0, p.rows, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> row(p.k);
      quantize(p, begin, end, row.data());
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(modernbert_kernels, CPU, m) {
  m.impl("int8_linear_native", &int8_linear_op<CpuInt8>);
  m.impl("quantize_per_token_native", &quantize_per_token_op<CpuInt8>);
}

}  // namespace modernbert_kernels
