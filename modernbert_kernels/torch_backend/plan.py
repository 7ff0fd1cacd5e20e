"""A layout's visited tiles as groups that each cost one batched matmul.

- diagonal runs: query blocks ``[start, stop)`` visiting key blocks ``[start + offset, stop + offset)``.
  Blocks are stored block-major (``[num_blocks, batch, heads, block, dim]``), so both operands of a
  run are contiguous slices and nothing is copied. Sliding-window, dilated and strided layouts are
  almost entirely runs.
- the rest (global columns, random blocks, short runs): key blocks gathered per query block.

A plan depends only on the layout and the number of blocks the sequence covers, so it is cached
on the layout's tensors: an encoder plans each layout once, not once per layer and sequence.
"""

from __future__ import annotations

import dataclasses

import torch

from ..block_sparse_layout import dense_prefix_blocks
from ..tensor_cache import TensorCache, version

# Diagonal runs shorter than this go to the gathered rest: one matmul per run must pay off.
MIN_RUN = 4


@dataclasses.dataclass(frozen=True)
class Run:
    offset: int
    start: int
    stop: int


@dataclasses.dataclass
class HeadPlan:
    """One layout head's tile groups."""

    runs: list
    rest_rows: torch.Tensor  # query blocks with at least one gathered tile
    rest_keys: torch.Tensor  # [len(rest_rows), width] key blocks (0 where not valid)
    rest_valid: torch.Tensor  # [len(rest_rows), width]

    @property
    def width(self) -> int:
        """Key blocks per query block in the widest group step (sizes the score chunks)."""
        return max(1, self.rest_keys.shape[1]) + len({run.offset for run in self.runs})


@dataclasses.dataclass
class LayoutPlan:
    heads: list  # a HeadPlan per layout head
    dense: bool  # every query block visits every key block of the sequence


def _plan_head(row_offsets: torch.Tensor, col_indices: torch.Tensor, num_blocks: int, min_run: int) -> HeadPlan:
    """One head's CSR rows, cut to ``num_blocks`` (a layout built for a longer sequence), as groups."""
    device = row_offsets.device
    counts = (row_offsets[1 : num_blocks + 1] - row_offsets[:num_blocks]).long()
    rows = torch.repeat_interleave(torch.arange(num_blocks, device=device), counts)
    cols = col_indices[int(row_offsets[0]) : int(row_offsets[num_blocks])].long()
    inside = cols < num_blocks
    rows, cols = rows[inside], cols[inside]
    offsets = cols - rows
    order = torch.argsort(offsets * num_blocks + rows)
    offsets, rows = offsets[order], rows[order]
    starts_run = torch.ones_like(rows, dtype=torch.bool)
    starts_run[1:] = (offsets[1:] != offsets[:-1]) | (rows[1:] != rows[:-1] + 1)
    run_id = torch.cumsum(starts_run, 0) - 1
    run_length = torch.bincount(run_id) if rows.numel() else run_id
    long_enough = run_length >= min_run
    first = torch.nonzero(starts_run)[:, 0][long_enough]
    runs = [
        Run(offset, start, start + length)
        for offset, start, length in zip(offsets[first].tolist(), rows[first].tolist(), run_length[long_enough].tolist())
    ]
    in_run = long_enough[run_id] if rows.numel() else starts_run
    rest_rows_all, rest_cols = rows[~in_run], (offsets + rows)[~in_run]
    by_row = torch.argsort(rest_rows_all * num_blocks + rest_cols)
    rest_rows_all, rest_cols = rest_rows_all[by_row], rest_cols[by_row]
    rest_rows, per_row = torch.unique_consecutive(rest_rows_all, return_counts=True)
    width = int(per_row.max()) if per_row.numel() else 0
    slot = torch.arange(width, device=device)
    rest_valid = slot < per_row[:, None]
    first_of_row = torch.cumsum(per_row, 0) - per_row
    position = (first_of_row[:, None] + slot).clamp(max=max(rest_cols.numel() - 1, 0))
    rest_keys = torch.where(rest_valid, rest_cols[position], 0) if rest_cols.numel() else position
    return HeadPlan(runs, rest_rows, rest_keys, rest_valid)


_plans = TensorCache()


def layout_plan(row_offsets: torch.Tensor, col_indices: torch.Tensor, num_blocks: int) -> LayoutPlan:
    """The plan of the layout (row_offsets, col_indices) over its first ``num_blocks`` blocks."""

    def compute():
        heads = [_plan_head(row_offsets[h], col_indices, num_blocks, MIN_RUN) for h in range(row_offsets.shape[0])]
        return LayoutPlan(heads, num_blocks <= dense_prefix_blocks(row_offsets, col_indices))

    key = (num_blocks, id(col_indices), version(col_indices), MIN_RUN)
    return _plans.get(row_offsets, key, compute)
