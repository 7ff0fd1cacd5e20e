"""The benchmark suite's smallest configuration runs end to end, so the scripts cannot rot."""

import json

from benchmarks import run


def test_quick_cpu_suite_writes_json_markdown_and_plot(tmp_path):
    run.main(["--device", "cpu", "--quick", "--out", str(tmp_path)])
    written = {p.suffix for p in tmp_path.iterdir()}
    assert {".json", ".md", ".png"} <= written
    report = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert report["meta"]["device"]
    for row in report["rows"]:
        for field in ("median_ms", "iqr_ms", "baseline_median_ms", "speedup_vs_baseline"):
            assert row[field] > 0, (field, row)


def test_side_by_side_pairs_rows_and_takes_medians_over_rounds():
    from benchmarks import side_by_side

    def row(provider, ms, seq_len=8192):
        return {"bench": "attention", "pass": "fwd", "provider": provider, "seq_len": seq_len, "median_ms": ms}

    old = [[row("cpu", 10.0), row("sdpa", 100.0)], [row("cpu", 14.0), row("sdpa", 90.0)], [row("cpu", 12.0)]]
    new = [[row("cpu", 9.0), row("sdpa", 95.0), row("only_new", 1.0)], [row("cpu", 11.0)], [row("cpu", 30.0)]]
    table = {r["provider"]: r for r in side_by_side.compare(old, new)}
    assert set(table) == {"cpu", "sdpa"}  # a row on one side only has nothing to compare with
    assert (table["cpu"]["old_ms"], table["cpu"]["new_ms"]) == (12.0, 11.0)
    assert table["sdpa"]["new_over_old"] == 95.0 / 95.0
    assert "| attention | fwd | 8192 | cpu | 12 | 11 |" in side_by_side.markdown(list(table.values()))
