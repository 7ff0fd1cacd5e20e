"""Concurrency and determinism on the CPU: per-thread workspaces and the caches (checked
cu_seqlens, layout plans) are safe under concurrent calls, and results do not depend on how many
threads torch runs with.

- 4 Python threads calling one op on different inputs give bitwise the results of serial calls.
- The C++ kernels split work into fixed items (a query block, a row chunk), each computed by one
  thread in a fixed order: their outputs are bitwise equal under torch.set_num_threads(1) and (2).
- The encoder adds PyTorch's own GEMMs, whose blocking may follow the thread count: bounded by
  ENCODER_THREADS_TOLERANCE (relative), and bitwise equal across repeated calls.
"""

import threading

import pytest
import torch
from helpers import CPU_EXTENSION

from modernbert import ModernBertConfig, ModernBertModel
from modernbert_kernels import block_sparse_attention, int8_linear, layouts, quantize_per_token, rotary_embedding
from modernbert_kernels.int8 import quantize_per_channel

ENCODER_THREADS_TOLERANCE = 1e-5
NATIVE_AND_TORCH = [pytest.param("cpu", marks=CPU_EXTENSION), "torch"]


def attention_problem(seed):
    """A varlen batch on a sliding-window + global layout: the cu_seqlens check and the torch path's
    plan cache are exercised along with the kernels."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [130, 1, 77 + seed]
    q, k, v = (torch.randn(sum(lengths), 4, 64, generator=generator) for _ in range(3))
    cu_seqlens = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return q, k, v, cu_seqlens


LAYOUT = layouts.union(layouts.sliding_window(256, 64, 32), layouts.global_tokens(256, 32, 32))


def run_attention(backend, problem):
    q, k, v, cu_seqlens = problem
    return block_sparse_attention(q, k, v, LAYOUT, window=64, cu_seqlens=cu_seqlens, backend=backend)


def run_int8(backend, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(300 + seed, 192, generator=generator)
    w_q, w_scale = quantize_per_channel(torch.randn(256, 192, generator=generator))
    x_q, x_scale = quantize_per_token(x, norm_weight=torch.rand(192, generator=generator) + 0.5, backend=backend)
    return int8_linear(x_q, x_scale, w_q, w_scale, torch.randn(256, generator=generator), "geglu", backend=backend)


def run_rotary(backend, seed):
    generator = torch.Generator().manual_seed(seed)
    qkv = torch.randn(200 + seed, 2, 4, 64, generator=generator)
    angles = torch.rand(200 + seed, 32, generator=generator) * 10
    return rotary_embedding(qkv, angles.cos(), angles.sin(), backend=backend)


OPS = {"attention": lambda backend, seed: run_attention(backend, attention_problem(seed)),
       "int8_linear": run_int8, "rotary": run_rotary}


def concurrently(fn, seeds):
    results, errors = {}, []

    def work(seed):
        try:
            for _ in range(3):  # repeated, so the threads overlap
                results[seed] = fn(seed)
        except Exception as err:  # surfaced below: a thread's exception would vanish otherwise
            errors.append(err)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in seeds]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    return results


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("backend", NATIVE_AND_TORCH)
def test_four_threads_give_the_serial_results_bitwise(op, backend):
    seeds = [0, 1, 2, 3]
    serial = {seed: OPS[op](backend, seed) for seed in seeds}
    parallel = concurrently(lambda seed: OPS[op](backend, seed), seeds)
    for seed in seeds:
        assert torch.equal(parallel[seed], serial[seed]), (op, seed)


def with_threads(count, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


@CPU_EXTENSION
@pytest.mark.parametrize("op", list(OPS))
def test_native_kernels_are_bitwise_equal_under_one_and_two_threads(op):
    one = with_threads(1, lambda: OPS[op]("cpu", 5))
    two = with_threads(2, lambda: OPS[op]("cpu", 5))
    assert torch.equal(one, two)
    assert torch.equal(two, OPS[op]("cpu", 5))  # and across repeated calls


@CPU_EXTENSION
def test_native_attention_backward_is_bitwise_equal_under_one_and_two_threads():
    q, k, v, cu_seqlens = attention_problem(6)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(7))

    def grads():
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        out = block_sparse_attention(*inputs, LAYOUT, window=64, cu_seqlens=cu_seqlens, backend="cpu")
        return torch.autograd.grad(out, inputs, dout)

    for one, two in zip(with_threads(1, grads), with_threads(2, grads)):
        assert torch.equal(one, two)


def test_encoder_is_deterministic_and_bounded_across_thread_counts():
    config = ModernBertConfig(vocab_size=100, hidden_size=128, intermediate_size=192, num_hidden_layers=3,
                              num_attention_heads=2, local_attention=64, global_attn_every_n_layers=3,
                              max_position_embeddings=512, pad_token_id=0)
    torch.manual_seed(0)
    model = ModernBertModel(config).eval()
    ids = torch.randint(1, 100, (3, 200), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 200, dtype=torch.long)
    mask[1, 120:] = 0
    with torch.no_grad():
        one = with_threads(1, lambda: model(ids, mask))
        two = with_threads(2, lambda: model(ids, mask))
        again = with_threads(2, lambda: model(ids, mask))
    assert torch.equal(two, again)
    real = mask.bool()
    scale = one[real].abs().max()
    assert ((one[real] - two[real]).abs().max() / scale).item() <= ENCODER_THREADS_TOLERANCE
