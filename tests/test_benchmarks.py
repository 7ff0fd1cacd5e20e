"""The benchmark suite's smallest configuration runs end to end, so the scripts cannot rot."""

import json

import pytest
import torch

from benchmarks import run


def test_smoke_cpu_suite_writes_json_markdown_and_plot(tmp_path):
    """Every subject at its smallest size (--smoke): the same code paths as --quick, in seconds.
    The runtimes subject has its own test below (it exports and converts a model)."""
    subjects = [f"--only={name}" for name in run.SUBJECTS if name != "runtimes"]
    run.main(["--device", "cpu", "--smoke", "--out", str(tmp_path), *subjects])
    written = {p.suffix for p in tmp_path.iterdir()}
    assert {".json", ".md", ".png"} <= written
    report = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert report["meta"]["device"]
    assert {"attention", "int8_linear", "rotary"} <= {row["bench"] for row in report["rows"]}
    # Every sparse model case, each under the short name that --models takes.
    from benchmarks import sparse_models

    cases = sparse_models.cases(small=True)
    assert {row["model"] for row in report["rows"] if row["bench"] == "sparse_models"} == {c[1] for c in cases}
    assert tuple(c[0] for c in cases) == sparse_models.MODELS
    for row in report["rows"]:
        for field in ("median_ms", "baseline_median_ms", "speedup_vs_baseline"):
            assert row[field] > 0, (field, row)
        assert row["iqr_ms"] >= 0, row  # 0 where a provider is timed once


def test_cpu_linears_rates_every_gemm_against_its_precisions_ceiling():
    """Every GEMM that runs each precision here, at the encoder's shapes and on the square problem
    whose fastest GEMM is the precision's ceiling (100%); the choice the linears make; the fp32
    encoder against its linears at that ceiling."""
    from benchmarks import cpu_linears
    from modernbert_kernels import cpu_linear

    rows = cpu_linears.run(torch.device("cpu"), quick=True, progress=print, smoke=True)
    for precision, dtype in cpu_linears.PRECISIONS.items():
        gemm_rows = [r for r in rows if r["pass"].startswith(f"{precision} ") and r["provider"] in cpu_linear.GEMMS]
        square = [r for r in gemm_rows if " square " in r["pass"]]
        assert {r["provider"] for r in square} == set(cpu_linear.available_gemms(dtype))
        assert max(r["pct_of_precision_ceiling"] for r in gemm_rows) == pytest.approx(100)  # no GEMM beats it
        shapes = {r["pass"] for r in gemm_rows if " encoder " in r["pass"]}
        assert len(shapes) == len(set(cpu_linear.ENCODER_SHAPES))
        for row in gemm_rows:
            assert row["median_ms"] > 0 and row["pct_of_precision_ceiling"] > 0
            if " encoder " in row["pass"]:
                assert row["chosen"] in cpu_linear.available_gemms(dtype)
    (encoder,) = [r for r in rows if r["provider"] == "ours_fp32"]
    (at_ceiling,) = [r for r in rows if r["provider"] == "linears_at_fp32_ceiling"]
    assert encoder["over_linears_at_ceiling"] == pytest.approx(encoder["median_ms"] / at_ceiling["median_ms"])
    fp32_ceiling = max(r["tflops"] for r in rows if r["pass"].startswith("fp32 ") and r["provider"] in cpu_linear.GEMMS)
    assert at_ceiling["tflops"] == pytest.approx(fp32_ceiling)  # the linears' FLOPs at exactly that rate
    (floor,) = [r for r in rows if r["provider"] == "flop_floor_at_fp32_ceiling"]
    assert floor["median_ms"] > at_ceiling["median_ms"]
    assert floor["over_linears_at_ceiling"] == pytest.approx(floor["median_ms"] / at_ceiling["median_ms"])


