"""A ModernBERT encoder on modernbert_kernels that loads Hugging Face checkpoints (local folders or
Hub ids). The Auto* names let code written for transformers' Auto classes run with only its
import line changed (``from modernbert import AutoTokenizer, AutoModelForSequenceClassification``)."""

from .config import ModernBertConfig
from .heads import (
    ModernBertForMaskedLM,
    ModernBertForQuestionAnswering,
    ModernBertForSequenceClassification,
    ModernBertForTokenClassification,
)
from .frozen import FrozenEncoder
from .model import ModernBertModel
from .quantize import quantize_int8
from .tokenizer import AutoTokenizer

AutoModelForMaskedLM = ModernBertForMaskedLM
AutoModelForSequenceClassification = ModernBertForSequenceClassification
AutoModelForTokenClassification = ModernBertForTokenClassification
AutoModelForQuestionAnswering = ModernBertForQuestionAnswering

__all__ = [
    "AutoModelForMaskedLM",
    "AutoModelForQuestionAnswering",
    "AutoModelForSequenceClassification",
    "AutoModelForTokenClassification",
    "AutoTokenizer",
    "FrozenEncoder",
    "ModernBertConfig",
    "ModernBertForMaskedLM",
    "ModernBertForQuestionAnswering",
    "ModernBertForSequenceClassification",
    "ModernBertForTokenClassification",
    "ModernBertModel",
    "quantize_int8",
]
