"""Training on existing engines: torchrun (DDP, FSDP2) with 2 gloo processes on the CPU, resumable
checkpoints, transformers' Trainer on this package's heads, and transformers' own ModernBERT with
this package's attention under Trainer + torchrun."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from context_task import make_dataset, tiny_config
from modernbert import ModernBertForSequenceClassification, ModernBertForTokenClassification
from modernbert.train import TrainingConfig, collate, finetune, shard

ROOT = Path(__file__).parents[1]
# 40 examples in global batches of 8: 5 steps an epoch, so 8 steps cross an epoch boundary.
STEPS = ["--max-steps", "8", "--batch-size", "8", "--learning-rate", "2e-3"]
# fp32 sums in another order (2 processes reduce their halves' gradients, matmuls of half the
# rows): a few ulps per gradient. AdamW divides each update by the gradient's running RMS, so for
# near-zero gradients such ulps can move a weight by a good part of one step (lr 2e-3). Measured:
# 6.5e-6 with the C++ kernels, 5.8e-5 on the torch path; a wrong split (a batch counted twice or
# dropped, a loss not rescaled) moves weights by ~1e-2.
ATOL = 5e-4


def small_config(**overrides):
    return tiny_config(hidden_size=64, num_attention_heads=2, num_hidden_layers=2,
                       layer_types=["sliding_attention", "full_attention"], **overrides)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A saved model and its training data (JSONL)."""
    path = tmp_path_factory.mktemp("distributed")
    torch.manual_seed(6)
    ModernBertForSequenceClassification(small_config()).save_pretrained(path / "model")
    torch.manual_seed(6)
    ModernBertForSequenceClassification(small_config(classifier_dropout=0.2)).save_pretrained(path / "dropout")
    data = make_dataset(40, seed=6, seq_len=128, region=16)
    (path / "train.jsonl").write_text("\n".join(json.dumps(d) for d in data))
    return path


def finetune_command(processes: int, script=("-m", "modernbert.train")) -> list[str]:
    if processes == 1:
        return [sys.executable, *script]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", *script]


def run(command: list[str], check: bool = True) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT, env=environment)
    if check:
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def train_cli(folder, out, processes=1, model="model", extra=(), script=("-m", "modernbert.train"), check=True):
    return run(finetune_command(processes, script) + [
        "--model", str(folder / model), "--train", str(folder / "train.jsonl"), "--out", str(out), *STEPS, *extra,
    ], check=check)


def weights(path: Path) -> dict:
    return load_file(str(path / "model.safetensors"))


def assert_same_weights(a: dict, b: dict, atol: float):
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, worst


@pytest.fixture(scope="module")
def one_process(folder):
    train_cli(folder, folder / "one")
    return weights(folder / "one")


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_two_processes_train_the_weights_of_one(folder, one_process, engine):
    """The same global batches on 1 process and on 2 (each its half, as two accumulation passes):
    the same weights within fp32 reduction-order tolerance; rank 0 alone logs and writes."""
    extra = ["--accumulate", "2"] + (["--fsdp"] if engine == "fsdp" else [])
    done = train_cli(folder, folder / engine, processes=2, extra=extra)
    assert done.stdout.count("saved to") == 1
    assert_same_weights(weights(folder / engine), one_process, ATOL)
    history = json.loads((folder / engine / "training_history.json").read_text())
    assert [h["step"] for h in history] == list(range(1, 9))


def test_accumulation_splits_a_batch_without_changing_the_step():
    """accumulate=4 runs each batch as 4 passes and gives the step of one pass over it (token task:
    the loss is per labelled position, so uneven passes weigh right)."""
    rng = torch.Generator().manual_seed(3)
    examples = []
    for n in (40, 17, 33, 25, 9, 40, 12, 31):
        labels = torch.randint(0, 2, (n,), generator=rng)
        labels[torch.rand(n, generator=rng) < 0.3] = -100
        examples.append({"input_ids": torch.randint(3, 32, (n,), generator=rng).tolist(), "labels": labels.tolist()})
    trained = []
    for accumulate in (1, 4):
        torch.manual_seed(0)
        model = ModernBertForTokenClassification(small_config())
        finetune(model, examples, config=TrainingConfig(task="token", max_steps=3, batch_size=8,
                                                        accumulate=accumulate, learning_rate=1e-3), progress=False)
        trained.append(model.state_dict())
    assert_same_weights(*trained, atol=1e-5)


