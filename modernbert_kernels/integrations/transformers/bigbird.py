"""BigBird's block-sparse attention (``attention_type="block_sparse"``) on block_sparse_attention.

transformers computes BigBird in five parts (the first and last query blocks against every key; the
second and second-to-last; the middle blocks against three sliding blocks, the first and last block
and ``num_random_blocks`` random blocks), gathering copies of the random key blocks. Here the same
pattern is one layout per head, with the layout block equal to BigBird's block, run by the kernels:

- query blocks 0 and n-1: every key block; block 1: {0, 1, 2, n-1}; block n-2: {0, n-3, n-2, n-1};
  a middle block i: {0, i-1, i, i+1, n-1}; and each of blocks 1..n-2 its random blocks;
- transformers draws the random blocks with its own helpers, seeded with the layer's seed in
  training; in eval they are all block 0, which the first block already covers, so its keys count
  1 + num_random_blocks times in those rows' softmax. A random block that repeats a block the row
  already has is therefore appended to the keys as a copy (and to the queries as empty rows whose
  outputs are dropped), visited by the rows that drew it: every copy transformers attends to is a
  key here too, so outputs and gradients match.

Masks are transformers': padded keys are seen by no one (but the random keys of query blocks 1 and
n-2, which transformers does not mask; a padded block drawn there in training is the one case not
served), and padded queries output 0.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from ... import layouts
from ...attention import block_sparse_attention


def _random_blocks(module, seq_len: int) -> np.ndarray:
    """[heads, blocks - 2, random blocks] as transformers draws them for this layer (its helpers,
    its seeding: the layer's seed in training, none needed in eval)."""
    block, heads, count = module.block_size, module.num_attention_heads, module.num_random_blocks
    if module.training:
        np.random.seed(module.seed)
    if seq_len in (1024, 3072, 4096):  # the plans of the BigBird paper
        drawn = [module._bigbird_block_rand_mask(module.max_seqlen, module.max_seqlen, block, block, count,
                                                 last_idx=1024)[: seq_len // block - 2] for _ in range(heads)]
    else:
        plan_lengths, plan_counts = module._get_rand_attn_plan(seq_len, block, count)
        drawn = module._bigbird_block_rand_mask_with_head(
            from_seq_length=seq_len, to_seq_length=seq_len, from_block_size=block, to_block_size=block,
            num_heads=heads, plan_from_length=plan_lengths, plan_num_rand_blocks=plan_counts)
    return np.stack(drawn)


def _fixed_blocks(row: int, num_blocks: int) -> list[int]:
    """The key blocks of query block ``row`` besides the random ones."""
    last = num_blocks - 1
    if row in (0, last):
        return list(range(num_blocks))
    if row == 1:
        return [0, 1, 2, last]
    if row == last - 1:
        return [0, last - 2, last - 1, last]
    return [0, row - 1, row, row + 1, last]


@functools.lru_cache(maxsize=32)
def _plan(random_bytes: bytes, shape: tuple, num_blocks: int, block: int):
    """(layout over the blocks plus the appended copies, [heads, copies] source block of each copy)."""
    random = np.frombuffer(random_bytes, dtype=np.int32).reshape(shape)
    heads = shape[0]
    visits, copies = [], []
    for head in range(heads):
        rows = [set(_fixed_blocks(row, num_blocks)) for row in range(num_blocks)]
        repeats = [{} for _ in range(num_blocks)]  # row -> {source block: copies it needs}
        for row in range(1, num_blocks - 1):
            for source in random[head, row - 1].tolist():
                if source in rows[row]:
                    repeats[row][source] = repeats[row].get(source, 0) + 1
                else:
                    rows[row].add(source)
        needed = {}  # source -> copies the head appends (the most any row needs)
        for row_repeats in repeats:
            for source, count in row_repeats.items():
                needed[source] = max(needed.get(source, 0), count)
        slots = [(source, n) for source in sorted(needed) for n in range(needed[source])]
        visits.append((rows, repeats, slots))
        copies.append([source for source, _ in slots])
    width = max(len(c) for c in copies)
    total = num_blocks + width
    mask = torch.zeros(heads, total, total, dtype=torch.bool)
    for head, (rows, repeats, slots) in enumerate(visits):
        for row in range(num_blocks):
            mask[head, row, sorted(rows[row])] = True
            for source, count in repeats[row].items():
                for n in range(count):
                    mask[head, row, num_blocks + slots.index((source, n))] = True
    sources = torch.tensor([c + [0] * (width - len(c)) for c in copies], dtype=torch.long).reshape(heads, width)
    if bool((mask == mask[:1]).all()):
        mask = mask[:1]
    return layouts.from_block_mask(mask, block), sources


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    return x.view(x.shape[0], x.shape[1], num_heads, -1).transpose(1, 2)


def _block_sparse_forward(self, hidden_states, band_mask=None, from_mask=None, to_mask=None, from_blocked_mask=None,
                          to_blocked_mask=None, **kwargs):
    """BigBirdBlockSparseAttention.forward on the kernels: ([batch, seq, heads * d], None)."""
    if kwargs.get("output_attentions"):
        raise NotImplementedError(
            "replace_attention: output_attentions=True is not served; the kernels never form attention "
            "probabilities. Run the model without replace_attention to inspect them.")
    batch, seq_len, _ = hidden_states.shape
    block, heads = self.block_size, self.num_attention_heads
    if seq_len % block:
        raise ValueError(f"BigBird's sequence length ({seq_len}) must be a multiple of its block size ({block})")
    num_blocks = seq_len // block
    random = np.ascontiguousarray(_random_blocks(self, seq_len), dtype=np.int32)
    layout, sources = _plan(random.tobytes(), random.shape, num_blocks, block)
    q, k, v = (_heads(proj(hidden_states), heads) for proj in (self.query, self.key, self.value))
    real = None if to_mask is None else to_mask.reshape(batch, seq_len).bool()
    if sources.shape[1]:
        # The copies: per head, the tokens of each source block, appended after the sequence.
        tokens = (sources.to(q.device)[:, :, None] * block + torch.arange(block, device=q.device)).reshape(heads, -1)
        index = tokens[None, :, :, None].expand(batch, -1, -1, q.shape[-1])
        k = torch.cat((k, k.gather(2, index)), 2)
        v = torch.cat((v, v.gather(2, index)), 2)
        q = torch.cat((q, q.new_zeros(batch, heads, tokens.shape[1], q.shape[-1])), 2)
        if real is not None:
            if not bool((sources == sources[:1]).all()) and not bool(real.all()):
                raise NotImplementedError(
                    "replace_attention: BigBird heads that repeat different random blocks on a padded batch")
            real = torch.cat((real, real[:, tokens[0]]), 1)
    out = block_sparse_attention(q, k, v, layout, key_padding_mask=real)[:, :, :seq_len]
    if from_mask is not None:  # transformers zeroes the attention of padded queries
        out = out * from_mask.reshape(batch, 1, seq_len, 1)
    return out.transpose(1, 2).reshape(batch, seq_len, -1), None


@functools.cache
def _swapped_classes():
    """Subclasses of transformers' BigBird attention classes: the block-sparse one with our forward,
    and the attention wrapper, whose switch back to block_sparse (after a short input made the model
    fall back to full attention) builds a new block-sparse module that must run ours too."""
    from transformers.models.big_bird import modeling_big_bird as hf

    class BlockSparseAttention(hf.BigBirdBlockSparseAttention):
        forward = _block_sparse_forward

    class Attention(hf.BigBirdAttention):
        def set_attention_type(self, value, layer_idx=None):
            super().set_attention_type(value, layer_idx=layer_idx)
            if self.attention_type == "block_sparse":
                self.self.__class__ = BlockSparseAttention

    return hf.BigBirdAttention, Attention, BlockSparseAttention


def swap(model: torch.nn.Module) -> int:
    """Make every BigBird attention of ``model`` run block-sparse layers on the kernels (the
    modules keep their parameters: their class changes in place). Returns how many."""
    original, attention, block_sparse = _swapped_classes()
    if getattr(model.config, "attention_type", None) != "block_sparse":
        raise ValueError(
            f"replace_attention: BigBird with attention_type={model.config.attention_type!r} runs full attention "
            "through transformers' attention interface; use attn_implementation='modernbert_kernels' after "
            "register(), or build the model with attention_type='block_sparse'")
    swapped = 0
    for module in model.modules():
        if type(module) is original:
            module.__class__ = attention
            if module.attention_type == "block_sparse":
                module.self.__class__ = block_sparse
            swapped += 1
    return swapped
