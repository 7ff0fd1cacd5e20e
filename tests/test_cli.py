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
