"""Pack a padded batch into one token stream (and back), so no FLOP is spent on padding."""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class PackedBatch:
    indices: torch.Tensor  # [total_tokens] positions of the real tokens in the flattened [batch * seq]
    cu_seqlens: torch.Tensor  # int32 [batch + 1]
    max_seqlen: int
    positions: torch.Tensor  # [total_tokens] position of each token inside its sequence
    batch: int
    seq_len: int


def pack(attention_mask: torch.Tensor) -> PackedBatch:
    """attention_mask [batch, seq] (1 = real token) -> where the real tokens are.

    Tokens keep their order; positions restart at 0 for every sequence, so a right-padded batch
    gets the positions it would have unpadded. Two host reads (the real tokens' positions and
    the longest length): the only ones of an encoder forward.
    """
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be [batch, seq], got shape {tuple(attention_mask.shape)}")
    mask = attention_mask.bool()
    lengths = mask.sum(1, dtype=torch.int32)
    cu_seqlens = torch.zeros(mask.shape[0] + 1, dtype=torch.int32, device=mask.device)
    cu_seqlens[1:] = torch.cumsum(lengths, 0)
    indices = torch.nonzero(mask.reshape(-1))[:, 0]
    positions = torch.cumsum(mask, 1).reshape(-1)[indices] - 1
    return PackedBatch(indices, cu_seqlens, int(lengths.max()) if lengths.numel() else 0, positions,
                       mask.shape[0], mask.shape[1])


def unpack(packed_values: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """[total_tokens, ...] -> [batch, seq, ...] with zeros at padding (a view where there is none:
    every token is real, in order)."""
    if packed_values.shape[0] == batch.batch * batch.seq_len:
        return packed_values.reshape(batch.batch, batch.seq_len, *packed_values.shape[1:])
    out = packed_values.new_zeros(batch.batch * batch.seq_len, *packed_values.shape[1:])
    out[batch.indices] = packed_values
    return out.reshape(batch.batch, batch.seq_len, *packed_values.shape[1:])
