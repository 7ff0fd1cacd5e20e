// CPU int8_linear_native, quantize_per_token_native and int8_linear_dynamic_native (the two in one call).
//
// The GEMM runs over row chunks whose int32 result stays in cache: each chunk's epilogue (scales,
// bias, activation, cast) runs right after its GEMM, so the int32 accumulator never makes a round
// trip to DRAM. Where the CPU has AMX-INT8 it is this library's AMX tile kernel
// (amx_int8_gemm_kernel.h), on a weight packed once (int8_pack_weight_native; else in the call), in
// a schedule of its own (int8_linear_amx); oneDNN's AMX matmul through aten::_int_mm reorders the
// weight again for every chunk. With VNNI only, it is oneDNN's int8 matmul through aten::_int_mm.
// Without an int8 dot product (x86 with AVX2 only) oneDNN's int8 matmul is ~25x slower than an fp32
// GEMM and saturates, so the GEMM is this library's exact int16-pair kernel instead
// (int8_gemm_kernel.h). A last GEMM, exact fp32 GEMMs of the int8 values, is kept for CPUs with none
// of these (see cpu_int8_gemm).
#include <array>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "../library.h"
#include "../ops.h"
#include "cpu_ops.h"
#include "kernels.h"

namespace modernbert_kernels {
namespace {

// aten::<name>.out(self, mat2, *, out) through the dispatcher (the stable ABI has no C++ entry
// point for these two).
void matmul_out(const char* name, const Tensor& out, const Tensor& self, const Tensor& mat2) {
  using torch::stable::detail::from;
  std::array<StableIValue, 3> stack{from(self), from(mat2), from(out)};
  STABLE_TORCH_ERROR_CODE_CHECK(torch_call_dispatcher(name, "out", stack.data(), TORCH_ABI_VERSION));
  (void)torch::stable::detail::to<Tensor>(stack[0]);  // the returned alias of out, released
}

// Rows per GEMM call: the int32 chunk (rows x N x 4 bytes) should stay in L2 for the epilogue
// while leaving oneDNN enough rows to block well.
int64_t chunk_rows(int64_t n) {
  const int64_t target_bytes = int64_t(1) << 20;
  int64_t rows = target_bytes / (4 * n);
  rows = rows < 64 ? 64 : rows;
  return (rows + 31) / 32 * 32;
}

// A [rows, cols] view, with the given element strides, of memory that another tensor owns: made by
// the shim directly, cheaper than a narrow() through the dispatcher, once per row chunk.
Tensor matrix_view(const void* data, int64_t rows, int64_t cols, int64_t row_stride, int64_t col_stride,
                   ScalarType dtype, const Tensor& owner) {
  const int64_t sizes[2] = {rows, cols}, strides[2] = {row_stride, col_stride};
  return torch::stable::from_blob(const_cast<void*>(data), {sizes, 2}, {strides, 2}, owner.device(), dtype);
}

// The same test as modernbert_kernels.backends.cpu_capabilities (the Python side's int8 choice).
bool has_int8_dot_product() {
#if defined(__x86_64__)
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vnni") || __builtin_cpu_supports("avxvnni") ||
           __builtin_cpu_supports("amx-int8");
  }();
  return has;
#else
  return true;
#endif
}

// Whether aten::_int_mm (oneDNN) sums int8 products exactly here. With VNNI or AMX each product
// accumulates in int32; without them oneDNN multiplies u8 x s8 pairs whose sums saturate at int16
// (vpmaddubsw), a path ONEDNN_MAX_CPU_ISA below VNNI selects on any CPU. So a product that would
// saturate (all 127s) is tried once, as modernbert_kernels.int8.cpu_int8_gemm_is_exact does.
bool int8_gemm_is_exact() {
  static const bool exact = [] {
    constexpr int64_t m = 32, k = 64, n = 32;
    const Tensor x = empty({m, k}, ScalarType::Char, DeviceType::CPU);
    const Tensor w = empty({k, n}, ScalarType::Char, DeviceType::CPU);
    const Tensor sums = empty({m, n}, ScalarType::Int, DeviceType::CPU);
    std::memset(x.data_ptr(), 127, m * k);
    std::memset(w.data_ptr(), 127, k * n);
    matmul_out("aten::_int_mm", sums, x, w);
    const auto* values = static_cast<const int32_t*>(sums.data_ptr());
    for (int64_t i = 0; i < m * n; ++i)
      if (values[i] != 127 * 127 * k) return false;
    return true;
  }();
  return exact;
}

// The GEMM of the C++ backend's int8 linear on this CPU:
//   amx:   the AMX tile kernel of amx_int8_gemm_kernel.h, where the CPU has AMX-INT8 and the OS allows it;
//   int8:  oneDNN's int8 matmul, where the CPU has an int8 dot product and it is exact;
//   int16: the int16-pair kernel of int8_gemm_kernel.h (x86 without an int8 dot product);
//   float: exact fp32 GEMMs of the int8 values (elsewhere, or forced).
// MODERNBERT_KERNELS_CPU_INT8_GEMM=amx|int8|int16|float forces one (read per call, for tests and
// benchmarks; amx only where it runs, int8 only where it is exact, int16 only on x86); unset or
// "auto" picks by the CPU.
enum class CpuInt8Gemm : int64_t { Amx = 1, OneDnn = 2, Int16 = 3, Float = 4 };

CpuInt8Gemm cpu_int8_gemm() {
  const char* forced = std::getenv("MODERNBERT_KERNELS_CPU_INT8_GEMM");
  const std::string mode = forced == nullptr ? "auto" : forced;
  MBK_CHECK(mode == "auto" || mode == "amx" || mode == "int8" || mode == "int16" || mode == "float",
            "MODERNBERT_KERNELS_CPU_INT8_GEMM must be auto, amx, int8, int16 or float, not '", mode, "'");
  MBK_CHECK(mode != "amx" || cpu::amx_int8_gemm() != nullptr,
            "MODERNBERT_KERNELS_CPU_INT8_GEMM=amx, but AMX-INT8 cannot run here (the CPU lacks it, the OS refused "
            "the tile registers, or MODERNBERT_KERNELS_CPU_ISA caps it): use int8, int16, float or auto");
  MBK_CHECK(mode != "int8" || int8_gemm_is_exact(),
            "MODERNBERT_KERNELS_CPU_INT8_GEMM=int8, but oneDNN's int8 GEMM does not sum int8 products exactly on this "
            "CPU (no VNNI / AMX, or ONEDNN_MAX_CPU_ISA below them): use int16, float or auto");
  const bool has_int16 = cpu::kernels().int8_gemm.rows != nullptr;
  MBK_CHECK(mode != "int16" || has_int16,
            "MODERNBERT_KERNELS_CPU_INT8_GEMM=int16, but the int16-pair GEMM is built for x86 only: use auto");
  if (mode == "amx") return CpuInt8Gemm::Amx;
  if (mode == "int8") return CpuInt8Gemm::OneDnn;
  if (mode == "int16") return CpuInt8Gemm::Int16;
  if (mode == "float") return CpuInt8Gemm::Float;
  if (cpu::amx_int8_gemm() != nullptr) return CpuInt8Gemm::Amx;
  if (has_int8_dot_product() && int8_gemm_is_exact()) return CpuInt8Gemm::OneDnn;
  return has_int16 ? CpuInt8Gemm::Int16 : CpuInt8Gemm::Float;
}

// For `modernbert-kernels info`: the name of the GEMM above.
std::string cpu_int8_gemm_name() {
  switch (cpu_int8_gemm()) {
    case CpuInt8Gemm::Amx: return "amx";
    case CpuInt8Gemm::OneDnn: return "int8";
    case CpuInt8Gemm::Int16: return "int16";
    default: return "float";
  }
}

// int8 x int8 products are integers of magnitude <= 127 * 127 < 2^14, so an fp32 GEMM of the int8
// values sums up to this many of them exactly (every partial sum below 2^24). A longer K is cut
// into the fewest equal parts within it, one fp32 GEMM each, their integer results added in int32
// (fp64 would be exact in one GEMM, at half the rate or less). As modernbert_kernels.int8.exact_fp32_parts.
constexpr int64_t kExactFp32K = ((int64_t(1) << 24) - 1) / (127 * 127);  // 1040

int64_t exact_fp32_part_size(int64_t k) {
  const int64_t parts = (k + kExactFp32K - 1) / kExactFp32K;
  return (k + parts - 1) / parts;
}

// The library's own GEMM behind a choice: the AMX tile kernel or the int16-pair one; null for the
// GEMMs that read w_q as it is (oneDNN's, the fp32 one).
const cpu::Int8Gemm* own_gemm(CpuInt8Gemm gemm) {
  if (gemm == CpuInt8Gemm::Amx) return cpu::amx_int8_gemm();
  if (gemm == CpuInt8Gemm::Int16) return &cpu::kernels().int8_gemm;
  return nullptr;
}

// A packed weight (int8_pack_weight_native) is a 64-byte header, then the layout of the GEMM it
// names (none for the GEMMs that read w_q as it is). The header ties it to a weight shape and a
// GEMM: int8_linear_native refuses one made for another shape, and packs w_q itself when the GEMM
// in use is no longer the one it was made for (MODERNBERT_KERNELS_CPU_INT8_GEMM set since).
struct PackedWeightHeader {
  int64_t magic, gemm, n, k;
  int64_t unused[4];
};
static_assert(sizeof(PackedWeightHeader) == 64, "the layout starts 64 bytes in, cache-line aligned");
constexpr int64_t kPackedWeightMagic = 0x316b61704b424d;  // "MBKpak1"

// The weight in one of the library's own GEMMs' layout (panels of gemm.cols columns), at dst.
void pack_weight_into(const cpu::Int8Gemm& gemm, const Tensor& w_q, int64_t n, int64_t k, int8_t* dst) {
  const auto* w_data = static_cast<const int8_t*>(w_q.data_ptr());
  torch::stable::parallel_for(0, cpu::int8_gemm_panels(n, gemm.cols), 1, [&](int64_t begin, int64_t end) {
    gemm.pack_weight(w_data, n, k, begin, end, dst);
  });
}

Tensor int8_pack_weight(const Tensor& w_q) {
  MBK_CHECK(w_q.scalar_type() == ScalarType::Char && w_q.dim() == 2 && w_q.is_contiguous(),
            "w_q must be a contiguous [N, K] int8 tensor, got ", shape(w_q));
  check_device(w_q, DeviceType::CPU, "w_q");
  const int64_t n = w_q.size(0), k = w_q.size(1);
  check_int8_k(k);
  const CpuInt8Gemm choice = cpu_int8_gemm();
  const cpu::Int8Gemm* gemm = own_gemm(choice);
  const int64_t bytes = gemm != nullptr && n > 0 && k > 0 ? cpu::int8_gemm_packed_weight_bytes(*gemm, n, k) : 0;
  Tensor packed = empty({int64_t(sizeof(PackedWeightHeader)) + bytes}, ScalarType::Char, w_q);
  const PackedWeightHeader header{kPackedWeightMagic, static_cast<int64_t>(choice), n, k, {}};
  std::memcpy(packed.data_ptr(), &header, sizeof(header));
  if (bytes > 0) pack_weight_into(*gemm, w_q, n, k, static_cast<int8_t*>(packed.data_ptr()) + sizeof(header));
  return packed;
}

// The layout in w_packed for this call's GEMM, or null where w_packed was made for another GEMM
// (or is absent): then the caller packs w_q itself.
const int8_t* packed_layout(const std::optional<Tensor>& w_packed, CpuInt8Gemm gemm, int64_t n, int64_t k) {
  if (!w_packed.has_value()) return nullptr;
  const Tensor& t = *w_packed;
  MBK_CHECK(t.scalar_type() == ScalarType::Char && t.dim() == 1 && t.is_contiguous() &&
                t.device().type() == DeviceType::CPU && t.numel() >= int64_t(sizeof(PackedWeightHeader)),
            "w_packed must come from int8_pack_weight (a 1-D int8 CPU tensor), got ", shape(t));
  PackedWeightHeader header;
  std::memcpy(&header, t.data_ptr(), sizeof(header));
  MBK_CHECK(header.magic == kPackedWeightMagic, "w_packed was not made by int8_pack_weight");
  MBK_CHECK(header.n == n && header.k == k, "w_packed was made for a [", header.n, ", ", header.k,
            "] weight, but w_q is [", n, ", ", k, "]");
  if (header.gemm != static_cast<int64_t>(gemm)) return nullptr;
  const cpu::Int8Gemm* own = own_gemm(gemm);
  const int64_t bytes = own != nullptr ? cpu::int8_gemm_packed_weight_bytes(*own, n, k) : 0;
  MBK_CHECK(t.numel() == int64_t(sizeof(PackedWeightHeader)) + bytes, "w_packed holds ", t.numel(),
            " bytes where its header promises ", int64_t(sizeof(PackedWeightHeader)) + bytes);
  return static_cast<const int8_t*>(t.data_ptr()) + sizeof(PackedWeightHeader);
}

struct CpuInt8 {
  static constexpr DeviceType kDevice = DeviceType::CPU;

