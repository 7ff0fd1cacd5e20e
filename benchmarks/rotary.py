"""rotary_embedding (RoPE on q and k of a fused qkv) vs transformers' apply_rotary_pos_emb.

ModernBERT-base shapes: 12 heads of 64, q and k sliced from qkv [tokens, 3, heads, 64]. Providers:
"ours" (a new q/k tensor, autograd-capable), "ours_inplace" (what the encoder runs at inference),
"torch_path" (the op's PyTorch backend) and "transformers" (its apply_rotary_pos_emb on the
[batch, heads, seq, dim] views it makes, angles repeated over both halves).

    python -m benchmarks.rotary --device cpu
"""

from __future__ import annotations

import torch

from benchmarks.report import result_rows
from benchmarks.timing import summarize, time_fn
from modernbert_kernels import rotary_embedding

HEADS, HEAD_DIM = 12, 64


def run(device: torch.device, quick: bool, progress=None, smoke: bool = False) -> list[dict]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    token_counts = [1024] if smoke else [8192, 65536] if device.type == "cuda" else [8192]
    rows = []
    for tokens in token_counts:
        generator = torch.Generator().manual_seed(0)
        qkv = torch.randn(tokens, 3, HEADS, HEAD_DIM, generator=generator).to(device, dtype)
        angles = (torch.arange(tokens).float()[:, None] * torch.rand(HEAD_DIM // 2, generator=generator)).to(device)
        cos, sin = angles.cos(), angles.sin()
        providers = {
            "ours": lambda: rotary_embedding(qkv[:, :2], cos, sin),
            "ours_inplace": lambda: rotary_embedding(qkv[:, :2], cos, sin, inplace=True),
            "torch_path": lambda: rotary_embedding(qkv[:, :2], cos, sin, backend="torch"),
        }
        try:
            from transformers.models.modernbert.modeling_modernbert import apply_rotary_pos_emb

            # As transformers' ModernBertAttention calls it: [1, heads, seq, dim] views of qkv.
            q, k = (t.transpose(0, 1)[None] for t in qkv.unbind(1)[:2])
            cos_full, sin_full = (torch.cat((t, t), -1)[None].to(dtype) for t in (cos, sin))
            providers["transformers"] = lambda: apply_rotary_pos_emb(q, k, cos_full, sin_full)
        except ImportError:
            pass
        measured = {}
        with torch.no_grad():
            for provider, fn in providers.items():
                measured[provider] = summarize(time_fn(fn, device, repeats=10, smoke=smoke))
                if progress:
                    progress(f"rotary tokens={tokens} {provider}: {measured[provider]['median_ms']:.3f} ms")
        elements = 2 * tokens * HEADS * HEAD_DIM  # q and k
        # Read q and k, write them, read both angle tables once.
        moved = 2 * elements * qkv.element_size() + 2 * tokens * (HEAD_DIM // 2) * 4
        baseline = "transformers" if "transformers" in measured else "torch_path"
        rows += result_rows(
            "rotary", "forward", measured, baseline, flops=3.0 * elements, bytes_moved=moved, seq_len=tokens,
            heads=HEADS, head_dim=HEAD_DIM, dtype=str(dtype).replace("torch.", ""),
        )
    return rows


def main(argv=None):
    from benchmarks.report import script_main

    script_main(run, __doc__, "rotary", argv)


if __name__ == "__main__":
    main()
