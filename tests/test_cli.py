"""`modernbert-kernels info` tells the truth about this machine."""

import torch

from modernbert_kernels import cli


def test_info_reports_each_backend(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    rows = {tuple(line.split()[:3]) for line in out.splitlines() if line.split()}
    live = "yes" if torch.cuda.is_available() else "no"
    for op in ("block_sparse_attention", "int8_linear", "quantize_per_token"):
        assert (op, "torch", "yes") in rows
        if not torch.cuda.is_available():
            # Under pytest without a GPU the interpreter is on, which makes the Triton row live.
            assert any(r[:2] == (op, "triton") for r in rows)
        else:
            assert (op, "triton", live) in rows
    assert "torch " + torch.__version__ in out.replace(",", "")
    for precision in ("fp32", "bf16"):  # the measured GEMM choice of each linear shape
        assert f"  {precision}   768 ->  2304: " in out


def test_info_measures_the_gemms_as_the_encoder_does():
    """`info` times the linears' GEMMs with the encoder's heap pad in place, as the encoder's first
    call does: without it, page faults on some calls made the fp32 768 -> 2304 choice flip between
    runs (a Zen 4: the packed GEMM at 32.6 or 36.7 ms per pass, against MKL's 36.3). A fresh
    process, so no earlier test has set the pad."""
    import subprocess
    import sys

    code = ("import contextlib, io\n"
            "from modernbert_kernels import cli, cpu_memory\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    cli.main(['info'])\n"
            "print(cpu_memory.pad_in_effect(), cpu_memory.configured_pad_bytes(), cpu_memory.glibc_available())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    in_effect, configured, glibc = result.stdout.split()
    assert in_effect == (configured if glibc == "True" else "None")


def test_info_is_the_registry(capsys):
    """Every (op, backend) the registry holds is a row of `info`, live as the backend says, and
    nothing else is: the table cannot go stale."""
    from modernbert_kernels import backends

    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines().index(next(line for line in out.splitlines() if line.startswith("op ")))
    rows = {tuple(line.split()[:3]) for line in out.splitlines()[header + 1:] if line.split()}
    expected = {(op, backend, "yes" if backends.BACKENDS[backend].status()[0] else "no")
                for op, entry in backends.OPS.items() for backend in entry.backends}
    assert rows == expected
    assert {op for op, _, _ in rows} == {"block_sparse_attention", "int8_linear", "quantize_per_token",
                                         "rotary_embedding"}


def test_kernel_package_imports_neither_the_encoder_nor_the_benchmarks():
    import ast
    from pathlib import Path

    import modernbert_kernels

    for path in Path(modernbert_kernels.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            for name in names:
                assert name.split(".")[0] not in ("modernbert", "benchmarks"), f"{path} imports {name}"
