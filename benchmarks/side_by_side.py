"""Two checkouts' benchmark suites in one run, alternating, so that a change's speed is compared on
the same machine at the same time.

    python -m benchmarks.side_by_side OLD_CHECKOUT NEW_CHECKOUT --quick --rounds 2 --out DIR

Round r runs ``python -m benchmarks.run`` once per side, each in its own process from its own
checkout (its package and its built extension), old first in even rounds and new first in odd
ones, so a drift in the machine's speed falls on both sides alike. Per benchmark row it reports
the median over rounds of each side's median, and new / old. The baselines (PyTorch, transformers)
run the same code on both sides: their ratios show how far apart two runs of identical work land.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.report import timed

# What identifies a row across runs; everything else is a measurement.
KEY_FIELDS = ("bench", "pass", "provider", "seq_len", "batch", "heads", "head_dim", "window", "dtype", "M", "K",
              "N", "activation", "tokens")


def _key(row: dict) -> tuple:
    return tuple(str(row.get(field, "")) for field in KEY_FIELDS)


def run_side(checkout: Path, subjects: list[str], quick: bool, out: Path) -> list[dict]:
    command = [sys.executable, "-m", "benchmarks.run", "--out", str(out), "--stem", "side"]
    command += ["--quick"] if quick else []
    for subject in subjects:
        command += ["--only", subject]
    subprocess.run(command, cwd=checkout, check=True)
    (report,) = out.glob("side-*.json")
    return json.loads(report.read_text())["rows"]


def compare(old_runs: list[list[dict]], new_runs: list[list[dict]]) -> list[dict]:
    def medians(runs):
        by_key: dict[tuple, list[float]] = {}
        for rows in runs:
            for row in timed(rows):
                by_key.setdefault(_key(row), []).append(row["median_ms"])
        return {key: statistics.median(values) for key, values in by_key.items()}

    old, new = medians(old_runs), medians(new_runs)
    table = []
    for key in old.keys() & new.keys():
        fields = {name: value for name, value in zip(KEY_FIELDS, key) if value}
        table.append({**fields, "old_ms": old[key], "new_ms": new[key], "new_over_old": new[key] / old[key]})
    return sorted(table, key=lambda row: tuple(str(row.get(f, "")) for f in KEY_FIELDS))


def markdown(table: list[dict]) -> str:
    columns = ["bench", "pass", "seq_len", "provider", "old_ms", "new_ms", "new_over_old"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in table:
        cells = [f"{row[c]:.4g}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old", type=Path, help="the checkout before the change (its extension built in place)")
    parser.add_argument("new", type=Path, help="the checkout after it")
    parser.add_argument("--only", action="append", help="subjects (default: all of benchmarks.run)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/local"))
    args = parser.parse_args(argv)
    subjects = args.only or ["attention", "encoder", "int8_linear", "rotary"]
    runs = {"old": [], "new": []}
    for round_index in range(args.rounds):
        order = ("old", "new") if round_index % 2 == 0 else ("new", "old")
        for side in order:
            print(f"round {round_index + 1}/{args.rounds}: {side}", flush=True)
            with tempfile.TemporaryDirectory() as scratch:
                runs[side].append(run_side(getattr(args, side).resolve(), subjects, args.quick, Path(scratch)))
    table = compare(runs["old"], runs["new"])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "side_by_side.json").write_text(json.dumps(
        {"old": str(args.old), "new": str(args.new), "rounds": args.rounds, "quick": args.quick, "rows": table},
        indent=2))
    (args.out / "side_by_side.md").write_text(markdown(table))
    print(markdown(table))


if __name__ == "__main__":
    main()
