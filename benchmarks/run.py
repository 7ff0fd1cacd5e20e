"""Run every benchmark script and write one report (JSON, Markdown, PNG).

    python -m benchmarks.run --quick --out benchmarks/results/local
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks import attention, int8_linear
from benchmarks.report import write_report

SUBJECTS = {"attention": attention.run, "int8_linear": int8_linear.run}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer sizes (CPU: under 5 minutes)")
    parser.add_argument("--only", choices=sorted(SUBJECTS), action="append", help="run only these subjects")
    parser.add_argument("--out", default="benchmarks/results/local")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    started = time.perf_counter()

    def progress(message):
        print(f"[{time.perf_counter() - started:7.1f} s] {message}", flush=True)

    rows = []
    for name in args.only or sorted(SUBJECTS):
        rows += SUBJECTS[name](device, args.quick, progress=progress)
    write_report(rows, args.out, device, "suite")


if __name__ == "__main__":
    main()
