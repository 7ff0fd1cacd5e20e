"""transformers' sparse-attention models on these kernels, against transformers' own implementation
(fp32, tiny configs with random weights built here): sliding-window and causal decoders through
attn_implementation="modernbert_kernels", and Longformer, LED and BigBird through replace_attention.
Each checks outputs, gradients and a few AdamW steps of training."""

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import modernbert_kernels.attention  # noqa: E402
from modernbert_kernels.integrations.transformers import register, replace_attention  # noqa: E402

NAME = register()
VOCAB = 128


def count_kernel_calls(monkeypatch):
    """A list that grows by the kwargs of every block_sparse_attention call the integrations make."""
    calls = []
    original = modernbert_kernels.attention.block_sparse_attention

    def counted(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    from modernbert_kernels.integrations.transformers import attention, longformer
    for module in (attention, longformer):
        monkeypatch.setattr(module, "block_sparse_attention", counted)
    return calls


def max_difference(a, b):
    return (a - b).abs().max().item()


def gradients(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def logits_and_gradients(model, batch):
    """The logits of one forward on ``batch``, and every parameter's gradient of its loss."""
    out = model(**batch)
    out.loss.backward()
    return out.logits, gradients(model)


def assert_gradients_match(ours, theirs, tol):
    """Relative to each parameter's largest gradient, floored at 1% of the model's largest: some
    gradients are zero but for rounding (a key bias shifts every score of a row alike)."""
    assert ours.keys() == theirs.keys() and ours
    floor = 1e-2 * max(g.abs().max().item() for g in theirs.values())
    for name in theirs:
        scale = max(theirs[name].abs().max().item(), floor)
        assert max_difference(ours[name], theirs[name]) / scale <= tol, name


def train_losses(model, batch, steps=4):
    """The loss at each of ``steps`` AdamW steps on one batch."""
    torch.manual_seed(0)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


# ------------------------------------------------------------------------------------------------
# Decoders through attn_implementation: causal layers, sliding-window causal layers, grouped heads.

DECODERS = {
    # ModernBERT's decoder: a global (causal) layer every third, sliding windows of 32 between.
    "modernbert-decoder": lambda: transformers.ModernBertDecoderConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=2,
        local_attention=32, global_attn_every_n_layers=3, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        cls_token_id=1, sep_token_id=2, attention_dropout=0.0, embedding_dropout=0.0, mlp_dropout=0.0),
    # Mistral: every layer a sliding window of 40, grouped-query attention (4 query heads, 2 kv).
    "mistral": lambda: transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, sliding_window=40),
    # Gemma 3: local (sliding 40) and global layers alternating, one kv head.
    "gemma3": lambda: transformers.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, sliding_window=40,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"]),
    # Gemma 3's released head_dim, 256: the kernels' widest.
    "gemma3-head256": lambda: transformers.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=256, sliding_window=40, layer_types=["sliding_attention", "full_attention"]),
    # Qwen 2: the window only from layer max_window_layers on (use_sliding_window), biased q/k/v.
    "qwen2": lambda: transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, use_sliding_window=True, sliding_window=40, max_window_layers=1),
    # Phi-3: a window in every layer, q, k and v from one fused projection.
    "phi3": lambda: transformers.Phi3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=40, pad_token_id=0),
    # PhiMoE: a window in every layer that only its masks apply (its attention is given no
    # sliding_window), a mixture of experts (without the router's training noise).
    "phimoe": lambda: transformers.PhimoeConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=40, num_local_experts=4, num_experts_per_tok=2,
        router_jitter_noise=0.0, input_jitter_noise=0.0),
    # Gemma 3n (text): sliding and full layers whose last two reuse the keys and values of earlier
    # layers of their kind (num_kv_shared_layers), per-layer input embeddings, AltUp and LAuReL, and
    # activation sparsity in the first layer as in the released model.
    "gemma3n": lambda: transformers.Gemma3nTextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, sliding_window=40, vocab_size_per_layer_input=VOCAB,
        hidden_size_per_layer_input=16, laurel_rank=8, altup_num_inputs=2, num_kv_shared_layers=2,
        activation_sparsity_pattern=[0.95, 0.0, 0.0, 0.0], pad_token_id=0, bos_token_id=2, eos_token_id=1,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"]),
    # Cohere 2: sliding layers with rotary embeddings, a global layer without them.
    "cohere2": lambda: transformers.Cohere2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=40, layer_types=["sliding_attention", "full_attention"]),
    # Gemma 2: logit soft-capping in every layer. This random model's scores are ~0.01-0.05
    # (initializer range 0.02): the released cap, 50, would not touch them; 0.01 bends them all.
    # transformers' SDPA drops the cap: eager is its reference.
    "gemma2-softcap": lambda: transformers.Gemma2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, sliding_window=40, attn_logit_softcapping=0.01,
        layer_types=["sliding_attention", "full_attention"]),
    # GPT-OSS: attention sinks (a learned logit per head, s_aux), sliding and full layers alternating,
    # a mixture of experts.
    "gpt-oss-sinks": lambda: transformers.GptOssConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=40, num_local_experts=4, num_experts_per_tok=2,
        layer_types=["sliding_attention", "full_attention"], pad_token_id=0),
    # Llama 4: chunked attention (causal inside chunks of 32 tokens: 150 tokens are four chunks and
    # a part) in three layers of four, the fourth full causal and without rotary embeddings; a
    # mixture of experts in every second layer.
    "llama4-chunked": lambda: transformers.Llama4TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, intermediate_size_mlp=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, attention_chunk_size=32, num_local_experts=2,
        num_experts_per_tok=1, interleave_moe_layer_step=2, no_rope_layers=[1, 1, 1, 0], pad_token_id=0),
}
# transformers' implementation each decoder is compared with (sdpa unless named).
REFERENCE_IMPLEMENTATION = {"gemma2-softcap": "eager", "gpt-oss-sinks": "eager"}


