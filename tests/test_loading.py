"""from_pretrained and save_pretrained: Hub ids through a cache folder built here (offline), no
random initialization of weights the checkpoint holds, dtype / device, int8 checkpoints."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import modernbert
from modernbert import ModernBertConfig, ModernBertForSequenceClassification, ModernBertModel, quantize_int8
from modernbert_kernels import Int8Linear

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=2,
            local_attention=32, global_attn_every_n_layers=2, max_position_embeddings=512, pad_token_id=0,
            id2label={0: "no", 1: "yes"})
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def batch(seed=1):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, TINY["vocab_size"], (2, 90), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 50:] = 0
    return ids, mask


def hub_cache(tmp_path, repo_id, folder):
    """A huggingface_hub cache holding ``folder`` as ``repo_id``'s main revision (as a download
    leaves it: snapshots/<commit>/files and refs/main naming the commit)."""
    cache = tmp_path / "cache"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return cache


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = ModernBertForSequenceClassification(ModernBertConfig(**TINY)).eval()
    model.save_pretrained(tmp_path / "model")
    return model, tmp_path / "model"


def test_a_hub_id_loads_offline_from_the_cache(tmp_path, saved, monkeypatch):
    model, folder = saved
    cache = hub_cache(tmp_path, "example-org/tiny-modernbert", folder)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ids, mask = batch()
    for revision in (None, COMMIT):
        loaded = ModernBertForSequenceClassification.from_pretrained("example-org/tiny-modernbert", cache_dir=cache,
                                                                     revision=revision)
        with torch.no_grad():
            assert torch.equal(loaded(ids, mask).logits, model(ids, mask).logits)
    config = ModernBertConfig.from_pretrained("example-org/tiny-modernbert", cache_dir=cache)
    assert config.id2label == {0: "no", 1: "yes"}


def test_a_missing_repo_names_the_id(tmp_path, saved, monkeypatch):
    _, folder = saved
    cache = hub_cache(tmp_path, "example-org/tiny-modernbert", folder)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="example-org/absent.*cache"):
        ModernBertModel.from_pretrained("example-org/absent", cache_dir=cache)
    with pytest.raises(FileNotFoundError, match="example-org/tiny-modernbert.*revision 'v9'"):
        ModernBertModel.from_pretrained("example-org/tiny-modernbert", cache_dir=cache, revision="v9")
    monkeypatch.delenv("HF_HUB_OFFLINE")  # online: no network here (or no such repo on the Hub)
    with pytest.raises(FileNotFoundError, match="modernbert-kernels-tests/no-such-model"):
        ModernBertModel.from_pretrained("modernbert-kernels-tests/no-such-model", cache_dir=cache)
    with pytest.raises(FileNotFoundError, match="not a Hub repo id"):
        ModernBertModel.from_pretrained(tmp_path / "no" / "such" / "folder")


def test_loading_initializes_no_weight_the_checkpoint_holds(saved, monkeypatch):
    """The model is built on the meta device: no initializer runs for loaded weights; an
    encoder-only checkpoint loaded into a head model initializes exactly the head."""
    _, folder = saved
    initialized = []
    for name in ("kaiming_uniform_", "uniform_", "normal_", "ones_", "zeros_"):
        original = getattr(torch.nn.init, name)

        def counting(tensor, *args, original=original, name=name, **kwargs):
            if not tensor.is_meta:  # construction on the meta device initializes nothing real
                initialized.append((name, tuple(tensor.shape)))
            return original(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.nn.init, name, counting)
    model = ModernBertForSequenceClassification.from_pretrained(folder)
    assert initialized == []
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    encoder_only = folder.parent / "encoder"
    model.model.save_pretrained(encoder_only)
    head = ModernBertForSequenceClassification.from_pretrained(encoder_only)
    shapes = {shape for _, shape in initialized}
    assert shapes == {tuple(p.shape) for n, p in head.named_parameters() if not n.startswith("model.")}
    assert torch.equal(head.model.embeddings.tok_embeddings.weight, model.model.embeddings.tok_embeddings.weight)


def test_a_new_label_set_starts_a_fresh_classifier_only_when_asked(saved):
    """``config=`` with 5 labels over a 2-label checkpoint: a shape error naming the tensors, or,
    with ignore_mismatched_sizes, the checkpoint's encoder and head dense layer and a new classifier."""
    model, folder = saved
    config = ModernBertConfig.from_pretrained(folder)
    config.id2label = {i: f"LABEL_{i}" for i in range(5)}
    with pytest.raises(ValueError, match=r"classifier.weight \(2, 64\) \(model \(5, 64\)\).*ignore_mismatched_sizes"):
        ModernBertForSequenceClassification.from_pretrained(folder, config=config)
    torch.manual_seed(11)
    loaded = ModernBertForSequenceClassification.from_pretrained(folder, config=config, ignore_mismatched_sizes=True)
    assert loaded.classifier.weight.shape == (5, 64) and loaded.classifier.weight.abs().sum() > 0
    kept = {k: v for k, v in model.state_dict().items() if not k.startswith("classifier.")}
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in kept.items())
    ids, mask = batch()
    with torch.no_grad():
        assert loaded(ids, mask).logits.shape == (2, 5)
    wider = ModernBertConfig.from_pretrained(folder)
    wider.intermediate_size *= 2  # the encoder itself differs: another model, never quietly reinitialized
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.Wi.weight \(192, 64\) \(model \(384, 64\)\)"):
        ModernBertForSequenceClassification.from_pretrained(folder, config=wider, ignore_mismatched_sizes=True)


