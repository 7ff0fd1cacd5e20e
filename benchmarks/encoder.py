"""The whole encoder: ours (fp32 and int8) vs transformers' ModernBertModel (sdpa) on the same weights.

ModernBERT-base shapes (random weights, vocabulary cut to 1024 to keep the embedding small).
Rows: one sequence of N tokens (batch 1), and (full run) a padded batch of 8 sequences with
lengths 128..4096, where unpadding pays. Also reports the int8 model's drift from fp32: the mean
and minimum per-token cosine of the last hidden state, and the speed of the model with a quarter
of its heads pruned (3 of 12 per layer: the speed does not depend on which).

    python -m benchmarks.encoder --device cpu
"""

from __future__ import annotations

import importlib.util
import tempfile

import torch

from benchmarks.report import result_rows
from benchmarks.timing import summarize, time_cpu, time_fn
from modernbert import ModernBertModel, quantize_int8

BASE = dict(vocab_size=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
PADDED_LENGTHS = [128, 256, 512, 1024, 1536, 2048, 3072, 4096]


def models(device, dtype):
    """{name: model}: transformers (sdpa, and flash_attention_2 where installed), ours, ours int8."""
    import transformers

    torch.manual_seed(0)
    hf_model = transformers.ModernBertModel(transformers.ModernBertConfig(**BASE, attn_implementation="sdpa"))
    found = {}
    with tempfile.TemporaryDirectory() as folder:
        hf_model.save_pretrained(folder)
        found["transformers_sdpa"] = hf_model
        if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
            found["transformers_flash_attention_2"] = transformers.ModernBertModel.from_pretrained(
                folder, attn_implementation="flash_attention_2", dtype=dtype
            )
        found["ours"] = ModernBertModel.from_pretrained(folder)
        found["ours_int8"] = quantize_int8(ModernBertModel.from_pretrained(folder))
        # int8 linears and bf16 attention (fp32 accumulation), the usual int8 deployment.
        found["ours_int8_bf16_attention"] = quantize_int8(ModernBertModel.from_pretrained(folder),
                                                          attention_dtype=torch.bfloat16)
        found["ours_pruned_25pct_heads"] = ModernBertModel.from_pretrained(folder)
        found["ours_pruned_25pct_heads"].prune_heads({layer: [0, 1, 2] for layer in range(hf_model.config.num_hidden_layers)})
    for name, model in found.items():
        found[name] = (model.to(device) if name.startswith("ours_int8") else model.to(device=device, dtype=dtype)).eval()
    return found


def batch(lengths, device):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, BASE["vocab_size"], (len(lengths), max(lengths)), generator=generator)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    return ids.to(device), mask.to(device)


def run(device: torch.device, quick: bool, progress=None, headline: bool = False, smoke: bool = False) -> list[dict]:
    """``headline``: the GPU suite's stage b, a batch of 8 x 512 and one sequence of 8192. ``smoke``: one
    sequence of 256 tokens, timed once."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    found = models(device, dtype)
    cases = [("one sequence", [256 if smoke else 1024 if quick and not headline else 8192])]
    if device.type == "cuda" or headline:  # short contexts too: a batch of 8 x 512 tokens
        cases.insert(0, ("batch 8 x 512", [512] * 8))
    if not quick and not headline:
        cases.append(("padded batch 128..4096", PADDED_LENGTHS))
    pruned_only_on = cases[0][0]  # one case is enough to show the pruned model's speed
    rows = []
    for case, lengths in cases:
        ids, mask = batch(lengths, device)
        tokens = int(mask.sum())
        providers = {
            name: (lambda m=model: m(input_ids=ids, attention_mask=mask).last_hidden_state)
            if name.startswith("transformers") else (lambda m=model: m(ids, mask))
            for name, model in found.items()
        }
        measured, outputs = {}, {}
        with torch.inference_mode():
            for name, fn in providers.items():
                if name == "ours_pruned_25pct_heads" and case != pruned_only_on:
                    continue
                outputs[name] = fn()
                # A whole encoder at 8192 tokens takes tens of seconds on 2 cores: 1 warm-up, 3 runs.
                samples = (time_cpu(fn, warmup=0, repeats=1 if smoke else 3, budget_s=0) if device.type == "cpu"
                           else time_fn(fn, device))
                measured[name] = summarize(samples)
                if progress:
                    progress(f"encoder {case} {name}: {measured[name]['median_ms'] / 1e3:.2f} s")
        real = mask.bool()
        # Drift of each int8 model from the fp32 one: per-token cosine of the last hidden state.
        cosine = {
            name: torch.nn.functional.cosine_similarity(out[real].float(), outputs["ours"][real].float(), dim=-1)
            for name, out in outputs.items() if name.startswith("ours_int8")
        }
        parity = (outputs["ours"][real].float() - outputs["transformers_sdpa"][real].float()).abs().max().item()

        def fields(name):
            return {
                "tokens_per_s": tokens / (measured[name]["median_ms"] * 1e-3),
                "max_abs_diff_vs_transformers": parity if name == "ours" else None,
                "int8_cosine_mean": cosine[name].mean().item() if name in cosine else None,
                "int8_cosine_min": cosine[name].min().item() if name in cosine else None,
            }

        rows += result_rows("encoder", case, measured, "transformers_sdpa", seq_len=max(lengths), tokens=tokens,
                            dtype=str(dtype).replace("torch.", ""), per_provider=fields)
    return rows


def main(argv=None):
    from benchmarks.report import script_main

    script_main(run, __doc__, "encoder", argv)


if __name__ == "__main__":
    main()