def set_sinks(model, low=-1.0, high=1.0):
    """GPT-OSS's sinks spread over [low, high] per layer: their init (std 0.02) would weigh little
    against the ~40-150 keys of the tests' rows."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.copy_(torch.linspace(low, high, layer.self_attn.sinks.numel()))


def model_pair(config, reference="sdpa"):
    """(transformers' own decoder, ours) from one config, with the same random weights."""
    models = []
    for implementation in (reference, NAME):
        torch.manual_seed(0)
        models.append(transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config),
                                                                    attn_implementation=implementation))
    return models


def decoder_pair(name):
    models = model_pair(DECODERS[name](), REFERENCE_IMPLEMENTATION.get(name, "sdpa"))
    if name == "gpt-oss-sinks":
        for model in models:
            set_sinks(model)
    return models


def decoder_batch():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 150), generator=generator)  # 150: not a multiple of the block
    mask = torch.ones(2, 150, dtype=torch.long)
    mask[1, 100:] = 0  # right padding
    return dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))


@pytest.mark.parametrize("name", list(DECODERS))
def test_decoder_matches_sdpa_forward_backward_and_training(name, monkeypatch):
    calls = count_kernel_calls(monkeypatch)
    theirs, ours = decoder_pair(name)
    batch = decoder_batch()
    real = batch["attention_mask"].bool()
    outputs = []
    for model in (theirs, ours):
        model.eval()
        with warnings.catch_warnings():  # every mask of these models is one the kernels compute
            warnings.filterwarnings("error", message=f"{NAME}: this model's attention mask")
            outputs.append(logits_and_gradients(model, batch))
    assert max_difference(outputs[1][0][real], outputs[0][0][real]) <= 1e-5
    assert_gradients_match(outputs[1][1], outputs[0][1], 1e-4)
    # Every layer ran on the kernels, causal, with the window where the layer has one (a chunked
    # layer: as a varlen batch, one sequence per chunk).
    layer_types = getattr(theirs.config, "layer_types", None) or ["sliding_attention"] * theirs.config.num_hidden_layers
    assert len(calls) == len(layer_types)
    assert all(call["causal"] for call in calls)
    assert [call["window"] is not None for call in calls] == [t == "sliding_attention" for t in layer_types]
    assert [call.get("cu_seqlens") is not None for call in calls] == [t == "chunked_attention" for t in layer_types]
    # Training: the same losses step after step.
    assert train_losses(ours, batch) == pytest.approx(train_losses(theirs, batch), abs=1e-4)