  // The weight in one of the library's own GEMMs' layout: w_packed's, or packed now into `storage`.
  static const int8_t* packed_weight(const cpu::Int8Gemm& gemm, const int8_t* prepacked, const Tensor& w_q, int64_t n,
                                     int64_t k, Tensor& storage) {
    if (prepacked != nullptr) return prepacked;
    storage = empty({cpu::int8_gemm_packed_weight_bytes(gemm, n, k)}, ScalarType::Char, w_q);
    pack_weight_into(gemm, w_q, n, k, static_cast<int8_t*>(storage.data_ptr()));
    return static_cast<const int8_t*>(storage.data_ptr());
  }

  // The AMX GEMM's schedule. Its tiles multiply so fast that streaming the weight from L3 for
  // every row chunk (the other GEMMs' schedule below) would take as long as the products. So the
  // weight's panels are split into one column group per thread, each group small enough to stay
  // in its core's L2 (0.9 MB of ModernBERT-base's largest weight on 2 threads), and a thread walks
  // every row through its group, in blocks of 32 rows (their A tiles in L1), each block's
  // epilogue right after its products.
  static void int8_linear_amx(const Int8LinearParams& p, const cpu::Int8Gemm& gemm, const Tensor& x_q,
                              const Tensor& w_q, const int8_t* prepacked) {
    const int64_t m = p.m, n = p.n, k = p.k;
    const auto epilogue = cpu::kernels().int8_epilogue;
    Tensor storage;
    const int8_t* packed = packed_weight(gemm, prepacked, w_q, n, k, storage);
    const int64_t panels = cpu::int8_gemm_panels(n, gemm.cols), rows_per_block = gemm.tile_rows;
    const int64_t groups = std::min<int64_t>(torch::stable::get_num_threads(), panels);
    const int64_t group_panels = (panels + groups - 1) / groups, group_cols = group_panels * gemm.cols;
    const int64_t panel_bytes = cpu::int8_gemm_packed_weight_bytes(gemm, gemm.cols, k);
    const int64_t row_blocks = (m + rows_per_block - 1) / rows_per_block;
    const auto* x_data = static_cast<const int8_t*>(x_q.data_ptr());
    // Items in group-major order: parallel_for gives each thread a contiguous range of them, so a
    // thread keeps to one group (two at most) while it walks the rows.
    const int64_t gemm_workspace_ints = gemm.workspace_ints(rows_per_block, k);
    torch::stable::parallel_for(0, groups * row_blocks, 1, [&](int64_t begin, int64_t end) {
      // Not zeroed (a vector would be): the GEMM writes all of it before reading (~180 KB a thread
      // at ModernBERT-base's widest weight, a fixed cost of every call, felt at a few tokens).
      const std::unique_ptr<int32_t[]> workspace(new int32_t[gemm_workspace_ints + rows_per_block * group_cols]);
      int32_t* acc = workspace.get() + gemm_workspace_ints;
      for (int64_t item = begin; item < end; ++item) {
        const int64_t group = item / row_blocks, row0 = item % row_blocks * rows_per_block;
        const int64_t col_begin = group * group_cols, col_end = std::min(n, col_begin + group_cols);
        if (col_begin >= n) continue;  // fewer panels than groups x group_panels
        const int64_t rows = std::min(rows_per_block, m - row0);
        gemm.rows(x_data + row0 * k, rows, k, packed + group * group_panels * panel_bytes, col_end - col_begin, acc,
                  workspace.get());
        epilogue(p, acc, col_end - col_begin, row0, row0 + rows, col_begin, col_end);
      }
    });
  }

