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
