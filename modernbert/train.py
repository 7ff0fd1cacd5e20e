"""Fine-tuning the encoder's classification heads: a small training loop and its CLI.

``finetune(model, train, eval, TrainingConfig(...))`` trains a ModernBertForSequenceClassification
or ModernBertForTokenClassification with AdamW, linear warmup then linear (or cosine) decay,
gradient clipping, optional bf16 / fp16 autocast (with a gradient scaler for fp16 on CUDA) and
gradient checkpointing. Batches are padded to their longest example and the model packs them
(no FLOP on padding), so the attention runs on the block-sparse kernels, backward included.

Data: lists of examples ``{"input_ids": [...], "label": int}`` (sequence) or
``{"input_ids": [...], "labels": [...]}`` (token; -100 ignores a position), or JSONL files of the
same, or with ``"text"`` instead of ``"input_ids"`` tokenized by the model folder's tokenizer.

    modernbert-kernels finetune --model DIR --train train.jsonl --eval eval.jsonl --out OUT
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import random
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


@dataclasses.dataclass
class TrainingConfig:
    task: str = "sequence"  # "sequence" or "token"
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs when set
    batch_size: int = 16
    learning_rate: float = 5e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    schedule: str = "linear"  # after warmup: "linear" or "cosine" decay to 0
    max_grad_norm: float = 1.0
    precision: str = "fp32"  # "fp32", "bf16" (autocast) or "fp16" (autocast + grad scaler on CUDA)
    gradient_checkpointing: bool = False
    eval_every: int = 0  # steps between evaluations (0: at the end only)
    seed: int = 0

    def __post_init__(self):
        if self.task not in ("sequence", "token"):
            raise ValueError(f"task must be 'sequence' or 'token', got {self.task!r}")
        if self.schedule not in ("linear", "cosine"):
            raise ValueError(f"schedule must be 'linear' or 'cosine', got {self.schedule!r}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")


def collate(examples: list[dict], pad_token_id: int, task: str, device) -> dict:
    """Pad a list of examples to the longest: input_ids, attention_mask and labels tensors."""
    longest = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(len(examples), longest, dtype=torch.bool)
    labels = (torch.tensor([e["label"] for e in examples]) if task == "sequence"
              else torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long))
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.as_tensor(example["input_ids"])
        attention_mask[row, :n] = True
        if task == "token":
            labels[row, :n] = torch.as_tensor(example["labels"])
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device), "labels": labels.to(device)}


def batches(examples: list[dict], batch_size: int, pad_token_id: int, task: str, device, shuffle: random.Random | None):
    order = list(range(len(examples)))
    if shuffle is not None:
        shuffle.shuffle(order)
    for start in range(0, len(order), batch_size):
        yield collate([examples[i] for i in order[start:start + batch_size]], pad_token_id, task, device)


def task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross entropy for [batch, classes] or [batch, seq, classes] logits (IGNORE_INDEX skipped)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX)


def autocast_context(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


@torch.no_grad()
def evaluate(model: nn.Module, examples: list[dict], task: str, batch_size: int = 32, precision: str = "fp32") -> float:
    """Accuracy over the examples (over labelled positions for token classification)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = total = 0
    for batch in batches(examples, batch_size, model.config.pad_token_id, task, device, None):
        with autocast_context(precision, device):
            logits = model(batch["input_ids"], batch["attention_mask"])
        labelled = batch["labels"] != IGNORE_INDEX
        correct += int(((logits.argmax(-1) == batch["labels"]) & labelled).sum())
        total += int(labelled.sum())
    model.train(was_training)
    return correct / max(total, 1)


