"""The classification snippet users start from, with its import line changed to this package.

    python examples/seed_classification.py path/or/hub-id "A sentence to classify."

It was written for transformers (``from transformers import AutoTokenizer,
AutoModelForSequenceClassification``); everything below the import is unchanged, and the model now
runs unpadded on the block-sparse kernels.
"""

import sys

import torch

from modernbert import AutoModelForSequenceClassification, AutoTokenizer

model_id = sys.argv[1] if len(sys.argv) > 1 else "answerdotai/ModernBERT-base"
text = sys.argv[2] if len(sys.argv) > 2 else "Block-sparse attention makes long documents cheap."

tokenizer = AutoTokenizer.from_pretrained(model_id)
model = AutoModelForSequenceClassification.from_pretrained(model_id)

inputs = tokenizer(text, return_tensors="pt")
with torch.no_grad():
    logits = model(**inputs).logits

predicted_class_id = logits.argmax().item()
print(model.config.id2label[predicted_class_id])
