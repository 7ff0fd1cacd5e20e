"""transformers' sparse-attention models, transformers' own implementation vs ours on the same
weights (random, base-size configs built here): whole model and one layer's self-attention module
alone, forward and forward+backward.

- Longformer-base at 4096 tokens: batch 1 (the CLS token global), and a padded batch of 4
  (4096, 3500, 2500 and 1200 tokens; the first 32 tokens of each, a question, global);
- BigBird-RoBERTa-base (block_sparse, eval) at 4096 tokens;
- a sliding-window decoder at 8192 tokens: Mistral-style, 12 layers of 768 with a window of 1024
  (transformers: sdpa with its [seq, seq] mask);
- Gemma 3 1B's attention at 4096 tokens: heads of 256 (4 query heads, 1 kv head), five sliding
  layers (window 512) to one global, 6 layers of 1152 (the released model has 26);
- Llama 4's chunked attention at 8192 tokens: three chunked layers (chunks of 2048; the released
  models' 8192, scaled with the length) to one full causal layer, heads of 128 (8 query heads, 2 kv
  heads), 4 layers of 1024 with dense MLPs (transformers: sdpa with its [seq, seq] chunked mask).

Ours: ``replace_attention`` (Longformer, BigBird) and ``attn_implementation="modernbert_kernels"``
(the decoder). "attention" rows time the first layer's self-attention module on the inputs the
model gave it, with the projections of the hidden states into queries, keys and values computed
beforehand and the decoder's output projection left out (the same matmuls in both, outside what
was replaced): the attention itself, with the masks, the global tokens and the layout work. fp32,
the model's base class (no task head). Whole models: 1 warm-up call, the median of 3 (CPU).

    python -m benchmarks.sparse_models --device cpu [--models gemma3 ...]
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys

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
    "gemma3_text": (("q_proj", "k_proj", "v_proj"), "o_proj"),
    "llama4_text": (("q_proj", "k_proj", "v_proj"), "o_proj"),
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


def _gemma3(small: bool):
    import transformers

    size = dict(SMOKE, num_key_value_heads=1, sliding_window=64, layer_types=["sliding_attention"]) if small else dict(
        hidden_size=1152, intermediate_size=6912, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=1,
        sliding_window=512, layer_types=["sliding_attention"] * 5 + ["full_attention"])
    config = transformers.Gemma3TextConfig(vocab_size=32000, head_dim=256, max_position_embeddings=8192,
                                           attn_implementation="sdpa", **size)
    return transformers.Gemma3TextModel(config), lambda model: model.layers[0].self_attn


def _llama4(small: bool):
    import transformers

    size = dict(SMOKE, num_key_value_heads=1, head_dim=64, attention_chunk_size=64, num_hidden_layers=2,
                intermediate_size_mlp=256, no_rope_layers=[1, 0]) if small else dict(
        hidden_size=1024, intermediate_size_mlp=2816, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
        head_dim=128, attention_chunk_size=2048, no_rope_layers=[1, 1, 1, 0])
    config = transformers.Llama4TextConfig(vocab_size=32000, max_position_embeddings=8192, moe_layers=[],
                                           attn_implementation="sdpa", **size)
    return transformers.Llama4TextModel(config), lambda model: model.layers[0].self_attn


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
    """(short name, name, build, inputs, ours) per row group; ``ours(model)`` turns transformers' model
    into ours."""
    from modernbert_kernels.integrations.transformers import register, replace_attention

    name = register()

    def decoder_ours(model):
        model.set_attn_implementation(name)
        return model

    n = 256 if small else 4096
    lengths = [n, n * 7 // 8, n * 5 // 8, n * 3 // 10]
    return [
        ("longformer", "longformer-base batch 1", _longformer, _inputs([n], 1, 50265, n), replace_attention),
        ("longformer_padded", "longformer-base padded batch 4", _longformer, _inputs(lengths, 32, 50265, n), replace_attention),
        ("bigbird", "bigbird-roberta-base", _bigbird, _inputs([n], 0, 50358, n), replace_attention),
        ("mistral", "mistral-style sliding-window decoder", _decoder, dict(_inputs([2 * n], 0, 32000, 2 * n), use_cache=False),
         decoder_ours),
        ("gemma3", "gemma3-1b-style decoder, head_dim 256", _gemma3, dict(_inputs([n], 0, 32000, n), use_cache=False),
         decoder_ours),
        ("llama4", "llama4-style chunked decoder", _llama4, dict(_inputs([2 * n], 0, 32000, 2 * n), use_cache=False),
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


def _prepared(case_index: int, device: torch.device, smoke: bool, providers=("transformers", "ours")):
    """(case name, {provider: model}, the layer-attention getter, inputs on ``device``): the same
    random weights for every provider, and in every process (seeded)."""
    _, case_name, build, inputs, make_ours = cases(small=smoke)[case_index]
    torch.manual_seed(0)
    theirs, layer_attention = build(smoke)
    theirs = theirs.to(device).eval()
    models = {}
    if "transformers" in providers:
        models["transformers"] = theirs
    if "ours" in providers:
        models["ours"] = make_ours(copy.deepcopy(theirs) if "transformers" in providers else theirs).eval()
    inputs = {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in inputs.items()}
    return case_name, models, layer_attention, inputs


def _model_fwd_bwd(case_index: int, provider: str, device: torch.device, smoke: bool, repeats: int) -> dict:
    """A whole model's forward+backward, timed in this process (the worker's side)."""
    _, models, _, inputs = _prepared(case_index, device, smoke, providers=(provider,))
    model = models[provider]
    return _timed(lambda: model(**inputs).last_hidden_state, device, True, repeats, warmup=1)


def _in_worker(case_index: int, provider: str, device: torch.device, smoke: bool, repeats: int) -> dict:
    """_model_fwd_bwd in a process of its own: transformers' Longformer keeps every layer's chunked
    scores for its backward, and a padded batch of 4 x 4096 tokens outgrows 24 GiB; the kernel's
    out-of-memory kill then ends the worker, not the run. {"error": why} when it fails."""
    job = json.dumps(dict(case=case_index, provider=provider, smoke=smoke, repeats=repeats))
    done = subprocess.run([sys.executable, "-m", "benchmarks.sparse_models", "--device", str(device), "--worker", job],
                          capture_output=True, text=True)
    if done.returncode != 0:
        killed = done.returncode in (-9, 137)
        return {"error": "killed: out of memory" if killed else done.stderr.strip().splitlines()[-1][:200]}
    return json.loads(done.stdout.strip().splitlines()[-1])


MODELS = ("longformer", "longformer_padded", "bigbird", "mistral", "gemma3", "llama4")  # cases()' short names, for --models


def run(device: torch.device, quick: bool, progress=print, smoke: bool = False, models=None) -> list[dict]:
    """Every case of cases(), or those named in ``models`` (MODELS)."""
    rows = []
    passes = ["fwd"] if smoke else ["fwd", "fwd+bwd"]
    repeats = 1 if smoke else 3
    for case_index, (short_name, *_) in enumerate(cases(small=smoke)):
        if models is not None and short_name not in models:
            continue
        case_name, models_by_provider, layer_attention, inputs = _prepared(case_index, device, smoke)
        seq_len = inputs["input_ids"].shape[1]
        tokens = int(inputs["attention_mask"].sum())
        calls = {name: _captured_call(model, layer_attention(model), inputs) for name, model in models_by_provider.items()}
        for pass_name in passes:
            backward = pass_name == "fwd+bwd"
            for scope in ("model", "attention"):
                measured, unavailable = {}, {}
                for name, model in models_by_provider.items():
                    if scope == "model" and backward:
                        stats = _in_worker(case_index, name, device, smoke, repeats)
                        if "error" in stats:
                            unavailable[name] = stats["error"]
                            progress(f"{case_name} {scope} {pass_name} {name}: {stats['error']}")
                            continue
                        measured[name] = stats
                        progress(f"{case_name} {scope} {pass_name} {name}: {stats['median_ms'] / 1e3:.3f} s")
                        continue
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
                if not measured:
                    continue
                rows += result_rows(
                    "sparse_models", pass_name, measured, "transformers" if "transformers" in measured else "ours",
                    seq_len=seq_len, model=case_name, scope=scope, batch=inputs["input_ids"].shape[0], dtype="float32",
                    note="; ".join(f"{name}: {why}" for name, why in unavailable.items()) or None,
                    per_provider=lambda name, measured=measured, scope=scope: (
                        {"tokens_per_s": tokens / (measured[name]["median_ms"] * 1e-3)} if scope == "model" else {}),
                )
    return rows


def main(argv=None):
    from benchmarks.report import script_main

    argv = sys.argv[1:] if argv is None else argv
    if "--worker" in argv:
        job = json.loads(argv[argv.index("--worker") + 1])
        device = torch.device(argv[argv.index("--device") + 1]) if "--device" in argv else torch.device("cpu")
        print(json.dumps(_model_fwd_bwd(job["case"], job["provider"], device, job["smoke"], job["repeats"])))
        return
    script_main(run, __doc__, "sparse_models", argv,
                options={"--models": dict(nargs="+", choices=MODELS, help="only these cases (default: all)")})


if __name__ == "__main__":
    main()
