"""Write benchmark rows as JSON, a Markdown table and PNG plots, named by device and date."""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
from pathlib import Path

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {torch.get_num_threads()} threads"


def timed(rows: list[dict]) -> list[dict]:
    """The rows with a time: not those of an engine that failed to run (benchmarks.runtimes)."""
    return [row for row in rows if row.get("median_ms") is not None]


def result_rows(bench: str, pass_name: str, measured: dict, baseline: str, *, flops: float = 0.0,
                bytes_moved: float | None = None, per_provider=None, **fields) -> list[dict]:
    """One row per provider of ``measured`` ({provider: timing stats}): the stats, the given fields,
    throughput (TFLOP/s from ``flops``, GB/s from ``bytes_moved``) and the speedup over ``baseline``
    measured in the same run. ``per_provider(provider)`` adds provider-specific fields."""
    base = measured[baseline]["median_ms"]
    rows = []
    for provider, stats in measured.items():
        seconds = stats["median_ms"] * 1e-3
        row = {"bench": bench, "pass": pass_name, "provider": provider, "baseline": baseline, **fields,
               "useful_flops": flops, "tflops": flops / seconds / 1e12}
        if bytes_moved is not None:
            row.update(bytes=bytes_moved, gb_per_s=bytes_moved / seconds / 1e9)
        row.update(per_provider(provider) if per_provider else {})
        row.update(stats, baseline_median_ms=base, speedup_vs_baseline=base / stats["median_ms"])
        rows.append(row)
    return rows


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def markdown_table(rows: list[dict]) -> str:
    columns = ["bench", "model", "scope", "batch", "pass", "seq_len", "provider", "median_ms", "iqr_ms", "baseline_median_ms",
               "speedup_vs_baseline", "tflops", "pct_of_matmul_ceiling", "chosen", "pct_of_precision_ceiling",
               "over_linears_at_ceiling", "pct_of_copy_ceiling", "relative_error_vs_float",
               "tokens_per_s", "int8_cosine_mean", "call_peak_mib", "sentences_per_s", "cosine_mean", "cosine_min",
               "nn_agreement", "nn_agreement_clear", "nn_recall_at_3", "note"]
    columns = [c for c in columns if any(row.get(c) is not None for row in rows)]  # only what was measured
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column)
            value = "" if value is None else value
            cells.append(f"{value:.4g}" if isinstance(value, float) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    groups = sorted({(r["bench"], r["pass"]) for r in rows if r.get("seq_len")})  # plotted against length
    if not groups:
        return False
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4), squeeze=False)
    for ax, (bench, pass_name) in zip(axes[0], groups):
        subset = [r for r in rows if r["bench"] == bench and r["pass"] == pass_name]
        for provider in sorted({r["provider"] for r in subset}):
            points = sorted((r["seq_len"], r["median_ms"]) for r in timed(subset) if r["provider"] == provider)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=provider)
        ax.set(xscale="log", yscale="log", xlabel="sequence length", ylabel="median ms", title=f"{bench} {pass_name}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_report(rows: list[dict], out_dir: str | Path, device: torch.device, stem: str,
                 ceilings: dict | None = None, extra: dict | None = None) -> dict[str, Path]:
    """``extra``: more run-level results for the JSON's meta (e.g. fits across rows)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = device_name(device)
    date = datetime.date.today().isoformat()
    base = out / f"{stem}-{_slug(name)}-{date}"
    meta = {"device": name, "date": date, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "ceilings": ceilings or {}, **(extra or {})}
    paths = {"json": base.with_suffix(".json"), "md": base.with_suffix(".md"), "png": base.with_suffix(".png")}
    paths["json"].write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    ceiling_line = ""
    if ceilings:
        ceiling_line = (f"Ceilings measured in this run: {ceilings['matmul_tflops']:.3g} TFLOP/s "
                        f"({ceilings['matmul_dtype']} matmul), {ceilings['copy_gb_per_s']:.3g} GB/s (copy).\n\n")
    paths["md"].write_text(f"# {stem} on {name}, {date}\n\ntorch {meta['torch']}\n\n{ceiling_line}" + markdown_table(rows))
    if not plot(rows, paths["png"]):
        del paths["png"]
    for path in paths.values():
        print(f"wrote {path}")
    return paths


def script_main(run, doc: str, stem: str, argv=None, options: dict | None = None) -> None:
    """The command line of one benchmark script: ``run(device, quick, progress, **options)`` then a
    report. ``options``: {flag: argparse keywords} of the script's own flags, passed to ``run`` by name."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/local")
    for flag, keywords in (options or {}).items():
        parser.add_argument(flag, **keywords)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    extra = {flag.lstrip("-").replace("-", "_"): getattr(args, flag.lstrip("-").replace("-", "_")) for flag in options or {}}
    write_report(run(device, args.quick, progress=print, **extra), args.out, device, stem)