# More of transformers' decoders with sliding-window layers, each built from its own config class at
# the tiny sizes below (the fields a config lacks are left alone): MoE, GQA and per-layer windows in
# shapes the hand-written configs above do not cover.
MORE_WINDOWED_DECODERS = ["afmoe", "cohere2_moe", "cwm", "exaone4", "ministral", "ministral3", "mixtral", "olmo3",
                          "starcoder2"]
TINY_DECODER = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, sliding_window=40, moe_intermediate_size=32, num_experts=4,
                    num_local_experts=4, num_experts_per_tok=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def padded_forward_against_transformers(config, monkeypatch):
    """Ours against transformers' SDPA on decoder_batch(): the largest logit difference over real
    tokens, and for each kernel call whether it ran with a window."""
    theirs, ours = (model.eval() for model in model_pair(config))
    batch = decoder_batch()
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        expected = theirs(**batch).logits
        calls = count_kernel_calls(monkeypatch)
        actual = ours(**batch).logits
    return max_difference(actual[real], expected[real]), [call["window"] is not None for call in calls]


@pytest.mark.parametrize("model_type", MORE_WINDOWED_DECODERS)
def test_more_windowed_decoders_match_sdpa(model_type, monkeypatch):
    try:
        config_class = type(transformers.AutoConfig.for_model(model_type))
    except ValueError:
        pytest.skip(f"transformers {transformers.__version__} has no {model_type}")
    defaults = config_class()
    config = config_class(**{key: value for key, value in TINY_DECODER.items() if hasattr(defaults, key)})
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        config.layer_types = layer_types = layer_types[:config.num_hidden_layers]
    layer_types = layer_types or ["sliding_attention"] * config.num_hidden_layers
    assert "sliding_attention" in layer_types and config.sliding_window == 40, (layer_types, config.sliding_window)
    difference, windowed = padded_forward_against_transformers(config, monkeypatch)
    assert difference <= 1e-5
    assert windowed == [t == "sliding_attention" for t in layer_types]


def test_gemma4_matches_transformers_forward_backward_and_generation(monkeypatch):
    """Gemma 4 (text): sliding and full layers, per-layer input embeddings. Its full layers are
    sensitive in fp32: transformers' own SDPA is 1.6e-5 from its eager at logits of ~0.7, and ours
    2.3e-5 (3.8e-5 from eager); its gradients 1.5e-4 from eager's, and ours 2.8e-4 (relative). A
    wrong mask is off by 1e-2 or more. Training is not compared step by step: the same
    sensitivity spreads eager's, SDPA's and our losses by ~5e-3 after six AdamW steps."""
    Gemma4TextConfig = getattr(transformers, "Gemma4TextConfig", None)
    if Gemma4TextConfig is None:
        pytest.skip(f"transformers {transformers.__version__} has no Gemma 4")
    config = Gemma4TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, sliding_window=40, vocab_size_per_layer_input=VOCAB,
        hidden_size_per_layer_input=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"])
    theirs, ours = (model.eval() for model in model_pair(config))
    batch = decoder_batch()
    real = batch["attention_mask"].bool()
    calls = count_kernel_calls(monkeypatch)  # only ours calls the kernels
    outputs = [logits_and_gradients(model, batch) for model in (theirs, ours)]
    assert max_difference(outputs[1][0][real], outputs[0][0][real]) <= 1e-4
    assert_gradients_match(outputs[1][1], outputs[0][1], 1e-3)
    assert [call["window"] is not None for call in calls] == [t == "sliding_attention" for t in config.layer_types]
    # Greedy decoding with a KV cache (sliding layers keep a window's worth of it).
    prompt = batch["input_ids"][:1, :70]
    tokens = [model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0) for model in (theirs, ours)]
    assert torch.equal(tokens[0], tokens[1])


@pytest.mark.parametrize("name", list(DECODERS))
def test_decoder_generates_the_same_tokens(name):
    """Greedy decoding with a KV cache: prefill on the kernels, then one-token steps."""
    theirs, ours = decoder_pair(name)
    prompt = decoder_batch()["input_ids"][:1, :70]
    tokens = [m.eval().generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0) for m in (theirs, ours)]
    assert torch.equal(tokens[0], tokens[1])


