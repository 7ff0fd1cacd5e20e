// CPU block_sparse_attention_{forward,backward}_native: the work items spread over torch's
// parallel_for (through the stable ABI), each thread with its own workspace.
#include <vector>

#include "../library.h"
#include "../ops.h"
#include "cpu_ops.h"
#include "kernels.h"

namespace modernbert_kernels {

void cpu::attention_forward(const AttentionParams& p) {
  const int64_t blocks = (p.seq_len + p.block_size - 1) / p.block_size;
  const size_t slot_floats = attention_slot_floats(p.block_size, static_cast<int>(p.head_dim),
                                                   p.dtype == ElementType::Float32);
  const int cache_slots = attention_cache_slots(blocks, slot_floats);
  const size_t workspace_floats = attention_workspace_floats(cache_slots, slot_floats);
  const auto forward = kernels().attention_forward;
  torch::stable::parallel_for(0, p.batch * p.heads * blocks, 1, [&](int64_t begin, int64_t end) {
    // Kept per thread: allocating (and page-faulting) it on every call costs more than small problems.
    thread_local std::vector<float> workspace;
    if (workspace.size() < workspace_floats) workspace.resize(workspace_floats);
    forward(p, cache_slots, begin, end, workspace.data());
  });
}

namespace {

struct CpuAttention {
  static constexpr DeviceType kDevice = DeviceType::CPU;

  static void attention_forward(const AttentionParams& p) { cpu::attention_forward(p); }

  static void attention_backward(const AttentionBackwardParams& p) {
    const int64_t items = p.batch * p.heads * ((p.seq_len + p.block_size - 1) / p.block_size);
    const auto backward = cpu::kernels().attention_backward;
    // dq (and delta) first; dk / dv read delta.
    for (const cpu::BackwardPass pass : {cpu::BackwardPass::Dq, cpu::BackwardPass::DkDv}) {
      torch::stable::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
        thread_local std::vector<float> workspace(cpu::kAttentionBackwardWorkspaceFloats);
        backward(p, pass, begin, end, workspace.data());
      });
    }
  }
};

}  // namespace

MODERNBERT_KERNELS_LIBRARY_IMPL(CPU, m) {
  m.impl("block_sparse_attention_forward_native", TORCH_BOX(&attention_forward_op<CpuAttention>));
  m.impl("block_sparse_attention_backward_native", TORCH_BOX(&attention_backward_op<CpuAttention>));
}

}  // namespace modernbert_kernels
