"""Task heads over ModernBertModel, with transformers' parameter names (model., head., decoder, classifier).

Each head takes ``labels`` (``start_positions`` / ``end_positions`` for question answering) and
returns an output object (modernbert.outputs) with ``.logits`` and, given labels, ``.loss``, as
transformers' heads do, so ``transformers.Trainer`` and ``accelerate`` train them as they are.
"""

from __future__ import annotations

import torch
from torch import nn

from modernbert_kernels.cpu_linear import Linear

from .config import ModernBertConfig
from .loading import PretrainedMixin
from .model import ModernBertModel, activation, layer_norm
from .outputs import (
    MaskedLMOutput,
    QuestionAnsweringOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
    cross_entropy,
    sequence_classification_loss,
    span_loss,
)


class ModernBertPredictionHead(nn.Module):
    def __init__(self, config: ModernBertConfig):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.hidden_size, bias=config.classifier_bias)
        self.act = activation(config.classifier_activation)
        self.norm = layer_norm(config)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.dense(hidden)))


class _WithEncoder(PretrainedMixin, nn.Module):
    """Encoder + prediction head, and a dropout + linear classifier when ``num_outputs`` is given."""

    def __init__(self, config: ModernBertConfig, num_outputs: int | None = None):
        super().__init__()
        self.config = config
        self.model = ModernBertModel(config)
        self.head = ModernBertPredictionHead(config)
        if num_outputs is not None:
            self.drop = nn.Dropout(config.classifier_dropout)
            self.classifier = Linear(config.hidden_size, num_outputs)

    def prune_heads(self, heads_to_prune: dict) -> None:
        """``{layer: [head indices]}``: see ModernBertModel.prune_heads."""
        self.model.prune_heads(heads_to_prune)


class ModernBertForMaskedLM(_WithEncoder):
    """Logits over the vocabulary for every position."""

    tied_weights = {"decoder.weight": "model.embeddings.tok_embeddings.weight"}

    def __init__(self, config: ModernBertConfig):
        super().__init__(config)
        self.decoder = Linear(config.hidden_size, config.vocab_size, bias=config.decoder_bias)
        self.tie_weights()

    def forward(self, input_ids, attention_mask=None, labels=None) -> MaskedLMOutput:
        """logits [batch, seq, vocab_size]; ``labels`` [batch, seq], -100 where not scored."""
        logits = self.decoder(self.head(self.model(input_ids, attention_mask)))
        return MaskedLMOutput(loss=None if labels is None else cross_entropy(logits, labels), logits=logits)


class ModernBertForSequenceClassification(_WithEncoder):
    """logits [batch, num_labels], pooling the first token ("cls") or the mean of real tokens ("mean")."""

    def __init__(self, config: ModernBertConfig):
        super().__init__(config, config.num_labels)

    def forward(self, input_ids, attention_mask=None, labels=None) -> SequenceClassifierOutput:
        """``labels`` [batch]: class indices, or float targets when num_labels == 1 (regression)."""
        hidden = self.model(input_ids, attention_mask)
        if self.config.classifier_pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
            mask = mask.to(hidden.dtype)[..., None]
            pooled = (hidden * mask).sum(1) / mask.sum(1)
        logits = self.classifier(self.drop(self.head(pooled)))
        loss = None if labels is None else sequence_classification_loss(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


class ModernBertForTokenClassification(_WithEncoder):
    """logits [batch, seq, num_labels]."""

    def __init__(self, config: ModernBertConfig):
        super().__init__(config, config.num_labels)

    def forward(self, input_ids, attention_mask=None, labels=None) -> TokenClassifierOutput:
        """``labels`` [batch, seq], -100 where not scored."""
        logits = self.classifier(self.drop(self.head(self.model(input_ids, attention_mask))))
        return TokenClassifierOutput(loss=None if labels is None else cross_entropy(logits, labels), logits=logits)


class ModernBertForQuestionAnswering(_WithEncoder):
    """start_logits and end_logits, each [batch, seq]."""

    def __init__(self, config: ModernBertConfig):
        super().__init__(config, 2)

    def forward(self, input_ids, attention_mask=None, start_positions=None,
                end_positions=None) -> QuestionAnsweringOutput:
        """``start_positions`` / ``end_positions`` [batch]: the answer span's token indices."""
        logits = self.classifier(self.drop(self.head(self.model(input_ids, attention_mask))))
        start, end = logits.unbind(-1)
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = span_loss(start, end, start_positions, end_positions)
        return QuestionAnsweringOutput(loss=loss, start_logits=start, end_logits=end)
