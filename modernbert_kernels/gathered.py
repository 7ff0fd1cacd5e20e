"""Block-sparse attention in plain PyTorch (``backend="torch"``): only visited tiles are computed.

The visited tiles are split into groups that each cost one batched matmul:

- diagonal runs: query blocks ``[start, stop)`` visiting key blocks ``[start + offset, stop + offset)``.
  Blocks are stored block-major (``[num_blocks, batch, heads, block, dim]``), so both operands of a
  run are contiguous slices and nothing is copied. Sliding-window, dilated and strided layouts are
  almost entirely runs.
- the rest (global columns, random blocks, short runs): key blocks gathered per query block.

Groups are merged with an online softmax, as the kernels merge key blocks, and the forward returns
the log-sum-exp so that the backward recomputes probabilities instead of storing them. The portable
fallback on any device; on the CPU, dense layouts go to PyTorch's fused attention kernel.
"""

from __future__ import annotations

import dataclasses
import threading

import torch

# Diagonal runs shorter than this go to the gathered rest: one matmul per run must pay off.
_MIN_RUN = 4
# Query blocks per chunk keep one chunk's scores near this many elements, so the softmax passes
# over the scores stay in cache (measured on the 2-thread CI machine: 2^21 beat 2^20 and 2^24).
_SCORES_PER_CHUNK = 1 << 21


@dataclasses.dataclass(frozen=True)
class _Run:
    offset: int
    start: int
    stop: int


@dataclasses.dataclass
class _Groups:
    runs: list
    rest_rows: torch.Tensor  # query blocks with at least one gathered tile
    rest_keys: torch.Tensor  # [len(rest_rows), width] key blocks (0 where not valid)
    rest_valid: torch.Tensor  # [len(rest_rows), width]


