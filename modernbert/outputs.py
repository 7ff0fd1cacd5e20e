"""What the task heads return, shaped as transformers' model outputs, and their losses.

An output is a dict of its present fields in declaration order (``loss`` only when labels were
given), readable as attributes (``out.logits``; an absent field reads None) and by position
(``out[0]``), so ``transformers.Trainer``, ``accelerate`` and code written for transformers'
heads use it unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # labels at this value are not scored (padding, sub-word continuations)


class ModelOutput(dict):
    fields: tuple[str, ...] = ()

    def __init__(self, **values):
        unknown = set(values) - set(self.fields)
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field(s) {sorted(unknown)}")
        super().__init__((name, values[name]) for name in self.fields if values.get(name) is not None)

    def __getattr__(self, name):
        if name in self.fields:
            return self.get(name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __getitem__(self, key):
        if isinstance(key, (int, slice)):
            return self.to_tuple()[key]
        return super().__getitem__(key)

    def to_tuple(self) -> tuple:
        return tuple(self.values())


class MaskedLMOutput(ModelOutput):
    fields = ("loss", "logits")


class SequenceClassifierOutput(ModelOutput):
    fields = ("loss", "logits")


class TokenClassifierOutput(ModelOutput):
    fields = ("loss", "logits")


class QuestionAnsweringOutput(ModelOutput):
    fields = ("loss", "start_logits", "end_logits")


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross entropy of [..., classes] logits against [...] labels, IGNORE_INDEX skipped, in fp32."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1).long(),
                           ignore_index=IGNORE_INDEX)


def sequence_classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One output (num_labels == 1) is regression (mean squared error against float labels), as in
    transformers; more outputs are single-label classification."""
    if logits.shape[-1] == 1:
        return F.mse_loss(logits.squeeze(-1).float(), labels.float())
    return cross_entropy(logits, labels)


def span_loss(start_logits, end_logits, start_positions, end_positions) -> torch.Tensor:
    """Mean of the start and end cross entropies; positions outside the sequence are ignored."""
    seq_len = start_logits.shape[-1]
    start = start_positions.clamp(0, seq_len).masked_fill(start_positions >= seq_len, IGNORE_INDEX)
    end = end_positions.clamp(0, seq_len).masked_fill(end_positions >= seq_len, IGNORE_INDEX)
    return (cross_entropy(start_logits, start) + cross_entropy(end_logits, end)) / 2
