"""The staged GPU suite's plan fits its budget, and its runner stops a stage at its budget while
keeping what earlier stages wrote (no GPU needed)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks import gpu_suite

REPO = Path(__file__).resolve().parent.parent


def test_plan_prints_every_stage_and_fits_the_budget():
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "--plan"], capture_output=True,
                            text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    for stage in ("environment", "smoke", "headline_attention", "headline_int8_linear", "headline_encoder",
                  "matrix", "extension"):
        assert f"\n{stage} " in result.stdout
    assert "fits: yes" in result.stdout
    stages = gpu_suite.stages()
    assert sum(s.budget_s for s in stages if s.budget_s) + gpu_suite.EXTENSION_MIN_S <= gpu_suite.TOTAL_BUDGET_S
    assert all(s.compile_estimate_s() <= s.budget_s for s in stages if s.budget_s)
    # The order is the priority: smoke before the numbers, the numbers before the wide matrix.
    assert [s.name for s in stages] == ["environment", "smoke", "headline_attention", "headline_int8_linear",
                                        "headline_encoder", "matrix", "extension"]


def test_plan_counts_the_compiles_of_the_tested_cases():
    from benchmarks import gpu_cases

    # 3 dtypes x (fwd, dq, dkdv) for the kernel smoke tests, and the matrix's 180 cases per backend.
    assert {s for s in gpu_cases.smoke_specializations() if s[0].startswith("attention")} >= {
        (kernel, dtype, 64, 64, True, True, False, False)
        for kernel in ("attention_fwd", "attention_dq", "attention_dkdv") for dtype in gpu_cases.DTYPES}
    assert len(gpu_cases.matrix_attention_cases()) == 5 * 3 * 2 * 2 * 3
    # Layouts that share a block size share compiles: 3 blocks x 3 head_dims x 2 x 2 x 3 dtypes x 3 kernels,
    # and head_dim 256's and the capped kernels' 2 modes x 3 dtypes x 3 kernels each.
    attention = {s for s in gpu_cases.matrix_specializations() if s[0].startswith("attention")}
    assert len(attention) == 3 * 3 * 2 * 2 * 3 * 3 + 2 * (2 * 3 * 3)


def test_runner_stops_a_stage_at_its_budget_and_keeps_earlier_results(tmp_path):
    runner = gpu_suite.Runner(tmp_path, REPO)
    quick = gpu_suite.Stage("quick", "a command that ends", 30, 0)
    slow = gpu_suite.Stage("slow", "a command that does not", 1, 0)
    assert runner.run(quick, [[sys.executable, "-c", "print('measured')"]], quick.budget_s) == "passed"
    assert runner.run(slow, [[sys.executable, "-c", "import time; time.sleep(60)"]], slow.budget_s) == "timeout"
    records = json.loads((tmp_path / "stages.json").read_text())
    assert [(r["stage"], r["status"]) for r in records] == [("quick", "passed"), ("slow", "timeout")]
    assert records[1]["wall_s"] < 10
    assert "measured" in (tmp_path / "quick.log").read_text()
    assert "over its budget" in (tmp_path / "slow.log").read_text()
    failing = gpu_suite.Stage("failing", "exits 3", 30, 0)
    assert runner.run(failing, [[sys.executable, "-c", "raise SystemExit(3)"]], 30) == "failed (exit 3)"