def _split_layout(row_offsets: torch.Tensor, col_indices: torch.Tensor, num_blocks: int) -> _Groups:
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
    long_enough = run_length >= _MIN_RUN
    first = torch.nonzero(starts_run)[:, 0][long_enough]
    runs = [
        _Run(offset, start, start + length)
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
    return _Groups(runs, rest_rows, rest_keys, rest_valid)


_workspaces = threading.local()


def _workspace(role: str, shape: tuple, device: torch.device) -> torch.Tensor:
    """A reusable fp32 buffer per role and thread, on CPU.

    Each call reorders q, k and v into fresh ~25 MB buffers at 8192 tokens; on the CI machine their
    page faults cost ~20 ms of a 90 ms call (NOTES.md). CUDA's caching allocator already reuses memory.
    """
    if device.type != "cpu":
        return torch.empty(shape, device=device, dtype=torch.float32)
    cache = _workspaces.__dict__.setdefault("buffers", {})
    buffer = cache.get(role)
    if buffer is None or buffer.shape != shape:
        buffer = cache[role] = torch.empty(shape, dtype=torch.float32)
    return buffer


def _block_major_view(x: torch.Tensor, layout_heads: int, block_size: int) -> torch.Tensor:
    """[batch, heads, blocks * block, ...] -> view [layout_heads, blocks, batch, heads / layout_heads, block, ...]."""
    batch, heads, padded = x.shape[:3]
    tail = x.shape[3:]
    x = x.reshape(batch, layout_heads, heads // layout_heads, padded // block_size, block_size, *tail)
    return x.permute((1, 3, 0, 2, 4) + tuple(range(5, x.dim())))


def _block_major(role: str, x: torch.Tensor, num_blocks: int, block_size: int, layout_heads: int,
                 scale: float = 1.0) -> torch.Tensor:
    """scale * x [batch, heads, seq, ...] as a contiguous fp32 block-major workspace (see above).

    16-bit inputs are widened: the math is fp32 as in the kernels, and fp16 matmul on CPUs is far
    slower than fp32. Sequences are zero-padded to whole blocks. The reordering copy applies the
    scale, so folding the softmax scale into q costs no extra pass.
    """
    batch, heads, seq_len = x.shape[:3]
    if num_blocks * block_size != seq_len:
        padded = x.new_zeros(batch, heads, num_blocks * block_size, *x.shape[3:])
        padded[:, :, :seq_len] = x
        x = padded
    view = _block_major_view(x, layout_heads, block_size)
    return torch.mul(view, scale, out=_workspace(role, view.shape, x.device))


def _padded_output(batch, heads, num_blocks, block_size, tail, device):
    """A [batch, heads, blocks * block, *tail] fp32 result buffer (returned to the caller, so fresh)."""
    return torch.empty(batch, heads, num_blocks * block_size, *tail, device=device, dtype=torch.float32)


class _Masks:
    """Token-level visibility of a group of tiles: window, sequence end, key padding."""

    def __init__(self, block_size, seq_len, num_blocks, window, key_padding_mask, device):
        self.block_size, self.seq_len, self.window = block_size, seq_len, window
        self.token = torch.arange(block_size, device=device)
        self.key_keep = None
        if key_padding_mask is not None:  # [num_blocks, batch, 1, 1, block]
            keep = key_padding_mask.new_zeros(key_padding_mask.shape[0], num_blocks * block_size)
            keep[:, :seq_len] = key_padding_mask
            self.key_keep = keep.reshape(-1, num_blocks, 1, 1, block_size).permute(1, 0, 2, 3, 4)

    def for_run(self, offset, first, last):
        """Mask for query blocks [first, last) against key blocks shifted by offset, or None."""
        bs = self.block_size
        mask = None
        if self.window is not None and (abs(offset) + 1) * bs - 1 > self.window:
            distance = -offset * bs + self.token[:, None] - self.token[None, :]
            mask = (distance.abs() <= self.window)[None, None, None]
        key_start = (torch.arange(first + offset, last + offset, device=self.token.device) * bs)
        if (last + offset) * bs > self.seq_len:
            in_seq = (key_start[:, None] + self.token < self.seq_len)[:, None, None, None, :]
            mask = in_seq if mask is None else mask & in_seq
        if self.key_keep is not None:
            keep = self.key_keep[first + offset : last + offset]
            mask = keep if mask is None else mask & keep
        return mask

    def for_gather(self, rows, keys, valid):
        """Mask for gathered tiles: rows [n], keys/valid [n, width] -> [n, batch or 1, 1, bs, width * bs]."""
        bs = self.block_size
        key_pos = (keys[:, :, None] * bs + self.token).reshape(keys.shape[0], -1)
        visible = valid.repeat_interleave(bs, 1) & (key_pos < self.seq_len)
        visible = visible[:, None, None, None, :]
        if self.window is not None:
            query_pos = rows[:, None] * bs + self.token
            near = (query_pos[:, :, None] - key_pos[:, None, :]).abs() <= self.window
            visible = visible & near[:, None, None]
        if self.key_keep is not None:
            keep = self.key_keep[:, :, 0, 0].permute(1, 0, 2).reshape(self.key_keep.shape[1], -1)
            visible = visible & keep[:, key_pos].permute(1, 0, 2)[:, :, None, None, :]
        return visible


def _gathered(blocks: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """blocks [N, B, G, bs, D], keys [n, W] -> [n, B, G, W * bs, D]."""
    n, width = keys.shape
    found = blocks[keys]  # [n, W, B, G, bs, D]
    found = found.permute(0, 2, 3, 1, 4, 5)
    return found.reshape(n, found.shape[1], found.shape[2], width * blocks.shape[3], blocks.shape[4])


def _chunks(num_blocks: int, scores_per_block: int):
    step = max(1, _SCORES_PER_CHUNK // max(scores_per_block, 1))
    for first in range(0, num_blocks, step):
        yield first, min(first + step, num_blocks)


def _tile_groups(groups: _Groups, first: int, last: int):
    """(rows, keys) of each group's part in query blocks [first, last): slices or index tensors."""
    for run in groups.runs:
        lo, hi = max(run.start, first), min(run.stop, last)
        if lo < hi:
            yield "run", slice(lo, hi), slice(lo + run.offset, hi + run.offset), run.offset
    if groups.rest_rows.numel():
        chosen = (groups.rest_rows >= first) & (groups.rest_rows < last)
        if chosen.any():
            yield "gather", groups.rest_rows[chosen], (groups.rest_keys[chosen], groups.rest_valid[chosen]), None


def _group_operands(kind, rows, keys, offset, masks, k, v):
    if kind == "run":
        return k[keys], v[keys], masks.for_run(offset, rows.start, rows.stop)
    key_blocks, valid = keys
    return _gathered(k, key_blocks), _gathered(v, key_blocks), masks.for_gather(rows, key_blocks, valid)


def _forward_one_layout_head(q, k, v, groups, masks, out, lse):
    """q (scaled), k, v: [N, B, G, bs, D]; writes out (same shape) and lse [N, B, G, bs]."""
    num_blocks = q.shape[0]
    row_max = q.new_full(q.shape[:-1], float("-inf"))
    row_sum = q.new_zeros(q.shape[:-1])
    acc = out.zero_()
    width = max([1] + [groups.rest_keys.shape[1]]) + len({r.offset for r in groups.runs})
    per_block = q.shape[1] * q.shape[2] * q.shape[3] * width * q.shape[3]
    for first, last in _chunks(num_blocks, per_block):
        for kind, rows, keys, offset in _tile_groups(groups, first, last):
            keys_tile, values_tile, mask = _group_operands(kind, rows, keys, offset, masks, k, v)
            scores = torch.matmul(q[rows], keys_tile.transpose(-1, -2))
            if mask is not None:
                scores.masked_fill_(~mask, float("-inf"))
            old_max = row_max[rows]
            new_max = torch.maximum(old_max, scores.amax(-1))
            # Rows that have seen no visible key keep max = -inf: subtract 0 instead (no NaN).
            shift = new_max.masked_fill(new_max == float("-inf"), 0.0)
            probs = scores.sub_(shift[..., None]).exp_()
            rescale = old_max.sub_(shift).exp_() if kind == "run" else torch.exp(old_max - shift)
            if kind == "run":  # slices are views: update the running state in place
                row_sum[rows].mul_(rescale).add_(probs.sum(-1))
                acc[rows].mul_(rescale[..., None]).add_(torch.matmul(probs, values_tile))
                row_max[rows] = new_max
            else:
                row_sum[rows] = row_sum[rows] * rescale + probs.sum(-1)
                acc[rows] = acc[rows] * rescale[..., None] + torch.matmul(probs, values_tile)
                row_max[rows] = new_max
    has_keys = row_sum > 0
    acc.div_(torch.where(has_keys, row_sum, 1.0)[..., None])
    lse.copy_(row_max.add_(torch.log(row_sum)).masked_fill_(~has_keys, float("inf")))


def _backward_one_layout_head(dout, q, k, v, lse, delta, groups, masks, dq, dk, dv):
    """All [N, B, G, bs, D] (q scaled) or [N, B, G, bs]; writes dq / scale, dk and dv."""
    for grad in (dq, dk, dv):
        grad.zero_()
    width = max([1] + [groups.rest_keys.shape[1]]) + len({r.offset for r in groups.runs})
    per_block = q.shape[1] * q.shape[2] * q.shape[3] * width * q.shape[3]
    for first, last in _chunks(q.shape[0], per_block):
        for kind, rows, keys, offset in _tile_groups(groups, first, last):
            keys_tile, values_tile, mask = _group_operands(kind, rows, keys, offset, masks, k, v)
            q_rows, do_rows = q[rows], dout[rows]
            scores = torch.matmul(q_rows, keys_tile.transpose(-1, -2))
            if mask is not None:  # masked scores may exceed the LSE: mask before exp, never after
                scores.masked_fill_(~mask, float("-inf"))
            probs = scores.sub_(lse[rows][..., None]).exp_()
            dprobs = torch.matmul(do_rows, values_tile.transpose(-1, -2))
            dscores = dprobs.sub_(delta[rows][..., None]).mul_(probs)
            dq[rows] += torch.matmul(dscores, keys_tile)
            dk_tile = torch.matmul(dscores.transpose(-1, -2), q_rows)
            dv_tile = torch.matmul(probs.transpose(-1, -2), do_rows)
            if kind == "run":
                dk[keys] += dk_tile
                dv[keys] += dv_tile
            else:  # scatter per slot; padded slots carry zero probabilities
                key_blocks = keys[0].reshape(-1)
                shape = (rows.numel(),) + dk_tile.shape[1:3] + (keys[0].shape[1], q.shape[3], q.shape[4])
                for grad, tile in ((dk, dk_tile), (dv, dv_tile)):
                    per_slot = tile.reshape(shape).permute(0, 3, 1, 2, 4, 5).reshape(-1, *grad.shape[1:])
                    grad.index_add_(0, key_blocks, per_slot)


def _layout_heads(row_offsets, col_indices, num_blocks):
    return [_split_layout(row_offsets[h], col_indices, num_blocks) for h in range(row_offsets.shape[0])]


def _dense(row_offsets, col_indices, num_blocks, window, key_padding_mask) -> bool:
    """Every head visits every block of the sequence, with no token mask: plain attention.

    Then PyTorch's fused CPU attention (which also returns the LSE our backward uses) beats the
    tile groups, which exist to skip work (measured: 0.70 s vs 2.24 s at 8192 tokens, 12 heads).
    Rows that see no key would come out NaN there, so any key mask takes the tile groups.
    """
    if window is not None or key_padding_mask is not None:
        return False
    counts = (row_offsets[:, 1 : num_blocks + 1] - row_offsets[:, :num_blocks])
    if not bool((counts >= num_blocks).all()):
        return False
    return all(
        int((col_indices[int(row_offsets[h, 0]) : int(row_offsets[h, num_blocks])] < num_blocks).sum())
        == num_blocks * num_blocks
        for h in range(row_offsets.shape[0])
    )


def _fused_cpu_attention(q, k, v, scale):
    """PyTorch's fused CPU attention on [batch, heads, seq, dim] tensors: (out, lse).

    bf16 stays bf16 (the kernel accumulates in fp32 and uses bf16 matmul units); fp16 has none on
    CPUs and is computed in fp32. Inputs are made contiguous first: the kernel walks key and value
    rows, and rows 9 KB apart (q, k, v sliced from a fused qkv) cost it more than the copies do
    (fp32 [1, 12, 8192, 64]: 801 ms median as views, 730 ms with the copies in and out).
    """
    dtype = q.dtype
    work = dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32
    q, k, v = (t.to(work).contiguous() for t in (q, k, v))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
    return out.to(dtype), lse.float()


def gathered_forward_padded(q, k, v, row_offsets, col_indices, block_size, window, scale, key_padding_mask):
    """q, k, v [batch, heads, seq, dim] -> (out like q, lse [batch, heads, seq] fp32)."""
    seq_len = q.shape[2]
    num_blocks = -(-seq_len // block_size)
    if q.device.type == "cpu" and _dense(row_offsets, col_indices, num_blocks, window, key_padding_mask):
        out, lse = _fused_cpu_attention(q, k, v, scale)
        return out.contiguous(), lse.contiguous()
    layout_heads = row_offsets.shape[0]
    masks = _Masks(block_size, seq_len, num_blocks, window, key_padding_mask, q.device)
    # The scale is folded into q: one pass over [seq, dim] instead of one over the scores.
    qb = _block_major("q", q, num_blocks, block_size, layout_heads, scale)
    kb, vb = (_block_major(role, t, num_blocks, block_size, layout_heads) for role, t in (("k", k), ("v", v)))
    # The results are written straight into [batch, heads, seq] buffers through block-major views.
    out = _padded_output(q.shape[0], q.shape[1], num_blocks, block_size, q.shape[3:], q.device)
    lse = _padded_output(q.shape[0], q.shape[1], num_blocks, block_size, (), q.device)
    out_blocks, lse_blocks = _block_major_view(out, layout_heads, block_size), _block_major_view(lse, layout_heads, block_size)
    for h, groups in enumerate(_layout_heads(row_offsets, col_indices, num_blocks)):
        _forward_one_layout_head(qb[h], kb[h], vb[h], groups, masks, out_blocks[h], lse_blocks[h])
    # Contiguous whatever q's strides are: the op's fake implementation promises it.
    return out[:, :, :seq_len].to(q.dtype).contiguous(), lse[:, :, :seq_len].contiguous()


def gathered_backward_padded(dout, q, k, v, out, lse, row_offsets, col_indices, block_size, window, scale,
                             key_padding_mask):
    seq_len = q.shape[2]
    num_blocks = -(-seq_len // block_size)
    if q.device.type == "cpu" and _dense(row_offsets, col_indices, num_blocks, window, key_padding_mask):
        # As the forward: contiguous inputs (454 vs 418 ms median for [1, 12, 4096, 64] fp32 from qkv slices).
        work = q.dtype if q.dtype in (torch.float32, torch.bfloat16) else torch.float32
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            *(t.to(work).contiguous() for t in (dout, q, k, v, out)), lse, 0.0, False, scale=scale
        )
        return tuple(g.to(q.dtype).contiguous() for g in grads)
    layout_heads = row_offsets.shape[0]
    masks = _Masks(block_size, seq_len, num_blocks, window, key_padding_mask, q.device)
    delta = (dout.float() * out.float()).sum(-1)

    def blocks(role, t, scale=1.0):
        return _block_major(role, t, num_blocks, block_size, layout_heads, scale)

    qb, kb, vb, dob, deltab = (blocks(*args) for args in (("q", q, scale), ("k", k), ("v", v), ("dout", dout),
                                                        ("delta", delta)))
    # Padded query rows get lse = +inf: their probabilities are exactly 0.
    lse_b = blocks("lse", torch.nn.functional.pad(lse, (0, num_blocks * block_size - seq_len), value=float("inf")))
    grads = [_padded_output(q.shape[0], q.shape[1], num_blocks, block_size, q.shape[3:], q.device) for _ in range(3)]
    grad_blocks = [_block_major_view(g, layout_heads, block_size) for g in grads]
    for h, groups in enumerate(_layout_heads(row_offsets, col_indices, num_blocks)):
        _backward_one_layout_head(dob[h], qb[h], kb[h], vb[h], lse_b[h], deltab[h], groups, masks,
                                  *(g[h] for g in grad_blocks))
    grads[0].mul_(scale)
    return tuple(g[:, :, :seq_len].to(q.dtype).contiguous() for g in grads)


def _per_sequence(cu_seqlens, *tensors):
    """Varlen [total, heads, dim] tensors -> per-sequence [1, heads, len, dim] views."""
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        yield start, end, [t[start:end].transpose(0, 1)[None] for t in tensors]


def gathered_forward(q, k, v, row_offsets, col_indices, block_size, window, scale, key_padding_mask, cu_seqlens):
    if cu_seqlens is None:
        return gathered_forward_padded(q, k, v, row_offsets, col_indices, block_size, window, scale,
                                       key_padding_mask)
    def dense(start, end):
        blocks = -(-(end - start) // block_size)
        return q.device.type == "cpu" and _dense(row_offsets, col_indices, blocks, window, None)

    bounds = cu_seqlens.tolist()
    if len(bounds) == 2 and bounds[1] > 0 and dense(0, bounds[1]):
        # One dense sequence: the fused kernel's output, transposed once, is the whole result.
        o, l = _fused_cpu_attention(*next(_per_sequence(cu_seqlens, q, k, v))[2], scale)
        return o[0].transpose(0, 1).contiguous(), l[0].contiguous()
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(q.shape[1], q.shape[0], device=q.device, dtype=torch.float32)
    for start, end, seq in _per_sequence(cu_seqlens, q, k, v):
        if end > start:
            if dense(start, end):
                o, l = _fused_cpu_attention(*seq, scale)
            else:
                o, l = gathered_forward_padded(*seq, row_offsets, col_indices, block_size, window, scale, None)
            out[start:end] = o[0].transpose(0, 1)
            lse[:, start:end] = l[0]
    return out, lse


def gathered_backward(dout, q, k, v, out, lse, row_offsets, col_indices, block_size, window, scale,
                      key_padding_mask, cu_seqlens):
    if cu_seqlens is None:
        return gathered_backward_padded(dout, q, k, v, out, lse, row_offsets, col_indices, block_size, window,
                                        scale, key_padding_mask)
    grads = [torch.zeros_like(t, memory_format=torch.contiguous_format) for t in (q, k, v)]
    for start, end, seq in _per_sequence(cu_seqlens, dout, q, k, v, out):
        if end > start:
            seq_grads = gathered_backward_padded(*seq, lse[None, :, start:end], row_offsets, col_indices,
                                                 block_size, window, scale, None)
            for grad, seq_grad in zip(grads, seq_grads):
                grad[start:end] = seq_grad[0].transpose(0, 1)
    return tuple(grads)
