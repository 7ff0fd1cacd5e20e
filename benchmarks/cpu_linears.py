"""The CPU linears against the machine's GEMM ceiling, per precision.

For fp32 and bf16, every GEMM ``modernbert_kernels.cpu_linear`` can run here (``F.linear``;
oneDNN's inner product on a prepacked weight; for bf16 also the prepacked fp32 GEMM on the widened
input) at each linear shape of ModernBERT-base, with the tokens of a batch of 8 x 512, and on a
square 2048^3 problem, with the heap kept as the encoder keeps it. A precision's ceiling is the
fastest rate any of its GEMMs reached in the run (the square one's, unless an encoder shape beat
it), and every row reports its share of it (``pct_of_precision_ceiling``). Last,
the fp32 encoder at 8 x 512 against the time its linears would take at the fp32 ceiling
(``over_linears_at_ceiling``; the goal is at most 1.15), and beside it the encoder's FLOP floor:
its linears and its attention's visible (query, key) pairs, both at the fp32 ceiling. No run of the
encoder at the ceiling's rate goes below it; the softmax and the elementwise passes add to it.

    python -m benchmarks.cpu_linears
"""

from __future__ import annotations

import statistics

import torch

from benchmarks.attention import attention_flops, visible_pairs
from benchmarks.encoder import BASE
from benchmarks.report import result_rows
from benchmarks.timing import summarize, time_cpu
from modernbert import ModernBertConfig, ModernBertModel
from modernbert_kernels import cpu_linear, cpu_memory

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def gemm_flops(tokens: int, in_features: int, out_features: int) -> int:
    return 2 * tokens * in_features * out_features


def linear_flops(model: torch.nn.Module, tokens: int) -> int:
    """FLOPs of every linear layer of ``model`` over ``tokens`` (unpadded) tokens."""
    return sum(gemm_flops(tokens, m.in_features, m.out_features) for m in model.modules()
               if isinstance(m, torch.nn.Linear))


def encoder_attention_flops(config: ModernBertConfig, batch: int, seq_len: int) -> float:
    """Forward FLOPs of the encoder's attention over unpadded sequences: every visible (query, key)
    pair of each layer (all of them in global layers, the band in sliding-window ones)."""
    head_dim = config.hidden_size // config.num_attention_heads
    return sum(attention_flops(batch, config.num_attention_heads, head_dim,
                               visible_pairs(seq_len, seq_len if kind == "full_attention" else config.sliding_window),
                               backward=False)
               for kind in config.layer_types)


def run(device: torch.device, quick: bool, progress=print, smoke: bool = False) -> list[dict]:
    """``smoke``: 64 tokens, a square 256^3, an encoder of 2 layers over 1 x 64 tokens, timed once."""
    if device.type != "cpu":
        progress("cpu_linears: a CPU subject, skipped on " + device.type)
        return []
    # As the encoder does at its first CPU call: freed memory stays in the heap, so a GEMM's fresh
    # output is not page-faulted in on every call (768 -> 2304 at 4096 tokens: 195 GFLOP/s without,
    # 224 with, on a 2-core EPYC Zen 4).
    cpu_memory.keep_freed_memory()
    batch, seq_len = (1, 64) if smoke else (8, 512)
    tokens, square = batch * seq_len, 256 if smoke else 2048
    rounds = 1 if smoke else 3 if quick else 5
    rows, ceilings = [], {}
    for precision, dtype in PRECISIONS.items():
        problems = [("square", square, square, square)]
        problems += [("encoder", tokens, k, n) for k, n in dict.fromkeys(cpu_linear.ENCODER_SHAPES)]
        timed = []
        for kind, m, k, n in problems:
            samples = cpu_linear.time_gemms(dtype, shapes=((k, n),), tokens=m, rounds=rounds)
            measured = {gemm: summarize([s * 1e3 for s in seconds]) for gemm, seconds in samples.items()}
            flops = gemm_flops(m, k, n)
            rates = {gemm: flops / (stats["median_ms"] * 1e-3) for gemm, stats in measured.items()}  # FLOP/s
            for gemm, rate in rates.items():
                progress(f"cpu_linears {precision} {m} x {k} -> {n} {gemm}: {rate / 1e9:.0f} GFLOP/s")
            timed.append((kind, m, k, n, measured, flops, rates))
        # The precision's ceiling: the fastest rate any of its GEMMs reached, the square one's as a rule;
        # an encoder shape can beat it by a percent in a run, and a ceiling must not be beaten.
        ceilings[precision] = ceiling = max(rate for *_, rates in timed for rate in rates.values())
        for kind, m, k, n, measured, flops, rates in timed:
            rows += result_rows(
                "cpu_linears", f"{precision} {kind} {k} -> {n}", measured, "aten", flops=flops, tokens=m,
                dtype=precision, chosen=cpu_linear.cpu_gemm(dtype, k, n, m) if kind == "encoder" else None,
                per_provider=lambda gemm, rates=rates: {"pct_of_precision_ceiling": 100 * rates[gemm] / ceiling},
            )

    config = dict(BASE, num_hidden_layers=2) if smoke else BASE
    torch.manual_seed(0)
    model = ModernBertModel(ModernBertConfig(**config)).eval()
    ids = torch.randint(3, BASE["vocab_size"], (batch, seq_len))
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        encoder_ms = time_cpu(lambda: model(ids, mask), warmup=1 if smoke else 2, repeats=rounds, budget_s=0)
    flops = linear_flops(model, tokens)
    floor_flops = flops + encoder_attention_flops(model.config, batch, seq_len)
    computed = {"linears_at_fp32_ceiling": (flops, "computed: the encoder's linear FLOPs at the fp32 ceiling"),
                "flop_floor_at_fp32_ceiling": (floor_flops, "computed: the linears' and the attention's visible "
                                               "pairs' FLOPs at the fp32 ceiling")}
    at_ceiling_ms = {name: count / ceilings["fp32"] * 1e3 for name, (count, _) in computed.items()}
    linears_ms = at_ceiling_ms["linears_at_fp32_ceiling"]
    over = {"ours_fp32": statistics.median(encoder_ms) / linears_ms,
            **{name: ms / linears_ms for name, ms in at_ceiling_ms.items()}}
    progress(f"cpu_linears fp32 encoder {batch} x {seq_len}: {statistics.median(encoder_ms) / 1e3:.2f} s, "
             f"its linears at the fp32 ceiling {linears_ms / 1e3:.2f} s: {over['ours_fp32']:.2f}x "
             f"(its FLOP floor: {over['flop_floor_at_fp32_ceiling']:.2f}x)")
    measured = {"ours_fp32": summarize(encoder_ms)}
    for name, ms in at_ceiling_ms.items():
        measured[name] = {"median_ms": ms, "iqr_ms": 0.0, "min_ms": ms, "runs": 0}
    rows += result_rows(
        "cpu_linears", f"fp32 encoder {batch} x {seq_len}", measured, "linears_at_fp32_ceiling", flops=flops,
        tokens=tokens, dtype="fp32",
        per_provider=lambda name: {"over_linears_at_ceiling": over[name],
                                   "note": computed[name][1] if name in computed else None},
    )
    return rows


def main(argv=None):
    from benchmarks.report import script_main

    script_main(run, __doc__, "cpu_linears", argv)


if __name__ == "__main__":
    main()
