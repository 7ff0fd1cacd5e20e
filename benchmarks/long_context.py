"""Long contexts: time and peak memory at 16k, 32k and 64k tokens.

Sliding-window attention (ModernBERT's local layers: 12 heads, head_dim 64, window 64, fp32),
forward and forward+backward, on each of our backends for the device; dense SDPA with the same
window as a mask beside it at 16k (its [seq, seq] mask alone is 1 GiB at 32k and 4 GiB at 64k).
The ModernBERT-base encoder forward (22 layers, 8 of them global, random weights,
max_position_embeddings raised to 65536), fp32 and int8, on one sequence of N tokens.

Memory is the call's peak on top of what the process held before it (benchmarks.timing.
peak_memory: the peak resident set on the CPU, the allocator's peak on CUDA). A straight line
through the encoder's total peaks gives the longest context that fits in a memory size
(``--memory-gib``, default 24).

    python -m benchmarks.long_context --out benchmarks/results/local
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch
import torch.nn.functional as F

from benchmarks.attention import attention_flops, visible_pairs
from benchmarks.report import result_rows, write_report
from benchmarks.timing import peak_memory, summarize, time_cpu, time_fn
from modernbert_kernels import block_sparse_attention, layouts, native
from modernbert_kernels.cpu_memory import return_freed_memory_to_the_os

SEQ_LENS = [16384, 32768, 65536]
HEADS, HEAD_DIM, WINDOW, BLOCK = 12, 64, 64, 64
DENSE_BASELINE_MAX_SEQ = 16384
GIB = 1 << 30


def attention_providers(device: torch.device, seq_len: int) -> list[str]:
    found = (["triton"] if device.type == "cuda" else []) + (
        [device.type] if native.status(device.type)[0] else []) + (["torch"] if device.type == "cpu" else [])
    found = [f"block_sparse_{backend}" for backend in found]
    return found + (["sdpa_dense_masked"] if seq_len <= DENSE_BASELINE_MAX_SEQ else [])


def attention_step(device, seq_len, provider, backward):
    """One call of sliding-window attention (and its backward) on fresh random inputs."""
    layout = layouts.sliding_window(seq_len, WINDOW, BLOCK)
    if provider == "sdpa_dense_masked":
        pos = torch.arange(seq_len, device=device)
        mask = (pos[:, None] - pos[None, :]).abs() <= WINDOW

        def attend(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    else:
        backend = provider.removeprefix("block_sparse_")

        def attend(q, k, v):
            return block_sparse_attention(q, k, v, layout, window=WINDOW, backend=backend)

    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v, grad = (torch.randn(1, HEADS, seq_len, HEAD_DIM, device=device, generator=generator) for _ in range(4))
    q, k, v = (t.requires_grad_(backward) for t in (q, k, v))

    def step():
        if backward:
            q.grad = k.grad = v.grad = None
            attend(q, k, v).backward(grad)
        else:
            with torch.no_grad():
                attend(q, k, v)

    return step, step  # the warm-up call is the same call


def encoder_step(device, seq_len, provider):
    """One forward of ModernBERT-base (random weights; int8 for ``ours_int8``) on one sequence,
    and a warm-up call on 512 tokens (it builds no layout of the measured length)."""
    from modernbert import ModernBertConfig, ModernBertModel, quantize_int8

    torch.manual_seed(0)
    model = ModernBertModel(ModernBertConfig(max_position_embeddings=max(seq_len, 8192))).to(device).eval()
    if provider == "ours_int8":
        quantize_int8(model)
    ids = torch.randint(3, 50000, (1, seq_len), generator=torch.Generator().manual_seed(1)).to(device)

    def forward(input_ids):
        with torch.inference_mode():
            model(input_ids)

    return (lambda: forward(ids)), (lambda: forward(ids[:, :512])), model


def layout_bytes(model) -> int:
    """Bytes of the block layouts the encoder built (the global layers' grows as (N / 64)^2)."""
    return sum(t.numel() * t.element_size() for layout in model._layouts.values()
               for t in (layout.row_offsets, layout.col_indices, layout.col_offsets, layout.row_indices))


def measure(device: torch.device, case: dict) -> dict:
    """Peak memory of one call (after a warm-up call), then ``repeats`` timed calls. Run in a
    process of its own (worker), so no earlier case's memory is resident."""
    if device.type == "cpu":
        return_freed_memory_to_the_os()
    model = None
    if case["pass"] == "encoder forward":
        step, warm_up, model = encoder_step(device, case["seq_len"], case["provider"])
    else:
        step, warm_up = attention_step(device, case["seq_len"], case["provider"], case["pass"] == "attention fwd+bwd")
    warm_up()
    if model is not None:
        model._layouts.clear()  # the measured call builds its own length's layouts, as a first call does
    memory = peak_memory(step, device)
    stats = summarize(time_cpu(step, warmup=0, repeats=case["repeats"], budget_s=0) if device.type == "cpu"
                      else time_fn(step, device))
    stats.update(memory, call_peak_mib=memory["call_peak_bytes"] / 2**20)
    if model is not None:
        stats["layout_bytes"] = layout_bytes(model)
    return stats


def measure_in_worker(device: torch.device, case: dict) -> dict:
    command = [sys.executable, "-m", "benchmarks.long_context", "--device", str(device), "--worker", json.dumps(case)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"long-context case {case} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(device: torch.device, quick: bool, progress=print, seq_lens=None, repeats: int = 3,
        encoder: bool = True) -> list[dict]:
    seq_lens = seq_lens or ([4096, 8192] if quick else SEQ_LENS)
    rows = []
    for seq_len in seq_lens:
        groups = [(f"attention {p}", attention_providers(device, seq_len), repeats) for p in ("fwd", "fwd+bwd")]
        if encoder:  # one timed call: a 64k-token forward takes minutes on a CPU
            groups.append(("encoder forward", ["ours_fp32", "ours_int8"], 1 if device.type == "cpu" else repeats))
        for pass_name, providers, case_repeats in groups:
            measured = {}
            for provider in providers:
                if pass_name == "attention fwd+bwd" and provider == "sdpa_dense_masked":
                    continue  # its backward keeps [heads, seq, seq] probabilities: minutes and GiBs
                case = {"pass": pass_name, "provider": provider, "seq_len": seq_len, "repeats": case_repeats}
                measured[provider] = measure_in_worker(device, case)
                progress(f"{pass_name} {seq_len} tokens {provider}: {measured[provider]['median_ms'] / 1e3:.3f} s, "
                         f"call peak +{measured[provider]['call_peak_mib']:.0f} MiB, "
                         f"process peak {measured[provider]['peak_bytes'] / GIB:.2f} GiB")
            if pass_name == "encoder forward":
                rows += result_rows("long_context", pass_name, measured, "ours_fp32", seq_len=seq_len, tokens=seq_len,
                                    per_provider=lambda name: {
                                        "tokens_per_s": seq_len / (measured[name]["median_ms"] * 1e-3)})
            else:
                baseline = "sdpa_dense_masked" if "sdpa_dense_masked" in measured else providers[0]
                rows += result_rows(
                    "long_context", pass_name, measured, baseline, seq_len=seq_len,
                    flops=attention_flops(1, HEADS, HEAD_DIM, visible_pairs(seq_len, WINDOW), pass_name.endswith("bwd")),
                    input_bytes=3 * seq_len * HEADS * HEAD_DIM * 4, heads=HEADS, head_dim=HEAD_DIM, window=WINDOW,
                    dtype="float32",
                )
    return rows


def longest_context(rows: list[dict], provider: str, memory_bytes: float) -> dict:
    """Least-squares line through (tokens, process peak) of one encoder provider, and the token
    count where it reaches ``memory_bytes``."""
    points = sorted((r["seq_len"], r["peak_bytes"]) for r in rows
                    if r["pass"] == "encoder forward" and r["provider"] == provider)
    n = torch.tensor([p[0] for p in points], dtype=torch.float64)
    peak = torch.tensor([p[1] for p in points], dtype=torch.float64)
    slope = ((n - n.mean()) * (peak - peak.mean())).sum() / ((n - n.mean()) ** 2).sum()
    intercept = peak.mean() - slope * n.mean()
    return {"provider": provider, "bytes_per_token": slope.item(), "intercept_bytes": intercept.item(),
            "max_tokens": int((memory_bytes - intercept) / slope),
            "worst_fit_error": ((intercept + slope * n - peak).abs() / peak).max().item()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="4k and 8k tokens (a smoke run)")
    parser.add_argument("--seq-lens", type=int, nargs="+", help=f"token counts (default {SEQ_LENS})")
    parser.add_argument("--repeats", type=int, default=3, help="timed attention calls per case")
    parser.add_argument("--no-encoder", action="store_true", help="attention only")
    parser.add_argument("--memory-gib", type=float, default=24.0)
    parser.add_argument("--out", default="benchmarks/results/local")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # one case, JSON in, JSON out (see measure_in_worker)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.worker:
        print(json.dumps(measure(device, json.loads(args.worker))))
        return
    rows = run(device, args.quick, seq_lens=args.seq_lens, repeats=args.repeats, encoder=not args.no_encoder)
    fits = []
    if not args.no_encoder and len({r["seq_len"] for r in rows}) >= 2:
        fits = [longest_context(rows, name, args.memory_gib * GIB) for name in ("ours_fp32", "ours_int8")]
        for fit in fits:
            print(f"{fit['provider']}: {fit['bytes_per_token'] / 1024:.1f} KiB per token; the longest context in "
                  f"{args.memory_gib:g} GiB: {fit['max_tokens']} tokens (line fits within {100 * fit['worst_fit_error']:.1f}%)")
    write_report(rows, args.out, device, "long-context", extra={"memory_fits": fits})


if __name__ == "__main__":
    main()
