"""FlashAttention-2's calling convention (flash_attn_func, flash_attn_varlen_func) over
block_sparse_attention, against a float64 softmax reference with the same masks."""

import math

import pytest
import torch
from helpers import TOLERANCES, relative_error

from modernbert_kernels import flash_attn_func, flash_attn_varlen_func


def reference(q, k, v, causal, window, scale, softcap=0.0):
    """q [seq, heads, dim], k / v [seq, kv_heads, dim] of one sequence, in float64. Fewer queries
    than keys are the keys' last positions (FlashAttention's alignment of the causal mask)."""
    q, k, v = (t.double() for t in (q, k, v))
    repeat = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    i = torch.arange(q.shape[0])[:, None] + k.shape[0] - q.shape[0]
    j = torch.arange(k.shape[0])[None, :]
    visible = torch.ones_like(scores[0], dtype=torch.bool)
    if causal:
        visible &= j <= i
    if window is not None:
        visible &= (i - j).abs() <= window
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, v)


CASES = {  # (causal, window_size, kv_heads)
    "bidirectional": (False, (-1, -1), 4),
    "window": (False, (40, 40), 4),
    "causal": (True, (-1, -1), 4),
    "causal_window_gqa": (True, (40, 0), 2),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES)
def test_varlen_and_padded_calls_match_the_reference(case, dtype):
    causal, window_size, kv_heads = CASES[case]
    window = None if window_size[0] < 0 else window_size[0]
    lengths = [130, 7, 64]
    gen = torch.Generator().manual_seed(sum(map(ord, case)))
    total = sum(lengths)
    q = torch.randn(total, 4, 64, generator=gen).to(dtype)
    k, v = (torch.randn(total, kv_heads, 64, generator=gen).to(dtype) for _ in range(2))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    scale = 1 / math.sqrt(64)
    out = flash_attn_varlen_func(q, k, v, cu, cu, max(lengths), max(lengths), causal=causal, window_size=window_size)
    assert out.shape == q.shape and out.dtype == dtype
    for b, n in enumerate(lengths):
        rows = slice(cu[b], cu[b + 1])
        expected = reference(q[rows], k[rows], v[rows], causal, window, scale)
        assert relative_error(out[rows], expected) < TOLERANCES[dtype], (case, b)
    # The padded entry point on the first sequence alone.
    n = lengths[0]
    padded = flash_attn_func(q[None, :n], k[None, :n], v[None, :n], causal=causal, window_size=window_size)
    assert relative_error(padded[0], reference(q[:n], k[:n], v[:n], causal, window, scale)) < TOLERANCES[dtype]


@pytest.mark.parametrize("case", ["bidirectional", "causal", "causal_window_gqa"])
def test_queries_fewer_than_the_keys_match_the_reference(case):
    """Decoding after a KV cache (causal: the queries are the keys' last positions) and a
    bidirectional layer's cross-attention, padded and varlen, against float64; forward and backward
    run. The varlen sequences have 1, 0 and 5 queries over 70, 12 and 5 keys."""
    causal, window_size, kv_heads = CASES[case]
    window = None if window_size[0] < 0 else window_size[0]
    q = torch.randn(2, 3, 4, 64, requires_grad=True)
    k, v = (torch.randn(2, 90, kv_heads, 64, requires_grad=True) for _ in range(2))
    out = flash_attn_func(q, k, v, causal=causal, window_size=window_size)
    out.sum().backward()
    assert q.grad.isfinite().all() and k.grad.isfinite().all()
    for b in range(2):
        assert relative_error(out[b], reference(q[b], k[b], v[b], causal, window, 1 / 8)) < TOLERANCES[torch.float32]
    q_lengths, k_lengths = [1, 0, 5], [70, 12, 5]
    q = torch.randn(sum(q_lengths), 4, 64)
    k, v = (torch.randn(sum(k_lengths), kv_heads, 64) for _ in range(2))
    cu_q, cu_k = (torch.tensor([0, *lengths]).cumsum(0).to(torch.int32) for lengths in (q_lengths, k_lengths))
    out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(q_lengths), max(k_lengths), causal=causal,
                                 window_size=window_size)
    assert out.shape == q.shape
    for b in range(3):
        rows, keys = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        if q_lengths[b]:
            expected = reference(q[rows], k[keys], v[keys], causal, window, 1 / 8)
            assert relative_error(out[rows], expected) < TOLERANCES[torch.float32], b