  static void int8_linear(const Int8LinearParams& p, const Tensor& x_q, const Tensor& w_q,
                          const std::optional<Tensor>& w_packed) {
    const int64_t m = p.m, n = p.n, k = p.k;
    const auto epilogue = cpu::kernels().int8_epilogue;
    const CpuInt8Gemm gemm = cpu_int8_gemm();
    const int8_t* prepacked = packed_layout(w_packed, gemm, n, k);
    if (gemm == CpuInt8Gemm::Amx) return int8_linear_amx(p, *own_gemm(gemm), x_q, w_q, prepacked);
    // The library's int16-pair GEMM, if it is the one chosen (else null: oneDNN's or the fp32 one).
    const cpu::Int8Gemm* int16_gemm = own_gemm(gemm);
    // One parallel region over row chunks: each thread runs the GEMM of its chunk on its own
    // (oneDNN inside a parallel region stays single-threaded) and its epilogue while the int32
    // result is still in L2. No barrier between GEMM and epilogue, no int32 tensor in DRAM.
    int64_t chunk = std::min(m, chunk_rows(n));
    if (int16_gemm != nullptr) {
      // Whole register tiles, and at least one chunk per thread when M is small.
      const int64_t threads = torch::stable::get_num_threads(), tile = int16_gemm->tile_rows;
      const int64_t per_thread = (m + threads - 1) / threads;
      chunk = std::min(chunk, per_thread);
      chunk = std::max(tile, (chunk + tile - 1) / tile * tile);
      chunk = std::min(chunk, m);
    }
    const int64_t chunks = (m + chunk - 1) / chunk;
    const auto* x_data = static_cast<const int8_t*>(x_q.data_ptr());
    Tensor storage;  // the weight packed for the int16-pair GEMM (unless w_packed was), or as fp32
    const int8_t* int16_weight =
        int16_gemm != nullptr ? packed_weight(*int16_gemm, prepacked, w_q, n, k, storage) : nullptr;
    const Tensor w_float = gemm == CpuInt8Gemm::Float ? torch::stable::to(w_q, ScalarType::Float) : Tensor();  // [N, K]
    const Tensor w_t = torch::stable::transpose(w_q, 0, 1);
    const int64_t part_size = exact_fp32_part_size(k);
    torch::stable::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      Tensor acc = empty({chunk, n}, ScalarType::Int, x_q);
      Tensor acc_float = gemm == CpuInt8Gemm::Float ? empty({chunk, n}, ScalarType::Float, x_q) : Tensor();
      std::vector<int32_t> workspace(int16_gemm != nullptr ? int16_gemm->workspace_ints(chunk, k) : 0);
      for (int64_t c = begin; c < end; ++c) {
        const int64_t m0 = c * chunk, rows = std::min(chunk, m - m0);
        Tensor acc_rows = matrix_view(acc.data_ptr(), rows, n, n, 1, ScalarType::Int, acc);
        Tensor x_rows = matrix_view(x_data + m0 * k, rows, k, k, 1, ScalarType::Char, x_q);
        if (int16_gemm != nullptr) {
          int16_gemm->rows(x_data + m0 * k, rows, k, int16_weight, n,
                         static_cast<int32_t*>(acc_rows.data_ptr()), workspace.data());
        } else if (gemm == CpuInt8Gemm::Float) {
          const Tensor x_float = torch::stable::to(x_rows, ScalarType::Float);
          Tensor float_rows = matrix_view(acc_float.data_ptr(), rows, n, n, 1, ScalarType::Float, acc_float);
          auto* sums = static_cast<int32_t*>(acc_rows.data_ptr());
          const auto* part_sums = static_cast<const float*>(float_rows.data_ptr());
          for (int64_t k0 = 0; k0 < k; k0 += part_size) {
            const int64_t width = std::min(part_size, k - k0);
            const Tensor x_part = matrix_view(static_cast<const float*>(x_float.data_ptr()) + k0, rows, width, k, 1,
                                              ScalarType::Float, x_float);
            const Tensor w_part = matrix_view(static_cast<const float*>(w_float.data_ptr()) + k0, width, n, 1, k,
                                              ScalarType::Float, w_float);  // the part's rows of w^T
            matmul_out("aten::mm", float_rows, x_part, w_part);
            // Each part's sums are integers below 2^24, exact in fp32; their total, in int32.
            if (k0 == 0) {
              for (int64_t i = 0; i < rows * n; ++i) sums[i] = static_cast<int32_t>(part_sums[i]);
            } else {
              for (int64_t i = 0; i < rows * n; ++i) sums[i] += static_cast<int32_t>(part_sums[i]);
            }
          }
        } else {
          matmul_out("aten::_int_mm", acc_rows, x_rows, w_t);
        }
        epilogue(p, static_cast<const int32_t*>(acc_rows.data_ptr()), n, m0, m0 + rows, 0, n);
      }
    });
  }

  static void quantize(const QuantizeParams& p) {
    const auto quantize = cpu::kernels().quantize_rows;
    torch::stable::parallel_for(0, p.rows, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> row(p.k);
      quantize(p, begin, end, row.data());
    });
  }
};

}  // namespace

