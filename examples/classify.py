"""Classify sentences with a ModernBERT sequence-classification checkpoint from a local folder.

    python examples/classify.py path/to/checkpoint "The kernels are fast." "Padding costs nothing."

The folder holds config.json, model.safetensors and the tokenizer files (as written by
transformers' save_pretrained). Sentences are batched with padding; the encoder unpads them, so the
padding costs no FLOP.
"""

from __future__ import annotations

import argparse

import torch


def classify(folder: str, sentences: list[str]) -> list[dict[str, float]]:
    from transformers import AutoTokenizer

    from modernbert import ModernBertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = ModernBertForSequenceClassification.from_pretrained(folder)
    labels = model.config.id2label or {i: f"LABEL_{i}" for i in range(model.config.num_labels)}
    batch = tokenizer(sentences, padding=True, truncation=True, return_tensors="pt")
    with torch.inference_mode():
        probabilities = model(batch["input_ids"], batch["attention_mask"]).logits.softmax(-1)
    return [{labels[i]: p for i, p in enumerate(row.tolist())} for row in probabilities]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder")
    parser.add_argument("sentences", nargs="+")
    args = parser.parse_args(argv)
    for sentence, scores in zip(args.sentences, classify(args.folder, args.sentences)):
        best = max(scores, key=scores.get)
        print(f"{best} ({scores[best]:.3f})  {sentence}")


if __name__ == "__main__":
    main()
