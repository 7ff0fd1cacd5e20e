import dataclasses
import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. triton.jit reads
# this when a kernel is defined, so it must be set before modernbert_kernels.triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Inductor under torch 2.11 checks each vector ISA that /proc/cpuinfo lists by building a library
# and loading it in a fresh Python process, in every process that compiles for the CPU (torch 2.14
# keeps the answer in its cache): ~17 s of stack 1's compile tests, measured cold on a 2-core AMD
# EPYC Zen 4. The flags decide the same on the machines these tests run on; it is read when
# torch._inductor.config is first imported, after this.
os.environ.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "1")


def _interpreter_problem() -> str | None:
    """Triton < 3.7's interpreter calls int() on one-element arrays, which numpy >= 2.4 refuses:
    every interpreter test would fail with an unhelpful TypeError."""
    import numpy
    import triton

    triton_version = tuple(int(p) for p in triton.__version__.split(".")[:2])
    numpy_version = tuple(int(p) for p in numpy.__version__.split(".")[:2])
    if triton_version < (3, 7) and numpy_version >= (2, 4):
        return (f"Triton {triton.__version__}'s interpreter cannot run under numpy {numpy.__version__}: "
                "install with -c constraints/torch2.11-triton3.6.txt (numpy<2.4)")
    return None


def _share_the_cores_between_workers():
    """Under pytest-xdist each worker process would run torch on every core: N workers x N threads
    on N cores, OpenMP threads spinning for cores another worker holds. Each worker takes its share
    instead (tests that need a thread count set their own)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // workers))


def _patch_the_language_once_per_launch():
    """Triton's interpreter (3.6 to 3.8) swaps triton.language's builtins for interpreted ones at
    each kernel launch, and undoes it when the launch ends; but it also redoes the swap at every
    call of a @triton.jit helper inside the kernel, scanning the language modules with
    inspect.getmembers each time: ~30% of an attention test's interpreter time (1.58x on two of
    them). Within a launch, a helper whose module sees the same language modules as the launch
    already patched finds every builtin swapped, so its own swap changes nothing and is skipped.
    Anything else (another language module, a launch) goes through Triton's own code."""
    import inspect

    import triton.language as tl
    from triton.runtime import interpreter

    patch_lang, scope_type = getattr(interpreter, "_patch_lang", None), getattr(interpreter, "_LangPatchScope", None)
    if patch_lang is None or scope_type is None:  # another interpreter: left as it is
        return
    patched = set()  # ids of the language modules patched since the launch in progress began

    def patch_lang_once(fn):
        langs = {id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)}
        if patched and langs <= patched:
            return scope_type()  # nothing changed, nothing to restore
        launch = not patched
        scope = patch_lang(fn)
        patched.update(langs)
        if launch:  # the launch restores its scope when it ends
            restore = scope.restore

            def restore_and_end():
                patched.clear()
                restore()

            scope.restore = restore_and_end
        return scope

    interpreter._patch_lang = patch_lang_once


def pytest_configure(config):
    _share_the_cores_between_workers()
    if os.environ.get("TRITON_INTERPRET") == "1":
        if problem := _interpreter_problem():
            raise pytest.UsageError(problem)
        _patch_the_language_once_per_launch()


def pytest_collection_modifyitems(config, items):
    # Tests of one xdist_group run one after the other on one worker (--dist loadgroup): the longest
    # chain of the run. Collected first, they start first, and the other workers take the rest.
    items.sort(key=lambda item: item.get_closest_marker("xdist_group") is None)
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_interpreter = pytest.mark.skip(reason="runs Triton on CPU tensors: needs TRITON_INTERPRET=1")
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "interpreter" in item.keywords and not interpreting:
            item.add_marker(skip_interpreter)


@pytest.fixture(autouse=True)
def interpreter_overflow_checks(request):
    """Triton's interpreter re-runs every int32 add, sub and mul in int64 to assert it did not
    overflow: ~26% of an attention test's interpreter time. At these tests' shapes (offsets below
    2^17) only a garbage index could overflow, and it would fail the comparison with the reference
    anyway, so the check is off, except in the fuzz tests (random shapes, run once in CI), where it
    names the operation that overflowed."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        yield
        return
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    options = builder.options
    if hasattr(options, "sanitize_overflow"):
        builder.options = dataclasses.replace(options, sanitize_overflow="fuzz" in request.keywords)
    yield
    builder.options = options


@pytest.fixture
def poison_allocations(monkeypatch):
    """Fill every fresh floating-point allocation with NaN, so unwritten outputs cannot pass."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poisoned(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poisoned(real_empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poisoned(real_empty_like(*a, **kw)))


@pytest.fixture(autouse=True)
def one_config_on_gpu(request, monkeypatch):
    """GPU correctness tests run one shipped config per kernel: autotuning each of the ~100 problem
    classes would spend minutes of a rare GPU session compiling. Tests named *autotuned* tune."""
    if "gpu" in request.keywords and "autotuned" not in request.node.name:
        monkeypatch.setenv("MODERNBERT_KERNELS_AUTOTUNE", "0")
