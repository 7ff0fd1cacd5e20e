"""Fine-tuning the encoder's heads: a training loop that also runs under torchrun, and its CLI.

``finetune(model, train, eval, TrainingConfig(...))`` trains a ModernBertForSequenceClassification
or ModernBertForTokenClassification with AdamW, linear warmup then linear (or cosine) decay,
gradient clipping, optional bf16 / fp16 autocast (with a gradient scaler for fp16 on CUDA),
gradient checkpointing and gradient accumulation. Batches are padded to their longest example and
the model packs them (no FLOP on padding), so the attention runs on the block-sparse kernels,
backward included.

Under ``torchrun`` (WORLD_SIZE > 1) every process takes its share of each global batch (the same
shuffled order everywhere, ``batch_size`` examples per optimizer step in all), gradients are
averaged by DistributedDataParallel (gloo on the CPU, NCCL on CUDA) or the layers are sharded
with FSDP2 (``fsdp=True``), and only rank 0 logs, shows progress and writes. Each process scales
its loss so that the averaged gradient is the global batch's mean: 1 and N processes train the
same weights. Checkpoints (``save_every``; model, optimizer, scheduler, scaler, every rank's RNG
state, the step) resume an interrupted run where it stopped.

Data: lists of examples ``{"input_ids": [...], "label": int}`` (sequence) or
``{"input_ids": [...], "labels": [...]}`` (token; -100 ignores a position), or JSONL files of the
same, or with ``"text"`` instead of ``"input_ids"`` tokenized by the model folder's tokenizer.

    modernbert-finetune --model DIR --train train.jsonl --eval eval.jsonl --out OUT
    torchrun --standalone --nproc-per-node 2 -m modernbert.train --model DIR ... [--fsdp]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, NoReturn

import torch
import torch.distributed as dist
from torch import nn

from .outputs import IGNORE_INDEX

CHECKPOINT_PREFIX = "checkpoint-"
TRAINING_STATE = "training_state.pt"


@dataclasses.dataclass
class TrainingConfig:
    task: str = "sequence"  # "sequence" or "token"
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs when set
    batch_size: int = 16  # examples per optimizer step, over all processes and accumulation steps
    accumulate: int = 1  # each process's share of a batch runs as this many forward/backward passes
    learning_rate: float = 5e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    schedule: str = "linear"  # after warmup: "linear" or "cosine" decay to 0
    max_grad_norm: float = 1.0
    precision: str = "fp32"  # "fp32", "bf16" (autocast) or "fp16" (autocast + grad scaler on CUDA)
    gradient_checkpointing: bool = False
    fsdp: bool = False  # under torchrun: shard parameters, gradients and optimizer state (FSDP2)
    eval_every: int = 0  # steps between evaluations (0: at the end only)
    save_every: int = 0  # steps between checkpoints in checkpoint_dir (0: none; one at the end when set)
    checkpoint_dir: str | None = None
    seed: int = 0

    def __post_init__(self):
        if self.task not in ("sequence", "token"):
            raise ValueError(f"task must be 'sequence' or 'token', got {self.task!r}")
        if self.schedule not in ("linear", "cosine"):
            raise ValueError(f"schedule must be 'linear' or 'cosine', got {self.schedule!r}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.batch_size < 1 or self.accumulate < 1:
            raise ValueError(f"batch_size and accumulate must be >= 1, got {self.batch_size}, {self.accumulate}")
        if self.save_every and not self.checkpoint_dir:
            raise ValueError("save_every needs checkpoint_dir")


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


def batches(examples: list[dict], batch_size: int, pad_token_id: int, task: str, device, order=None):
    """Padded batches of ``examples`` in ``order`` (default: as given)."""
    order = range(len(examples)) if order is None else order
    for start in range(0, len(order), batch_size):
        yield collate([examples[i] for i in order[start:start + batch_size]], pad_token_id, task, device)


def scored_items(examples: list[dict], task: str) -> int:
    """What a batch's mean loss divides by: examples, or labelled positions for token tasks."""
    if task == "sequence":
        return len(examples)
    return sum(sum(1 for label in e["labels"] if label != IGNORE_INDEX) for e in examples)


