"""Block-sparse attention vs dense baselines with the same mask: the sliding window of ModernBERT's
local layers (bench "attention"), the causal sliding window of decoders' local layers (Mistral,
Gemma: 0 <= i - j <= w; bench "attention_causal", where ours also runs with GPT-OSS's attention
sinks, "_sinks"), Longformer's pattern (bench
"attention_global": a window of 256 each side plus 1% of the tokens global, at random positions
that differ per example; its baselines get the same per-example mask), and Gemma 3's local layer
with its heads of 256 (bench "attention_wide_heads": the 1B model's 4 heads and causal window of
512, in 128-token blocks; ours and FlexAttention (the cap as a score_mod) also with Gemma 2's logit
soft-capping at 50, "_softcap").

CPU: backend="cpu" (the C++ kernel) and backend="torch" (gathered blocks) vs
F.scaled_dot_product_attention with the equivalent boolean mask. GPU: backend="triton" and
backend="cuda" (the C++ extension's CUDA kernel) vs SDPA with the mask and FlexAttention with the
same window (create_block_mask), forward and forward+backward. FlexAttention is timed on the CPU
as well (compiled by inductor for the CPU). The causal rows add SDPA with ``is_causal=True`` and no
window: the dense causal cost a user without a window mask would pay.

    python -m benchmarks.attention --device cpu --out benchmarks/results/local
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from benchmarks.report import result_rows
from benchmarks.timing import summarize, time_fn
from modernbert_kernels import block_sparse_attention, layouts, native


def visible_pairs(seq_len: int, window: int, causal: bool = False) -> int:
    """Number of (i, j) with |i - j| <= window (and j <= i if causal) inside a sequence: the useful work."""
    return sum((i if causal else min(i + window, seq_len - 1)) - max(i - window, 0) + 1 for i in range(seq_len))


def attention_flops(batch, heads, head_dim, pairs, backward: bool) -> float:
    forward = 4.0 * batch * heads * head_dim * pairs  # QK^T and PV, 2 FLOPs per multiply-add
    return forward * (3.5 if backward else 1.0)  # backward: 5 matmuls, one recomputing QK^T (FA2 count)


def _window_mask(seq_len, window, device, causal=False):
    pos = torch.arange(seq_len, device=device)
    distance = pos[:, None] - pos[None, :]
    return (distance.abs() <= window) & ((distance >= 0) | (not causal))


def _sdpa_with(backend, attn_mask):
    from torch.nn.attention import sdpa_kernel

    def call(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)

    return call


def providers(device: torch.device, seq_len: int, window: int, block_size: int, quick: bool, causal: bool = False,
              softcap: float | None = None, sinks: torch.Tensor | None = None):
    """name -> function(q, k, v) returning the attention output, for this device; with ``softcap``,
    also each of ours and FlexAttention with the scores soft-capped (the cost of Gemma 2's cap; the
    other baselines do not cap); with ``sinks`` ([heads]), also each of ours with GPT-OSS's attention
    sinks (their cost; no baseline has them)."""
    from torch.nn.attention import SDPBackend

    layout = layouts.sliding_window(seq_len, window, block_size, causal=causal)
    ours = ["triton"] if device.type == "cuda" else []
    if native.status(device.type)[0]:  # the C++ extension's kernel for this device
        ours.append(device.type)
    if device.type == "cpu":
        ours.append("torch")
    mask = _window_mask(seq_len, window, device, causal)
    found = {
        f"block_sparse_{backend}": (
            lambda q, k, v, backend=backend: block_sparse_attention(q, k, v, layout, window=window, causal=causal,
                                                                   backend=backend)
        )
        for backend in ours
    }
    variants = {"softcap": dict(softcap=softcap)} if softcap else {}
    if sinks is not None:
        variants["sinks"] = dict(sinks=sinks)
    for suffix, options in variants.items():
        for backend in ours:
            found[f"block_sparse_{backend}_{suffix}"] = (
                lambda q, k, v, backend=backend, options=options: block_sparse_attention(
                    q, k, v, layout, window=window, causal=causal, backend=backend, **options)
            )
    found["sdpa_dense_masked"] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if causal:
        found["sdpa_is_causal_no_window"] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    # Each SDPA backend on its own, where present (an unusable one is skipped with a note).
    if device.type == "cpu" and not quick:
        found["sdpa_math_masked"] = _sdpa_with(SDPBackend.MATH, mask)
        found["sdpa_flash_cpu_masked"] = _sdpa_with(SDPBackend.FLASH_ATTENTION, mask)
    if device.type == "cuda":
        found["sdpa_efficient_masked"] = _sdpa_with(SDPBackend.EFFICIENT_ATTENTION, mask)
        found["sdpa_cudnn_masked"] = _sdpa_with(SDPBackend.CUDNN_ATTENTION, mask)
        if seq_len <= 4096:  # the math backend materializes [heads, seq, seq] scores
            found["sdpa_math_masked"] = _sdpa_with(SDPBackend.MATH, mask)
        # Flash takes no arbitrary mask: dense attention without the window, the unmasked cost.
        found["sdpa_flash_dense_unmasked"] = _sdpa_with(SDPBackend.FLASH_ATTENTION, None)
        try:
            from flash_attn import flash_attn_func

            found["flash_attn_window"] = lambda q, k, v: flash_attn_func(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), window_size=(window, 0 if causal else window),
                causal=causal,
            ).transpose(1, 2)
        except ImportError:
            pass

    found["flex_attention"] = _flex_attention(seq_len, window, device, causal)
    if softcap:
        found["flex_attention_softcap"] = _flex_attention(seq_len, window, device, causal, softcap)
    return found


def _flex_attention(seq_len: int, window: int, device: torch.device, causal: bool = False,
                    softcap: float | None = None):
    """torch.compile(flex_attention) with the same window (and causal mask) as a block mask (CPU
    too: inductor's C++ template), and the cap as a score_mod. Its first call compiles (~13 s on
    the 2-core CPU), which the warm-up absorbs."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def mask_mod(b, h, q_idx, kv_idx):
        near = (q_idx - kv_idx).abs() <= window
        return near & (q_idx >= kv_idx) if causal else near

    def capped(score, b, h, q_idx, kv_idx):
        return softcap * torch.tanh(score / softcap)

    block_mask = create_block_mask(mask_mod, None, None, seq_len, seq_len, device=device)
    # dynamic=False: one static compile per sequence length (168 ms at 8192 tokens on the CPU).
    compiled_flex = torch.compile(flex_attention, dynamic=False)
    score_mod = capped if softcap else None
    return lambda q, k, v: compiled_flex(q, k, v, score_mod=score_mod, block_mask=block_mask)