def packed_batch():
    """Two rows of 150 tokens: three sequences packed in the first (60, 1 and 89 tokens: a partial
    block, a lone token), one sequence in the second; told apart by position_ids that restart.
    Returns the ids, the positions and each row's sequence lengths."""
    generator = torch.Generator().manual_seed(4)
    ids = torch.randint(3, VOCAB, (2, 150), generator=generator)
    lengths = [[60, 1, 89], [150]]
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    return ids, positions, lengths


PACKED_BOUNDS = [0, 60, 61, 150, 300]
# The same sequences cut into chunks of 32 (a chunked layer's sequences).
PACKED_CHUNK_BOUNDS = [0, 32, 60, 61, 93, 125, 150, 182, 214, 246, 278, 300]
# Reference implementations that let packed sequences see each other (transformers 5.x's eager
# GPT-OSS: past the first sequence its logits differ from the sequences run alone by ~0.5): ours is
# compared with the sequences run alone only.
LEAKS_PACKED_SEQUENCES = {"gpt-oss-sinks"}


@pytest.mark.parametrize("flash_kwargs", [False, True], ids=["position_ids", "cu_seq_lens"])
@pytest.mark.parametrize("name", list(DECODERS))
def test_packed_sequences_do_not_see_each_other(name, flash_kwargs, monkeypatch):
    """Sequences packed in a row without a padding mask (DataCollatorWithFlattening's batches): each
    token sees only its own sequence, as transformers' SDPA masks make it when they detect packing;
    forward and backward. With return_flash_attn_kwargs=True the collator also passes cu_seq_lens."""
    calls = count_kernel_calls(monkeypatch)
    theirs, ours = decoder_pair(name)
    ids, positions, lengths = packed_batch()
    # Each sequence run alone, the packed run must give the same: nothing leaks between them.
    with torch.no_grad():
        alone = torch.stack([torch.cat([ours.eval()(input_ids=part[None]).logits[0] for part in row.split(parts)])
                             for row, parts in zip(ids, lengths)])
    calls.clear()
    extra = {}
    if flash_kwargs:
        bounds = torch.tensor(PACKED_BOUNDS, dtype=torch.int32)
        extra = dict(cu_seq_lens_q=bounds, cu_seq_lens_k=bounds, max_length_q=150, max_length_k=150)
        # The bounds given are used as they are: the positions are not read for them (a chunked
        # layer reads each token's place in its chunk, counted from those bounds).
        from modernbert_kernels.integrations.transformers import attention

        def not_from_the_positions(position_ids, original=attention.sequences_from_positions):
            assert not torch.equal(position_ids, positions), "the sequences were read from position_ids"
            return original(position_ids)
        monkeypatch.setattr(attention, "sequences_from_positions", not_from_the_positions)
    outputs = []
    for model in (theirs, ours) if name not in LEAKS_PACKED_SEQUENCES else (ours,):
        out = model.eval()(input_ids=ids, position_ids=positions, labels=ids, use_cache=False,
                           **(extra if model is ours else {}))
        out.loss.backward()
        outputs.append((out.logits, gradients(model)))
    if name not in LEAKS_PACKED_SEQUENCES:
        assert max_difference(outputs[1][0], outputs[0][0]) <= 1e-5
        assert_gradients_match(outputs[1][1], outputs[0][1], 1e-4)
    layer_types = getattr(ours.config, "layer_types", None) or [None] * ours.config.num_hidden_layers
    assert [call["cu_seqlens"].tolist() for call in calls] == [
        PACKED_CHUNK_BOUNDS if t == "chunked_attention" else PACKED_BOUNDS for t in layer_types]
    assert max_difference(outputs[-1][0], alone) <= 1e-5


def test_one_sequence_a_row_is_not_taken_for_packing(monkeypatch):
    """position_ids that count up in every row (what transformers makes without a mask, and what a
    continuation starting past 0 gives) run the padded path, not varlen."""
    calls = count_kernel_calls(monkeypatch)
    theirs, ours = decoder_pair("mistral")
    ids = decoder_batch()["input_ids"]
    positions = torch.arange(ids.shape[1])[None] + torch.tensor([[0], [7]])
    with torch.no_grad():
        expected = theirs.eval()(input_ids=ids, position_ids=positions, use_cache=False).logits
        actual = ours.eval()(input_ids=ids, position_ids=positions, use_cache=False).logits
    assert max_difference(actual, expected) <= 1e-5
    assert calls and all(call.get("cu_seqlens") is None for call in calls)


