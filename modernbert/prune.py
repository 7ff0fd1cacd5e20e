"""Attention-head pruning by importance (Michel, Levy and Neubig 2019, "Are Sixteen Heads Really
Better than One?").

A head's importance is the expected magnitude of the loss's gradient with respect to a gate
multiplying that head's output, accumulated over data: ``I_h = sum_batches |dL / dgate_h|``,
normalized per layer (L2), as in the paper. ``prune_least_important`` removes the k lowest
(keeping at least one head per layer) through ``model.prune_heads``, so the pruned model is
smaller, faster, still runs on the block-sparse kernels, and saves / loads with its config.
"""

from __future__ import annotations

import torch
from torch import nn

from .train import batches


def head_importance(model: nn.Module, examples: list[dict], task: str = "sequence", batch_size: int = 16,
                    normalize: bool = True) -> dict[int, torch.Tensor]:
    """{layer: importance [its heads]} of a head model on labelled examples."""
    encoder = model.model
    if encoder.config.num_hidden_groups is not None:
        raise ValueError("head importance of shared layers is not supported")
    device = next(model.parameters()).device
    attentions = {i: layer.attn for i, layer in encoder.layer_sequence()}
    for attention in attentions.values():
        attention.head_gate = torch.ones(attention.num_heads, device=device, requires_grad=True)
    scores = {i: torch.zeros(a.num_heads, device=device) for i, a in attentions.items()}
    was_training = model.training
    model.eval()  # no dropout: the gradient of the model as it will be used
    try:
        for batch in batches(examples, batch_size, model.config.pad_token_id, task, device):
            loss = model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"]).loss
            gates = [a.head_gate for a in attentions.values()]
            grads = torch.autograd.grad(loss, gates)
            for (i, _), grad in zip(attentions.items(), grads):
                scores[i] += grad.abs().detach()
    finally:
        for attention in attentions.values():
            attention.head_gate = None
        model.train(was_training)
    if normalize:
        scores = {i: s / s.norm().clamp_min(1e-12) for i, s in scores.items()}
    return scores


def least_important_heads(importance: dict[int, torch.Tensor], count: int, heads_of: dict[int, list[int]]
                          ) -> dict[int, list[int]]:
    """The ``count`` lowest-scoring heads as {layer: [original head indices]}, never a layer's last."""
    ranked = sorted((float(score), layer, position) for layer, scores in importance.items()
                    for position, score in enumerate(scores))
    remaining = {layer: len(heads) for layer, heads in heads_of.items()}
    chosen: dict[int, list[int]] = {}
    for _, layer, position in ranked:
        if sum(len(v) for v in chosen.values()) == count:
            break
        if remaining[layer] > 1:
            chosen.setdefault(layer, []).append(heads_of[layer][position])
            remaining[layer] -= 1
    return chosen


def prune_least_important(model: nn.Module, examples: list[dict], fraction: float = 0.25, task: str = "sequence",
                          batch_size: int = 16) -> dict[int, list[int]]:
    """Prune ``fraction`` of all heads, the least important first; returns what was pruned."""
    importance = head_importance(model, examples, task, batch_size)
    heads_of = {i: list(layer.attn.heads) for i, layer in model.model.layer_sequence()}
    total = sum(len(h) for h in heads_of.values())
    chosen = least_important_heads(importance, int(round(fraction * total)), heads_of)
    model.prune_heads(chosen)
    return chosen
