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


def test_with_the_pad_a_freed_large_block_is_not_faulted_in_again():
    """40 MB allocated, written and freed 5 times, as an encoder's largest activation is call after
    call: without the pad glibc maps it afresh each time (~10,000 minor page faults a round), with
    it the same pages come back (none measured, once the first rounds have faulted them in)."""
    code = """
        import resource, sys, torch
        from modernbert_kernels import cpu_memory
        cpu_memory.keep_freed_memory(int(sys.argv[1]))
        torch.empty(1 << 20).fill_(1.0)  # 4 MB activations come first in an encoder: the heap grows
        for _ in range(6):  # the first rounds fault in either way (the pad's pages are new, and glibc's
            # bins take a few rounds to settle: measured here 10240, 0, 10240, 10240, then 0 for good)
            torch.empty(10 << 20).fill_(1.0)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(5):
            torch.empty(10 << 20).fill_(1.0)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
    faults = {}
    for pad in (0, 1 << 30):
        done = subprocess.run([sys.executable, "-c", textwrap.dedent(code), str(pad)], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        faults[pad] = int(done.stdout.strip())
    pages = 5 * (40 << 20) // 4096
    assert faults[0] >= pages // 2, faults
    assert faults[1 << 30] <= pages // 4, faults