def autocast_context(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


@torch.no_grad()
def evaluate(model: nn.Module, examples: list[dict], task: str, batch_size: int = 32, precision: str = "fp32",
             pad_token_id: int | None = None) -> float:
    """Accuracy over the examples (over labelled positions for token classification). Every
    process of a distributed run evaluates all of them (an FSDP forward needs every rank)."""
    device = next(model.parameters()).device
    pad_token_id = _unwrapped(model).config.pad_token_id if pad_token_id is None else pad_token_id
    was_training = model.training
    model.eval()
    correct = total = 0
    for batch in batches(examples, batch_size, pad_token_id, task, device):
        with autocast_context(precision, device):
            logits = model(batch["input_ids"], batch["attention_mask"]).logits
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


# --- processes ----------------------------------------------------------------------------------

def world() -> tuple[int, int]:
    """(rank, world size): (0, 1) outside a distributed run."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: torch.device | str | None = None) -> torch.device:
    """Join the process group torchrun describes (WORLD_SIZE > 1), once; returns this process's
    device (its LOCAL_RANK's GPU under CUDA)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def _unwrapped(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _parallel(model: nn.Module, config: TrainingConfig, device: torch.device) -> nn.Module:
    """DDP or FSDP2 around ``model`` in a distributed run; ``model`` itself otherwise."""
    _, size = world()
    if size == 1:
        return model
    if config.fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in _unwrapped(model).model.layers:
            fully_shard(layer)
        return fully_shard(model)
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _gradient_sync(model: nn.Module, sync: bool):
    """Only the last accumulation pass averages gradients across processes."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext() if sync else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def epoch_order(count: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of one epoch: the same in every process, and from (seed, epoch) alone,
    so a resumed run sees the data of the run it continues."""
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


def shard(examples: list, rank: int, size: int, parts: int) -> list[list]:
    """This process's share of a global batch, cut into ``parts`` micro-batches (strided, so the
    shares differ by at most one example); empty micro-batches are dropped."""
    share = examples[rank::size]
    return [share[i::parts] for i in range(parts) if share[i::parts]]


# --- checkpoints --------------------------------------------------------------------------------

def _full_states(model: nn.Module, optimizer) -> tuple[dict, dict]:
    """Full (unsharded) model and optimizer state dicts, on the CPU."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    if world()[1] > 1 and not isinstance(model, nn.parallel.DistributedDataParallel):  # FSDP2
        return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return _unwrapped(model).state_dict(), optimizer.state_dict()


def _load_full_states(model: nn.Module, optimizer, model_state: dict, optimizer_state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    if world()[1] > 1 and not isinstance(model, nn.parallel.DistributedDataParallel):  # FSDP2
        set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                       options=StateDictOptions(full_state_dict=True))
    else:
        _unwrapped(model).load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def save_checkpoint(directory: Path, step: int, model, optimizer, scheduler, scaler, history, device) -> Path | None:
    """Every process takes part (FSDP gathers shards, RNG states are collected); rank 0 writes
    ``directory/checkpoint-<step>/training_state.pt`` (and the model's config.json), atomically."""
    rank, size = world()
    model_state, optimizer_state = _full_states(model, optimizer)
    rng = [None] * size
    if size > 1:
        dist.all_gather_object(rng, _rng_state(device))
    else:
        rng = [_rng_state(device)]
    path = None
    if rank == 0:
        path = Path(directory) / f"{CHECKPOINT_PREFIX}{step}"
        partial = path.with_name(path.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        torch.save({"step": step, "model": model_state, "optimizer": optimizer_state,
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rng,
                    "history": history, "world_size": size}, partial / TRAINING_STATE)
        _unwrapped(model).config.save_pretrained(partial)
        shutil.rmtree(path, ignore_errors=True)
        partial.rename(path)  # a run killed while writing leaves only a .partial folder
    if size > 1:
        dist.barrier()
    return path


def latest_checkpoint(directory: str | Path) -> Path:
    """``directory`` itself when it is a checkpoint, else its newest complete checkpoint-<step>."""
    directory = Path(directory)
    if (directory / TRAINING_STATE).exists():
        return directory
    found = [p for p in directory.glob(f"{CHECKPOINT_PREFIX}*")
             if p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / TRAINING_STATE).exists()]
    if not found:
        raise FileNotFoundError(f"no checkpoint in {directory} (expected {CHECKPOINT_PREFIX}<step>/{TRAINING_STATE})")
    return max(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def _resume(path: Path, model, optimizer, scheduler, scaler, device) -> tuple[int, list]:
    """Every process reads the checkpoint; returns (step, history)."""
    state = torch.load(path / TRAINING_STATE, map_location="cpu", weights_only=False)
    _load_full_states(model, optimizer, state["model"], state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    rank, size = world()
    if state["world_size"] == size:  # the same processes: each continues its own random stream
        rng = state["rng"][rank]
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], device)
    return state["step"], state["history"]


# --- the loop -----------------------------------------------------------------------------------

def finetune(model: nn.Module, train: list[dict], eval_examples: list[dict] | None = None,
             config: TrainingConfig | None = None, *, compute_loss: Callable | None = None,
             progress: bool = True, log: Callable[[str], None] | None = None,
             resume_from: str | Path | None = None) -> list[dict]:
    """Train ``model`` in place; returns the history [{"step", "loss", "eval_accuracy"?}].

    ``compute_loss(model, batch) -> loss``, the batch's mean loss, replaces the task's cross
    entropy (distillation uses it). In a distributed run (torchrun) ``model`` is wrapped in DDP or,
    with ``config.fsdp``, sharded in place by FSDP2; ``resume_from`` (a checkpoint, or a folder
    of them: the newest) continues an interrupted run.
    """
    config = config or TrainingConfig()
    device = init_distributed(next(model.parameters()).device)
    if device != next(model.parameters()).device:
        model.to(device)
    rank, size = world()
    torch.manual_seed(config.seed + rank)  # dropout differs per process, as per example it would
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    total_steps = config.max_steps or max(1, int(config.epochs * steps_per_epoch))
    encoder = model.model
    encoder.gradient_checkpointing = config.gradient_checkpointing
    pad_token_id = model.config.pad_token_id
    wrapped = _parallel(model, config, device)
    decay, no_decay = [], []
    for name, parameter in wrapped.named_parameters():
        if parameter.requires_grad:
            (no_decay if parameter.dim() < 2 or "norm" in name else decay).append(parameter)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, config.warmup_ratio, config.schedule))
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16" and device.type == "cuda")
    compute_loss = compute_loss or (lambda m, b: m(b["input_ids"], b["attention_mask"], labels=b["labels"]).loss)

    step, history = 0, []
    if resume_from is not None:
        step, history = _resume(latest_checkpoint(resume_from), wrapped, optimizer, scheduler, scaler, device)
    log = log if rank == 0 else None
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=step, desc="finetune", unit="step")
    running = history[-1]["loss"] if history else None
    wrapped.train()
    try:
        while step < total_steps:
            epoch, index = divmod(step, steps_per_epoch)
            order = epoch_order(len(train), config.seed, epoch)
            examples = [train[i] for i in order[index * config.batch_size:(index + 1) * config.batch_size]]
            # Each process's loss is its share of the global batch's mean: sum over its items /
            # all items, times the process count that DDP's averaging divides by.
            everything = scored_items(examples, config.task)
            micro_batches = shard(examples, rank, size, config.accumulate)
            if not micro_batches:
                raise ValueError(f"a global batch of {len(examples)} examples leaves process {rank} of {size} "
                                 "without any: use fewer processes or a larger batch_size")
            step_loss = torch.zeros((), device=device)
            for position, part in enumerate(micro_batches):
                batch = collate(part, pad_token_id, config.task, device)
                with _gradient_sync(wrapped, position == len(micro_batches) - 1):
                    with autocast_context(config.precision, device):
                        loss = compute_loss(wrapped, batch) * (scored_items(part, config.task) * size / everything)
                    scaler.scale(loss).backward()
                step_loss += loss.detach()
            if size > 1:
                dist.all_reduce(step_loss)
            step_loss = step_loss.item() / size
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(wrapped.parameters(), config.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            running = step_loss if running is None else 0.9 * running + 0.1 * step_loss
            record = {"step": step, "loss": running}
            evaluate_now = eval_examples is not None and (
                (config.eval_every and step % config.eval_every == 0) or step == total_steps
            )
            if evaluate_now:
                record["eval_accuracy"] = evaluate(wrapped, eval_examples, config.task, precision=config.precision,
                                                   pad_token_id=pad_token_id)
                if log:
                    log(f"step {step}: loss {running:.4f}, eval accuracy {record['eval_accuracy']:.4f}")
            history.append(record)
            if config.save_every and (step % config.save_every == 0 or step == total_steps):
                path = save_checkpoint(Path(config.checkpoint_dir), step, wrapped, optimizer, scheduler, scaler,
                                       history, device)
                if log:
                    log(f"step {step}: checkpoint {path}")
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{v:.4f}" for k, v in record.items() if k != "step"})
    finally:
        if bar is not None:
            bar.close()
        encoder.gradient_checkpointing = False
    model.eval()
    return history


def full_state_dict(model: nn.Module) -> dict:
    """The model's whole state dict on the CPU, FSDP-sharded or not (every process must call)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if any(type(p).__name__ == "DTensor" for p in model.parameters()):
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return model.state_dict()


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
    parser.add_argument("--model", required=True, help="a folder with config.json + model.safetensors, or a Hub id")
    parser.add_argument("--train", required=True, help="JSONL training examples")
    parser.add_argument("--eval", help="JSONL evaluation examples")
    parser.add_argument("--out", required=True, help="where to save_pretrained the fine-tuned model")
    parser.add_argument("--task", choices=["sequence", "token"], default="sequence")
    parser.add_argument("--num-labels", type=int, help="classes (default: from the model's config)")
    parser.add_argument("--max-length", type=int, help="truncate tokenized texts")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--resume", help="continue from this checkpoint, or the newest checkpoint-<step> in it")
    casts = {"int": int, "float": float, "str": str, "int | None": int}
    for field in dataclasses.fields(TrainingConfig):
        if field.name in ("task", "checkpoint_dir"):  # checkpoints go to --out
            continue
        flag = "--" + field.name.replace("_", "-")
        if field.type == "bool":
            parser.add_argument(flag, action="store_true")
        else:
            parser.add_argument(flag, type=casts[field.type], default=field.default)
    args = parser.parse_args(argv)

    from . import ModernBertConfig, ModernBertForSequenceClassification, ModernBertForTokenClassification
    from .hub import resolve

    device = init_distributed(args.device)
    rank, _ = world()
    torch.manual_seed(args.seed)  # a fresh task head starts the same in every process
    folder = resolve(args.model)  # a local folder or a Hub id
    config = ModernBertConfig.from_pretrained(folder)
    if args.num_labels:
        config.id2label = {i: f"LABEL_{i}" for i in range(args.num_labels)}
    model_class = ModernBertForSequenceClassification if args.task == "sequence" else ModernBertForTokenClassification
    try:  # the encoder must load; a task head of another shape (new labels) starts fresh
        model = model_class.from_pretrained(folder, config=config, ignore_mismatched_sizes=True)
    except ValueError as err:
        parser.error(str(err))
    tokenizer = None
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception:  # noqa: BLE001 - pre-tokenized data needs no tokenizer
        tokenizer = None
    train = read_jsonl(args.train, tokenizer, args.max_length)
    eval_examples = read_jsonl(args.eval, tokenizer, args.max_length) if args.eval else None
    training = TrainingConfig(task=args.task, checkpoint_dir=args.out if args.save_every else None,
                              **{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingConfig)
                                 if f.name not in ("task", "checkpoint_dir")})
    model = model.to(device)
    history = finetune(model, train, eval_examples, training, log=print, resume_from=args.resume)
    state = full_state_dict(model)  # every process takes part when FSDP holds shards
    if rank == 0:
        model.save_pretrained(args.out, state_dict=state)
        (Path(args.out) / "training_history.json").write_text(json.dumps(history))
        final = history[-1] if history else {}
        print(f"saved to {args.out}; final loss {final.get('loss', float('nan')):.4f}"
              + (f", eval accuracy {final['eval_accuracy']:.4f}" if "eval_accuracy" in final else ""))
    if dist.is_initialized():
        dist.barrier()  # rank 0 may still be writing; a peer leaving early aborts gloo
        dist.destroy_process_group()
    return 0


def exit_skipping_finalization(code: int = 0) -> NoReturn:
    """End a process that joined a process group without the interpreter's finalization. A gloo
    worker thread can still be dropping the last reference to a tensor of the final collective
    when finalization starts; it then cannot take the GIL and the process aborts ("terminate
    called without an active exception", pytorch/pytorch#190489) after a run that finished and
    saved (seen once in CI: FSDP2 on gloo, rank 1)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cli(argv=None) -> None:
    """The console script: ``main``, then, in a process that joined a process group, an exit that
    skips the interpreter's finalization."""
    joined = int(os.environ.get("WORLD_SIZE", "1")) > 1
    code = main(argv)
    if joined:
        exit_skipping_finalization(code)
    raise SystemExit(code)


if __name__ == "__main__":
    cli()