def test_chunked_layers_count_chunks_from_the_first_real_token(monkeypatch):
    """Llama 4's chunked layers with left padding: chunks start at each row's first real token, as
    in transformers' masks, and each is one sequence of a varlen batch on the kernels (the padding
    forms sequences of its own). Padding between real tokens has no varlen form: those layers run
    in PyTorch over the written-out mask. Left-padded batched generation gives the same tokens."""
    calls = count_kernel_calls(monkeypatch)
    theirs, ours = decoder_pair("llama4-chunked")
    ids = decoder_batch()["input_ids"]
    left_padded = torch.ones(2, 150, dtype=torch.long)
    left_padded[1, :45] = 0
    with_a_hole = torch.ones(2, 150, dtype=torch.long)
    with_a_hole[1, 40:50] = 0
    for mask in (left_padded, with_a_hole):
        calls.clear()
        outputs = []
        # A label counts where it and the token before it are real: a padding query's output is
        # the kernels' choice (it sees its padding run, SDPA's sees nothing).
        real = mask.bool()
        labels = ids.masked_fill(~(real & torch.nn.functional.pad(real[:, :-1], (1, 0))), -100)
        for model in (theirs, ours):
            model.zero_grad()
            out = model.eval()(input_ids=ids, attention_mask=mask, labels=labels)
            out.loss.backward()
            outputs.append((out.logits, gradients(model)))
        assert max_difference(outputs[1][0][real], outputs[0][0][real]) <= 1e-5
        assert_gradients_match(outputs[1][1], outputs[0][1], 1e-4)
        chunked = [call["cu_seqlens"].tolist() for call in calls if call.get("cu_seqlens") is not None]
        if mask is left_padded:  # row 1: padding at 0-12 and 13-44 (45 - 13 = 32), then chunks from 45
            assert chunked == [[0, 32, 64, 96, 128, 150, 163, 195, 227, 259, 291, 300]] * 3
        else:
            assert chunked == [] and len(calls) == 1  # only the full layer on the kernels
    tokens = [m.generate(ids[:, :70], attention_mask=left_padded[:, :70], max_new_tokens=12, do_sample=False,
                         pad_token_id=0) for m in (theirs, ours)]
    assert torch.equal(tokens[0], tokens[1])


def test_a_mask_the_kernels_do_not_compute_runs_on_transformers_own(monkeypatch):
    """Gemma 3 with an image: its image tokens see each other both ways (a union with the causal
    mask), which no layout here computes. The mask function hands over transformers' own mask, the
    layers run in PyTorch's SDPA over it with a warning, and the output is SDPA's (not the causal
    one: it moves without the image tokens' bidirectional block)."""
    calls = count_kernel_calls(monkeypatch)
    config = transformers.Gemma3Config(
        text_config=DECODERS["gemma3"](),
        vision_config=transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                                      num_attention_heads=2, image_size=56, patch_size=14),
        mm_tokens_per_image=4, image_token_index=120, boi_token_index=121, eoi_token_index=122)
    models = []
    for implementation in ("sdpa", NAME):
        torch.manual_seed(0)
        models.append(transformers.Gemma3ForConditionalGeneration._from_config(
            copy.deepcopy(config), attn_implementation=implementation).eval())
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 110, (1, 90), generator=generator)
    ids[0, 50:54] = 120  # the image's four tokens
    image = dict(pixel_values=torch.randn(1, 3, 56, 56, generator=generator), token_type_ids=(ids == 120).long())
    with torch.no_grad():
        expected = models[0](input_ids=ids, **image).logits
        with pytest.warns(UserWarning, match="a pattern the kernels do not compute"):
            actual = models[1](input_ids=ids, **image).logits
        causal_only = models[0](input_ids=ids, pixel_values=image["pixel_values"]).logits
    assert max_difference(actual, expected) <= 1e-5
    assert max_difference(causal_only, expected) > 1e-3
    # On the kernels: the vision tower's bidirectional layer only, none of the text's causal ones.
    assert calls and not any(call["causal"] for call in calls)


