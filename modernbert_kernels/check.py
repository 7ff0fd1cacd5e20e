"""Cross-compile every shipped Triton kernel config for real GPUs, with no GPU present.

``python -m modernbert_kernels.check`` builds each kernel with ``triton.compile`` for sm_80 and
sm_90 and reads registers, spills and shared memory from the cubin with the cuobjdump that ships
with Triton. It fails on any spill, on shared memory above the arch's limit, and on an sm_90
tensor-core build (16-bit or int8, 64 or more rows per program) that does not use wgmma. Run it
without TRITON_INTERPRET (interpreted kernels cannot be compiled).

When the C++ extension was built with CUDA kernels (FORCE_CUDA=1), their cubins are read from the
shared library the same way: every kernel must exist for each arch, spill nothing and fit its
static shared memory in 48 KiB.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
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
TYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# ModernBERT's local layers use 64-token blocks; 32 and 128 are the other sizes we tune for.
SHIPPED_LAYOUT_BLOCKS = (32, 64, 128)
# ModernBERT-base / -large hidden and intermediate widths, rounded up to the quantize kernel's block.
QUANTIZE_WIDTHS = (1024, 2048, 4096)
# Attention builds are checked with the heaviest specialization (window on, varlen), with and without
# logit soft-capping (HAS_SOFTCAP, which keeps one more tile live in the backward).
ATTENTION_FLAGS = dict(IS_VARLEN=True, HAS_WINDOW=True, HAS_KEY_MASK=False)


@dataclasses.dataclass
class Build:
    """One kernel specialization to compile."""

    kernel: object
    dtype: str
    shape: str
    pointer_types: dict
    constexprs: dict
    num_warps: int
    num_stages: int
    rows_per_program: int  # rows of the MMA's M side: wgmma needs 64
    tensor_cores: bool  # False for fp32 (IEEE) dots and kernels without dots
    name: str = ""  # as reported; the kernel's own name when empty

    def __post_init__(self):
        self.name = self.name or self.kernel.__name__


@dataclasses.dataclass
class KernelBuild:
    kernel: str
    arch: int
    dtype: str
    shape: str
    config: str
    registers: int
    spill_bytes: int
    shared_bytes: int
    uses_wgmma: bool
    wants_wgmma: bool

    def problems(self) -> list[str]:
        found = []
        if self.spill_bytes:
            found.append(f"spills {self.spill_bytes} bytes to local memory")
        if self.shared_bytes > SHARED_MEMORY_LIMIT[self.arch]:
            found.append(f"needs {self.shared_bytes} B of shared memory (limit {SHARED_MEMORY_LIMIT[self.arch]})")
        if self.arch >= 90 and self.wants_wgmma and not self.uses_wgmma:
            found.append("does not use wgmma on sm_90")
        return found


def _cuobjdump() -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def _signature(kernel, pointer_types: dict, constexprs: dict):
    """Argument types as a real launch would see them, with 16-byte alignment hints where a real
    launch gets them (pointers and row strides of 16-element-aligned tensors)."""
    signature, attrs = {}, {}
    aligned = [["tt.divisibility", 16]]
    for index, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointer_types:
            signature[name], attrs[(index,)] = f"*{pointer_types[name]}", aligned
        elif name in ("sm_scale", "softcap", "eps"):
            signature[name] = "fp32"
        elif name.startswith("stride_") and name != "stride_mb":
            signature[name], attrs[(index,)] = "i32", aligned
        else:
            signature[name] = "i32"
    return signature, attrs


def compile_build(build: Build, arch: int) -> KernelBuild:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, attrs = _signature(build.kernel, build.pointer_types, build.constexprs)
    source = ASTSource(fn=build.kernel, signature=signature, constexprs=build.constexprs, attrs=attrs)
    compiled = triton.compile(
        source, target=GPUTarget("cuda", arch, 32),
        options={"num_warps": build.num_warps, "num_stages": build.num_stages},
    )
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run(
            [_cuobjdump(), "--dump-resource-usage", cubin.name], capture_output=True, text=True, check=True
        ).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    tile = "x".join(str(build.constexprs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in build.constexprs)
    return KernelBuild(
        kernel=build.name, arch=arch, dtype=build.dtype, shape=build.shape,
        config=f"{tile} w{build.num_warps} s{build.num_stages}",
        registers=int(fields.get("REG", 0)),
        # ptxas puts spills in the stack frame; both count.
        spill_bytes=int(fields.get("LOCAL", 0)) + int(fields.get("STACK", 0)),
        # Triton kernels use dynamic shared memory, which cuobjdump does not see; metadata has it.
        shared_bytes=int(fields.get("SHARED", 0)) + compiled.metadata.shared,
        uses_wgmma="wgmma" in compiled.asm["ptx"],
        wants_wgmma=build.tensor_cores and build.rows_per_program >= 64,
    )


def attention_builds(arch: int, quick: bool):
    from .triton.attention_common import dot_precision
    from .triton.configs import configs_for
    from .triton.attention_kernel import PASSES, block_sparse_attention_kernel

    head_dims = (64, 128, 256) if quick else (32, 64, 128, 256)
    layout_blocks = (64,) if quick else SHIPPED_LAYOUT_BLOCKS
    # Quick: one 16-bit type (fp16 and bf16 run the same MMA shapes), and the capped kernels at
    # head_dim 256 only (Gemma 2's, and the widest tiles: the likeliest to spill).
    dtypes = {t: n for t, n in TYPE_NAMES.items() if not quick or t != torch.float16}
    for kind, pass_number in PASSES.items():
        for dtype, type_name in dtypes.items():
            pointers = {name: type_name for name in ("Q", "K", "V", "Out", "DOut", "DQ", "DK", "DV")}
            pointers.update(Lse="fp32", Delta="fp32", KeyMask="u8")
            pointers.update({name: "i32" for name in ("Offsets", "Indices", "CuSeqlens")})
            for head_dim, layout_block in itertools.product(head_dims, layout_blocks):
                for capped in (False, True) if not quick or head_dim == 256 else (False,):
                    chosen = configs_for(kind, layout_block, head_dim, dtype, arch, capped)
                    if quick:  # the deepest pipeline of each tile: the likeliest to spill
                        chosen = [c for c in chosen if c.num_stages == max(x.num_stages for x in chosen)]
                    for config in chosen:
                        yield Build(
                            block_sparse_attention_kernel, type_name,
                            f"d={head_dim} lb={layout_block}{' cap' if capped else ''}", pointers,
                            dict(HEAD_DIM=head_dim, LAYOUT_BLOCK=layout_block, DOT_PRECISION=dot_precision(dtype),
                                 PASS=pass_number, HAS_SOFTCAP=capped, **ATTENTION_FLAGS, **config.kwargs),
                            config.num_warps, config.num_stages,
                            # dk/dv owns key rows (BLOCK_N); the others own query rows (BLOCK_M).
                            rows_per_program=config.kwargs["BLOCK_N" if kind == "dkdv" else "BLOCK_M"],
                            tensor_cores=dtype != torch.float32, name=f"block_sparse_attention[{kind}]",
                        )


def int8_builds(arch: int, quick: bool):
    from .triton.configs import INT8_CONFIGS
    from .triton.int8_matmul import EPILOGUES, int8_matmul_kernel
    from .triton.quantize import quantize_rows_kernel

    out_types = ("bf16",) if quick else ("bf16", "fp16")
    epilogues = ("geglu",) if quick else ("gelu", "geglu")
    for out_type in out_types:
        pointers = dict(A="i8", B="i8", Out=out_type, AScale="fp32", BScale="fp32", Bias="fp32", Residual=out_type)
        for epilogue in epilogues:
            for config in INT8_CONFIGS:
                # With the residual: its tile is the epilogue's largest extra load (registers, spills).
                yield Build(
                    int8_matmul_kernel, f"i8->{out_type}", f"{epilogue}+residual", pointers,
                    dict(EPILOGUE=EPILOGUES[epilogue], HAS_BIAS=True, HAS_RESIDUAL=True, **config.kwargs),
                    config.num_warps, config.num_stages, rows_per_program=config.kwargs["BLOCK_M"], tensor_cores=True,
                )
        for width in QUANTIZE_WIDTHS:
            yield Build(
                quantize_rows_kernel, f"{out_type}->i8", f"K<={width}",
                dict(X=out_type, Q="i8", Scale="fp32", NormWeight=out_type, Smooth="fp32"),
                dict(BLOCK_K=width, HAS_NORM=True, HAS_SMOOTH=True),
                4 if width <= 2048 else 8, 1, rows_per_program=1, tensor_cores=False,
            )


def rotary_builds(arch: int, quick: bool):
    from .triton.rotary import rotary_kernel, rows_per_program

    for dtype in ("bf16",) if quick else ("bf16", "fp16", "fp32"):
        for head_dim in (64,) if quick else (32, 64, 128):
            block_half = head_dim // 2
            yield Build(
                rotary_kernel, dtype, f"head_dim={head_dim}", dict(X=dtype, Out=dtype, Cos="fp32", Sin="fp32"),
                dict(BLOCK_ROWS=rows_per_program(block_half), BLOCK_HALF=block_half),
                4, 1, rows_per_program=rows_per_program(block_half), tensor_cores=False,
            )


def run_check(archs=ARCHS, quick: bool = False, progress=None) -> list[KernelBuild]:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    sources = (attention_builds, int8_builds, rotary_builds)
    plan = [(arch, build) for arch in archs for source in sources for build in source(arch, quick)]
    results = []
    for step, (arch, build) in enumerate(plan):
        results.append(compile_build(build, arch))
        if progress:
            progress(step + 1, len(plan), results[-1])
    return results


STATIC_SHARED_LIMIT = 48 * 1024


@dataclasses.dataclass
class NativeBuild:
    """One CUDA kernel of the C++ extension, as cuobjdump reads it from the shared library."""

    kernel: str
    arch: int
    registers: int
    spill_bytes: int
    shared_bytes: int

    def problems(self) -> list[str]:
        found = [f"spills {self.spill_bytes} bytes to local memory"] if self.spill_bytes else []
        if self.shared_bytes > STATIC_SHARED_LIMIT:
            found.append(f"needs {self.shared_bytes} B of static shared memory (limit 48 KiB)")
        return found


def native_cuda_builds(archs=ARCHS) -> list[NativeBuild] | None:
    """Resource usage of the extension's CUDA kernels; None when it was built without them."""
    from . import native

    if not native.cpu_status()[0]:
        return None
    from . import _C

    dump = subprocess.run(
        [_cuobjdump(), "--dump-resource-usage", _C.__file__], capture_output=True, text=True, check=False
    ).stdout
    results, arch, kernel = [], None, None
    for line in dump.splitlines():
        if match := re.match(r"\s*arch = sm_(\d+)", line):
            arch = int(match.group(1))
        elif match := re.match(r"\s*Function (\S+):", line):
            # Mangled names: keep the kernel's own name and its template arguments' gist.
            found = re.search(r"(attention_(?:forward|dq|dkdv)_kernel|int8_linear_kernel|quantize_rows_kernel|rotary_kernel)I(\w+?)E",
                              match.group(1))
            kernel = f"{found.group(1)}<{found.group(2)}>" if found else match.group(1)
        elif (match := re.search(r"REG:(\d+) STACK:\d+ SHARED:(\d+) LOCAL:(\d+)", line)) and arch and kernel:
            registers, shared, local = (int(g) for g in match.groups())
            results.append(NativeBuild(kernel, arch, registers, local, shared))
    if not results:
        return None
    missing = set(archs) - {b.arch for b in results}
    if missing:
        raise RuntimeError(f"the extension's CUDA kernels were not built for sm_{sorted(missing)}")
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append", help="compute capability x10 (default: 80 and 90)")
    parser.add_argument("--quick", action="store_true", help="fewer shapes: deepest pipelines, 64-token blocks")
    args = parser.parse_args(argv)

    def progress(step, total, build):
        status = "; ".join(build.problems()) or "ok"
        print(
            f"[{step:3d}/{total}] sm_{build.arch} {build.kernel:42s} {build.dtype:9s} {build.shape:17s} "
            f"{build.config:18s} regs={build.registers:3d} spill={build.spill_bytes} smem={build.shared_bytes:6d} "
            f"wgmma={'y' if build.uses_wgmma else 'n'} {status}",
            flush=True,
        )

    results = run_check(tuple(args.arch or ARCHS), args.quick, progress)
    native_builds = native_cuda_builds(tuple(args.arch or ARCHS))
    if native_builds is None:
        print("C++ extension: no CUDA kernels built (FORCE_CUDA=1 builds them)")
    for build in native_builds or []:
        print(f"sm_{build.arch} native {build.kernel:40s} regs={build.registers:3d} spill={build.spill_bytes} "
              f"smem={build.shared_bytes:6d} {'; '.join(build.problems()) or 'ok'}")
    results = results + (native_builds or [])
    failed = [b for b in results if b.problems()]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
