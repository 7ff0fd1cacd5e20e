"""The kernel-hub build (scripts/build_hub_kernel.sh): the variant folder the `kernels` package
loads offline, beside the installed package in one process, and transformers using it through
``attn_implementation="<org>/<repo>:attention_forward"`` with LOCAL_KERNELS."""

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import CPU_EXTENSION

import modernbert_kernels

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [CPU_EXTENSION, pytest.mark.xdist_group("hub_kernel")]  # one build for the file's tests


@pytest.fixture(scope="module")
def hub_repo(tmp_path_factory):
    pytest.importorskip("kernels", reason="Hugging Face's kernels package (the hf extra)")
    out = tmp_path_factory.mktemp("hub")
    # One CUDA arch: the variant's layout and metadata are what is tested here, and nvcc's time grows
    # with the archs (the package's own build compiles both).
    done = subprocess.run(["bash", str(ROOT / "scripts" / "build_hub_kernel.sh"), str(out)], capture_output=True,
                          text=True, timeout=900, env={**os.environ, "TORCH_CUDA_ARCH_LIST": "9.0+PTX"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_the_variant_folder_loads_offline_beside_the_installed_package(hub_repo, offline):
    import kernels

    variants = {p.name: p for p in (hub_repo / "build").iterdir()}
    expected = {f"torch-stable-abi211-cpu-{platform.machine()}-linux"}
    nvcc = shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc")
    if nvcc and os.environ.get("FORCE_CUDA") != "0" and torch.version.cuda:  # the script builds CUDA there
        expected.add(f"torch-stable-abi211-cu{torch.version.cuda.replace('.', '')}-{platform.machine()}-linux")
    assert set(variants) == expected
    ids = set()
    for variant in variants.values():
        assert {"_ops.py", "_C.abi3.so", "__init__.py", "metadata.json"} <= {p.name for p in variant.iterdir()}
        metadata = json.loads((variant / "metadata.json").read_text())
        ids.add(metadata["id"])
        assert metadata["backend"] == ({"type": "cuda", "archs": ["9.0"]} if "-cu" in variant.name
                                       else {"type": "cpu", "archs": None}), metadata
    assert len(ids) == 1, ids  # one build, one op namespace, whichever variant a machine picks

    hub = kernels.get_local_kernel(hub_repo)
    assert hub.__name__ == metadata["id"] == hub._ops.NAMESPACE != modernbert_kernels._ops.NAMESPACE
    assert hub.native.cpu_status()[0], hub.native.cpu_status()[1]
    # Its ops live in their own namespace, so both copies' registrations coexist.
    assert hasattr(getattr(torch.ops, metadata["id"]), "block_sparse_attention_forward_native")

    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 3, 200, 64, generator=gen) for _ in range(3))
    pad = torch.ones(2, 200, dtype=torch.bool)
    pad[1, 150:] = False
    outputs = [package.block_sparse_attention(q, k, v, package.layouts.sliding_window(200, 48, 64), window=48,
                                              key_padding_mask=pad, backend="cpu")
               for package in (hub, modernbert_kernels)]
    assert torch.equal(*outputs)
    x = torch.randn(33, 96, generator=gen)
    w_q, w_scale = modernbert_kernels.quantize_per_channel(torch.randn(40, 96, generator=gen))
    results = [package.int8_linear(*package.quantize_per_token(x, backend="cpu"), w_q, w_scale, backend="cpu",
                                   out_dtype=torch.float32) for package in (hub, modernbert_kernels)]
    assert torch.equal(*results)


def test_the_cpu_variant_serves_a_cpu_only_torch(hub_repo):
    """What `kernels` picks with backend="cpu" (a CPU-only torch resolves to it by itself), in a
    process of its own: two variants of one build share an id, and a process loads one."""
    code = f"""
import torch, kernels
from pathlib import Path
hub = kernels.get_local_kernel(Path({str(hub_repo)!r}), backend="cpu")
assert "/torch-stable-abi211-cpu-" in hub.__file__, hub.__file__
assert hub.native.cpu_status()[0], hub.native.cpu_status()
q, k, v = (torch.randn(1, 2, 96, 64) for _ in range(3))
layout = hub.layouts.sliding_window(96, 32, 32)
out = hub.block_sparse_attention(q, k, v, layout, window=32, backend="cpu")
ref = hub.reference.block_sparse_attention_reference(q.double(), k.double(), v.double(), layout, window=32)
assert (out.double() - ref).abs().max() < 1e-5
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_transformers_loads_it_as_an_attention_implementation(hub_repo, offline, monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("LOCAL_KERNELS", f"acme/modernbert-kernels={hub_repo}")
    from modernbert_kernels.integrations.transformers import register

    config = transformers.ModernBertConfig(
        vocab_size=100, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2, local_attention=32,
        max_position_embeddings=256, global_attn_every_n_layers=2)
    torch.manual_seed(0)
    model = transformers.ModernBertModel(config).eval()
    ids = torch.randint(3, 100, (2, 100))
    mask = torch.ones(2, 100, dtype=torch.long)
    mask[1, 70:] = 0
    real = mask.bool()
    outputs = {}
    for name in ("acme/modernbert-kernels:attention_forward", register(), "sdpa"):
        model.set_attn_implementation(name)
        assert model.config._attn_implementation == name
        with torch.no_grad():
            outputs[name] = model(input_ids=ids, attention_mask=mask).last_hidden_state
    hub_out = outputs["acme/modernbert-kernels:attention_forward"]
    assert any(m.startswith("_modernbert_kernels_") for m in sys.modules)
    # transformers unpads the batch for a hub kernel (varlen) and not for ours (key padding): the
    # same kernels on a different split of the work, so equal to fp32 rounding, not bit for bit.
    for name in (register(), "sdpa"):
        assert (hub_out - outputs[name])[real].abs().max() < 1e-5, name


def test_a_decoder_generates_with_it(hub_repo, offline, monkeypatch):
    """transformers' flash-attention path on the hub kernel in a decoder: the prefill on the kernels,
    then one-token steps with fewer queries than keys (flash_attn_func's KV-cache case); greedy
    tokens equal SDPA's, for one prompt and for a left-padded batch."""
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("LOCAL_KERNELS", f"acme/modernbert-kernels={hub_repo}")
    models = []
    for name in ("sdpa", "acme/modernbert-kernels:attention_forward"):
        torch.manual_seed(0)
        config = transformers.MistralConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                            sliding_window=40)
        models.append(transformers.AutoModelForCausalLM.from_config(config, attn_implementation=name).eval())
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (2, 90), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :30] = 0
    ids[1, :30] = 0
    for batch in (dict(input_ids=ids[:1, :70]), dict(input_ids=ids, attention_mask=mask)):
        tokens = [m.generate(**batch, max_new_tokens=8, do_sample=False, pad_token_id=0) for m in models]
        assert torch.equal(tokens[0], tokens[1])
