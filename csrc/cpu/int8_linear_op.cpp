// CPU int8_linear_native and quantize_per_token_native.
//
// The GEMM is oneDNN's int8 matmul (AMX / VNNI) through at::_int_mm where the CPU has an int8
// dot-product instruction, run over row chunks whose int32 result stays in cache: each chunk's
// epilogue (scales, bias, activation, cast) runs right after its GEMM, so the int32 accumulator
// never makes a round trip to DRAM. Without such an instruction (x86 with AVX2 only) oneDNN's
// int8 matmul is ~25x slower than an fp32 GEMM, so the GEMM runs in floating point instead,
// exactly (see cpu_int8_gemm_in_float).
#include <ATen/Parallel.h>
#include <ATen/cpu/Utils.h>
#include <ATen/ops/_int_mm.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>
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

bool has_int8_dot_product() {
  static const bool has = [] {
    const auto capabilities = at::cpu::get_cpu_capabilities();
    const auto flag = [&](const char* name) {
      const auto found = capabilities.find(name);
      return found != capabilities.end() && found->second.isBool() && found->second.toBool();
    };
    const auto architecture = capabilities.find("architecture");
    const bool x86 = architecture != capabilities.end() && architecture->second.isString() &&
                     architecture->second.toStringRef() == "x86_64";
    return !x86 || flag("avx512_vnni") || flag("avx_vnni") || flag("amx_int8");
  }();
  return has;
}

// MODERNBERT_KERNELS_CPU_INT8_GEMM=int8|float forces one GEMM (read per call, for tests and
// benchmarks); unset or "auto" picks by the CPU.
bool cpu_int8_gemm_in_float() {
  const char* forced = std::getenv("MODERNBERT_KERNELS_CPU_INT8_GEMM");
  const std::string mode = forced == nullptr ? "auto" : forced;
  TORCH_CHECK(mode == "auto" || mode == "int8" || mode == "float",
              "MODERNBERT_KERNELS_CPU_INT8_GEMM must be auto, int8 or float, not '", mode, "'");
  return mode == "auto" ? !has_int8_dot_product() : mode == "float";
}

// int8 x int8 products are integers of magnitude <= 127 * 127 < 2^14, so a floating-point GEMM
// of the int8 values sums them exactly while every partial sum stays below 2^(mantissa + 1):
// fp32 up to K = 1040, fp64 beyond (2^53).
at::ScalarType exact_float_type(int64_t k) {
  return k * 127 * 127 < (int64_t(1) << 24) ? at::kFloat : at::kDouble;
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
    const bool in_float = cpu_int8_gemm_in_float();
    const at::ScalarType float_type = exact_float_type(p.k);
    const at::Tensor w_t_float = in_float ? w_t.to(float_type) : at::Tensor();  // once per call
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      at::Tensor acc = at::empty({chunk, n}, x_q.options().dtype(at::kInt));
      at::Tensor acc_float = in_float ? at::empty({chunk, n}, x_q.options().dtype(float_type)) : at::Tensor();
      for (int64_t c = begin; c < end; ++c) {
        const int64_t m0 = c * chunk, rows = std::min(chunk, m - m0);
        at::Tensor acc_rows = acc.narrow(0, 0, rows);
        if (in_float) {
          at::Tensor float_rows = acc_float.narrow(0, 0, rows);
          at::mm_out(float_rows, x_q.narrow(0, m0, rows).to(float_type), w_t_float);
          acc_rows.copy_(float_rows);  // integers, exact
        } else {
          at::_int_mm_out(acc_rows, x_q.narrow(0, m0, rows), w_t);
        }
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
