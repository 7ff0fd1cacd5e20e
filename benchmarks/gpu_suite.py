"""The GPU run, in stages of priority order, each with its own time budget.

    benchmarks/gpu_suite.sh OUT_DIR      # on the GPU machine: runs the stages, writes OUT_DIR
    benchmarks/gpu_suite.sh --plan       # anywhere: the stages, their compiles and budgets

A lent GPU gives 15 minutes of device time, machine start included, so the whole run is bounded by
design (TOTAL_BUDGET_S of wall time) and what matters most runs first: (a) the environment and one
smoke test per kernel and dtype, (b) the headline numbers, (c) the wide test matrix, (d) the C++
extension's CUDA kernels, built and tested with whatever time is left. Each stage runs under its
own timeout and writes its log, its results and OUT_DIR/stages.json the moment it ends, so a stage
that runs over still leaves every earlier result behind.

The plan counts the Triton specializations each stage compiles (benchmarks/gpu_cases.py for the
tests; the autotuning candidates for the benchmarks) and estimates their compile time at
COMPILE_S each per worker, a guess until a GPU run measures it.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import gpu_cases

TOTAL_BUDGET_S = 540  # 9 minutes: the device call's 10-minute limit less the machine's start
COMPILE_S = 1.5  # seconds per Triton compile on one host core (estimate; sm_90, cold cache)
MATRIX_WORKERS = 8  # pytest-xdist workers for the matrix (16 cores: compiles are single-threaded)
# The GPU tests of each op (marked gpu), one file per op.
MATRIX_TESTS = ("tests/test_attention.py", "tests/test_int8.py", "tests/test_rotary.py")
EXTENSION_MIN_S = 45  # below this the CUDA extension cannot even build: the stage is skipped


@dataclasses.dataclass
class Stage:
    name: str
    what: str
    budget_s: int | None  # None: whatever is left of TOTAL_BUDGET_S
    specializations: int
    workers: int = 1

    def compile_estimate_s(self) -> float:
        return self.specializations * COMPILE_S / self.workers


def _headline_specializations() -> dict[str, int]:
    """Per subject: autotuning compiles every candidate once per problem class (the benchmarks
    autotune as users do)."""
    import torch

    from modernbert_kernels.triton.configs import configs_for, int8_candidates

    def candidates(kernel):
        return len(configs_for(kernel, 64, 64, torch.bfloat16, 90))

    def int8(classes):  # (N, K, epilogue, bias) problem classes
        return sum(len(int8_candidates(k)) for _, k, _, _ in classes)

    quantize = 4  # widths 768 and 1152 (1024- and 2048-wide blocks), with and without a fused LayerNorm
    return {
        "attention": candidates("fwd") + candidates("dq") + candidates("dkdv"),  # bf16, window 64, padded
        "int8_linear": int8([(2304, 768, "geglu", True), (768, 1152, None, True)]) + quantize,
        # varlen global and local layers; the int8 model's four linears; RoPE
        "encoder": 2 * candidates("fwd") + 1
        + int8([(2304, 768, None, False), (2304, 768, "geglu", False), (768, 1152, None, False), (768, 768, None, False)]),
    }


# The headline numbers, one stage per subject so that one running over cannot take the others.
HEADLINE = {
    "attention": ("attention 4k / 8k / 16k (+ at 8k: the causal sliding window, and a window of 256 with 1% "
                  "global tokens per example), fwd and fwd+bwd, vs SDPA, FlexAttention, flash-attn", 150),
    "int8_linear": ("int8 linear at ModernBERT-base's MLP shapes (8192 tokens) vs bf16 F.linear", 45),
    "encoder": ("encoder tokens/s vs transformers (sdpa) at 8 x 512 and 8192", 90),
}


def stages() -> list[Stage]:
    compiles = _headline_specializations()
    return [
        Stage("environment", "nvidia-smi, versions, `modernbert-kernels info`", 15, 0),
        Stage("smoke", "one test per kernel and dtype, fwd + bwd vs float64; the encoder in a CUDA graph",
              90, len(gpu_cases.smoke_specializations())),
        *(Stage(f"headline_{subject}", what, budget, compiles[subject]) for subject, (what, budget) in HEADLINE.items()),
        Stage("matrix", "the wide GPU test matrix (pytest -m gpu), in parallel where pytest-xdist is installed",
              105, len(gpu_cases.matrix_specializations()), MATRIX_WORKERS),
        Stage("extension", "build the C++ extension's CUDA kernels for this GPU and run their tests", None, 0),
    ]


def print_plan() -> int:
    planned = stages()
    fixed = sum(s.budget_s for s in planned if s.budget_s is not None)
    left = TOTAL_BUDGET_S - fixed
    print(f"GPU suite plan: {TOTAL_BUDGET_S} s of wall time in all; compile estimate {COMPILE_S} s per "
          f"specialization per worker\n")
    print(f"{'stage':20s} {'budget s':>8s} {'compiles':>8s} {'workers':>7s} {'est. compile s':>14s}  what")
    for stage in planned:
        budget = stage.budget_s if stage.budget_s is not None else left
        label = f"{budget}" if stage.budget_s is not None else f"<={budget}"
        print(f"{stage.name:20s} {label:>8s} {stage.specializations:8d} {stage.workers:7d} "
              f"{stage.compile_estimate_s():14.0f}  {stage.what}")
    print(f"\nfixed budgets: {' + '.join(str(s.budget_s) for s in planned if s.budget_s is not None)} = {fixed} s; "
          f"the extension gets what is left: {TOTAL_BUDGET_S} - {fixed} = {left} s or more "
          f"(skipped under {EXTENSION_MIN_S} s)")
    over = [s.name for s in planned if s.budget_s is not None and s.compile_estimate_s() > s.budget_s]
    fits = fixed <= TOTAL_BUDGET_S and not over
    print(f"fits: {'yes' if fits else 'no'}" + (f" (compiles exceed the budget of {', '.join(over)})" if over else ""))
    return 0 if fits else 1


class Runner:
    """Runs stage commands under timeouts and records each stage the moment it ends."""

    def __init__(self, out: Path, repo: Path):
        self.out, self.repo, self.started = out, repo, time.monotonic()
        self.records: list[dict] = []

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def run(self, stage: Stage, commands: list[list[str]], budget_s: float, env: dict | None = None) -> str:
        log = self.out / f"{stage.name}.log"
        start = time.monotonic()
        status = "passed"
        with log.open("w") as sink:
            for command in commands:
                left = budget_s - (time.monotonic() - start)
                if left <= 0:
                    status = "timeout"
                    break
                sink.write(f"$ {' '.join(command)}\n")
                sink.flush()
                # Own process group: a timeout kills the command's children (pytest-xdist workers) too.
                process = subprocess.Popen(command, cwd=self.repo, stdout=sink, stderr=subprocess.STDOUT,
                                           env={**os.environ, **(env or {})}, start_new_session=True)
                try:
                    code = process.wait(timeout=left)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
                    status = "timeout"
                    sink.write(f"\n[gpu_suite] {stage.name}: over its budget of {budget_s:.0f} s, stopped\n")
                    break
                if code != 0:
                    status = f"failed (exit {code})"
        self.record(stage, status, time.monotonic() - start, budget_s)
        return status

    def record(self, stage: Stage, status: str, wall_s: float, budget_s: float | None) -> None:
        self.records.append({"stage": stage.name, "status": status, "wall_s": round(wall_s, 1),
                             "budget_s": None if budget_s is None else round(budget_s),
                             "specializations": stage.specializations, "elapsed_s": round(self.elapsed(), 1)})
        (self.out / "stages.json").write_text(json.dumps(self.records, indent=2))
        print(f"[gpu_suite {self.elapsed():6.1f} s] {stage.name}: {status} in {wall_s:.1f} s"
              + (f" (budget {budget_s:.0f} s)" if budget_s is not None else ""), flush=True)


def _pytest(out: Path, name: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={out / name}.xml", *args]


def run_suite(out: Path) -> int:
    import torch

    if not torch.cuda.is_available():
        print("gpu_suite: no CUDA device", file=sys.stderr)
        return 2
    repo = Path(__file__).resolve().parent.parent
    out.mkdir(parents=True, exist_ok=True)
    runner = Runner(out, repo)
    planned = {stage.name: stage for stage in stages()}
    python = sys.executable
    statuses = []

    versions = ("import torch, triton, sys, numpy; print('python', sys.version.split()[0], 'torch', torch.__version__, "
                "'triton', triton.__version__, 'numpy', numpy.__version__, 'device', torch.cuda.get_device_name())")
    commands = [[python, "-c", versions], [python, "-m", "modernbert_kernels.cli", "info"]]
    if shutil.which("nvidia-smi"):
        commands.insert(0, ["nvidia-smi"])
    statuses.append(runner.run(planned["environment"], commands, planned["environment"].budget_s))

    smoke = _pytest(out, "smoke", "tests/test_gpu_smoke.py", "tests/test_encoder_gpu.py")
    statuses.append(runner.run(planned["smoke"], [smoke], planned["smoke"].budget_s))

    for subject in HEADLINE:
        stage = planned[f"headline_{subject}"]
        command = [python, "-m", "benchmarks.run", "--headline", "--only", subject, "--stem", stage.name,
                   "--out", str(out)]
        statuses.append(runner.run(stage, [command], stage.budget_s))

    parallel = ["-n", str(MATRIX_WORKERS)] if importlib.util.find_spec("xdist") else []
    matrix = _pytest(out, "matrix", "-m", "gpu", *parallel, *MATRIX_TESTS)
    statuses.append(runner.run(planned["matrix"], [matrix], planned["matrix"].budget_s))

    left = TOTAL_BUDGET_S - runner.elapsed()
    if left < EXTENSION_MIN_S:
        runner.record(planned["extension"], f"skipped ({left:.0f} s left)", 0.0, left)
    else:
        major, minor = torch.cuda.get_device_capability()
        build_env = {"FORCE_CUDA": "1", "MODERNBERT_KERNELS_BUILD_EXTENSION": "1",
                     "TORCH_CUDA_ARCH_LIST": f"{major}.{minor}", "MAX_JOBS": str(os.cpu_count() or 8)}
        build = [python, "setup.py", "-q", "build_ext", "--inplace"]
        tests = _pytest(out, "extension", "-m", "gpu", "-k", "cuda", *MATRIX_TESTS)
        statuses.append(runner.run(planned["extension"], [build, tests], left, env=build_env))
    print(json.dumps(runner.records, indent=2))
    return 0 if all(status == "passed" for status in statuses) else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", help="folder for the results")
    parser.add_argument("--plan", action="store_true", help="print the stages, compiles and budgets; run nothing")
    args = parser.parse_args(argv)
    if args.plan:
        return print_plan()
    if not args.out:
        parser.error("OUT_DIR is required (or --plan)")
    return run_suite(Path(args.out))


if __name__ == "__main__":
    sys.exit(main())
