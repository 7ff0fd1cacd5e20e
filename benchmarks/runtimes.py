"""ModernBERT on the CPU: ours against the runtimes users pick instead, on one checkpoint.

Engines, each at the precisions it offers: transformers (sdpa, fp32); ours (fp32, bf16, int8; a
``FrozenEncoder`` of the model, as a deployment runs it: the model's outputs, bit for bit);
OpenVINO (``ov.convert_model`` of the transformers model; fp32, bf16, NNCF int8); ONNX Runtime
(``torch.onnx.export``; fp32, dynamic int8). Workloads: a full batch of 8 x 512 tokens, 32
documents of 16-512 tokens padded to the longest, one sequence of 8192 tokens, and one query of 16
tokens (latency: a few tokens' products per weight read, and every op's fixed cost). Every engine
runs on the same weights (ModernBERT-base shapes, random, vocabulary cut to 1024), on the same
number of threads, in the same run.

Each engine at each precision runs in a process of its own (an engine's idle thread pool slows
the next one's), after one process has exported the checkpoint. With ``--rounds N`` every engine's
process runs N times, the engines interleaved round by round, and each row pools the samples of all
rounds: a drift in the machine's speed (these 2-core VMs move 10-30% within an hour) then falls on
every engine alike. Each row reports the median time
and the drift from transformers' fp32 output over the real tokens (padding excluded): the minimum
per-token cosine. An engine whose output holds a NaN or an Inf on a real token is reported as
wrong (``note``), not ranked. So is an OpenVINO or ONNX Runtime engine that fails to load or run:
its rows have no time and its error in ``note``, and the other engines' results are kept. bf16
rows appear where the CPU has bf16 units (AVX512_BF16 or AMX) and oneDNN is not capped below them
(``cpu_has_bf16``): elsewhere OpenVINO runs bf16 as fp32 and ours would be emulated. Our int8
model runs its attention on bf16 q, k, v on those CPUs, in fp32 elsewhere, and OpenVINO's int8
model runs its unquantized ops (the attention among them) in the same precision, its own default
on such CPUs (``attention_dtype``).
Needs the ``runtimes`` extra (pip install -e '.[runtimes]').

    python -m benchmarks.runtimes --out benchmarks/results/local
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.encoder import BASE
from benchmarks.encoder import batch as encoder_batch
from benchmarks.report import _slug, result_rows
from benchmarks.timing import summarize, time_cpu
from modernbert import FrozenEncoder, ModernBertModel, quantize_int8
from modernbert_kernels.cpu_linear import cpu_has_bf16

# Smoke: the same code paths on a model small enough to export and convert in seconds.
SMOKE = dict(BASE, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=2,
             global_attn_every_n_layers=3, local_attention=32)


def workloads(smoke: bool, quick: bool) -> dict[str, list[int]]:
    """{name: sequence lengths}: a full batch, mixed lengths (log-uniform, fixed seed), one long
    sequence (not in --quick), one short query."""
    generator = torch.Generator().manual_seed(2)
    (full_batch, full_length), (low, high, count), long = ((2, 64), (8, 64, 6), 256) if smoke else \
        ((8, 512), (16, 512, 32), 8192)
    mixed = torch.empty(count).uniform_(float(torch.tensor(low).log()), float(torch.tensor(high).log()),
                                        generator=generator).exp().long().tolist()
    found = {f"full {full_batch} x {full_length}": [full_length] * full_batch,
             f"mixed {count} docs {low}-{high}": mixed}
    if not quick or smoke:
        found[f"one sequence of {long}"] = [long]
    found["one query of 16"] = [16]
    return found


def batch(lengths: list[int]):
    return encoder_batch(lengths, torch.device("cpu"))


ENGINES = {"transformers": ("fp32",), "ours": ("fp32", "bf16", "int8"), "openvino": ("fp32", "bf16", "int8"),
           "onnxruntime": ("fp32", "int8")}


def precisions(engine: str) -> tuple[str, ...]:
    """bf16 only where the CPU has bf16 units (elsewhere it would be fp32 under another name)."""
    return tuple(p for p in ENGINES[engine] if p != "bf16" or cpu_has_bf16())


def export(folder: Path) -> None:
    """The checkpoint in ``folder`` to OpenVINO IR (fp32, and NNCF int8 calibrated on 8 short
    sequences) and to ONNX (fp32, and ONNX Runtime's dynamic int8), next to it."""
    import nncf
    import openvino as ov
    import transformers
    from onnxruntime.quantization import QuantType, quantize_dynamic

    hf_model = transformers.ModernBertModel.from_pretrained(folder / "checkpoint", attn_implementation="sdpa").eval()
    example = dict(zip(("input_ids", "attention_mask"), batch([48, 64])))
    with torch.no_grad():
        ov_model = ov.convert_model(hf_model, example_input=example)
        ov.save_model(ov_model, folder / "openvino-fp32.xml")
        calibration = [{"input_ids": ids, "attention_mask": mask}
                       for ids, mask in (batch([length] * 2) for length in (32, 64, 128, 256))]
        quantized = nncf.quantize(ov_model, nncf.Dataset(calibration), model_type=nncf.ModelType.TRANSFORMER,
                                  subset_size=len(calibration))
        ov.save_model(quantized, folder / "openvino-int8.xml")
        batch_dim, seq_dim = torch.export.Dim("batch"), torch.export.Dim("sequence")
        torch.onnx.export(hf_model, (), str(folder / "onnxruntime-fp32.onnx"), kwargs=example,
                          input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
                          dynamic_shapes={"input_ids": {0: batch_dim, 1: seq_dim},
                                          "attention_mask": {0: batch_dim, 1: seq_dim}},
                          dynamo=True, external_data=True)
    quantize_dynamic(folder / "onnxruntime-fp32.onnx", folder / "onnxruntime-int8.onnx", weight_type=QuantType.QInt8)


def int8_attention_dtype() -> torch.dtype | None:
    """The int8 models' attention dtype: bf16 where the CPU has bf16 dot products (our avx512_bf16
    kernels, or AMX), else fp32 (None)."""
    return torch.bfloat16 if cpu_has_bf16() else None


def engine(name: str, precision: str, folder: Path, threads: int):
    """fn(ids, mask) -> [batch, seq, hidden] fp32 tensor, for one engine at one precision."""
    checkpoint = folder / "checkpoint"
    if name == "transformers":
        import transformers

        model = transformers.ModernBertModel.from_pretrained(checkpoint, attn_implementation="sdpa").eval()
        return lambda ids, mask: model(input_ids=ids, attention_mask=mask).last_hidden_state
    if name == "ours":
        model = ModernBertModel.from_pretrained(checkpoint).eval()
        if precision == "bf16":
            model.to(torch.bfloat16)
        elif precision == "int8":
            # int8 linears, and the attention on bf16 q, k, v where the CPU has bf16 dot products
            # (as int8 deployments run it); the row's attention_dtype says which.
            quantize_int8(model, attention_dtype=int8_attention_dtype())
        frozen = FrozenEncoder(model)
        return lambda ids, mask: frozen(ids, mask).float()
    if name == "openvino":
        import openvino as ov

        bf16 = precision == "bf16" or (precision == "int8" and int8_attention_dtype() == torch.bfloat16)
        config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32"}
        compiled = ov.Core().compile_model(folder / f"openvino-{'int8' if precision == 'int8' else 'fp32'}.xml",
                                           "CPU", config)
        return lambda ids, mask: torch.from_numpy(compiled({"input_ids": ids.numpy(),
                                                            "attention_mask": mask.numpy()})[0])
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(str(folder / f"onnxruntime-{precision}.onnx"), options,
                                           providers=["CPUExecutionProvider"])
    return lambda ids, mask: torch.from_numpy(session.run(None, {"input_ids": ids.numpy(),
                                                                 "attention_mask": mask.numpy()})[0])


def worker(job: dict) -> dict:
    """One engine at one precision, in a process of its own (an engine's idle thread pool would slow
    the next one's): every workload's output over the real tokens saved for the drift, and its
    samples (milliseconds)."""
    folder = Path(job["folder"])
    if job["engine"] == "export":
        export(folder)
        return {}
    fn = engine(job["engine"], job["precision"], folder, job["threads"])
    timings = {}
    with torch.inference_mode():
        for workload, lengths in workloads(job["smoke"], job["quick"]).items():
            ids, mask = batch(lengths)
            out = fn(ids, mask)  # the warm-up call, and the output judged
            torch.save(out[mask.bool()].float().clone(), folder / f"out-{job['engine']}-{job['precision']}-{_slug(workload)}.pt")
            # At least 3 calls; short ones up to a second's worth (the query's ~20 ms calls: ~50).
            samples = time_cpu(lambda: fn(ids, mask), warmup=0, repeats=1 if job["smoke"] else 3,
                               budget_s=0 if job["smoke"] else 1.0)
            timings[workload] = samples
            median_ms = summarize(samples)["median_ms"]
            shown = f"{median_ms / 1e3:.2f} s" if median_ms >= 1e3 else f"{median_ms:.1f} ms"
            print(f"runtimes {workload} {job['engine']}_{job['precision']}: {shown}", file=sys.stderr, flush=True)
    return timings


class WorkerFailed(RuntimeError):
    """A worker process exited with an error; ``reason`` is the last line it printed to stderr."""

    def __init__(self, job: dict, returncode: int, reason: str):
        super().__init__(f"runtimes worker {job['engine']} {job.get('precision', '')} failed (exit {returncode}): "
                         f"{reason}; its whole error is above")
        self.reason = reason


def _in_worker(job: dict) -> dict:
    # stdout to a file, not a pipe: while stderr is read line by line, a pipe that filled (the
    # exporters print to stdout) would stall the worker.
    with tempfile.TemporaryFile("w+") as stdout:
        worker_process = subprocess.Popen([sys.executable, "-m", "benchmarks.runtimes", "--worker", json.dumps(job)],
                                          stdout=stdout, stderr=subprocess.PIPE, text=True)
        last_line = ""
        for line in worker_process.stderr:  # passed on as it comes: the worker's progress
            sys.stderr.write(line)
            last_line = line.strip() or last_line
        if worker_process.wait() != 0:
            raise WorkerFailed(job, worker_process.returncode, last_line)
        stdout.seek(0)
        return json.loads(stdout.read().strip().splitlines()[-1])


def run(device: torch.device, quick: bool, progress=None, smoke: bool = False,
        engines: list[str] | None = None, rounds: int = 1) -> list[dict]:
    """``engines``: a subset of ENGINES to time (transformers, the reference, always runs).
    ``rounds``: how many times each engine's process runs, the engines interleaved."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    engines = ["transformers", *[e for e in engines or ENGINES if e != "transformers"]]
    unknown = set(engines) - set(ENGINES)
    if unknown:
        raise ValueError(f"unknown engines {sorted(unknown)}; known: {list(ENGINES)}")
    if device.type != "cpu":
        return []  # OpenVINO and ONNX Runtime's CPU providers: a CPU comparison
    needs = {"transformers": ["transformers"], "openvino": ["openvino", "nncf"],
             "onnxruntime": ["onnxruntime", "onnxscript"]}
    for module in [m for e in engines for m in needs.get(e, [])]:
        if importlib.util.find_spec(module) is None:
            raise ImportError(f"{module} is not installed (pip install -e '.[runtimes]')")
    progress = progress or (lambda message: None)
    import transformers

    rows = []
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        torch.manual_seed(0)
        transformers.ModernBertModel(transformers.ModernBertConfig(**(SMOKE if smoke else BASE))).save_pretrained(
            folder / "checkpoint")
        job = {"folder": name, "smoke": smoke, "quick": quick, "threads": torch.get_num_threads()}
        if {"openvino", "onnxruntime"} & set(engines):
            progress("runtimes: exporting to OpenVINO (+ NNCF int8) and ONNX (+ dynamic int8)")
            _in_worker({**job, "engine": "export"})
        samples, failed = {}, {}  # {provider: {workload: milliseconds of every round}}
        for round_index in range(rounds):
            for engine_name in engines:
                for precision in precisions(engine_name):
                    provider = f"{engine_name}_{precision}"
                    if provider in failed:
                        continue
                    try:
                        found = _in_worker({**job, "engine": engine_name, "precision": precision})
                    except WorkerFailed as error:
                        if engine_name in ("transformers", "ours"):  # the reference, and ours: never excused
                            raise
                        failed[provider] = error.reason
                        samples.pop(provider, None)
                        progress(f"runtimes: {engine_name} {precision} FAILED, reported in its rows: {error.reason}")
                        continue
                    for workload, milliseconds in found.items():
                        samples.setdefault(provider, {}).setdefault(workload, []).extend(milliseconds)
                    progress(f"runtimes: {engine_name} {precision} done"
                             + (f" (round {round_index + 1} of {rounds})" if rounds > 1 else ""))
        timings = {provider: {workload: summarize(milliseconds) for workload, milliseconds in by_workload.items()}
                   for provider, by_workload in samples.items()}
        for workload, lengths in workloads(smoke, quick).items():
            real = batch(lengths)[1].bool()
            tokens = int(real.sum())

            def output(provider):
                engine_name, precision = provider.rsplit("_", 1)
                return torch.load(folder / f"out-{engine_name}-{precision}-{_slug(workload)}.pt").double()

            reference = output("transformers_fp32")
            measured = {provider: by_workload[workload] for provider, by_workload in timings.items()}

            def fields(provider):
                out = output(provider)
                finite = bool(torch.isfinite(out).all())
                cosine = torch.nn.functional.cosine_similarity(out, reference, dim=-1).min().item()
                engine_name, precision = provider.rsplit("_", 1)
                attention = None
                if provider in ("ours_int8", "openvino_int8"):
                    attention = "bf16" if int8_attention_dtype() else "fp32"
                return {"engine": engine_name, "precision": precision, "attention_dtype": attention,
                        "tokens_per_s": tokens / (measured[provider]["median_ms"] * 1e-3),
                        "cosine_min": cosine if finite else None,
                        "note": None if finite else "wrong: NaN or Inf on real tokens"}

            rows += result_rows("runtimes", workload, measured, "transformers_fp32", seq_len=max(lengths),
                                batch=len(lengths), tokens=tokens, per_provider=fields)
            for provider, reason in failed.items():
                engine_name, precision = provider.rsplit("_", 1)
                rows.append({"bench": "runtimes", "pass": workload, "provider": provider, "baseline": "transformers_fp32",
                             "seq_len": max(lengths), "batch": len(lengths), "tokens": tokens, "engine": engine_name,
                             "precision": precision, "median_ms": None, "cosine_min": None,
                             "note": f"failed: {reason}"})
    return rows


def main(argv=None):
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--worker":
        torch.set_num_threads(json.loads(sys.argv[2])["threads"])
        print(json.dumps(worker(json.loads(sys.argv[2]))))
        return
    from benchmarks.report import script_main

    script_main(run, __doc__, "runtimes", argv, options={
        "--engines": dict(nargs="+", choices=list(ENGINES), help="time only these (transformers always runs)"),
        "--rounds": dict(type=int, default=1, help="run every engine's process this many times, interleaved; "
                                                   "the rows pool all rounds' samples")})


if __name__ == "__main__":
    main()