GLOBAL_WINDOW, GLOBAL_FRACTION, GLOBAL_BATCH = 256, 0.01, 2


def random_global_tokens(batch: int, seq_len: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """[batch, seq_len] bool: GLOBAL_FRACTION of each example's tokens, at positions of its own."""
    generator = torch.Generator().manual_seed(seed)
    count = max(1, round(GLOBAL_FRACTION * seq_len))
    marked = torch.zeros(batch, seq_len, dtype=torch.bool)
    for row in marked:
        row[torch.randperm(seq_len, generator=generator)[:count]] = True
    return marked.to(device)


def global_providers(device: torch.device, seq_len: int, block_size: int, global_tokens: torch.Tensor):
    """name -> function(q, k, v) for Longformer's pattern: ours (window layout + global_tokens), SDPA
    with the equivalent [batch, 1, seq, seq] mask, and FlexAttention with the per-example block mask
    (made once, outside the timing: a user would pay it for every batch)."""
    window = GLOBAL_WINDOW
    layout = layouts.sliding_window(seq_len, window, block_size)
    ours = ["triton"] if device.type == "cuda" else []
    if native.status(device.type)[0]:
        ours.append(device.type)
    if device.type == "cpu":
        ours.append("torch")
    found = {
        f"block_sparse_{backend}": (
            lambda q, k, v, backend=backend: block_sparse_attention(q, k, v, layout, window=window,
                                                                   global_tokens=global_tokens, backend=backend)
        )
        for backend in ours
    }
    mask = _window_mask(seq_len, window, device)[None, None] | global_tokens[:, None, :, None] | global_tokens[:, None, None, :]
    found["sdpa_dense_masked"] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def mask_mod(b, h, q_idx, kv_idx):
        return ((q_idx - kv_idx).abs() <= window) | global_tokens[b, q_idx] | global_tokens[b, kv_idx]

    block_mask = create_block_mask(mask_mod, global_tokens.shape[0], None, seq_len, seq_len, device=device)
    compiled_flex = torch.compile(flex_attention, dynamic=False)
    found["flex_attention"] = lambda q, k, v: compiled_flex(q, k, v, block_mask=block_mask)
    return found, int(mask.sum()) // global_tokens.shape[0], block_mask.sparsity()


# The GPU suite's headline sizes (benchmarks/gpu_suite.py, stage b).
HEADLINE_SEQ_LENS = [4096, 8192, 16384]


BENCHES = ("attention", "attention_causal", "attention_global", "attention_wide_heads")
# (heads, head_dim, window, layout block): ModernBERT's local layer, and Gemma 3 1B's.
GEOMETRY = {"attention_wide_heads": (4, 256, 512, 128)}
WIDE_HEADS_SOFTCAP = 50.0  # Gemma 2's attn_logit_softcapping: the wide heads also run capped
MODERNBERT_GEOMETRY = (12, 64, 64, 64)


def run(device: torch.device, quick: bool, progress=None, headline: bool = False, smoke: bool = False,
        benches=None) -> list[dict]:
    """Every bench of BENCHES (or those named in ``benches``) at the sizes of the mode asked for."""
    if device.type == "cuda":
        seq_lens = HEADLINE_SEQ_LENS if headline else [1024, 4096, 16384] if quick else [1024, 2048, 4096, 8192, 16384]
        dtype, passes = torch.bfloat16, ["fwd", "fwd+bwd"]
    else:
        dtype, seq_lens, passes = torch.float32, [8192] if quick else [2048, 8192], ["fwd"] if quick else ["fwd", "fwd+bwd"]
    if smoke:  # every provider once, at the smallest size worth a layout of several blocks
        seq_lens, passes = [1024], ["fwd"]
    # The causal sliding window at every length, Longformer's pattern and the wide heads at the
    # longest; in the GPU suite's budgeted headline, the first two at 8192 only. The smoke run skips
    # the wide heads: the causal bench's code with other sizes, and one more FlexAttention compile.
    long_only = [8192] if headline else seq_lens[-1:]
    cases = ([(n, "attention") for n in seq_lens] + [(n, "attention_causal") for n in (long_only if headline else seq_lens)]
             + [(n, "attention_global") for n in long_only]
             + [(n, "attention_wide_heads") for n in ([] if headline or smoke else long_only)])
    cases = [(n, bench) for n, bench in cases if benches is None or bench in benches]
    rows = []
    for seq_len, bench in cases:
        causal = bench in ("attention_causal", "attention_wide_heads")
        heads, head_dim, window, block_size = GEOMETRY.get(bench, MODERNBERT_GEOMETRY)
        batch, extra = 1, {}
        if bench == "attention_global":
            batch = GLOBAL_BATCH
            global_tokens = random_global_tokens(batch, seq_len, device)
            funcs, pairs, flex_sparsity = global_providers(device, seq_len, block_size, global_tokens)
            extra = dict(window=GLOBAL_WINDOW, global_tokens_per_example=int(global_tokens[0].sum()),
                         flex_block_sparsity_percent=round(flex_sparsity, 1))
        else:
            pairs = visible_pairs(seq_len, window, causal)
            # The decoder bench also runs ours with sinks (GPT-OSS's), spread over [-1, 1].
            sinks = torch.linspace(-1, 1, heads, device=device) if bench == "attention_causal" else None
            funcs = providers(device, seq_len, window, block_size, quick, causal,
                              WIDE_HEADS_SOFTCAP if bench == "attention_wide_heads" else None, sinks)
            extra = dict(window=window)
        baseline_name = "sdpa_dense_masked"
        for pass_name in passes:
            backward = pass_name == "fwd+bwd"
            generator = torch.Generator(device=device).manual_seed(0)
            q, k, v = (
                torch.randn(batch, heads, seq_len, head_dim, device=device, dtype=dtype, generator=generator)
                .requires_grad_(backward)
                for _ in range(3)
            )
            measured = {}
            for name, fn in funcs.items():
                if backward and name == "sdpa_math_masked" and seq_len > 2048:
                    continue  # materializes [heads, seq, seq] scores and their gradient: minutes on a CPU
                if backward and name == "flex_attention" and device.type == "cpu":
                    # FlexAttention has no CPU backward; a failed compile would also send the
                    # forward's later calls to eager (dense) flex_attention, 100x slower.
                    continue
                if backward:
                    grad = torch.randn_like(q)

                    def step(fn=fn):
                        out = fn(q, k, v)
                        out.backward(grad)
                else:

                    def step(fn=fn):
                        with torch.no_grad():
                            fn(q, k, v)

                try:
                    measured[name] = summarize(time_fn(step, device, smoke=smoke))
                except RuntimeError as err:  # a baseline backend that cannot take this input
                    if progress:
                        progress(f"{bench} {pass_name} seq={seq_len} {name}: unavailable ({str(err)[:80]})")
                    continue
                if progress:
                    progress(f"{bench} {pass_name} seq={seq_len} {name}: {measured[name]['median_ms']:.2f} ms")
            flops = attention_flops(batch, heads, head_dim, pairs, backward)
            # Compulsory traffic: q, k, v read and the output written (and for the backward, dO read
            # and dq, dk, dv written, plus q, k, v, O read again).
            tensor_bytes = batch * heads * seq_len * head_dim * q.element_size()
            moved = tensor_bytes * (4 + (8 if backward else 0))
            rows += result_rows(
                bench, pass_name, measured, baseline_name, flops=flops, bytes_moved=moved, seq_len=seq_len,
                batch=batch, heads=heads, head_dim=head_dim, dtype=str(dtype).replace("torch.", ""), **extra,
            )
    return rows


def main(argv=None):
    from benchmarks.report import script_main

    script_main(run, __doc__, "attention", argv,
                options={"--benches": dict(nargs="+", choices=BENCHES, help="only these benches (default: all)")})


if __name__ == "__main__":
    main()
