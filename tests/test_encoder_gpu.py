"""The encoder on a GPU: its forward for a fixed batch shape captured in a CUDA graph and replayed
(no host read or sync inside, so capture works), with the outputs of the eager forward."""

import pytest
import torch

from modernbert import ModernBertConfig, ModernBertModel, quantize_int8

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def one_config(monkeypatch):
    monkeypatch.setenv("MODERNBERT_KERNELS_AUTOTUNE", "0")


@pytest.mark.parametrize("int8", [False, True], ids=["bf16", "int8"])
def test_encoder_forward_replays_in_a_cuda_graph(int8):
    torch.manual_seed(0)
    config = ModernBertConfig(vocab_size=512, num_hidden_layers=2, global_attn_every_n_layers=2, pad_token_id=0)
    model = ModernBertModel(config).eval().to("cuda", torch.bfloat16)
    if int8:
        quantize_int8(model)
    generator = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(1, 512, (4, 512), device="cuda", generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 300:] = 0
    mask[3, 77:] = 0
    batch = model.unpad(mask)  # the host reads happen here, outside the graph
    static_ids = ids.reshape(-1)[batch.indices].clone()
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: compiles the kernels, fills the layout caches
            for _ in range(2):
                model.forward_packed(static_ids, batch)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = model.forward_packed(static_ids, batch)
        for seed in (2, 3):  # new tokens of the same shape, copied into the captured input
            new_ids = torch.randint(1, 512, static_ids.shape, device="cuda",
                                    generator=torch.Generator(device="cuda").manual_seed(seed))
            static_ids.copy_(new_ids)
            static_out.fill_(float("nan"))
            graph.replay()
            expected = model.forward_packed(new_ids, batch)
            torch.cuda.synchronize()
            assert not static_out.isnan().any()
            torch.testing.assert_close(static_out, expected)  # bf16 tolerances
