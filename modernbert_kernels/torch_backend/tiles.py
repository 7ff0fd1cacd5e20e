"""The tile loops of the torch backend: a layout plan (plan.py) run over block-major tensors.

Groups are merged with an online softmax, as the kernels merge key blocks, and the forward returns
the log-sum-exp so that the backward recomputes probabilities instead of storing them.
"""

from __future__ import annotations

import threading

import torch

from .plan import HeadPlan, LayoutPlan

# Query blocks per chunk keep one chunk's scores near this many elements, so the softmax passes
# over the scores stay in cache (measured on the 2-thread CI machine: 2^21 beat 2^20 and 2^24).
SCORES_PER_CHUNK = 1 << 21

_workspaces = threading.local()


def _workspace(role: str, shape: tuple, device: torch.device) -> torch.Tensor:
    """A reusable fp32 buffer per role and thread, on CPU.

    Each call reorders q, k and v into fresh ~25 MB buffers at 8192 tokens; on the CI machine their
    page faults cost ~20 ms of a 90 ms call (NOTES.md). CUDA's caching allocator already reuses memory.
    """
    if device.type != "cpu":
        return torch.empty(shape, device=device, dtype=torch.float32)
    cache = _workspaces.__dict__.setdefault("buffers", {})
    # A buffer made under torch.inference_mode is an inference tensor, which may not be written
    # outside it: one buffer per mode.
    key = (role, torch.is_inference_mode_enabled())
    buffer = cache.get(key)
    if buffer is None or buffer.shape != shape:
        buffer = cache[key] = torch.empty(shape, dtype=torch.float32)
    return buffer


