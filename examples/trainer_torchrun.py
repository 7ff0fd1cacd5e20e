"""Fine-tune transformers' ModernBERT (or any encoder classifier) with this package's attention, by
transformers' Trainer, on one process or many under torchrun.

    torchrun --standalone --nproc-per-node 2 examples/trainer_torchrun.py \
        --model path/to/checkpoint --train train.jsonl --out OUT [--attn sdpa]

JSONL lines are ``{"text": ..., "label": ...}`` (tokenized with the folder's tokenizer) or
``{"input_ids": [...], "label": ...}``. ``--batch-size`` is the global batch: Trainer's
per-device batch is it divided by the process count. Rank 0 writes the model and
``OUT/log_history.json`` (Trainer's log: the loss at every ``--logging-steps``). On the CPU the
processes talk through gloo (``ddp_backend``), on GPUs through NCCL.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a transformers checkpoint folder (or Hub id)")
    parser.add_argument("--train", required=True, help="JSONL examples")
    parser.add_argument("--out", required=True)
    parser.add_argument("--attn", default="modernbert_kernels", help="attn_implementation (e.g. sdpa to compare)")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per optimizer step, all processes")
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--logging-steps", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import transformers

    from modernbert.train import collate, exit_skipping_finalization, read_jsonl
    from modernbert_kernels.integrations.transformers import register

    register()
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if args.batch_size % processes:
        parser.error(f"--batch-size {args.batch_size} is not divisible by the {processes} processes")
    cpu = not torch.cuda.is_available()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError):  # pre-tokenized data needs none
        tokenizer = None
    model = transformers.AutoModelForSequenceClassification.from_pretrained(args.model, attn_implementation=args.attn)
    pad_token_id = model.config.pad_token_id or 0
    training = transformers.TrainingArguments(
        output_dir=args.out, per_device_train_batch_size=args.batch_size // processes, max_steps=args.max_steps,
        learning_rate=args.learning_rate, logging_steps=args.logging_steps, seed=args.seed, data_seed=args.seed,
        use_cpu=cpu, ddp_backend="gloo" if cpu and processes > 1 else None, save_strategy="no", report_to=[],
        disable_tqdm=False,
    )
    trainer = transformers.Trainer(
        model=model, args=training, train_dataset=read_jsonl(args.train, tokenizer),
        data_collator=lambda examples: collate(examples, pad_token_id, "sequence", "cpu"),
    )
    trainer.train()
    if trainer.is_world_process_zero():
        trainer.save_model(args.out)
        Path(args.out, "log_history.json").write_text(json.dumps(trainer.state.log_history))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # rank 0 may still be writing
        torch.distributed.destroy_process_group()
        exit_skipping_finalization(0)  # no gloo thread left to abort the exit


if __name__ == "__main__":
    main()
