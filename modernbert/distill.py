"""Knowledge distillation: a smaller student learns from a teacher's logits and hidden states.

``make_student(teacher, num_layers)`` builds a shallower copy (layers picked evenly, as in
DistilBERT's every-other-layer initialization); ``distill(teacher, student, examples, config)``
trains it with temperature-scaled KL on the teacher's logits (Hinton et al. 2015), cross entropy
on the labels, and optionally MSE between mapped hidden states (TinyBERT's intermediate layers).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .outputs import cross_entropy
from .train import TrainingConfig, finetune


def evenly_spaced_layers(teacher_layers: int, student_layers: int) -> list[int]:
    """Teacher layer indices for each student layer, first and last included."""
    if not 1 <= student_layers <= teacher_layers:
        raise ValueError(f"a student needs 1..{teacher_layers} layers, got {student_layers}")
    if student_layers == 1:
        return [teacher_layers - 1]
    return [round(i * (teacher_layers - 1) / (student_layers - 1)) for i in range(student_layers)]


@torch.no_grad()
def make_student(teacher: nn.Module, num_layers: int) -> nn.Module:
    """A copy of ``teacher`` (a head model) keeping ``num_layers`` of its encoder layers, each with
    its layer type (global / local) and weights."""
    encoder = teacher.model
    if encoder.config.num_hidden_groups is not None:
        raise ValueError("make_student copies layers one by one: unshare the teacher's layers first")
    picked = evenly_spaced_layers(encoder.config.num_hidden_layers, num_layers)
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = num_layers
    config.layer_types = [encoder.config.layer_types[i] for i in picked]
    if config.pruned_heads:
        config.pruned_heads = {s: config.pruned_heads[t] for s, t in enumerate(picked) if t in config.pruned_heads}
    student = type(teacher)(config).to(next(teacher.parameters()).device)
    state = {k: v for k, v in teacher.state_dict().items() if not k.startswith("model.layers.")}
    for student_index, teacher_index in enumerate(picked):
        prefix = f"model.layers.{teacher_index}."
        for key, value in teacher.state_dict().items():
            if key.startswith(prefix):
                state[f"model.layers.{student_index}." + key[len(prefix):]] = value
    # Layer 0 has no attention LayerNorm (the embeddings end with one): a teacher layer copied
    # there drops its norm, and one copied from layer 0 elsewhere starts from a fresh one.
    missing, unexpected = student.load_state_dict(state, strict=False)
    if unexpected and any("attn_norm" not in k for k in unexpected):
        raise RuntimeError(f"unexpected keys building the student: {unexpected}")
    if any("attn_norm" not in k for k in missing):
        raise RuntimeError(f"missing keys building the student: {missing}")
    return student


class _HiddenStates:
    """Records each encoder layer's output (packed [tokens, hidden]) during a forward."""

    def __init__(self, model: nn.Module):
        self.outputs: list[torch.Tensor] = []
        # One hook per module: a module shared by several layers fires once per use, in order.
        model = getattr(model, "module", model)  # under DistributedDataParallel
        self.hooks = [layer.register_forward_hook(lambda m, i, o: self.outputs.append(o))
                      for layer in model.model.layers]

    def remove(self):
        for hook in self.hooks:
            hook.remove()


def distillation_loss(student_logits, teacher_logits, labels, temperature: float, alpha: float):
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(labels)."""
    t = temperature
    vocab = student_logits.shape[-1]
    keep = labels.reshape(-1) != -100
    s = student_logits.reshape(-1, vocab)[keep].float()
    te = teacher_logits.reshape(-1, vocab)[keep].float()
    kl = F.kl_div(F.log_softmax(s / t, -1), F.log_softmax(te / t, -1), log_target=True, reduction="batchmean")
    return alpha * t * t * kl + (1 - alpha) * cross_entropy(student_logits, labels)


def distill(teacher: nn.Module, student: nn.Module, train: list[dict], eval_examples: list[dict] | None = None,
            config: TrainingConfig | None = None, *, temperature: float = 2.0, alpha: float = 0.5,
            hidden_weight: float = 0.0, layer_map: list[int] | None = None, progress: bool = True) -> list[dict]:
    """Train ``student`` on ``train`` against ``teacher`` (frozen); returns the training history.

    ``hidden_weight`` > 0 adds MSE between student layer i's output and teacher layer
    ``layer_map[i]``'s (default: evenly spaced), which needs equal hidden sizes.
    """
    teacher.eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    layers = student.config.num_hidden_layers
    layer_map = layer_map or evenly_spaced_layers(teacher.config.num_hidden_layers, layers)
    if hidden_weight and teacher.config.hidden_size != student.config.hidden_size:
        raise ValueError("hidden-state distillation needs equal hidden sizes")

    def compute_loss(model, batch):
        student_states = _HiddenStates(model) if hidden_weight else None
        teacher_states = _HiddenStates(teacher) if hidden_weight else None
        try:
            with torch.no_grad():
                teacher_logits = teacher(batch["input_ids"], batch["attention_mask"]).logits
            student_logits = model(batch["input_ids"], batch["attention_mask"]).logits
            loss = distillation_loss(student_logits, teacher_logits, batch["labels"], temperature, alpha)
            if hidden_weight:
                loss = loss + hidden_weight * sum(
                    F.mse_loss(student_states.outputs[i].float(), teacher_states.outputs[t].float())
                    for i, t in enumerate(layer_map)
                ) / len(layer_map)
        finally:
            for states in (student_states, teacher_states):
                if states is not None:
                    states.remove()
        return loss

    return finetune(student, train, eval_examples, config, compute_loss=compute_loss, progress=progress)
