// The op namespace this build registers (torch.ops.<namespace>), and the stable-ABI registration
// macros over it. The pip package uses modernbert_kernels; a kernel-hub build passes its own
// (-DMODERNBERT_KERNELS_NAMESPACE=_modernbert_kernels_<hash>, see scripts/build_hub_kernel.sh), so
// both can be loaded in one process. The Python side reads the same name from _ops.py.
#pragma once

#include <torch/csrc/stable/library.h>

#ifndef MODERNBERT_KERNELS_NAMESPACE
#define MODERNBERT_KERNELS_NAMESPACE modernbert_kernels
#endif

// One level of indirection, so that the namespace macro expands before the stable macros paste it.
#define MBK_STABLE_LIBRARY(ns, m) STABLE_TORCH_LIBRARY(ns, m)
#define MBK_STABLE_LIBRARY_IMPL(ns, k, m) STABLE_TORCH_LIBRARY_IMPL(ns, k, m)
#define MODERNBERT_KERNELS_LIBRARY(m) MBK_STABLE_LIBRARY(MODERNBERT_KERNELS_NAMESPACE, m)
#define MODERNBERT_KERNELS_LIBRARY_IMPL(k, m) MBK_STABLE_LIBRARY_IMPL(MODERNBERT_KERNELS_NAMESPACE, k, m)