def _block_major_view(x: torch.Tensor, layout_heads: int, block_size: int) -> torch.Tensor:
    """[batch, heads, blocks * block, ...] -> view [layout_heads, blocks, batch, heads / layout_heads, block, ...]."""
    batch, heads, padded = x.shape[:3]
    tail = x.shape[3:]
    x = x.reshape(batch, layout_heads, heads // layout_heads, padded // block_size, block_size, *tail)
    return x.permute((1, 3, 0, 2, 4) + tuple(range(5, x.dim())))


def _block_major(role: str, x: torch.Tensor, num_blocks: int, block_size: int, layout_heads: int,
                 scale: float = 1.0) -> torch.Tensor:
    """scale * x [batch, heads, seq, ...] as a contiguous fp32 block-major workspace.

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


def _in_band(distance: torch.Tensor, left: int, right: int) -> torch.Tensor:
    """distance = query - key positions; True inside the band -right <= distance <= left."""
    visible = None
    if left >= 0:
        visible = distance <= left
    if right >= 0:
        visible = distance >= -right if visible is None else visible & (distance >= -right)
    return visible


class _Masks:
    """Token-level visibility of a group of tiles: the band (window, causal), sequence end, key padding."""

    def __init__(self, block_size, seq_len, num_blocks, window, key_padding_mask, device):
        self.block_size, self.seq_len = block_size, seq_len
        self.left, self.right = window
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
        # Query - key distances in these tiles run from -offset * bs - (bs - 1) to -offset * bs + bs - 1.
        reaches_out = ((self.left >= 0 and -offset * bs + bs - 1 > self.left)
                       or (self.right >= 0 and offset * bs + bs - 1 > self.right))
        if reaches_out:
            distance = -offset * bs + self.token[:, None] - self.token[None, :]
            mask = _in_band(distance, self.left, self.right)[None, None, None]
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
        if self.left >= 0 or self.right >= 0:
            query_pos = rows[:, None] * bs + self.token
            near = _in_band(query_pos[:, :, None] - key_pos[:, None, :], self.left, self.right)
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


def _chunks(head: HeadPlan, q: torch.Tensor):
    """Query-block ranges [first, last) whose scores stay near SCORES_PER_CHUNK elements."""
    num_blocks, batch, group, block = q.shape[:4]
    step = max(1, SCORES_PER_CHUNK // max(batch * group * block * head.width * block, 1))
    for first in range(0, num_blocks, step):
        yield first, min(first + step, num_blocks)


def _tile_groups(head: HeadPlan, first: int, last: int, masks: _Masks, k, v):
    """Each group's part in query blocks [first, last): (kind, rows, keys, keys tile, values tile,
    mask), rows and keys as slices (runs) or index tensors (gathered)."""
    for run in head.runs:
        lo, hi = max(run.start, first), min(run.stop, last)
        if lo < hi:
            rows, keys = slice(lo, hi), slice(lo + run.offset, hi + run.offset)
            yield "run", rows, keys, k[keys], v[keys], masks.for_run(run.offset, lo, hi)
    if head.rest_rows.numel():
        chosen = (head.rest_rows >= first) & (head.rest_rows < last)
        if chosen.any():
            rows, key_blocks, valid = head.rest_rows[chosen], head.rest_keys[chosen], head.rest_valid[chosen]
            yield ("gather", rows, key_blocks, _gathered(k, key_blocks), _gathered(v, key_blocks),
                   masks.for_gather(rows, key_blocks, valid))


def _forward_head(q, k, v, head: HeadPlan, masks, softcap, out, lse):
    """q (scaled), k, v: [N, B, G, bs, D]; writes out (same shape) and lse [N, B, G, bs]."""
    row_max = q.new_full(q.shape[:-1], float("-inf"))
    row_sum = q.new_zeros(q.shape[:-1])
    acc = out.zero_()
    for first, last in _chunks(head, q):
        for kind, rows, _, keys_tile, values_tile, mask in _tile_groups(head, first, last, masks, k, v):
            scores = torch.matmul(q[rows], keys_tile.transpose(-1, -2))
            if softcap:  # before the mask: tanh would turn -inf into -softcap
                scores.div_(softcap).tanh_().mul_(softcap)
            if mask is not None:
                scores.masked_fill_(~mask, float("-inf"))
            old_max = row_max[rows]
            new_max = torch.maximum(old_max, scores.amax(-1))
            # Rows that have seen no visible key keep max = -inf: subtract 0 instead (no NaN).
            shift = new_max.masked_fill(new_max == float("-inf"), 0.0)
            probs = scores.sub_(shift[..., None]).exp_()
            if kind == "run":  # slices are views: update the running state in place
                rescale = old_max.sub_(shift).exp_()
                row_sum[rows].mul_(rescale).add_(probs.sum(-1))
                acc[rows].mul_(rescale[..., None]).add_(torch.matmul(probs, values_tile))
            else:
                rescale = torch.exp(old_max - shift)
                row_sum[rows] = row_sum[rows] * rescale + probs.sum(-1)
                acc[rows] = acc[rows] * rescale[..., None] + torch.matmul(probs, values_tile)
            row_max[rows] = new_max
    # 0 for a row that saw no key; a NaN sum (a NaN score) makes the output and lse NaN.
    has_keys = row_sum != 0
    acc.div_(torch.where(has_keys, row_sum, 1.0)[..., None])
    lse.copy_(row_max.add_(torch.log(row_sum)).masked_fill_(~has_keys, float("inf")))


def _backward_head(dout, q, k, v, lse, delta, head: HeadPlan, masks, softcap, dq, dk, dv):
    """All [N, B, G, bs, D] (q scaled) or [N, B, G, bs]; writes dq / scale, dk and dv."""
    for grad in (dq, dk, dv):
        grad.zero_()
    for first, last in _chunks(head, q):
        for kind, rows, keys, keys_tile, values_tile, mask in _tile_groups(head, first, last, masks, k, v):
            q_rows, do_rows = q[rows], dout[rows]
            scores = torch.matmul(q_rows, keys_tile.transpose(-1, -2))
            if softcap:  # capped = softcap * t with t = tanh(scores / softcap); d capped / d scores = 1 - t^2
                tanh = scores.div(softcap).tanh_()
                scores = torch.mul(tanh, softcap, out=scores)
            if mask is not None:  # masked scores may exceed the LSE: mask before exp, never after
                scores.masked_fill_(~mask, float("-inf"))
            probs = scores.sub_(lse[rows][..., None]).exp_()
            dprobs = torch.matmul(do_rows, values_tile.transpose(-1, -2))
            dscores = dprobs.sub_(delta[rows][..., None]).mul_(probs)
            if softcap:
                dscores.mul_(tanh.square_().neg_().add_(1.0))
            dq[rows] += torch.matmul(dscores, keys_tile)
            dk_tile = torch.matmul(dscores.transpose(-1, -2), q_rows)
            dv_tile = torch.matmul(probs.transpose(-1, -2), do_rows)
            if kind == "run":
                dk[keys] += dk_tile
                dv[keys] += dv_tile
            else:  # scatter per slot; padded slots carry zero probabilities
                shape = (keys.shape[0],) + dk_tile.shape[1:3] + (keys.shape[1], q.shape[3], q.shape[4])
                for grad, tile in ((dk, dk_tile), (dv, dv_tile)):
                    per_slot = tile.reshape(shape).permute(0, 3, 1, 2, 4, 5).reshape(-1, *grad.shape[1:])
                    grad.index_add_(0, keys.reshape(-1), per_slot)


def forward(q, k, v, plan: LayoutPlan, block_size, window, scale, softcap, key_padding_mask):
    """q, k, v [batch, heads, seq, dim] -> (out like q, lse [batch, heads, seq] fp32)."""
    seq_len = q.shape[2]
    num_blocks = -(-seq_len // block_size)
    layout_heads = len(plan.heads)
    masks = _Masks(block_size, seq_len, num_blocks, window, key_padding_mask, q.device)
    # The scale is folded into q: one pass over [seq, dim] instead of one over the scores.
    qb = _block_major("q", q, num_blocks, block_size, layout_heads, scale)
    kb, vb = (_block_major(role, t, num_blocks, block_size, layout_heads) for role, t in (("k", k), ("v", v)))
    # The results are written straight into [batch, heads, seq] buffers through block-major views.
    out = _padded_output(q.shape[0], q.shape[1], num_blocks, block_size, q.shape[3:], q.device)
    lse = _padded_output(q.shape[0], q.shape[1], num_blocks, block_size, (), q.device)
    out_blocks = _block_major_view(out, layout_heads, block_size)
    lse_blocks = _block_major_view(lse, layout_heads, block_size)
    for h, head in enumerate(plan.heads):
        _forward_head(qb[h], kb[h], vb[h], head, masks, softcap, out_blocks[h], lse_blocks[h])
    # Contiguous whatever q's strides are: the op's fake implementation promises it.
    return out[:, :, :seq_len].to(q.dtype).contiguous(), lse[:, :, :seq_len].contiguous()


def backward(dout, q, k, v, out, lse, plan: LayoutPlan, block_size, window, scale, softcap, key_padding_mask):
    """(dq, dk, dv) like q, contiguous."""
    seq_len = q.shape[2]
    num_blocks = -(-seq_len // block_size)
    layout_heads = len(plan.heads)
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
    for h, head in enumerate(plan.heads):
        _backward_head(dob[h], qb[h], kb[h], vb[h], lse_b[h], deltab[h], head, masks, softcap,
                       *(g[h] for g in grad_blocks))
    grads[0].mul_(scale)
    return tuple(g[:, :, :seq_len].to(q.dtype).contiguous() for g in grads)
