// Schemas of the native (C++/CUDA) kernels, defined once. The public ops
// (modernbert_kernels::block_sparse_attention, ::int8_linear, ::quantize_per_token, ::rotary_embedding) are defined in
// Python, where they also carry the Triton implementations, fake tensors and autograd; their
// backend="cpu" / "cuda" branches call these. CPU implementations live in cpu/, CUDA ones in cuda/.
#include <Python.h>

#include <string>

#include "cpu/kernels.h"
#include "library.h"

namespace {

std::string cpu_isa() { return modernbert_kernels::cpu::kernels().isa; }

}  // namespace

MODERNBERT_KERNELS_LIBRARY(m) {
  m.def(
      "block_sparse_attention_forward_native(Tensor q, Tensor k, Tensor v, Tensor row_offsets, "
      "Tensor col_indices, int block_size, int window_left, int window_right, float scale, float softcap, "
      "Tensor? key_padding_mask, "
      "Tensor? cu_seqlens, int max_seqlen) -> (Tensor, Tensor)");
  m.def(
      "block_sparse_attention_backward_native(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, Tensor row_offsets, Tensor col_indices, Tensor col_offsets, Tensor row_indices, "
      "int block_size, int window_left, int window_right, float scale, float softcap, Tensor? key_padding_mask, "
      "Tensor? cu_seqlens, "
      "int max_seqlen) -> (Tensor, Tensor, Tensor)");
  m.def(
      "int8_linear_native(Tensor x_q, Tensor x_scale, Tensor w_q, Tensor w_scale, Tensor? bias, "
      "str activation, ScalarType out_dtype, Tensor? residual=None, Tensor? w_packed=None) -> Tensor");
  // The CPU GEMM's layout of an int8 weight, made once (int8_pack_weight in int8.py); int8_linear_native
  // takes it as w_packed and skips packing w_q on every call (cpu/int8_linear_op.cpp).
  m.def("int8_pack_weight_native(Tensor w_q) -> Tensor");
  // out may be x itself (in place).
  m.def("rotary_embedding_native(Tensor x, Tensor cos, Tensor sin, Tensor(a!) out) -> ()");
  m.def("quantize_per_token_native(Tensor x, Tensor? norm_weight, float eps, Tensor? smooth) -> (Tensor, Tensor)");
  // The two above in one call (CPU): an int8 linear that quantizes its float input itself.
  m.def(
      "int8_linear_dynamic_native(Tensor x, Tensor? norm_weight, float eps, Tensor? smooth, Tensor w_q, "
      "Tensor w_scale, Tensor? bias, str activation, ScalarType out_dtype, Tensor? residual=None, "
      "Tensor? w_packed=None) -> Tensor");
  // A fp32 / bf16 linear on a weight packed for streaming (streamed_gemm.py); CPU only. gate "none" is
  // a plain linear, otherwise the activation of a gated projection. With norm_weight, x's rows are
  // layer-normed first.
  m.def(
      "streamed_linear_native(Tensor x, Tensor packed, int out_features, Tensor? bias, str gate, "
      "Tensor? residual, Tensor? norm_weight=None, Tensor? norm_bias=None, float eps=1e-05) -> Tensor");
  // Pre-norm encoder layers (ModernBERT's) of packed tokens, one after the other, in one call
  // (cpu/encoder_layer_op.cpp, encoder_layer.py); CPU only. Per layer: 4 norms (attention weight and
  // bias, MLP weight and bias), 4 linears (Wqkv, Wo, Wi, Wo2: weight_counts of `weights` each, [packed]
  // for the streamed GEMM or [w_q, w_scale, w_packed(, smooth)] for the int8 linear, and a bias), and
  // one entry of each per-layer list; qkv_dtype, wi_activation and eps are all the layers'.
  m.def(
      "encoder_layers_native(Tensor hidden, Tensor?[] norms, Tensor[] weights, int[] weight_counts, Tensor?[] biases, "
      "int[] heads, int[] intermediate, Tensor[] cos, Tensor[] sin, Tensor[] row_offsets, Tensor[] col_indices, "
      "int[] block_size, int[] window_left, int[] window_right, float[] scale, Tensor cu_seqlens, int max_seqlen, "
      "ScalarType qkv_dtype, str wi_activation, float eps) -> Tensor");
  // Which CPU kernel build this machine runs (avx512_bf16, avx512, avx2 or baseline), for
  // `modernbert-kernels info`.
  m.def("cpu_isa() -> str");
  // The GEMM of the CPU int8 linear on this machine (int8, int16 or float; cpu/int8_linear_op.cpp).
  m.def("cpu_int8_gemm() -> str");
}

MODERNBERT_KERNELS_LIBRARY_IMPL(CompositeExplicitAutograd, m) { m.impl("cpu_isa", TORCH_BOX(&cpu_isa)); }

// Importing modernbert_kernels._C runs the registrations above; the module itself is empty, and
// built on Python's limited API (abi3), so one binary serves every CPython from 3.10 on.
static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr, nullptr, nullptr, nullptr, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