def test_compiled_decoder_runs_in_one_graph_and_keeps_packed_sequences_apart():
    """torch.compile of a decoder with local and global layers: a padded batch compiles to one graph
    with no break, as with SDPA (the layouts are made while tracing, the padding mask is not
    branched on); packed sequences compile too (one graph where Dynamo may capture the op whose
    output size depends on the positions) and match SDPA in forward and backward."""
    from torch._dynamo.testing import CompileCounter
    from torch._dynamo.utils import counters

    theirs, ours = decoder_pair("gemma3")
    batch = decoder_batch()
    torch._dynamo.reset()
    counters.clear()
    compile_counter = CompileCounter()
    compiled = torch.compile(ours.eval(), backend=compile_counter)
    with torch.no_grad():
        for _ in range(2):  # the second call reuses the graph: no recompilation
            actual = compiled(**batch).logits
        expected = theirs.eval()(**batch).logits
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert compile_counter.frame_count == 1
    real = batch["attention_mask"].bool()
    assert max_difference(actual[real], expected[real]) <= 1e-5

    ids, positions, _ = packed_batch()
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        out = torch.compile(ours)(input_ids=ids, position_ids=positions, labels=ids, use_cache=False)
        out.loss.backward()
    reference = theirs(input_ids=ids, position_ids=positions, labels=ids, use_cache=False)
    reference.loss.backward()
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert max_difference(out.logits, reference.logits) <= 1e-5
    assert_gradients_match(gradients(ours), gradients(theirs), 1e-4)


def test_encoder_decoder_matches_sdpa_forward_backward_and_generation():
    """BART on the backend: the encoder's bidirectional layers and the decoder's causal ones on the
    kernels, the cross-attention over every real encoder token (SDPA: no tiles to skip); outputs
    and gradients against SDPA on a padded batch, and greedy generation token for token."""
    models = []
    for implementation in ("sdpa", NAME):
        torch.manual_seed(0)
        config = transformers.BartConfig(
            vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=96, decoder_ffn_dim=96, max_position_embeddings=256,
            dropout=0.0, attention_dropout=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=2,
            decoder_start_token_id=2)
        models.append(transformers.BartForConditionalGeneration._from_config(config,
                                                                               attn_implementation=implementation))
    theirs, ours = models
    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(3, VOCAB, (2, 90), generator=generator)
    mask = torch.ones(2, 90, dtype=torch.long)
    mask[1, 61:] = 0
    labels = torch.randint(3, VOCAB, (2, 30), generator=generator)
    outputs = []
    for model in (theirs, ours):
        out = model.eval()(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        outputs.append((out.logits, gradients(model)))
    assert max_difference(outputs[1][0], outputs[0][0]) <= 1e-5
    assert_gradients_match(outputs[1][1], outputs[0][1], 1e-4)
    tokens = [m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, num_beams=1)
              for m in (theirs, ours)]
    assert torch.equal(tokens[0], tokens[1])


def test_soft_capping_is_applied_and_not_a_no_op():
    """Gemma 2's softcap reaches the kernels (and the decoding path): without it the model's output
    moves, so the decoder tests above could not pass with the cap dropped."""
    theirs, ours = decoder_pair("gemma2-softcap")
    ids = decoder_batch()["input_ids"][:1, :90]
    with torch.no_grad():
        capped = ours.eval()(input_ids=ids).logits
        uncapped = transformers.AutoModelForCausalLM.from_config(
            DECODERS["gemma2-softcap"](), attn_implementation=NAME).eval()
        uncapped.load_state_dict(ours.state_dict())
        for layer in uncapped.model.layers:
            layer.self_attn.attn_logit_softcapping = None
        assert max_difference(uncapped(input_ids=ids).logits, capped) > 1e-3


