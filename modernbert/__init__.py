"""A ModernBERT encoder on modernbert_kernels that loads Hugging Face checkpoints from a local folder."""

from .config import ModernBertConfig
from .heads import (
    ModernBertForMaskedLM,
    ModernBertForQuestionAnswering,
    ModernBertForSequenceClassification,
    ModernBertForTokenClassification,
)
from .model import ModernBertModel
from .quantize import quantize_int8

__all__ = [
    "ModernBertConfig",
    "ModernBertForMaskedLM",
    "ModernBertForQuestionAnswering",
    "ModernBertForSequenceClassification",
    "ModernBertForTokenClassification",
    "ModernBertModel",
    "quantize_int8",
]
