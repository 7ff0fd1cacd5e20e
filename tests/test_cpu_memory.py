"""The heap pad the encoder keeps on the CPU (modernbert_kernels.cpu_memory): set once per process
at the first CPU call, sized by MODERNBERT_KERNELS_CPU_HEAP_PAD, and what it buys: a large freed
block is reused without page faults. Each case runs in a process of its own (the setting is the
process's)."""

import os
import subprocess
import sys
import textwrap

import pytest

from modernbert_kernels import cpu_memory

pytestmark = pytest.mark.skipif(not cpu_memory.glibc_available(), reason="glibc's mallopt (Linux)")


def run_python(code: str, **env) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


def test_the_encoder_keeps_the_default_pad_at_its_first_cpu_call():
    out = run_python("""
        import torch
        from modernbert import ModernBertConfig, ModernBertModel
        from modernbert_kernels import cpu_memory
        assert cpu_memory.pad_in_effect() is None  # importing changes nothing
        model = ModernBertModel(ModernBertConfig(vocab_size=64, pad_token_id=0, hidden_size=64, intermediate_size=96,
                                                 num_hidden_layers=2, num_attention_heads=2)).eval()
        with torch.no_grad():
            model(torch.randint(1, 64, (2, 40)))
        print(cpu_memory.pad_in_effect())
        assert cpu_memory.keep_freed_memory(0) == cpu_memory.pad_in_effect()  # the first call decided
    """)
    assert out == str(cpu_memory.DEFAULT_PAD_BYTES)


@pytest.mark.parametrize("setting, expected", [("0", "0"), ("268435456", "268435456")])
def test_the_environment_sets_the_pad(setting, expected):
    out = run_python("from modernbert_kernels import cpu_memory; print(cpu_memory.keep_freed_memory())",
                     MODERNBERT_KERNELS_CPU_HEAP_PAD=setting)
    assert out == expected


@pytest.mark.parametrize("setting", ["1GiB", "-1"])
def test_a_bad_setting_is_refused(setting):
    done = subprocess.run([sys.executable, "-c", "from modernbert_kernels import cpu_memory; cpu_memory.keep_freed_memory()"],
                          capture_output=True, text=True, env={**os.environ, "MODERNBERT_KERNELS_CPU_HEAP_PAD": setting},
                          timeout=120)
    assert done.returncode != 0
    assert "MODERNBERT_KERNELS_CPU_HEAP_PAD must be a number" in done.stderr or "heap pad must be >= 0" in done.stderr


@pytest.mark.skipif(cpu_memory.heap_top_bytes() is None, reason="glibc 2.33+ (mallinfo2)")
@pytest.mark.parametrize("pad", [1 << 28, 1 << 30])
def test_the_pad_is_in_place_at_once(pad):
    """Without a growth of the heap after the setting, a first request of 32 MiB or more would still
    be mmapped: keep_freed_memory grows the heap by the pad itself."""
    out = run_python(f"""
        from modernbert_kernels import cpu_memory
        before = cpu_memory.heap_top_bytes()
        cpu_memory.keep_freed_memory({pad})
        print(before, cpu_memory.heap_top_bytes())
    """)
    before, after = map(int, out.split())
    assert before < pad <= after < pad + (64 << 20), (before, after)


def test_with_the_pad_a_freed_large_block_is_not_faulted_in_again():
    """40 MB allocated, written and freed, as an encoder's largest activation is call after call
    (torch's CPU allocator is glibc's posix_memalign; called here directly, so that nothing else
    allocates between the rounds): without the pad glibc maps it afresh each round (10,240 minor
    page faults), with it the same pages come back from the heap's top."""
    code = """
        import ctypes, resource, sys
        from modernbert_kernels import cpu_memory
        cpu_memory.keep_freed_memory(int(sys.argv[1]))
        libc = ctypes.CDLL(None)
        libc.malloc.restype = ctypes.c_void_p
        libc.free.argtypes = [ctypes.c_void_p]
        libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
        faults = []
        for _ in range(4):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            block = libc.malloc(40 << 20)
            libc.memset(block, 1, 40 << 20)
            libc.free(block)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        print(*faults)
    """
    faults = {}
    for pad in (0, 1 << 30):
        done = subprocess.run([sys.executable, "-c", textwrap.dedent(code), str(pad)], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        faults[pad] = [int(count) for count in done.stdout.split()]
    pages = (40 << 20) // 4096
    assert all(count >= pages // 2 for count in faults[0]), faults  # the first round faults in either way
    assert all(count <= pages // 8 for count in faults[1 << 30][1:]), faults