def test_sinks_are_applied_and_not_a_no_op():
    """GPT-OSS's sinks reach the kernels (and the decoding path): with sinks too low to weigh, the
    model's output moves, so the decoder tests above could not pass with the sinks dropped."""
    _, ours = decoder_pair("gpt-oss-sinks")
    ids = decoder_batch()["input_ids"][:1, :90]
    with torch.no_grad():
        with_sinks = ours.eval()(input_ids=ids).logits
        set_sinks(ours, -100.0, -100.0)
        assert max_difference(ours(input_ids=ids).logits, with_sinks) > 1e-3


# ------------------------------------------------------------------------------------------------
# Longformer and LED through replace_attention.

def longformer_config(**overrides):
    values = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96,
                  attention_window=[64, 128], max_position_embeddings=600, attention_probs_dropout_prob=0.0,
                  hidden_dropout_prob=0.0, pad_token_id=1)
    return transformers.LongformerConfig(**{**values, **overrides})


def led_config():
    return transformers.LEDConfig(
        vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=96, decoder_ffn_dim=96, attention_window=[64, 128],
        max_encoder_position_embeddings=600, max_decoder_position_embeddings=64, dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)


def long_document_batch(seq_len=300):
    """A padded batch of 3 (300 tokens: not a multiple of either window), with global tokens in the
    middle of blocks, a question's tokens, and an example without any."""
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(3, VOCAB, (3, seq_len), generator=generator)
    mask = torch.ones(3, seq_len, dtype=torch.long)
    mask[1, 250:] = 0
    mask[2, 77:] = 0
    ids = ids.masked_fill(mask == 0, 1)
    marked = torch.zeros(3, seq_len, dtype=torch.long)
    marked[0, [0, 130]] = 1
    marked[1, [5, 6, 7, 200]] = 1
    return ids, mask, marked


def swapped_pair(model_class, config):
    torch.manual_seed(0)
    theirs = model_class(config)
    ours = replace_attention(copy.deepcopy(theirs))
    return theirs, ours


def test_longformer_matches_transformers_forward_and_backward(monkeypatch):
    calls = count_kernel_calls(monkeypatch)
    theirs, ours = swapped_pair(transformers.LongformerModel, longformer_config())
    ids, mask, marked = long_document_batch()
    results = []
    for model in (theirs, ours):
        model.eval()
        hidden = model(input_ids=ids, attention_mask=mask, global_attention_mask=marked).last_hidden_state
        (hidden * torch.linspace(-1, 1, hidden.shape[-1])).sum().backward()
        results.append((hidden, gradients(model)))
    assert max_difference(results[1][0], results[0][0]) <= 1e-5  # padded positions included
    assert_gradients_match(results[1][1], results[0][1], 1e-5)
    assert [call["window"] for call in calls] == [32, 64]  # attention_window / 2 per layer
    assert all(call["global_tokens"] is not None for call in calls)


def test_longformer_trains_like_transformers():
    config = longformer_config()
    torch.manual_seed(0)
    theirs = transformers.LongformerForMaskedLM(config)
    ours = replace_attention(copy.deepcopy(theirs))
    ids, mask, marked = long_document_batch()
    batch = dict(input_ids=ids, attention_mask=mask, global_attention_mask=marked,
                 labels=ids.masked_fill(mask == 0, -100))
    assert train_losses(ours, batch) == pytest.approx(train_losses(theirs, batch), abs=1e-4)


def test_led_encoder_matches_transformers_and_trains():
    theirs, ours = swapped_pair(transformers.LEDForConditionalGeneration, led_config())
    ids, mask, marked = long_document_batch()
    labels = torch.randint(3, VOCAB, (3, 20), generator=torch.Generator().manual_seed(3))
    batch = dict(input_ids=ids, attention_mask=mask, global_attention_mask=marked, labels=labels)
    results = []
    for model in (theirs, ours):
        model.eval()
        out = model(**batch)
        out.loss.backward()
        results.append((out.encoder_last_hidden_state, out.logits, gradients(model)))
    assert max_difference(results[1][0], results[0][0]) <= 1e-5
    assert max_difference(results[1][1], results[0][1]) <= 1e-5
    assert_gradients_match(results[1][2], results[0][2], 1e-5)
    theirs, ours = swapped_pair(transformers.LEDForConditionalGeneration, led_config())
    assert train_losses(ours, batch) == pytest.approx(train_losses(theirs, batch), abs=1e-4)