Tensor cpu::int8_linear_dynamic(const Tensor& x, const std::optional<Tensor>& norm_weight, double eps,
                                const std::optional<Tensor>& smooth, const Tensor& w_q, const Tensor& w_scale,
                                const std::optional<Tensor>& bias, std::string activation, ScalarType out_dtype,
                                const std::optional<Tensor>& residual, const std::optional<Tensor>& w_packed) {
  return int8_linear_dynamic_op<CpuInt8>(x, norm_weight, eps, smooth, w_q, w_scale, bias, std::move(activation),
                                         out_dtype, residual, w_packed);
}

MODERNBERT_KERNELS_LIBRARY_IMPL(CPU, m) {
  m.impl("int8_linear_native", TORCH_BOX(&int8_linear_op<CpuInt8>));
  m.impl("int8_pack_weight_native", TORCH_BOX(&int8_pack_weight));
  m.impl("quantize_per_token_native", TORCH_BOX(&quantize_per_token_op<CpuInt8>));
  m.impl("int8_linear_dynamic_native", TORCH_BOX(&int8_linear_dynamic_op<CpuInt8>));
}

MODERNBERT_KERNELS_LIBRARY_IMPL(CompositeExplicitAutograd, m) {
  m.impl("cpu_int8_gemm", TORCH_BOX(&cpu_int8_gemm_name));
}

}  // namespace modernbert_kernels
