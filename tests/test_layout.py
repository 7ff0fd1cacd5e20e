import pytest
import torch

from modernbert_kernels import BlockSparseLayout, layouts


def token_mask(seq_len, block_size, rule):
    """Token-level mask written from a pattern's definition, independently of the builders."""
    i = torch.arange(seq_len)[:, None]
    j = torch.arange(seq_len)[None, :]
    return rule(i, j, i // block_size, j // block_size)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("window", [0, 1, 16, 40, 64, 65, 1000])
@pytest.mark.parametrize("seq_len", [64, 200, 512])
@pytest.mark.parametrize("block_size", [16, 32, 64])
def test_sliding_window_covers_exactly_the_tiles_of_the_window(seq_len, block_size, window, causal):
    lay = layouts.sliding_window(seq_len, window, block_size, causal=causal)
    near = token_mask(seq_len, block_size, lambda i, j, bi, bj: ((i - j).abs() <= window) & ((i >= j) | (not causal)))
    dense = lay.to_dense_mask(seq_len)[0]
    # Every in-window pair is covered, and every covered tile holds at least one in-window pair.
    assert torch.equal(dense & near, near)
    tiles_with_pairs = torch.zeros(lay.num_blocks, lay.num_blocks, dtype=torch.bool)
    idx = torch.nonzero(near)
    tiles_with_pairs[idx[:, 0] // block_size, idx[:, 1] // block_size] = True
    assert torch.equal(lay.to_block_mask()[0], tiles_with_pairs)


@pytest.mark.parametrize("seq_len,block_size", [(1, 16), (200, 32), (512, 64)])
def test_causal_layout_is_the_tiles_at_and_below_the_diagonal(seq_len, block_size):
    lay = layouts.causal(seq_len, block_size)
    expected = token_mask(seq_len, block_size, lambda i, j, bi, bj: bj <= bi)
    assert torch.equal(lay.to_dense_mask(seq_len)[0], expected)


@pytest.mark.parametrize("heads", [1, 3])
@pytest.mark.parametrize("seq_len,block_size", [(1, 16), (200, 32), (512, 64)])
def test_dense_layout_is_every_tile_and_its_own_transpose(seq_len, block_size, heads):
    num_blocks = -(-seq_len // block_size)
    everything = torch.ones(heads, num_blocks, num_blocks, dtype=torch.bool)
    lay = layouts.dense(seq_len, block_size) if heads == 1 else layouts.from_block_mask(everything, block_size)
    assert torch.equal(lay.to_block_mask(), everything)
    assert lay.dense_blocks == num_blocks
    for h in range(heads):  # the transpose, checked entry by entry as for any layout
        for col in range(num_blocks):
            lo, hi = lay.col_offsets[h, col], lay.col_offsets[h, col + 1]
            assert lay.row_indices[lo:hi].tolist() == list(range(num_blocks))


LAYOUT_PEAKS = """
import json, torch
from benchmarks.timing import peak_memory
from modernbert_kernels.cpu_memory import return_freed_memory_to_the_os
from modernbert_kernels import layouts
return_freed_memory_to_the_os()
layouts.sliding_window(1024, 64, 64), layouts.dense(1024, 64)  # libraries loaded before measuring
kept = []
peaks = [peak_memory(lambda: kept.append(build()), torch.device("cpu"))["call_peak_bytes"]
         for build in (lambda: layouts.sliding_window(1 << 20, 64, 64), lambda: layouts.dense(1 << 18, 64))]
print(json.dumps(peaks))
"""


def test_layout_memory_sliding_window_linear_dense_four_bytes_per_tile():
    """Peak memory of building ModernBERT's layouts (in a fresh process, by its peak resident set):
    a window over 1M tokens stays small (3 tiles per block row; a [blocks, blocks] int64 scratch
    would be 2 GiB), and a dense layout over 256k tokens costs ~8 bytes per tile (its int32
    col_indices, which is also its transpose, and the validation's scratch), not the ~60 of a
    boolean mask, nonzero() and a sorted transpose."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    # benchmarks/ sits beside tests/ in a checkout, inside the tests' folder in the wheel's CI run.
    here = Path(__file__).parent
    path = os.pathsep.join([str(here), str(here.parent), os.environ.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", LAYOUT_PEAKS], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": path})
    window_peak, dense_peak = json.loads(done.stdout.splitlines()[-1])
    assert window_peak < 32 << 20, window_peak
    tiles = 4096**2
    assert dense_peak < 10 * tiles, dense_peak / tiles


def test_global_tokens_dense_mask():
    lay = layouts.global_tokens(200, 64, 32)
    expected = token_mask(200, 32, lambda i, j, bi, bj: (i < 64) | (j < 64))
    assert torch.equal(lay.to_dense_mask(200)[0], expected)


def test_strided_dense_mask():
    lay = layouts.strided(320, 96, 32)
    expected = token_mask(320, 32, lambda i, j, bi, bj: ((bi - bj).abs() < 3) | ((bi - bj) % 3 == 0))
    assert torch.equal(lay.to_dense_mask(320)[0], expected)


def test_fixed_dense_mask():
    lay = layouts.fixed(300, 128, 32, 32)
    expected = token_mask(300, 32, lambda i, j, bi, bj: (i // 128 == j // 128) | (j % 128 >= 96))
    assert torch.equal(lay.to_dense_mask(300)[0], expected)


def test_dilated_dense_mask():
    lay = layouts.dilated(400, 128, 2, 32)
    expected = token_mask(400, 32, lambda i, j, bi, bj: ((bi - bj).abs() <= 4) & ((bi - bj) % 2 == 0))
    assert torch.equal(lay.to_dense_mask(400)[0], expected)


def test_bigbird_has_window_global_and_random_blocks_per_head():
    lay = layouts.bigbird(512, 32, 32, 2, 32, seed=3, num_heads=4)
    assert lay.num_heads == 4
    blocks = lay.to_block_mask()
    base = layouts.union(layouts.sliding_window(512, 32, 32), layouts.global_tokens(512, 32, 32)).to_block_mask()
    assert torch.equal(blocks & base, base.expand_as(blocks))
    extra = (blocks & ~base).sum(-1)
    free = (~base).sum(-1)
    assert torch.equal(extra, torch.minimum(free, torch.tensor(2)).expand_as(extra))
    assert not torch.equal(blocks[0], blocks[1]), "heads should draw different random blocks"
    assert lay == layouts.bigbird(512, 32, 32, 2, 32, seed=3, num_heads=4)


def test_from_block_mask_round_trip_and_union():
    torch.manual_seed(0)
    mask = torch.rand(3, 7, 7) < 0.4
    lay = layouts.from_block_mask(mask, 16)
    assert torch.equal(lay.to_block_mask(), mask)
    shared = layouts.sliding_window(7 * 16, 0, 16)
    both = layouts.union(lay, shared)
    assert both.num_heads == 3
    assert torch.equal(both.to_block_mask(), mask | torch.eye(7, dtype=torch.bool))


def test_transposed_csr_lists_the_query_blocks_of_each_key_block():
    torch.manual_seed(1)
    mask = torch.rand(2, 9, 9) < 0.5
    lay = BlockSparseLayout.from_block_mask(mask, 32)
    for h in range(2):
        for col in range(9):
            lo, hi = lay.col_offsets[h, col], lay.col_offsets[h, col + 1]
            assert lay.row_indices[lo:hi].tolist() == torch.nonzero(mask[h, :, col])[:, 0].tolist()


def test_empty_rows_are_allowed():
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[0, 1] = True
    lay = BlockSparseLayout.from_block_mask(mask, 16)
    assert lay.nnz == 1 and lay.to_dense_mask(64).sum() == 16 * 16


@pytest.mark.parametrize(
    "row_offsets, col_indices, message",
    [
        ([[0, 2, 3]], [1, 0, 1], "not sorted"),
        ([[0, 2, 3]], [1, 1, 0], "duplicated"),
        ([[0, 1, 2]], [0, 2], "out of range"),
        ([[0, 2, 1]], [0, 1], "non-decreasing"),
        ([[1, 2, 3]], [0, 1, 0], "must be 0"),
        ([[0, 1, 2]], [0, 1, 1], "entries"),
        ([[0, 1, 2], [1, 2, 3]], [0, 1, 0], "must start where head 0 ends"),
    ],
)
def test_invalid_csr_says_what_is_wrong(row_offsets, col_indices, message):
    with pytest.raises(ValueError, match=message):
        BlockSparseLayout(
            torch.tensor(row_offsets, dtype=torch.int32), torch.tensor(col_indices, dtype=torch.int32), 32
        )


def test_invalid_arguments():
    with pytest.raises(TypeError, match="int32"):
        BlockSparseLayout(torch.tensor([[0, 1]]), torch.tensor([0], dtype=torch.int32), 32)
    with pytest.raises(ValueError, match="block_size"):
        layouts.sliding_window(128, 8, 256)
    with pytest.raises(ValueError, match="multiple of block_size"):
        layouts.global_tokens(128, 40, 32)
    with pytest.raises(ValueError, match="covers"):
        layouts.sliding_window(128, 8, 32).to_dense_mask(129)
    with pytest.raises(ValueError, match="different head counts"):
        layouts.union(layouts.bigbird(128, 8, 32, 1, 32, num_heads=2), layouts.bigbird(128, 8, 32, 1, 32, num_heads=3))