def test_swapped_model_keeps_its_parameter_names_and_refuses_what_it_cannot_serve():
    theirs, ours = swapped_pair(transformers.LongformerModel, longformer_config())
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ids, mask, marked = long_document_batch()
    with pytest.raises(NotImplementedError, match="output_attentions=True"):
        ours(input_ids=ids, attention_mask=mask, global_attention_mask=marked, output_attentions=True)
    _, dropping = swapped_pair(transformers.LongformerModel, longformer_config(attention_probs_dropout_prob=0.1))
    with pytest.raises(NotImplementedError, match="attention dropout"):
        dropping.train()(input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match="no adapter for BertModel \\(model_type='bert'\\)"):
        replace_attention(transformers.BertModel(transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=96)))


# ------------------------------------------------------------------------------------------------
# BigBird (attention_type="block_sparse") through replace_attention.

def bigbird_config(**overrides):
    values = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96,
                  attention_type="block_sparse", block_size=16, num_random_blocks=2, max_position_embeddings=1024,
                  attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)
    return transformers.BigBirdConfig(**{**values, **overrides})


def bigbird_batch(seq_len=300):
    """Padded (300 tokens: the model pads to a multiple of the block), two lengths."""
    generator = torch.Generator().manual_seed(4)
    ids = torch.randint(3, VOCAB, (3, seq_len), generator=generator)
    mask = torch.ones(3, seq_len, dtype=torch.long)
    mask[1, 250:] = 0
    mask[2, 200:] = 0
    return ids, mask


def test_bigbird_matches_transformers_in_eval_forward_and_backward(monkeypatch):
    """In eval, transformers' random blocks are all block 0, whose keys then count 1 + num_random_blocks
    times in the middle rows' softmax: the adapter appends those copies, so the outputs agree."""
    calls = []
    original = modernbert_kernels.attention.block_sparse_attention
    from modernbert_kernels.integrations.transformers import bigbird
    monkeypatch.setattr(bigbird, "block_sparse_attention", lambda *a, **k: calls.append(a[3]) or original(*a, **k))
    theirs, ours = swapped_pair(transformers.BigBirdModel, bigbird_config())
    ids, mask = bigbird_batch()
    results = []
    for model in (theirs, ours):
        model.eval()
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        (hidden * torch.linspace(-1, 1, hidden.shape[-1])).sum().backward()
        results.append((hidden, gradients(model)))
    assert max_difference(results[1][0], results[0][0]) <= 1e-5
    assert_gradients_match(results[1][1], results[0][1], 1e-5)
    assert len(calls) == 2 and calls[0].block_size == 16
    assert calls[0].num_blocks == 19 + 2  # 304 tokens in blocks of 16, and the two copies of block 0


@pytest.mark.parametrize("seq_len", [300, 1024])  # 1024: the paper's plan of random blocks
def test_bigbird_trains_like_transformers(seq_len):
    """In training transformers draws random blocks per head and layer (seeded by the layer)."""
    config = bigbird_config()
    torch.manual_seed(0)
    theirs = transformers.BigBirdForMaskedLM(config)
    ours = replace_attention(copy.deepcopy(theirs))
    ids, _ = bigbird_batch(seq_len)
    batch = dict(input_ids=ids, labels=ids)
    assert train_losses(ours, batch, steps=3) == pytest.approx(train_losses(theirs, batch, steps=3), abs=1e-4)


def test_bigbird_keeps_the_kernels_after_falling_back_to_full_attention():
    """A short input makes transformers switch every layer to full attention; switching back
    builds new block-sparse modules, which must run on the kernels again."""
    _, ours = swapped_pair(transformers.BigBirdModel, bigbird_config())
    ours.eval()(input_ids=torch.randint(3, VOCAB, (1, 64)))
    assert ours.attention_type == "original_full"
    ours.set_attention_type("block_sparse")
    module = ours.encoder.layer[0].attention.self
    assert module.forward.__func__.__module__.startswith("modernbert_kernels")


def test_bigbird_full_attention_is_pointed_to_the_attention_backend():
    with pytest.raises(ValueError, match="attn_implementation='modernbert_kernels'"):
        replace_attention(transformers.BigBirdModel(bigbird_config(attention_type="original_full")))