@pytest.mark.parametrize("case", ["bidirectional", "causal_window_gqa"])
def test_softcap_matches_the_reference(case):
    """Logit soft-capping (a cap of 2 on scores of magnitude ~8) on the kernels' path (equal
    sequences) and on the decoding path (fewer queries than keys), against float64."""
    causal, window_size, kv_heads = CASES[case]
    window = None if window_size[0] < 0 else window_size[0]
    gen = torch.Generator().manual_seed(3)
    q = 3 * torch.randn(1, 100, 4, 64, generator=gen)
    k, v = (3 * torch.randn(1, 100, kv_heads, 64, generator=gen) for _ in range(2))
    out = flash_attn_func(q, k, v, causal=causal, window_size=window_size, softcap=2.0)
    expected = reference(q[0], k[0], v[0], causal, window, 1 / 8, softcap=2.0)
    assert relative_error(out[0], expected) < TOLERANCES[torch.float32]
    assert relative_error(out[0], reference(q[0], k[0], v[0], causal, window, 1 / 8)) > 1e-2  # the cap bites
    last = flash_attn_func(q[:, -3:], k, v, causal=causal, window_size=window_size, softcap=2.0)
    tail = reference(q[0, -3:], k[0], v[0], causal, window, 1 / 8, softcap=2.0)
    assert relative_error(last[0], tail) < TOLERANCES[torch.float32]


def test_what_it_cannot_do_is_refused():
    q = torch.randn(1, 64, 2, 64)
    with pytest.raises(NotImplementedError, match="dropout"):
        flash_attn_func(q, q, q, dropout_p=0.1)
    with pytest.raises(NotImplementedError, match="ALiBi"):
        flash_attn_func(q, q, q, alibi_slopes=torch.ones(2))
    with pytest.raises(NotImplementedError, match="probabilities"):
        flash_attn_func(q, q, q, return_attn_probs=True)
    with pytest.raises(NotImplementedError, match="symmetric"):
        flash_attn_func(q, q, q, window_size=(8, 0))
    with pytest.raises(NotImplementedError, match="another sequence's keys"):
        flash_attn_func(q[:, :5], q, q, window_size=(8, 8))
    flat = q[0]
    with pytest.raises(ValueError, match="count the same sequences"):
        flash_attn_varlen_func(flat, flat, flat, torch.tensor([0, 32, 64], dtype=torch.int32),
                               torch.tensor([0, 64], dtype=torch.int32), 32, 64)
    with pytest.raises(ValueError, match="multiple"):
        flash_attn_func(torch.randn(1, 64, 3, 64), q, q)


@pytest.mark.parametrize("case", CASES)
def test_empty_batches_give_empty_outputs(case):
    """No sequence, or sequences of no tokens: empty outputs of the input's shape."""
    causal, window_size, kv_heads = CASES[case]
    for batch, seq in ((2, 0), (0, 16)):
        q = torch.randn(batch, seq, 4, 64)
        k, v = (torch.randn(batch, seq, kv_heads, 64) for _ in range(2))
        assert flash_attn_func(q, k, v, causal=causal, window_size=window_size).shape == q.shape
    q = torch.randn(0, 4, 64)
    k, v = (torch.randn(0, kv_heads, 64) for _ in range(2))
    cu = torch.tensor([0, 0], dtype=torch.int32)
    assert flash_attn_varlen_func(q, k, v, cu, cu, 0, 0, causal=causal, window_size=window_size).shape == q.shape


def test_the_package_imports_without_the_compiler_and_loads_its_entry_points_on_use():
    """`import modernbert_kernels` leaves torch._dynamo unimported (it costs ~1 s in every process
    that only runs the kernels); the transformers and FlashAttention entry points load on first use."""
    import subprocess
    import sys

    code = ("import sys, modernbert_kernels as m\n"
            "print('torch._dynamo' in sys.modules)\n"
            "assert {'attention_forward', 'flash_attn_func', 'flash_attn_varlen_func'} <= set(dir(m))\n"
            "print(callable(m.attention_forward), m.flash_attn_func.__module__)\n"
            "from modernbert_kernels import *\n"
            "try:\n"
            "    m.no_such_attribute\n"
            "except AttributeError as error:\n"
            "    print(error)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == [
        "False", "True modernbert_kernels.integrations.flash_attn",
        "module 'modernbert_kernels' has no attribute 'no_such_attribute'"]
