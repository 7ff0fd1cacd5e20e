"""The one registry of backends: which exist, which are live on this machine, which one an op runs on.

A backend is a family of implementations ("triton", "cpu", "cuda", "torch", "reference") with a
status (live here, and why or why not) and the device types whose tensors it takes. An op is a
named table ``{backend: implementation}``: each op module registers its implementations with
``Op.implements`` and calls ``Op.resolve`` to turn a user's ``backend=`` into a name it can run,
with one set of errors for every op. ``modernbert-kernels info`` is generated from this registry.
The backend choices that depend on the layout ask one question, ``layout_is_dense``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import torch

from . import native
from ._ops import add_op_namespace_prefix


def interpreting() -> bool:
    """TRITON_INTERPRET=1: the Triton kernels run in Triton's interpreter on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotuning() -> bool:
    """Autotune on GPUs, unless MODERNBERT_KERNELS_AUTOTUNE=0 (the GPU tests: one config, no search)."""
    return not interpreting() and os.environ.get("MODERNBERT_KERNELS_AUTOTUNE", "1") != "0"


def triton_status() -> tuple[bool, str]:
    """(usable on this machine, why / why not)."""
    try:
        import triton  # noqa: F401
    except ImportError as err:
        return False, f"triton is not installed ({err})"
    if interpreting():
        return True, "TRITON_INTERPRET=1: kernels run in the interpreter on CPU tensors"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    return True, f"CUDA device: {torch.cuda.get_device_name()}"


def cpu_capabilities() -> dict:
    """The CPU's features as PyTorch detects them (avx512_bf16, avx512_vnni, amx_int8, ...): what
    the CPU code paths are chosen by."""
    probe = getattr(torch._C._cpu, "_get_cpu_capability", None)  # private; torch 2.11 and 2.14 have it
    return probe() if probe is not None else {}


def _dense_forward_in_our_cpu_kernels() -> frozenset:
    """The dtypes whose dense attention forward runs faster in our CPU kernels than in PyTorch's
    fused CPU kernel, measured on a 2-core Zen 4 at 8 x 512 (benchmarks/NOTES.md, "The attention
    kernel's reductions, exp and spills" and "The AVX2 build's microkernel"), the narrower builds
    with ATen, oneDNN and MKL capped to their ISA:
    - fp32 in the AVX-512 build (1.26x) and the AVX2 build (1.2-1.3x);
    - bf16 in those builds (bf16 pair dot products 2.4x; fp32 products on the widened blocks 1.4-1.5x)
      where the CPU has no AMX tiles, which PyTorch's kernel uses. Where it has them, PyTorch's
      kernel stays ahead of our amx build's tiles on dense layouts (10.6 against 17.7 ms at 8 x 512
      on a 2-core Xeon; NOTES "AMX tiles in our kernels").
    The amx build runs fp32 as the AVX-512 builds do; the SSE2 build keeps PyTorch's kernel."""
    dtypes = set()
    if native.CPU_ISA in ("avx2", "avx512", "avx512_bf16", "amx"):
        dtypes.add(torch.float32)
        if not cpu_capabilities().get("amx_bf16", False):
            dtypes.add(torch.bfloat16)
    return frozenset(dtypes)


# Decided once at import: a constant under torch.compile.
DENSE_FORWARD_IN_OUR_CPU_KERNELS = _dense_forward_in_our_cpu_kernels()


def layout_is_dense(layout, num_blocks: int) -> bool:
    """Whether ``layout`` (a BlockSparseLayout) over a sequence of ``num_blocks`` blocks is plain
    dense attention, which dense kernels (PyTorch's fused attention) run faster than a block-sparse
    walk. Known from the layout's construction: no tensor read, a constant under torch.compile."""
    return num_blocks <= layout.dense_blocks


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    status: Callable[[], tuple[bool, str]]
    device_types: Callable[[], tuple[str, ...]] | None  # None: tensors on any device

    def check(self, device: torch.device) -> None:
        """A clear error when this backend cannot run on ``device`` tensors here."""
        live, why = self.status()
        if self.device_types is not None and device.type not in self.device_types():
            if self.name == "triton":
                raise ValueError(f"backend='triton' is not available for {device} tensors: {why}")
            raise ValueError(f"backend={self.name!r} runs on {self.device_types()[0]} tensors, got {device} tensors")
        if not live:
            raise ValueError(f"backend={self.name!r} is not available: {why}")


