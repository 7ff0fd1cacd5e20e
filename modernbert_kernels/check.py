"""Cross-compile every shipped Triton kernel config for real GPUs, with no GPU present.

``python -m modernbert_kernels.check`` builds each kernel with ``triton.compile`` for sm_80 and
sm_90 and reads registers, spills and shared memory from the cubin with the cuobjdump that ships
with Triton. It fails on any spill, on shared memory above the arch's limit, and on an sm_90
16-bit build that does not use wgmma. Run it without TRITON_INTERPRET (interpreted kernels
cannot be compiled).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ARCHS = (80, 90)
# Opt-in shared memory per block (CUDA programming guide, compute capabilities table).
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# ModernBERT's local layers use 64-token blocks; 32 and 128 are the other sizes we tune for.
SHIPPED_LAYOUT_BLOCKS = (32, 64, 128)


@dataclasses.dataclass
class KernelBuild:
    kernel: str
    arch: int
    dtype: str
    head_dim: int
    layout_block: int
    config: str
    registers: int
    spill_bytes: int
    shared_bytes: int
    uses_wgmma: bool
    rows_per_program: int

    def problems(self) -> list[str]:
        found = []
        if self.spill_bytes:
            found.append(f"spills {self.spill_bytes} bytes to local memory")
        if self.shared_bytes > SHARED_MEMORY_LIMIT[self.arch]:
            found.append(f"needs {self.shared_bytes} B of shared memory (limit {SHARED_MEMORY_LIMIT[self.arch]})")
        # A warpgroup MMA needs 64 rows: programs that own fewer rows use mma.sync.
        if self.arch >= 90 and self.dtype != "fp32" and self.rows_per_program >= 64 and not self.uses_wgmma:
            found.append("does not use wgmma on sm_90")
        return found


def _cuobjdump() -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def _signature(kernel, dtype_name: str, constexprs: dict):
    """Argument types as a real launch would see them, with 16-byte alignment hints."""
    signature, attrs = {}, {}
    aligned = [["tt.divisibility", 16]]
    for index, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ("Lse", "Delta"):
            signature[name], attrs[(index,)] = "*fp32", aligned
        elif name in ("RowOffsets", "ColIndices", "ColOffsets", "RowIndices", "CuSeqlens"):
            signature[name], attrs[(index,)] = "*i32", aligned
        elif name == "KeyMask":
            signature[name], attrs[(index,)] = "*u8", aligned
        elif name[0].isupper():
            signature[name], attrs[(index,)] = f"*{dtype_name}", aligned
        elif name == "sm_scale":
            signature[name] = "fp32"
        elif name.startswith("stride_") and name != "stride_mb":
            signature[name], attrs[(index,)] = "i32", aligned
        else:
            signature[name] = "i32"
    return signature, attrs


def compile_kernel(kernel, arch: int, dtype: torch.dtype, head_dim: int, layout_block: int, config,
                   flags: dict) -> KernelBuild:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .triton.attention_common import dot_precision

    constexprs = dict(
        HEAD_DIM=head_dim, LAYOUT_BLOCK=layout_block, DOT_PRECISION=dot_precision(dtype), **flags, **config.kwargs
    )
    signature, attrs = _signature(kernel, DTYPES[dtype], constexprs)
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(
        source, target=GPUTarget("cuda", arch, 32),
        options={"num_warps": config.num_warps, "num_stages": config.num_stages},
    )
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run(
            [_cuobjdump(), "--dump-resource-usage", cubin.name], capture_output=True, text=True, check=True
        ).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    return KernelBuild(
        kernel=kernel.__name__, arch=arch, dtype=DTYPES[dtype], head_dim=head_dim, layout_block=layout_block,
        config=f"{config.kwargs['BLOCK_M']}x{config.kwargs['BLOCK_N']} w{config.num_warps} s{config.num_stages}",
        registers=int(fields.get("REG", 0)),
        spill_bytes=int(fields.get("LOCAL", 0)) + int(fields.get("STACK", 0)),
        # Triton kernels use dynamic shared memory, which cuobjdump does not see; metadata has it.
        shared_bytes=int(fields.get("SHARED", 0)) + compiled.metadata.shared,
        uses_wgmma="wgmma" in compiled.asm["ptx"],
        # The dk/dv kernel owns key rows (BLOCK_N); the others own query rows (BLOCK_M).
        rows_per_program=config.kwargs["BLOCK_N" if "dkdv" in kernel.__name__ else "BLOCK_M"],
    )


def shipped_builds(arch: int, quick: bool):
    """(kernel, dtype, head_dim, layout_block, config) for every config the autotuner may pick."""
    from .triton.attention_bwd import block_sparse_attention_bwd_dkdv_kernel, block_sparse_attention_bwd_dq_kernel
    from .triton.attention_common import configs_for
    from .triton.attention_fwd import block_sparse_attention_fwd_kernel

    kernels = {
        "fwd": block_sparse_attention_fwd_kernel,
        "dq": block_sparse_attention_bwd_dq_kernel,
        "dkdv": block_sparse_attention_bwd_dkdv_kernel,
    }
    head_dims = (64, 128) if quick else (32, 64, 128)
    layout_blocks = (64,) if quick else SHIPPED_LAYOUT_BLOCKS
    for kind, kernel in kernels.items():
        for dtype in DTYPES:
            for head_dim in head_dims:
                for layout_block in layout_blocks:
                    chosen = configs_for(kind, layout_block, head_dim, dtype, arch)
                    if quick:  # the deepest pipeline of each tile: the likeliest to spill
                        chosen = [c for c in chosen if c.num_stages == max(x.num_stages for x in chosen)]
                    for config in chosen:
                        yield kernel, dtype, head_dim, layout_block, config


# The specialization every shipped build is checked with: the heaviest (all masks on).
CHECK_FLAGS = dict(IS_VARLEN=True, HAS_WINDOW=True, HAS_KEY_MASK=False)


def run_check(archs=ARCHS, quick: bool = False, progress=None) -> list[KernelBuild]:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    plan = [(arch, *build) for arch in archs for build in shipped_builds(arch, quick)]
    results = []
    for step, (arch, kernel, dtype, head_dim, layout_block, config) in enumerate(plan):
        results.append(compile_kernel(kernel, arch, dtype, head_dim, layout_block, config, CHECK_FLAGS))
        if progress:
            progress(step + 1, len(plan), results[-1])
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append", help="compute capability x10 (default: 80 and 90)")
    parser.add_argument("--quick", action="store_true", help="largest tiles only, head_dim 64/128, 64-token blocks")
    args = parser.parse_args(argv)

    def progress(step, total, build):
        status = "; ".join(build.problems()) or "ok"
        print(
            f"[{step:3d}/{total}] sm_{build.arch} {build.kernel:42s} {build.dtype} d={build.head_dim:<3d} "
            f"lb={build.layout_block:<3d} {build.config:14s} regs={build.registers:3d} "
            f"spill={build.spill_bytes} smem={build.shared_bytes:6d} wgmma={'y' if build.uses_wgmma else 'n'} {status}",
            flush=True,
        )

    results = run_check(tuple(args.arch or ARCHS), args.quick, progress)
    failed = [b for b in results if b.problems()]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