def test_tied_decoder_follows_the_loaded_embeddings(tmp_path):
    torch.manual_seed(0)
    model = modernbert.ModernBertForMaskedLM(ModernBertConfig(**TINY))
    model.save_pretrained(tmp_path)
    loaded = modernbert.ModernBertForMaskedLM.from_pretrained(tmp_path)
    assert loaded.decoder.weight is loaded.model.embeddings.tok_embeddings.weight
    assert torch.equal(loaded.decoder.bias, model.decoder.bias)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dtype_and_device(saved, dtype):
    model, folder = saved
    loaded = ModernBertForSequenceClassification.from_pretrained(folder, dtype=dtype, device="cpu")
    assert {p.dtype for p in loaded.parameters()} == {dtype}
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    assert torch.equal(loaded.classifier.weight.float(), model.classifier.weight.to(dtype).float())


@pytest.mark.parametrize("calibrated", [False, True])
def test_int8_checkpoint_round_trip(tmp_path, saved, calibrated):
    """save_pretrained of an int8 model writes int8 weights and scales, says so in config.json,
    and from_pretrained rebuilds the int8 model (no float layer weights) with bitwise the same
    outputs; the layers' weights take at least 3x less room on disk than fp32."""
    model, folder = saved
    ids, mask = batch()
    quantize_int8(model, calibration=[(ids, mask)] if calibrated else None, attention_dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "int8")
    settings = json.loads((tmp_path / "int8" / "config.json").read_text())["quantization_config"]
    assert settings["quant_method"] == "modernbert_kernels_w8a8"
    assert (settings["smoothquant_alpha"] is not None) == calibrated
    loaded = ModernBertForSequenceClassification.from_pretrained(tmp_path / "int8")
    converted = [m for m in loaded.modules() if isinstance(m, Int8Linear)]
    assert len(converted) == 4 * TINY["num_hidden_layers"] + 1
    assert all(m.smooth is not None for m in converted) == calibrated
    assert not any(type(m) is torch.nn.Linear for m in loaded.model.modules())
    assert loaded.model.layers[0].attn.attention_dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(loaded(ids, mask).logits, model(ids, mask).logits)

    def layer_bytes(path):
        return sum(t.numel() * t.element_size() for k, t in load_file(str(path / "model.safetensors")).items()
                   if ".layers." in k)

    assert layer_bytes(folder) >= 3 * layer_bytes(tmp_path / "int8")
    stored = load_file(str(tmp_path / "int8" / "model.safetensors"))
    assert stored["model.layers.0.attn.Wqkv.weight_q"].dtype == torch.int8
