"""Task heads over ModernBertModel, with transformers' parameter names (model., head., decoder, classifier)."""

from __future__ import annotations

import torch
from torch import nn

from .config import ModernBertConfig
from .loading import PretrainedMixin
from .model import ModernBertModel, activation, layer_norm


class ModernBertPredictionHead(nn.Module):
    def __init__(self, config: ModernBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=config.classifier_bias)
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
            self.classifier = nn.Linear(config.hidden_size, num_outputs)

    def prune_heads(self, heads_to_prune: dict) -> None:
        """``{layer: [head indices]}``: see ModernBertModel.prune_heads."""
        self.model.prune_heads(heads_to_prune)


class ModernBertForMaskedLM(_WithEncoder):
    """Logits over the vocabulary for every position: [batch, seq, vocab_size]."""

    tied_weights = {"decoder.weight": "model.embeddings.tok_embeddings.weight"}

    def __init__(self, config: ModernBertConfig):
        super().__init__(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=config.decoder_bias)
        if config.tie_word_embeddings:
            self.decoder.weight = self.model.embeddings.tok_embeddings.weight

    def forward(self, input_ids, attention_mask=None):
        return self.decoder(self.head(self.model(input_ids, attention_mask)))


class ModernBertForSequenceClassification(_WithEncoder):
    """[batch, num_labels], pooling the first token ("cls") or the mean of real tokens ("mean")."""

    def __init__(self, config: ModernBertConfig):
        super().__init__(config, config.num_labels)

    def forward(self, input_ids, attention_mask=None):
        hidden = self.model(input_ids, attention_mask)
        if self.config.classifier_pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
            mask = mask.to(hidden.dtype)[..., None]
            pooled = (hidden * mask).sum(1) / mask.sum(1)
        return self.classifier(self.drop(self.head(pooled)))


class ModernBertForTokenClassification(_WithEncoder):
    """[batch, seq, num_labels]."""

    def __init__(self, config: ModernBertConfig):
        super().__init__(config, config.num_labels)

    def forward(self, input_ids, attention_mask=None):
        return self.classifier(self.drop(self.head(self.model(input_ids, attention_mask))))


class ModernBertForQuestionAnswering(_WithEncoder):
    """(start_logits, end_logits), each [batch, seq]."""

    def __init__(self, config: ModernBertConfig):
        super().__init__(config, 2)

    def forward(self, input_ids, attention_mask=None):
        logits = self.classifier(self.drop(self.head(self.model(input_ids, attention_mask))))
        start, end = logits.unbind(-1)
        return start, end