@pytest.mark.parametrize("seq_len", [64, 512, 1000])
def test_encoder_attention_flops_count_every_visible_pair_of_each_layer(seq_len):
    """Against pairs counted on the dense mask: every pair in global layers, |i - j| <= the half
    window in sliding ones; 4 FLOPs per pair and head dimension (QK^T and PV)."""
    from benchmarks import cpu_linears
    from benchmarks.encoder import BASE
    from modernbert import ModernBertConfig

    config = ModernBertConfig(**BASE)
    position = torch.arange(seq_len)
    band = ((position[:, None] - position[None, :]).abs() <= config.local_attention // 2).sum().item()
    pairs = {"full_attention": seq_len**2, "sliding_attention": band}
    expected = sum(4 * 2 * config.hidden_size * pairs[kind] for kind in config.layer_types)  # batch 2, heads x dim
    assert cpu_linears.encoder_attention_flops(config, 2, seq_len) == pytest.approx(expected)


# ~65 s (an export, then ten worker processes): in CI's slow step, beside the fuzz tests while the
# slow group trains, where a worker has that much slack (issue #20's budget).
@pytest.mark.slow
def test_runtimes_subject_times_every_engine_and_flags_wrong_outputs():
    """OpenVINO and ONNX Runtime beside ours and transformers on one checkpoint, every workload;
    each row's drift from transformers' fp32 output over the real tokens, or a note if it is wrong."""
    for module in ("openvino", "nncf", "onnxruntime", "onnxscript"):
        pytest.importorskip(module, reason="the runtimes extra (pip install -e '.[runtimes]')")
    from benchmarks import runtimes
    from modernbert_kernels.cpu_linear import cpu_has_bf16

    rows = runtimes.run(torch.device("cpu"), quick=True, progress=print, smoke=True)
    precisions = ("fp32", "bf16", "int8") if cpu_has_bf16() else ("fp32", "int8")
    expected = {"transformers_fp32", "onnxruntime_fp32", "onnxruntime_int8"}
    expected |= {f"{engine}_{p}" for engine in ("ours", "openvino") for p in precisions}
    for workload in runtimes.workloads(smoke=True, quick=True):
        found = {row["provider"]: row for row in rows if row["pass"] == workload}
        assert set(found) == expected, workload
        for name, row in found.items():
            assert row["tokens"] > 0
            if row["note"] is None:  # a finite output: close to fp32 at every real token
                assert row["median_ms"] > 0
                assert row["cosine_min"] > (0.9999 if name.endswith("fp32") else 0.98), row
            elif row["note"].startswith("failed: "):  # a runtime that did not load or run here
                assert row["median_ms"] is None and row["cosine_min"] is None, row
                assert name.startswith(("openvino", "onnxruntime")), row
            else:
                assert row["median_ms"] > 0 and row["cosine_min"] is None and "NaN" in row["note"], row
        for name in ("transformers_fp32", "ours_fp32", "ours_int8"):
            assert found[name]["note"] is None  # ours and the reference are never wrong


def test_runtimes_rounds_interleave_the_engines_and_pool_their_samples(monkeypatch):
    """--rounds N runs every engine's process N times, engine after engine within each round, and
    each row's statistics cover the samples of all rounds. The workers are stood in for here."""
    from benchmarks import report, runtimes

    calls = []

    def worker(job):
        if job["engine"] == "export":
            return {}
        provider = f"{job['engine']}_{job['precision']}"
        calls.append(provider)
        timings = {}
        for workload, lengths in runtimes.workloads(job["smoke"], job["quick"]).items():
            real = int(runtimes.batch(lengths)[1].sum())
            torch.save(torch.randn(real, 8), f"{job['folder']}/out-{job['engine']}-{job['precision']}-"
                                             f"{report._slug(workload)}.pt")
            # Round r's samples: 10 r + 1, 10 r + 2, 10 r + 3 ms.
            round_index = calls.count(provider) - 1
            timings[workload] = [10.0 * round_index + offset for offset in (1.0, 2.0, 3.0)]
        return timings

    monkeypatch.setattr(runtimes, "_in_worker", worker)
    rows = runtimes.run(torch.device("cpu"), quick=True, smoke=True, engines=["ours"], rounds=3)
    one_round = ["transformers_fp32", *[f"ours_{p}" for p in runtimes.precisions("ours")]]
    assert calls == one_round * 3
    for row in rows:
        assert row["runs"] == 9 and row["min_ms"] == 1.0 and row["median_ms"] == 12.0, row
    with pytest.raises(ValueError, match="rounds must be at least 1"):
        runtimes.run(torch.device("cpu"), quick=True, smoke=True, rounds=0)


def test_a_runtime_that_fails_is_reported_in_its_rows_and_the_others_are_kept(monkeypatch, tmp_path):
    """An OpenVINO or ONNX Runtime worker that exits with an error gives rows with no time and its
    error in ``note`` (the report, the plot and side_by_side skip them); ours failing stops the run.
    The workers are stood in for here: each writes a random output and a timing."""
    for module in ("openvino", "nncf", "onnxruntime", "onnxscript"):
        pytest.importorskip(module, reason="the runtimes extra (pip install -e '.[runtimes]')")
    from benchmarks import report, runtimes, side_by_side

    def stand_in(failing):
        def worker(job):
            if job["engine"] == "export":
                return {}
            if f"{job['engine']}_{job['precision']}" in failing:
                raise runtimes.WorkerFailed(job, 1, "RuntimeError: no primitive for Softmax")
            timings = {}
            for workload, lengths in runtimes.workloads(job["smoke"], job["quick"]).items():
                real = int(runtimes.batch(lengths)[1].sum())
                torch.save(torch.randn(real, 8), f"{job['folder']}/out-{job['engine']}-{job['precision']}-"
                                                 f"{report._slug(workload)}.pt")
                timings[workload] = [10.0]
            return timings
        return worker

    monkeypatch.setattr(runtimes, "_in_worker", stand_in({"openvino_fp32", "onnxruntime_int8"}))
    rows = runtimes.run(torch.device("cpu"), quick=True, smoke=True)
    workloads = runtimes.workloads(smoke=True, quick=True)
    failed = [row for row in rows if row["median_ms"] is None]
    assert {(row["provider"], row["pass"]) for row in failed} == {
        (provider, workload) for provider in ("openvino_fp32", "onnxruntime_int8") for workload in workloads}
    assert all(row["note"] == "failed: RuntimeError: no primitive for Softmax" and row["cosine_min"] is None
               for row in failed)
    timed = {row["provider"] for row in rows if row["median_ms"] is not None}
    assert {"transformers_fp32", "ours_fp32", "ours_int8", "openvino_int8", "onnxruntime_fp32"} <= timed
    assert "failed: RuntimeError" in report.markdown_table(rows)
    assert report.plot(rows, tmp_path / "runtimes.png")
    assert {row["provider"] for row in side_by_side.compare([rows], [rows])} == timed
    # Ours, or the reference, failing is never excused.
    monkeypatch.setattr(runtimes, "_in_worker", stand_in({"ours_int8"}))
    with pytest.raises(runtimes.WorkerFailed, match="no primitive"):
        runtimes.run(torch.device("cpu"), quick=True, smoke=True)


def test_a_failing_worker_process_passes_its_error_on(tmp_path, capfd):
    """A real worker process that cannot load its engine (no exported model in the folder): its
    stderr reaches ours as it comes, and its last line is the reason given."""
    pytest.importorskip("openvino", reason="the runtimes extra (pip install -e '.[runtimes]')")
    from benchmarks import runtimes

    job = {"folder": str(tmp_path), "smoke": True, "quick": True, "threads": 1, "engine": "openvino",
           "precision": "fp32"}
    with pytest.raises(runtimes.WorkerFailed) as failure:
        runtimes._in_worker(job)
    err = capfd.readouterr().err
    assert "Traceback" in err and failure.value.reason in err
    assert "openvino-fp32.xml" in failure.value.reason  # OpenVINO's own words: the file it could not open


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


def test_long_context_measures_time_and_memory_growing_with_length(tmp_path):
    """Worker processes per case, peak memory per call; the window attention's memory grows about
    linearly (4x the tokens: well under 8x the memory); the line through the encoder's peaks."""
    from benchmarks import long_context

    rows = long_context.run(torch.device("cpu"), quick=False, progress=print, seq_lens=[512, 2048], repeats=1,
                            encoder=False)
    peaks = {(r["pass"], r["provider"], r["seq_len"]): r["call_peak_bytes"] for r in rows}
    for (pass_name, provider, seq_len), peak in peaks.items():
        if seq_len == 2048 and provider.startswith("block_sparse"):
            small = peaks[(pass_name, provider, 512)]
            assert 0 < peak < 8 * small, (pass_name, provider, small, peak)
    assert peaks[("attention fwd", "sdpa_dense_masked", 2048)] > 2 * 2048**2  # SDPA makes its [N, N] mask floats
    fit = long_context.longest_context(
        [{"pass": "encoder forward", "provider": "p", "seq_len": n, "peak_bytes": 1e9 + 3e4 * n} for n in (1, 2, 4)],
        "p", 2e9)
    assert abs(fit["bytes_per_token"] - 3e4) < 1e-3 and fit["max_tokens"] == 33333
