"""Fine-tuning wall time on 1 process and on N under torchrun (DDP, FSDP2), the same work.

The same global batches (``--examples`` examples of ``--seq-len`` tokens in batches of 16, one
epoch) through ``modernbert-finetune``: 1 process with all the machine's threads, 1 process with
one thread (the per-core baseline), then N processes (torchrun gives each one thread unless
OMP_NUM_THREADS says otherwise). Wall time of the whole command (start-up included), median of
``--repeats`` runs, alternating.

    python -m benchmarks.distributed_training --out benchmarks/results/local
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.report import result_rows, write_report
from benchmarks.timing import summarize


def write_inputs(folder: Path, examples: int, seq_len: int) -> None:
    """A small ModernBERT (4 layers, hidden 128; global and local layers) and random labelled data."""
    from modernbert import ModernBertConfig, ModernBertForSequenceClassification

    torch.manual_seed(0)
    config = ModernBertConfig(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                              num_attention_heads=4, max_position_embeddings=max(seq_len, 1024), pad_token_id=0,
                              id2label={0: "no", 1: "yes"})
    ModernBertForSequenceClassification(config).save_pretrained(folder / "model")
    rng = random.Random(0)
    lines = [json.dumps({"input_ids": [rng.randrange(3, 1024) for _ in range(seq_len)], "label": rng.randrange(2)})
             for _ in range(examples)]
    (folder / "train.jsonl").write_text("\n".join(lines))


def command(folder: Path, processes: int, engine: str) -> list[str]:
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    return launcher + ["-m", "modernbert.train", "--model", str(folder / "model"), "--train", str(folder / "train.jsonl"),
                       "--out", str(folder / f"out-{processes}-{engine}"), "--batch-size", "16", "--epochs", "1"] + (
        ["--fsdp"] if engine == "fsdp" else [])


def run(processes: int = 2, examples: int = 384, seq_len: int = 1024, repeats: int = 3, progress=print) -> list[dict]:
    setups = [(1, "single"), (1, "one_thread"), (processes, "ddp"), (processes, "fsdp")]
    samples = {setup: [] for setup in setups}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_inputs(folder, examples, seq_len)
        for round_index in range(repeats):  # alternating, so drift in machine speed hits every setup alike
            for setup in setups:
                start = time.perf_counter()
                threads = {"OMP_NUM_THREADS": "1"} if setup[1] == "one_thread" else {}
                done = subprocess.run(command(folder, *setup), capture_output=True, text=True,
                                      env={**os.environ, **threads})
                if done.returncode != 0:
                    raise RuntimeError(f"{setup} failed:\n{done.stderr[-3000:]}")
                samples[setup].append((time.perf_counter() - start) * 1e3)
                progress(f"round {round_index + 1}: {setup[0]} process(es), {setup[1]}: {samples[setup][-1] / 1e3:.1f} s")
    names = {setup: ("1_process" if setup == (1, "single") else "1_process_1_thread" if setup[0] == 1
                     else f"{setup[0]}_processes_{setup[1]}") for setup in setups}
    measured = {names[setup]: summarize(times) for setup, times in samples.items()}
    steps = -(-examples // 16)
    return result_rows("training", f"finetune {examples} x {seq_len} tokens", measured, "1_process", seq_len=seq_len,
                       tokens=examples * seq_len, per_provider=lambda name: {
                           "tokens_per_s": examples * seq_len / (measured[name]["median_ms"] * 1e-3), "steps": steps})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--examples", type=int, default=384)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/local")
    args = parser.parse_args(argv)
    rows = run(args.processes, args.examples, args.seq_len, args.repeats)
    write_report(rows, args.out, torch.device("cpu"), "distributed-training")


if __name__ == "__main__":
    main()
