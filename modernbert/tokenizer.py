"""AutoTokenizer: transformers' fast tokenizer of a checkpoint, from a local folder or a Hub id."""

from __future__ import annotations

import os
from pathlib import Path

from .hub import resolve

# What the encoder takes: ModernBERT has no token type embeddings, so a tokenizer that would
# return token_type_ids (BERT's) leaves them out and ``model(**tokenizer(...))`` works.
MODEL_INPUTS = ["input_ids", "attention_mask"]


class AutoTokenizer:
    """``AutoTokenizer.from_pretrained(folder_or_id)``: the checkpoint's transformers tokenizer
    (fast when the folder has tokenizer.json), resolved like the models' from_pretrained."""

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, revision: str | None = None,
                        cache_dir: str | Path | None = None, local_files_only: bool = False, **kwargs):
        import transformers

        folder = resolve(name_or_path, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
        kwargs.setdefault("model_input_names", MODEL_INPUTS)
        return transformers.AutoTokenizer.from_pretrained(folder, **kwargs)