BACKENDS = {
    "triton": Backend("triton", triton_status, lambda: ("cuda", "cpu") if interpreting() else ("cuda",)),
    "cpu": Backend("cpu", native.cpu_status, lambda: ("cpu",)),
    "cuda": Backend("cuda", native.cuda_status, lambda: ("cuda",)),
    "torch": Backend("torch", lambda: (True, "PyTorch ops: any device"), None),
    "reference": Backend("reference", lambda: (True, "plain PyTorch, the test oracle: any device"), None),
}
NATIVE_BACKENDS = ("cpu", "cuda")  # the C++ extension's kernels, one per device type


def default_backend(device: torch.device) -> str:
    """Triton on CUDA; else the C++ kernels for the device; else the PyTorch path."""
    if device.type == "cuda" and triton_status()[0]:
        return "triton"
    if device.type in NATIVE_BACKENDS and native.status(device.type)[0]:
        return device.type
    return "torch"


@dataclasses.dataclass
class Implementation:
    fn: Callable
    summary: str


class Op:
    """One op's implementations by backend."""

    def __init__(self, name: str):
        self.name = name
        self.implementations: dict[str, Implementation] = {}
        self._resolved: dict[tuple, str] = {}  # (backend, device) -> resolve's answer

    def add(self, backend: str, summary: str, fn) -> None:
        """Register ``fn`` (a function, or whatever the op's dispatch expects) for ``backend``."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}")
        self.implementations[backend] = Implementation(fn, summary)
        self._resolved.clear()

    def implements(self, backend: str, summary: str):
        """Decorator form of ``add``."""

        def register(fn):
            self.add(backend, summary, fn)
            return fn

        return register

    @property
    def backends(self) -> tuple[str, ...]:
        return tuple(name for name in BACKENDS if name in self.implementations)

    def resolve(self, backend: str | None, device: torch.device) -> str:
        """The backend to run on ``device`` (``None``: the default for the device), or a clear
        error saying why ``backend`` cannot run here. Remembered per request (every op call asks, a
        few hundred times a forward), except for "triton", whose answer on CPU tensors follows
        TRITON_INTERPRET."""
        resolved = self._resolved.get((backend, device))
        if resolved is None:
            resolved = default_backend(device) if backend is None else backend
            if resolved not in self.implementations:
                raise ValueError(f"backend must be one of {self.backends} or None, got {resolved!r}")
            BACKENDS[resolved].check(device)
            if resolved != "triton":
                self._resolved[(backend, device)] = resolved
        return resolved

    def __getitem__(self, backend: str) -> Callable:
        return self.implementations[backend].fn


OPS: dict[str, Op] = {}

# The Python body of each custom op made by ``custom_op``, for ``run`` to call directly.
_BODIES: dict = {}


def custom_op(name: str, mutates_args: tuple[str, ...] = ()):
    """``torch.library.custom_op`` (namespaced) whose body ``run`` can also call without the
    dispatcher."""
    def register(fn):
        op = torch.library.custom_op(add_op_namespace_prefix(name), fn, mutates_args=mutates_args)
        _BODIES[op] = fn
        return op

    return register


_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def run(op, *args):
    """``op(*args)``, for an op made by ``custom_op``. In plain eager inference its body runs
    directly: the dispatcher's round trip to that same body (through autograd, the alias checks and
    the torch.compile guard) costs ~7 us a call, as much as a kernel on a short input (a 16-token
    query calls 220 such ops; NOTES, "The short query again"). The dispatcher stays wherever it does
    something: a tensor that needs a gradient, torch.compile, fake or other tensor subclasses,
    dispatch and function modes, and functorch transforms."""
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
            or torch._C._is_torch_function_mode_enabled() or torch._C._are_functorch_transforms_active()):
        return op(*args)
    grad = torch.is_grad_enabled()
    for arg in args:
        if isinstance(arg, torch.Tensor) and (type(arg) not in _PLAIN_TENSOR_TYPES or (grad and arg.requires_grad)):
            return op(*args)
    return _BODIES[op](*args)


def op(name: str) -> Op:
    """The registry entry of op ``name`` (made on first use)."""
    return OPS.setdefault(name, Op(name))


def table() -> list[tuple[str, str, bool, str]]:
    """(op, backend, live, what it runs / why not) for every registered implementation."""
    rows = []
    for name, entry in OPS.items():
        for backend in entry.backends:
            live, why = BACKENDS[backend].status()
            summary = entry.implementations[backend].summary
            rows.append((name, backend, live, f"{summary} [{why}]"))
    return rows
