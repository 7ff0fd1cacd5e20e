"""transformers' sparse-attention models, transformers' own implementation vs ours on the same
weights (random, base-size configs built here): whole model and one layer's self-attention module
alone, forward and forward+backward.

- Longformer-base at 4096 tokens: batch 1 (the CLS token global), and a padded batch of 4
  (4096, 3500, 2500 and 1200 tokens; the first 32 tokens of each, a question, global);
- BigBird-RoBERTa-base (block_sparse, eval) at 4096 tokens;
- a sliding-window decoder at 8192 tokens: Mistral-style, 12 layers of 768 with a window of 1024
  (transformers: sdpa with its [seq, seq] mask).

Ours: ``replace_attention`` (Longformer, BigBird) and ``attn_implementation="modernbert_kernels"``
(the decoder). "attention" rows time the first layer's self-attention module on the inputs the
model gave it, with the projections of the hidden states into queries, keys and values computed
beforehand and the decoder's output projection left out (the same matmuls in both, outside what
was replaced): the attention itself, with the masks, the global tokens and the layout work. fp32,
the model's base class (no task head). Whole models: 1 warm-up call, the median of 3 (CPU).

    python -m benchmarks.sparse_models --device cpu
"""

from __future__ import annotations

import copy

import torch

from benchmarks.report import result_rows
from benchmarks.timing import summarize, time_cpu, time_fn

LONGFORMER_LENGTHS = [4096, 3500, 2500, 1200]


# The smoke run's sizes: one layer of 128 (two heads of 64), windows and blocks to match 256 tokens.
SMOKE = dict(hidden_size=128, num_hidden_layers=1, num_attention_heads=2, intermediate_size=256)


class _Precomputed(torch.nn.Module):
    """A projection whose output on the timed hidden states was computed beforehand (a fresh copy
    per call: transformers scales Longformer's queries in place); other inputs go to the layer."""

    def __init__(self, layer: torch.nn.Module, hidden: torch.Tensor, backward: bool):
        super().__init__()
        self.layer, self.hidden = layer, hidden
        with torch.no_grad():
            self.out = layer(hidden).requires_grad_(backward)

    def forward(self, x):
        return self.out.clone() if x is self.hidden else self.layer(x)


# Per model: the projections of the hidden states (precomputed for the attention rows), and the
# output projection inside the module (left out: an identity, same shape).
PROJECTIONS = {
    "longformer": (("query", "key", "value", "key_global", "value_global"), None),
    "big_bird": (("query", "key", "value"), None),
    "mistral": (("q_proj", "k_proj", "v_proj"), "o_proj"),
}


def _attention_core(module: torch.nn.Module, model_type: str, hidden: torch.Tensor, backward: bool):
    """A copy of ``module`` whose input projections return precomputed outputs for ``hidden``."""
    core = copy.deepcopy(module)
    inputs, output = PROJECTIONS[model_type]
    for name in inputs:
        setattr(core, name, _Precomputed(getattr(core, name), hidden, backward))
    if output:
        setattr(core, output, torch.nn.Identity())
    return core


def _longformer(small: bool):
    import transformers

    size = dict(SMOKE, attention_window=64) if small else dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, attention_window=512)
    config = transformers.LongformerConfig(
        vocab_size=50265, max_position_embeddings=4098, type_vocab_size=1, pad_token_id=1,
        attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0, **size)
    return transformers.LongformerModel(config), lambda model: model.encoder.layer[0].attention.self


def _bigbird(small: bool):
    import transformers

    size = dict(SMOKE, block_size=16, num_random_blocks=1) if small else dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, block_size=64,
        num_random_blocks=3)
    config = transformers.BigBirdConfig(
        vocab_size=50358, max_position_embeddings=4096, attention_type="block_sparse",
        attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0, **size)
    return transformers.BigBirdModel(config), lambda model: model.encoder.layer[0].attention.self


def _decoder(small: bool):
    import transformers

    size = dict(SMOKE, num_key_value_heads=1, sliding_window=128) if small else dict(
        hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
        sliding_window=1024)
    config = transformers.MistralConfig(vocab_size=32000, head_dim=64, max_position_embeddings=8192,
                                        attn_implementation="sdpa", **size)
    return transformers.MistralModel(config), lambda model: model.layers[0].self_attn


