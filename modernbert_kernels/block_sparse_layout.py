"""BlockSparseLayout: which key blocks each query block visits, per head, in CSR form."""

from __future__ import annotations

import torch

MIN_BLOCK_SIZE = 16
MAX_BLOCK_SIZE = 128


def check_block_size(block_size) -> None:
    """Block sizes are powers of two in [16, 128]: the kernels' tiles divide them."""
    if not isinstance(block_size, int) or isinstance(block_size, bool) or not (
        MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE
    ):
        raise ValueError(f"block_size must be an int in [{MIN_BLOCK_SIZE}, {MAX_BLOCK_SIZE}], got {block_size!r}")
    if block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")


class BlockSparseLayout:
    """A square block-sparse attention pattern.

    The sequence is cut into ``num_blocks`` blocks of ``block_size`` tokens; query block ``m`` of head
    ``h`` visits the key blocks ``col_indices[row_offsets[h, m]:row_offsets[h, m + 1]]`` (sorted,
    no duplicates). ``row_offsets`` indexes one flat ``col_indices`` shared by all heads, so a kernel
    needs only one base pointer. ``col_offsets`` / ``row_indices`` hold the transposed pattern (for
    each key block, the query blocks that visit it), which the backward pass walks to accumulate
    dK and dV without atomics.

    ``num_heads == 1`` means one pattern shared by every attention head.
    """

    def __init__(self, row_offsets: torch.Tensor, col_indices: torch.Tensor, block_size: int):
        check_block_size(block_size)
        for name, t in (("row_offsets", row_offsets), ("col_indices", col_indices)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype != torch.int32:
                raise TypeError(f"{name} must be int32, got {t.dtype}")
        if row_offsets.dim() != 2 or row_offsets.shape[1] < 2:
            raise ValueError(
                f"row_offsets must have shape [num_heads, num_blocks + 1], got {tuple(row_offsets.shape)}"
            )
        if col_indices.dim() != 1:
            raise ValueError(f"col_indices must be 1-D, got shape {tuple(col_indices.shape)}")

        self.block_size = block_size
        self.row_offsets = row_offsets.detach().to("cpu").contiguous()
        self.col_indices = col_indices.detach().to("cpu").contiguous()
        self._validate()
        if self.nnz == self.num_heads * self.num_blocks**2:
            # Valid rows are sorted without duplicates, so this many entries means every row
            # visits every block: the layout is its own transpose. Skipping the general
            # transposition saves its ~40 bytes of int64 scratch per visited block (a global
            # layer's layout has (N / block)^2 of them).
            self.col_offsets, self.row_indices = self.row_offsets, self.col_indices
            self.dense_blocks = self.num_blocks
        else:
            self.col_offsets, self.row_indices = _transpose_csr(self.row_offsets, self.col_indices, self.num_blocks)
            self.dense_blocks = dense_prefix_blocks(self.row_offsets, self.col_indices)
        self._device_copies: dict[torch.device, tuple[torch.Tensor, ...]] = {}
        self._block_masks: dict[torch.device, torch.Tensor] = {}

    @property
    def num_heads(self) -> int:
        return self.row_offsets.shape[0]

    @property
    def num_blocks(self) -> int:
        return self.row_offsets.shape[1] - 1

    @property
    def nnz(self) -> int:
        """Number of visited (query block, key block) pairs, summed over heads."""
        return self.col_indices.numel()

    def density(self) -> float:
        return self.nnz / (self.num_heads * self.num_blocks * self.num_blocks)

    def _validate(self) -> None:
        offsets = self.row_offsets
        heads, num_blocks = self.num_heads, self.num_blocks
        flat = offsets.reshape(-1)
        if int(offsets[0, 0]) != 0:
            raise ValueError(f"row_offsets[0, 0] must be 0, got {int(offsets[0, 0])}")
        for h in range(1, heads):
            if int(offsets[h, 0]) != int(offsets[h - 1, -1]):
                raise ValueError(
                    f"row_offsets of head {h} must start where head {h - 1} ends "
                    f"({int(offsets[h - 1, -1])}), got {int(offsets[h, 0])}"
                )
        steps = flat[1:] - flat[:-1]
        if (steps < 0).any():
            pos = int(torch.nonzero(steps < 0)[0, 0]) + 1
            raise ValueError(
                f"row_offsets must be non-decreasing; it decreases at head {pos // (num_blocks + 1)}, "
                f"entry {pos % (num_blocks + 1)}"
            )
        if int(offsets[-1, -1]) != self.col_indices.numel():
            raise ValueError(
                f"row_offsets[-1, -1] = {int(offsets[-1, -1])} but col_indices has "
                f"{self.col_indices.numel()} entries"
            )
        cols = self.col_indices
        if cols.numel() == 0:
            return
        if int(cols.min()) < 0 or int(cols.max()) >= num_blocks:
            bad = int(torch.nonzero((cols < 0) | (cols >= num_blocks))[0, 0])
            raise ValueError(
                f"col_indices[{bad}] = {int(cols[bad])} is out of range [0, {num_blocks})"
            )
        # Within a row the indices must strictly increase; a step <= 0 that is not at a row start
        # is an unsorted or duplicated entry.
        row_starts = torch.zeros(cols.numel(), dtype=torch.bool)
        starts = offsets[:, :-1].reshape(-1).long()
        row_starts[starts[starts < cols.numel()]] = True
        bad_steps = (cols[1:] <= cols[:-1]) & ~row_starts[1:]
        if bad_steps.any():
            pos = int(torch.nonzero(bad_steps)[0, 0]) + 1
            row_of_pos = int(torch.searchsorted(flat[1:].contiguous(), torch.tensor(pos), right=True))
            head, row = divmod(row_of_pos, num_blocks + 1)
            kind = "duplicated" if int(cols[pos]) == int(cols[pos - 1]) else "not sorted"
            raise ValueError(
                f"col_indices of head {head}, query block {row} are {kind}: "
                f"{int(cols[pos - 1])} is followed by {int(cols[pos])}"
            )

    def to_block_mask(self) -> torch.Tensor:
        """Boolean ``[num_heads, num_blocks, num_blocks]``: True where a block is visited."""
        mask = torch.zeros(self.num_heads, self.num_blocks, self.num_blocks, dtype=torch.bool)
        counts = (self.row_offsets[:, 1:] - self.row_offsets[:, :-1]).reshape(-1).long()
        rows = torch.repeat_interleave(torch.arange(self.num_heads * self.num_blocks), counts)
        mask.view(-1, self.num_blocks)[rows, self.col_indices.long()] = True
        return mask

    def to_dense_mask(self, seq_len: int) -> torch.Tensor:
        """Boolean ``[num_heads, seq_len, seq_len]``: True where query i may see key j."""
        if seq_len > self.num_blocks * self.block_size:
            raise ValueError(
                f"layout covers {self.num_blocks * self.block_size} tokens "
                f"({self.num_blocks} blocks of {self.block_size}), fewer than seq_len={seq_len}"
            )
        dense = self.to_block_mask().repeat_interleave(self.block_size, 1)
        dense = dense.repeat_interleave(self.block_size, 2)
        return dense[:, :seq_len, :seq_len].contiguous()

    def tensors_on(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(row_offsets, col_indices, col_offsets, row_indices) on ``device``, copied once."""
        device = torch.device(device)
        if device not in self._device_copies:
            self._device_copies[device] = tuple(
                t.to(device)
                for t in (self.row_offsets, self.col_indices, self.col_offsets, self.row_indices)
            )
        return self._device_copies[device]

    def block_mask_on(self, device: torch.device) -> torch.Tensor:
        """``to_block_mask()`` on ``device``, made once (global tokens look tiles up in it)."""
        device = torch.device(device)
        if device not in self._block_masks:
            self._block_masks[device] = self.to_block_mask().to(device)
        return self._block_masks[device]

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, BlockSparseLayout)
            and self.block_size == other.block_size
            and torch.equal(self.row_offsets, other.row_offsets)
            and torch.equal(self.col_indices, other.col_indices)
        )

    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return (
            f"BlockSparseLayout(num_heads={self.num_heads}, num_blocks={self.num_blocks}, "
            f"block_size={self.block_size}, nnz={self.nnz}, density={self.density():.3f})"
        )

    @classmethod
    def dense(cls, num_blocks: int, block_size: int) -> "BlockSparseLayout":
        """Every query block visits every key block, built as int32 CSR directly (4 bytes per
        block pair; a boolean mask and its int64 nonzero() would take 25)."""
        if num_blocks * (num_blocks + 1) > torch.iinfo(torch.int32).max:
            raise ValueError(f"a dense layout of {num_blocks} blocks has more entries than int32 offsets can index")
        row_offsets = (torch.arange(num_blocks + 1, dtype=torch.int32) * num_blocks)[None]
        return cls(row_offsets, torch.arange(num_blocks, dtype=torch.int32).repeat(num_blocks), block_size)

    @classmethod
    def from_block_mask(cls, block_mask: torch.Tensor, block_size: int) -> "BlockSparseLayout":
        """Build from a boolean ``[num_heads, num_blocks, num_blocks]`` (or 2-D) block mask."""
        if not isinstance(block_mask, torch.Tensor) or block_mask.dtype != torch.bool:
            raise TypeError("block_mask must be a bool tensor")
        if block_mask.dim() == 2:
            block_mask = block_mask.unsqueeze(0)
        if block_mask.dim() != 3 or block_mask.shape[1] != block_mask.shape[2]:
            raise ValueError(
                "block_mask must have shape [num_heads, num_blocks, num_blocks], "
                f"got {tuple(block_mask.shape)}"
            )
        block_mask = block_mask.to("cpu")
        heads, num_blocks, _ = block_mask.shape
        counts = block_mask.sum(-1).reshape(-1)
        row_offsets = torch.zeros(heads * num_blocks + 1, dtype=torch.int64)
        row_offsets[1:] = torch.cumsum(counts, 0)
        # Per head the offsets run [start, ..., end]; neighbouring heads share their boundary value.
        per_head = torch.stack(
            [row_offsets[h * num_blocks : (h + 1) * num_blocks + 1] for h in range(heads)]
        )
        col_indices = torch.nonzero(block_mask.reshape(-1, num_blocks))[:, 1]
        return cls(per_head.to(torch.int32), col_indices.to(torch.int32), block_size)


def dense_prefix_blocks(row_offsets: torch.Tensor, col_indices: torch.Tensor) -> int:
    """The largest n such that, in every head, query blocks 0..n-1 all visit key blocks 0..n-1:
    over a sequence of at most n blocks the layout is plain dense attention."""
    heads, num_blocks = row_offsets.shape[0], row_offsets.shape[1] - 1
    if num_blocks == 0 or col_indices.numel() == 0:
        return 0
    counts = (row_offsets[:, 1:] - row_offsets[:, :-1]).reshape(-1).long()
    rows = torch.repeat_interleave(torch.arange(heads * num_blocks, device=row_offsets.device), counts)
    position = torch.arange(col_indices.numel(), device=row_offsets.device) - row_offsets[:, :-1].reshape(-1).long()[rows]
    # Leading entries of a row that are 0, 1, 2, ...: the key blocks it visits without a gap.
    mismatch = col_indices.long() != position
    leading = counts.clone()
    leading.scatter_reduce_(0, rows[mismatch], position[mismatch], "amin")
    # Dense over n blocks: every row r < n of every head leads with at least n such entries.
    shortest = leading.reshape(heads, num_blocks).amin(0).cummin(0).values
    return int((shortest >= torch.arange(1, num_blocks + 1, device=row_offsets.device)).sum())


def _transpose_csr(
    row_offsets: torch.Tensor, col_indices: torch.Tensor, num_blocks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    heads = row_offsets.shape[0]
    counts = (row_offsets[:, 1:] - row_offsets[:, :-1]).long()
    rows = torch.arange(num_blocks).repeat(heads).repeat_interleave(counts.reshape(-1))
    heads_of_entry = torch.arange(heads).repeat_interleave(counts.sum(-1))
    # Sort entries by (head, key block, query block): a stable sort on the key block keeps the
    # query blocks ascending because entries are already ordered by (head, query block).
    key = heads_of_entry * num_blocks + col_indices.long()
    order = torch.sort(key, stable=True).indices
    row_indices = rows[order].to(torch.int32)
    col_counts = torch.bincount(key, minlength=heads * num_blocks).reshape(heads, num_blocks)
    col_offsets = torch.zeros(heads, num_blocks + 1, dtype=torch.int64)
    col_offsets[:, 1:] = torch.cumsum(col_counts, -1)
    col_offsets += torch.cat([torch.zeros(1, dtype=torch.int64), counts.sum(-1).cumsum(0)[:-1]])[:, None]
    return col_offsets.to(torch.int32), row_indices
