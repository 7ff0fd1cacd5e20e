"""The op namespace of this copy of the package: its ops are ``torch.ops.<namespace>.*``.

The pip package registers ``modernbert_kernels``. A kernel-hub build (scripts/build_hub_kernel.sh)
rewrites this file with a namespace of its own, the one its ``_C`` was compiled with, so that it
and an installed package can be loaded side by side in one process (the ``kernels`` convention).
"""

import torch

NAMESPACE = "modernbert_kernels"
ops = getattr(torch.ops, NAMESPACE)


def add_op_namespace_prefix(op_name: str) -> str:
    """``name`` -> ``<namespace>::name``, for ``torch.library`` registrations."""
    return f"{NAMESPACE}::{op_name}"