def _inputs(lengths, global_count, vocab, seq_len):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (len(lengths), seq_len), generator=generator)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    inputs = dict(input_ids=ids.masked_fill(mask == 0, 1), attention_mask=mask)
    if global_count:
        marked = torch.zeros_like(ids)
        marked[:, :global_count] = 1
        inputs["global_attention_mask"] = marked
    return inputs


def cases(small: bool):
    """(name, build, inputs, ours) per row group; ``ours(model)`` turns transformers' model into ours."""
    from modernbert_kernels.integrations.transformers import register, replace_attention

    name = register()

    def decoder_ours(model):
        model.set_attn_implementation(name)
        return model

    n = 256 if small else 4096
    lengths = [n, n * 7 // 8, n * 5 // 8, n * 3 // 10]
    return [
        ("longformer-base batch 1", _longformer, _inputs([n], 1, 50265, n), replace_attention),
        ("longformer-base padded batch 4", _longformer, _inputs(lengths, 32, 50265, n), replace_attention),
        ("bigbird-roberta-base", _bigbird, _inputs([n], 0, 50358, n), replace_attention),
        ("mistral-style sliding-window decoder", _decoder, dict(_inputs([2 * n], 0, 32000, 2 * n), use_cache=False),
         decoder_ours),
    ]


def _captured_call(model, module, inputs):
    """The args and kwargs ``module`` received during ``model(**inputs)``."""
    seen = {}

    def hook(_, args, kwargs):
        seen.setdefault("call", (args, kwargs))

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    return seen["call"]


def _timed(fn, device, backward: bool, repeats: int, warmup: int):
    """Median stats of ``fn()`` (returning a tensor), under no_grad, or with a backward of a fixed
    random gradient."""
    if not backward:
        def step():
            with torch.no_grad():
                fn()
    else:
        grad = {}

        def step():
            out = fn()
            if "g" not in grad:
                grad["g"] = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
            out.backward(grad["g"])
    if device.type == "cpu":
        return summarize(time_cpu(step, warmup=warmup, repeats=repeats, budget_s=0 if warmup < 2 else 2.0))
    return summarize(time_fn(step, device))


def run(device: torch.device, quick: bool, progress=print, smoke: bool = False) -> list[dict]:
    rows = []
    passes = ["fwd"] if smoke else ["fwd", "fwd+bwd"]
    repeats = 1 if smoke else 3
    for case_name, build, inputs, make_ours in cases(small=smoke):
        torch.manual_seed(0)
        theirs, layer_attention = build(smoke)
        theirs = theirs.to(device).eval()
        ours = make_ours(copy.deepcopy(theirs)).eval()
        inputs = {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in inputs.items()}
        seq_len = inputs["input_ids"].shape[1]
        tokens = int(inputs["attention_mask"].sum())
        models = {"transformers": theirs, "ours": ours}
        calls = {name: _captured_call(model, layer_attention(model), inputs) for name, model in models.items()}
        for pass_name in passes:
            backward = pass_name == "fwd+bwd"
            for scope in ("model", "attention"):
                measured = {}
                for name, model in models.items():
                    if scope == "model":
                        fn = lambda model=model: model(**inputs).last_hidden_state
                    else:
                        args, kwargs = calls[name][0], dict(calls[name][1])
                        hidden = args[0] if args else kwargs.pop("hidden_states")
                        hidden = hidden.detach().requires_grad_(backward)
                        core = _attention_core(layer_attention(model), model.config.model_type, hidden, backward)
                        fn = lambda core=core, hidden=hidden, rest=args[1:], kwargs=kwargs: core(hidden, *rest, **kwargs)[0]
                    if backward:
                        model.zero_grad(set_to_none=True)
                    # Whole models take seconds a call on a CPU: one warm-up call, no extra runs.
                    measured[name] = _timed(fn, device, backward, repeats, warmup=1 if scope == "model" else 2)
                    progress(f"{case_name} {scope} {pass_name} {name}: {measured[name]['median_ms'] / 1e3:.3f} s")
                rows += result_rows(
                    "sparse_models", pass_name, measured, "transformers", seq_len=seq_len, model=case_name,
                    scope=scope, batch=inputs["input_ids"].shape[0], dtype="float32",
                    per_provider=lambda name, measured=measured, scope=scope: (
                        {"tokens_per_s": tokens / (measured[name]["median_ms"] * 1e-3)} if scope == "model" else {}),
                )
    return rows


def main(argv=None):
    from benchmarks.report import script_main

    script_main(run, __doc__, "sparse_models", argv)


if __name__ == "__main__":
    main()