def test_shards_cover_the_batch_once():
    batch = list(range(11))
    parts = [p for rank in range(3) for p in shard(batch, rank, 3, 2)]
    assert sorted(x for p in parts for x in p) == batch
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert shard([0], 1, 2, 1) == []  # a process left without examples gets nothing (finetune refuses)


# The CLI, killed (SIGKILL, no clean-up) right after it wrote checkpoint KILL_AT, mid-epoch.
KILLED_RUN = """
import os, signal, sys
import modernbert.train as train

save = train.save_checkpoint


def save_then_die(directory, step, *args, **kwargs):
    path = save(directory, step, *args, **kwargs)
    if step == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)
    return path


train.save_checkpoint = save_then_die
train.cli(sys.argv[1:])
"""


@pytest.mark.parametrize("processes", [1, 2])
def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_one(folder, tmp_path, processes):
    """With dropout in the head, so the restored RNG states matter. Under torchrun rank 0 writes
    the checkpoint and every rank reads it."""
    killer = tmp_path / "killed_run.py"
    killer.write_text(KILLED_RUN.format(kill_at=3))
    save = ["--save-every", "3"]
    train_cli(folder, tmp_path / "whole", processes, model="dropout", extra=save)
    killed = train_cli(folder, tmp_path / "resumed", processes, model="dropout", extra=save, script=(str(killer),),
                       check=False)
    assert killed.returncode != 0
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir()) == ["checkpoint-3"]
    train_cli(folder, tmp_path / "resumed", processes, model="dropout",
              extra=save + ["--resume", str(tmp_path / "resumed")])
    assert_same_weights(weights(tmp_path / "resumed"), weights(tmp_path / "whole"), atol=1e-6)
    history = json.loads((tmp_path / "resumed" / "training_history.json").read_text())
    assert history == json.loads((tmp_path / "whole" / "training_history.json").read_text())
    assert {p.name for p in (tmp_path / "resumed").glob("checkpoint-*")} == {"checkpoint-3", "checkpoint-6",
                                                                             "checkpoint-8"}


def test_transformers_trainer_trains_our_head(tmp_path):
    """Trainer calls model(**batch) with labels and reads .loss: no adapter."""
    import transformers

    torch.manual_seed(0)
    model = ModernBertForSequenceClassification(small_config())
    data = make_dataset(256, seed=3, seq_len=128, region=16)
    arguments = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=16, max_steps=40, learning_rate=3e-3, use_cpu=True,
        report_to=[], logging_steps=5, save_strategy="no", disable_tqdm=True, seed=0,
    )
    trainer = transformers.Trainer(model=model, args=arguments, train_dataset=data,
                                   data_collator=lambda examples: collate(examples, 0, "sequence", "cpu"))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print("Trainer losses every 5 steps:", [round(x, 4) for x in losses])
    assert len(losses) == 8
    assert sum(losses[-2:]) / 2 < 0.8 * sum(losses[:2]) / 2


def test_transformers_modernbert_with_our_attention_under_trainer_and_torchrun(tmp_path):
    """transformers' ModernBERT, attn_implementation="modernbert_kernels", fine-tuned by Trainer
    on 2 gloo processes: the loss curve of sdpa's, step by step."""
    import transformers

    torch.manual_seed(0)
    config = transformers.ModernBertConfig(
        vocab_size=32, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
        local_attention=32, global_attn_every_n_layers=2, max_position_embeddings=256, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2, num_labels=2,
    )
    transformers.ModernBertForSequenceClassification(config).save_pretrained(tmp_path / "hf")
    data = make_dataset(64, seed=6, seq_len=128, region=16)
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(d) for d in data))
    curves = {}
    for attention in ("sdpa", "modernbert_kernels"):
        run(finetune_command(2, ("examples/trainer_torchrun.py",)) + [
            "--model", str(tmp_path / "hf"), "--train", str(tmp_path / "train.jsonl"),
            "--out", str(tmp_path / attention), "--attn", attention, "--max-steps", "8", "--batch-size", "8",
            "--learning-rate", "3e-4",
        ])
        log = json.loads((tmp_path / attention / "log_history.json").read_text())
        curves[attention] = [h["loss"] for h in log if "loss" in h]
    print("loss curves:", curves)
    assert len(curves["sdpa"]) == 8
    torch.testing.assert_close(torch.tensor(curves["modernbert_kernels"]), torch.tensor(curves["sdpa"]),
                               rtol=1e-4, atol=1e-5)
