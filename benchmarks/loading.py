"""Loading ModernBERT-base (config.json + model.safetensors, random weights saved first): from_pretrained
of the fp32 checkpoint and of its int8 version, beside building the model with random weights.

    python -m benchmarks.loading --out benchmarks/results/local
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from benchmarks.report import result_rows
from benchmarks.timing import summarize, time_cpu


def run(device: torch.device, quick: bool, progress=None) -> list[dict]:
    from modernbert import ModernBertConfig, ModernBertModel, quantize_int8

    config = ModernBertConfig()  # ModernBERT-base: 22 layers, hidden 768, vocabulary 50368
    measured = {}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = ModernBertModel(config)
        model.save_pretrained(Path(tmp) / "fp32")
        quantize_int8(model).save_pretrained(Path(tmp) / "int8")
        del model
        cases = {
            "build_random_init": lambda: ModernBertModel(config),
            "from_pretrained_fp32": lambda: ModernBertModel.from_pretrained(Path(tmp) / "fp32"),
        }
        if (Path(tmp) / "int8" / "config.json").read_text().count("quantization_config"):
            cases["from_pretrained_int8"] = lambda: ModernBertModel.from_pretrained(Path(tmp) / "int8")
        for name, load in cases.items():
            measured[name] = summarize(time_cpu(load, warmup=1, repeats=3 if quick else 5, budget_s=0))
            if progress:
                progress(f"loading {name}: {measured[name]['median_ms']:.0f} ms")
    return result_rows("loading", "ModernBERT-base", measured, "build_random_init", dtype="float32")


def main(argv=None):
    from benchmarks.report import script_main

    script_main(run, __doc__, "loading", argv)


if __name__ == "__main__":
    main()
