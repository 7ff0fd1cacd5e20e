"""Builders of common block-sparse attention patterns.

Patterns are bidirectional (encoder attention) unless built ``causal`` (decoders: no tile above
the block diagonal), and block granular: a builder decides which (query block, key block) tiles
are computed. Lengths that define block boundaries (global tokens,
strides, chunks) must be multiples of ``block_size`` so that the block pattern is exact. The
sliding window is the exception: its layout covers every tile that holds a pair with
``|i - j| <= window`` and the exact token-level window is applied by
``block_sparse_attention(..., window=window)``, and the causal mask inside the diagonal tiles by
``block_sparse_attention(..., causal=True)``.
"""

from __future__ import annotations

import torch

from .block_sparse_layout import BlockSparseLayout, check_block_size


def _num_blocks(seq_len: int, block_size: int) -> int:
    check_block_size(block_size)
    if not isinstance(seq_len, int) or seq_len <= 0:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    return -(-seq_len // block_size)


def _in_blocks(name: str, tokens: int, block_size: int, minimum: int = 0) -> int:
    if not isinstance(tokens, int) or tokens < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {tokens!r}")
    if tokens % block_size:
        raise ValueError(
            f"{name}={tokens} must be a multiple of block_size={block_size}: layouts are block granular"
        )
    return tokens // block_size


def _block_distance(num_blocks: int) -> torch.Tensor:
    idx = torch.arange(num_blocks)
    return idx[:, None] - idx[None, :]


def sliding_window(seq_len: int, window: int, block_size: int = 64, causal: bool = False) -> BlockSparseLayout:
    """Tiles holding any pair with ``|i - j| <= window`` (ModernBERT local layers: window = 64);
    ``causal``: only those with ``0 <= i - j <= window`` (sliding-window decoders: Mistral's and
    Gemma's local layers), the blocks at and below the diagonal."""
    if not isinstance(window, int) or window < 0:
        raise ValueError(f"window must be an int >= 0, got {window!r}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    num_blocks = _num_blocks(seq_len, block_size)
    # The closest tokens of blocks d apart are (d - 1) * block_size + 1 apart, so query block m
    # visits the key blocks within `reach` of it. Built as CSR directly: memory linear in seq_len.
    reach = 0 if window == 0 else (window - 1) // block_size + 1
    rows = torch.arange(num_blocks, dtype=torch.int32)
    first = (rows - reach).clamp(min=0)
    last = rows if causal else (rows + reach).clamp(max=num_blocks - 1)
    counts = last - first + 1
    row_offsets = torch.zeros(num_blocks + 1, dtype=torch.int32)
    row_offsets[1:] = counts.cumsum(0)
    entry = torch.arange(int(row_offsets[-1]), dtype=torch.int32)
    row_of_entry = torch.repeat_interleave(rows, counts)
    col_indices = first[row_of_entry] + entry - row_offsets[:-1][row_of_entry]
    return BlockSparseLayout(row_offsets[None], col_indices, block_size)


def causal(seq_len: int, block_size: int = 64) -> BlockSparseLayout:
    """Every tile at or below the block diagonal: a decoder's global (full causal) layers, with
    ``block_sparse_attention(..., causal=True)`` masking inside the diagonal tiles."""
    num_blocks = _num_blocks(seq_len, block_size)
    return BlockSparseLayout.from_block_mask(_block_distance(num_blocks) >= 0, block_size)


def dense(seq_len: int, block_size: int = 64) -> BlockSparseLayout:
    """Every tile: dense attention (ModernBERT's global layers). (N / block_size)^2 int32 entries."""
    return BlockSparseLayout.dense(_num_blocks(seq_len, block_size), block_size)


def global_tokens(seq_len: int, num_global: int, block_size: int = 64) -> BlockSparseLayout:
    """The first ``num_global`` tokens see every token and are seen by every token."""
    num_blocks = _num_blocks(seq_len, block_size)
    g = _in_blocks("num_global", num_global, block_size, minimum=block_size)
    idx = torch.arange(num_blocks)
    mask = (idx[:, None] < g) | (idx[None, :] < g)
    return BlockSparseLayout.from_block_mask(mask, block_size)


def strided(seq_len: int, stride: int, block_size: int = 64) -> BlockSparseLayout:
    """Sparse Transformer "strided" pattern (Child et al. 2019), bidirectional, at block level.

    Query block ``a`` sees key block ``b`` when ``|a - b| < stride / block_size`` (the local part)
    or when ``(a - b)`` is a multiple of ``stride / block_size`` (the strided part).
    """
    num_blocks = _num_blocks(seq_len, block_size)
    s = _in_blocks("stride", stride, block_size, minimum=block_size)
    distance = _block_distance(num_blocks)
    mask = (distance.abs() < s) | (distance % s == 0)
    return BlockSparseLayout.from_block_mask(mask, block_size)


def fixed(seq_len: int, stride: int, num_summary: int, block_size: int = 64) -> BlockSparseLayout:
    """Sparse Transformer "fixed" pattern (Child et al. 2019), bidirectional, at block level.

    Tokens see their own chunk of ``stride`` tokens, and every token sees the last ``num_summary``
    tokens of each chunk (the summary positions).
    """
    num_blocks = _num_blocks(seq_len, block_size)
    s = _in_blocks("stride", stride, block_size, minimum=block_size)
    c = _in_blocks("num_summary", num_summary, block_size, minimum=block_size)
    if c > s:
        raise ValueError(f"num_summary={num_summary} must not exceed stride={stride}")
    idx = torch.arange(num_blocks)
    same_chunk = (idx[:, None] // s) == (idx[None, :] // s)
    summary = (idx[None, :] % s) >= (s - c)
    return BlockSparseLayout.from_block_mask(same_chunk | summary.expand(num_blocks, -1), block_size)


def dilated(seq_len: int, window: int, dilation: int, block_size: int = 64) -> BlockSparseLayout:
    """Every ``dilation``-th block within ``window`` tokens of the query block (own block included)."""
    num_blocks = _num_blocks(seq_len, block_size)
    w = _in_blocks("window", window, block_size)
    if not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"dilation must be an int >= 1, got {dilation!r}")
    distance = _block_distance(num_blocks)
    mask = (distance.abs() <= w) & (distance % dilation == 0)
    return BlockSparseLayout.from_block_mask(mask, block_size)


def bigbird(
    seq_len: int,
    window: int,
    num_global: int,
    num_random: int,
    block_size: int = 64,
    seed: int = 0,
    num_heads: int = 1,
) -> BlockSparseLayout:
    """BigBird (Zaheer et al. 2020): sliding window + global tokens + random key blocks.

    Each query block of each head gets ``num_random`` extra key blocks drawn without replacement
    (from a generator seeded with ``seed``) among those the window and global parts do not cover.
    """
    if not isinstance(num_random, int) or num_random < 0:
        raise ValueError(f"num_random must be an int >= 0, got {num_random!r}")
    if not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be an int >= 1, got {num_heads!r}")
    base = union(
        sliding_window(seq_len, window, block_size), global_tokens(seq_len, num_global, block_size)
    ).to_block_mask()[0]
    generator = torch.Generator().manual_seed(seed)
    mask = base.expand(num_heads, -1, -1).clone()
    for h in range(num_heads):
        for row in range(base.shape[0]):
            free = torch.nonzero(~base[row])[:, 0]
            if free.numel():
                pick = free[torch.randperm(free.numel(), generator=generator)[:num_random]]
                mask[h, row, pick] = True
    return BlockSparseLayout.from_block_mask(mask, block_size)


def from_block_mask(block_mask: torch.Tensor, block_size: int) -> BlockSparseLayout:
    """Any pattern, from a boolean ``[num_heads, num_blocks, num_blocks]`` (or 2-D) block mask."""
    return BlockSparseLayout.from_block_mask(block_mask, block_size)


def union(*layouts: BlockSparseLayout) -> BlockSparseLayout:
    """Tiles visited by any of ``layouts``; a one-head layout broadcasts over the others' heads."""
    if not layouts:
        raise ValueError("union() needs at least one layout")
    first = layouts[0]
    heads = {lay.num_heads for lay in layouts} - {1}
    if len(heads) > 1:
        raise ValueError(f"union() of layouts with different head counts: {sorted(heads)}")
    for lay in layouts[1:]:
        if lay.block_size != first.block_size or lay.num_blocks != first.num_blocks:
            raise ValueError(
                "union() needs equal block_size and num_blocks, got "
                f"({first.block_size}, {first.num_blocks}) and ({lay.block_size}, {lay.num_blocks})"
            )
    num_heads = heads.pop() if heads else 1
    mask = torch.zeros(num_heads, first.num_blocks, first.num_blocks, dtype=torch.bool)
    for lay in layouts:
        mask |= lay.to_block_mask()
    return BlockSparseLayout.from_block_mask(mask, first.block_size)
