"""torch.compile of the whole encoder: one graph for the layers, broken only where the batch is
unpadded (the values of the attention mask decide the packed sizes)."""

import pytest
import torch

from modernbert import ModernBertConfig, ModernBertModel, quantize_int8


def tiny_model(layers=6, seed=0):
    torch.manual_seed(seed)
    config = ModernBertConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                              num_attention_heads=2, local_attention=32, global_attn_every_n_layers=3,
                              max_position_embeddings=512, pad_token_id=0)
    return ModernBertModel(config).eval()


def padded_batch(seq_len=150):
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 64, (3, seq_len), generator=generator)
    mask = torch.ones(3, seq_len, dtype=torch.long)
    mask[1, seq_len - 60:] = 0
    mask[2, 17:] = 0
    return ids, mask


@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
def test_encoder_compiles_with_the_graph_broken_only_at_unpadding(int8):
    from torch._dynamo.testing import CompileCounter
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = tiny_model()
    if int8:
        quantize_int8(model)
    ids, mask = padded_batch()
    counters.clear()
    compile_counter = CompileCounter()
    with torch.no_grad():
        torch.compile(model, backend=compile_counter)(ids, mask)
    # One break, where the batch is unpadded (a compiler-disabled call: the mask's values decide
    # the packed sizes); the code before it and the layers after it are the only graphs.
    breaks = counters["graph_break"]
    assert sum(breaks.values()) == 1, dict(breaks)
    assert "unpad" in next(iter(breaks)), dict(breaks)
    assert compile_counter.frame_count <= 2
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(ids, mask)
    # Every layer (embeddings to final norm, 6 attention calls) lands in one graph.
    layers = [graph for graph in explanation.ops_per_graph
              if sum("block_sparse_attention" in str(op) for op in graph)]
    assert len(layers) == 1
    assert sum("block_sparse_attention" in str(op) for op in layers[0]) == 6
    assert not any("nonzero" in str(op) for graph in explanation.ops_per_graph for op in graph)


@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
def test_compiled_encoder_matches_eager(int8):
    torch._dynamo.reset()
    model = tiny_model(layers=4)
    if int8:
        quantize_int8(model)
    compiled = torch.compile(model)
    for seq_len in (150, 100):  # a second padded shape: the new sizes do not break the graph
        ids, mask = padded_batch(seq_len)
        with torch.no_grad():
            expected = model(ids, mask)
            actual = compiled(ids, mask)
        if int8:
            # Inductor reorders the fp32 LayerNorm and epilogue math, which moves a few activations
            # across an int8 rounding step: one step (~1/127 of a row's range) at a few elements.
            assert (actual - expected).abs().max() <= 2e-2
            assert (actual - expected).abs().mean() <= 1e-3
        else:
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