def lr_lambda(total_steps: int, warmup_ratio: float, schedule: str) -> Callable[[int], float]:
    warmup = max(1, int(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress

    return factor


def finetune(model: nn.Module, train: list[dict], eval_examples: list[dict] | None = None,
             config: TrainingConfig | None = None, *, compute_loss: Callable | None = None,
             progress: bool = True, log: Callable[[str], None] | None = None) -> list[dict]:
    """Train ``model`` in place; returns the history [{"step", "loss", "eval_accuracy"?}].

    ``compute_loss(model, batch) -> loss`` replaces the task's cross entropy (distillation uses it).
    """
    config = config or TrainingConfig()
    torch.manual_seed(config.seed)
    shuffle = random.Random(config.seed)
    device = next(model.parameters()).device
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    total_steps = config.max_steps or max(1, int(config.epochs * steps_per_epoch))
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (no_decay if parameter.dim() < 2 or "norm" in name else decay).append(parameter)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, config.warmup_ratio, config.schedule))
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16" and device.type == "cuda")
    encoder = getattr(model, "model", model)
    encoder.gradient_checkpointing = config.gradient_checkpointing
    compute_loss = compute_loss or (lambda m, b: task_loss(m(b["input_ids"], b["attention_mask"]), b["labels"]))

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, desc="finetune", unit="step")
    history, step, running = [], 0, None
    model.train()
    try:
        while step < total_steps:
            for batch in batches(train, config.batch_size, model.config.pad_token_id, config.task, device, shuffle):
                with autocast_context(config.precision, device):
                    loss = compute_loss(model, batch)
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                step += 1
                running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
                record = {"step": step, "loss": running}
                evaluate_now = eval_examples is not None and (
                    (config.eval_every and step % config.eval_every == 0) or step == total_steps
                )
                if evaluate_now:
                    record["eval_accuracy"] = evaluate(model, eval_examples, config.task, precision=config.precision)
                    if log:
                        log(f"step {step}: loss {running:.4f}, eval accuracy {record['eval_accuracy']:.4f}")
                history.append(record)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix({k: f"{v:.4f}" for k, v in record.items() if k != "step"})
                if step >= total_steps:
                    break
    finally:
        if bar is not None:
            bar.close()
        encoder.gradient_checkpointing = False
    model.eval()
    return history


def read_jsonl(path: str | Path, tokenizer=None, max_length: int | None = None) -> list[dict]:
    """Examples from a JSONL file; ``"text"`` fields are tokenized with ``tokenizer``."""
    examples = []
    for line_number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        if "input_ids" not in record:
            if "text" not in record:
                raise ValueError(f"{path}:{line_number}: an example needs 'input_ids' or 'text'")
            if tokenizer is None:
                raise ValueError(f"{path}:{line_number}: 'text' needs a tokenizer in the model folder")
            record["input_ids"] = tokenizer(record["text"], truncation=max_length is not None,
                                            max_length=max_length)["input_ids"]
        if "label" not in record and "labels" not in record:
            raise ValueError(f"{path}:{line_number}: an example needs 'label' (sequence) or 'labels' (token)")
        examples.append(record)
    return examples


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="modernbert-finetune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a folder with config.json + model.safetensors")
    parser.add_argument("--train", required=True, help="JSONL training examples")
    parser.add_argument("--eval", help="JSONL evaluation examples")
    parser.add_argument("--out", required=True, help="where to save_pretrained the fine-tuned model")
    parser.add_argument("--task", choices=["sequence", "token"], default="sequence")
    parser.add_argument("--num-labels", type=int, help="classes (default: from the model's config)")
    parser.add_argument("--max-length", type=int, help="truncate tokenized texts")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    casts = {"int": int, "float": float, "str": str, "int | None": int}
    for field in dataclasses.fields(TrainingConfig):
        if field.name == "task":
            continue
        flag = "--" + field.name.replace("_", "-")
        if field.type == "bool":
            parser.add_argument(flag, action="store_true")
        else:
            parser.add_argument(flag, type=casts[field.type], default=field.default)
    args = parser.parse_args(argv)

    from . import ModernBertConfig, ModernBertForSequenceClassification, ModernBertForTokenClassification
    from .loading import _align_prefix, read_state_dict

    config = ModernBertConfig.from_pretrained(args.model)
    if args.num_labels:
        config.id2label = {i: f"LABEL_{i}" for i in range(args.num_labels)}
    model_class = ModernBertForSequenceClassification if args.task == "sequence" else ModernBertForTokenClassification
    model = model_class(config)
    own = model.state_dict()
    state = _align_prefix(read_state_dict(args.model), set(own))
    # The encoder must load; a task head of another shape (new labels) starts fresh.
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k.startswith("model.") and k not in usable]
    if missing:
        parser.error(f"{args.model} lacks encoder weights: {missing[:5]}")
    model.load_state_dict(usable, strict=False)
    tokenizer = None
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
    except Exception:  # noqa: BLE001 - pre-tokenized data needs no tokenizer
        tokenizer = None
    train = read_jsonl(args.train, tokenizer, args.max_length)
    eval_examples = read_jsonl(args.eval, tokenizer, args.max_length) if args.eval else None
    training = TrainingConfig(task=args.task, **{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingConfig)
                                                  if f.name != "task"})
    model = model.to(args.device)
    history = finetune(model, train, eval_examples, training, log=print)
    model.save_pretrained(args.out)
    (Path(args.out) / "training_history.json").write_text(json.dumps(history))
    final = history[-1] if history else {}
    print(f"saved to {args.out}; final loss {final.get('loss', float('nan')):.4f}"
          + (f", eval accuracy {final['eval_accuracy']:.4f}" if "eval_accuracy" in final else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
