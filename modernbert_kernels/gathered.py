"""Block-sparse attention in plain PyTorch over gathered key blocks (``backend="torch"``).

Only visited tiles are computed: for each query block the visited key blocks are gathered into one
dense [blocks_per_row * block_size, head_dim] operand and a batched matmul does the rest. This is
the CPU path until the C++ kernels exist, and a portable fallback anywhere. Like the Triton
kernels, the forward returns the log-sum-exp and the backward recomputes probabilities from it,
so no attention matrix is kept for autograd.
"""

from __future__ import annotations

import torch

# Query blocks per chunk are chosen so that one chunk's scores stay near this many elements:
# large enough for efficient batched matmuls, small enough for dense layouts at long sequences.
_SCORES_PER_CHUNK = 1 << 24


def _ell_from_csr(row_offsets: torch.Tensor, col_indices: torch.Tensor, num_blocks: int):
    """CSR -> padded lists for the first ``num_blocks`` rows, dropping key blocks >= num_blocks
    (a layout built for a longer sequence): (key_blocks, valid), both [heads, num_blocks, width]."""
    row_offsets = row_offsets[:, : num_blocks + 1]
    heads, rows = row_offsets.shape[0], row_offsets.shape[1] - 1
    counts = (row_offsets[:, 1:] - row_offsets[:, :-1]).long()
    width = max(int(counts.max()), 1)
    slot = torch.arange(width, device=row_offsets.device)
    valid = slot < counts[..., None]
    position = (row_offsets[:, :-1].long()[..., None] + slot).clamp(max=max(col_indices.numel() - 1, 0))
    key_blocks = col_indices.long()[position] if col_indices.numel() else torch.zeros_like(position)
    valid = valid & (key_blocks < num_blocks)
    return torch.where(valid, key_blocks, 0), valid


def _chunk_mask(key_blocks, valid, first_block, block_size, seq_len, window, key_padding_mask):
    """Token visibility for a chunk of query blocks: [batch or 1, heads or 1, chunk, bs, width * bs]."""
    heads, chunk, width = key_blocks.shape
    device = key_blocks.device
    token = torch.arange(block_size, device=device)
    k_pos = (key_blocks[..., None] * block_size + token).reshape(heads, chunk, 1, width * block_size)
    q_pos = ((first_block + torch.arange(chunk, device=device))[:, None] * block_size + token)
    q_pos = q_pos[None, :, :, None]
    visible = valid.repeat_interleave(block_size, -1)[:, :, None, :] & (k_pos < seq_len)
    if window is not None:
        visible = visible & ((q_pos - k_pos).abs() <= window)
    visible = visible[None]
    if key_padding_mask is not None:
        keep = key_padding_mask.new_zeros(key_padding_mask.shape[0], -(-seq_len // block_size) * block_size)
        keep[:, :seq_len] = key_padding_mask
        keep = keep[:, k_pos]  # [batch, heads, chunk, 1, width * bs]
        visible = visible & keep
    return visible


def _blocks(x: torch.Tensor, num_blocks: int, block_size: int) -> torch.Tensor:
    """[batch, heads, seq, dim] -> zero-padded fp32 [batch, heads, num_blocks, block_size, dim].

    16-bit inputs are widened: the math is fp32 as in the kernels, and fp16 matmul on CPUs is
    far slower than fp32.
    """
    pad = num_blocks * block_size - x.shape[2]
    x = torch.nn.functional.pad(x.float(), (0, 0, 0, pad))
    return x.reshape(x.shape[0], x.shape[1], num_blocks, block_size, x.shape[-1])


def _gather(blocks: torch.Tensor, key_blocks: torch.Tensor) -> torch.Tensor:
    """blocks [B, H, N, bs, D], key_blocks [1 or H, C, W] -> [B, H, C, W * bs, D]."""
    batch, heads, _, block_size, dim = blocks.shape
    if key_blocks.shape[0] == 1:
        gathered = blocks[:, :, key_blocks[0]]
    else:
        gathered = blocks[:, torch.arange(heads, device=blocks.device)[:, None, None], key_blocks]
    chunk, width = key_blocks.shape[1], key_blocks.shape[2]
    return gathered.reshape(batch, heads, chunk, width * block_size, dim)


def _chunks(num_blocks: int, width: int, block_size: int, batch_heads: int):
    per_block = batch_heads * block_size * width * block_size
    step = max(1, _SCORES_PER_CHUNK // max(per_block, 1))
    for first in range(0, num_blocks, step):
        yield first, min(first + step, num_blocks)


def gathered_forward_padded(q, k, v, row_offsets, col_indices, block_size, window, scale, key_padding_mask):
    """q, k, v [batch, heads, seq, dim] -> (out like q, lse [batch, heads, seq] fp32)."""
    batch, heads, seq_len, dim = q.shape
    num_blocks = -(-seq_len // block_size)
    key_blocks, valid = _ell_from_csr(row_offsets, col_indices, num_blocks)
    q_blocks, k_blocks, v_blocks = (_blocks(t, num_blocks, block_size) for t in (q, k, v))
    out = torch.empty_like(q_blocks)
    lse = torch.empty(batch, heads, num_blocks, block_size, device=q.device, dtype=torch.float32)
    width = key_blocks.shape[-1]
    for first, last in _chunks(num_blocks, width, block_size, batch * heads):
        kb, vis = key_blocks[:, first:last], valid[:, first:last]
        keys, values = _gather(k_blocks, kb), _gather(v_blocks, kb)
        scores = torch.matmul(q_blocks[:, :, first:last], keys.transpose(-1, -2)) * scale
        visible = _chunk_mask(kb, vis, first, block_size, seq_len, window, key_padding_mask)
        scores = scores.masked_fill(~visible, float("-inf"))
        row_max = scores.amax(-1, keepdim=True)
        row_max = torch.where(row_max == float("-inf"), 0.0, row_max)
        probs = torch.exp(scores - row_max)
        row_sum = probs.sum(-1, keepdim=True)
        has_keys = row_sum > 0
        probs = probs / torch.where(has_keys, row_sum, 1.0)
        out[:, :, first:last] = torch.matmul(probs, values)
        lse[:, :, first:last] = torch.where(has_keys, row_max + torch.log(row_sum), float("inf"))[..., 0]
    # Contiguous whatever q's strides are: the op's fake implementation promises it.
    out = out.reshape(batch, heads, num_blocks * block_size, dim)[:, :, :seq_len].to(q.dtype).contiguous()
    return out, lse.reshape(batch, heads, -1)[:, :, :seq_len].contiguous()


def gathered_backward_padded(dout, q, k, v, out, lse, row_offsets, col_indices, block_size, window, scale,
                             key_padding_mask):
    batch, heads, seq_len, dim = q.shape
    num_blocks = -(-seq_len // block_size)
    key_blocks, valid = _ell_from_csr(row_offsets, col_indices, num_blocks)
    q_blocks, k_blocks, v_blocks, do_blocks = (_blocks(t, num_blocks, block_size) for t in (q, k, v, dout))
    delta = (dout.float() * out.float()).sum(-1)
    delta = torch.nn.functional.pad(delta, (0, num_blocks * block_size - seq_len))
    delta = delta.reshape(batch, heads, num_blocks, block_size, 1)
    lse_blocks = torch.nn.functional.pad(lse, (0, num_blocks * block_size - seq_len), value=float("inf"))
    lse_blocks = lse_blocks.reshape(batch, heads, num_blocks, block_size, 1)
    dq = torch.empty_like(q_blocks)
    dk = torch.zeros(batch, heads * num_blocks, block_size, dim, device=q.device, dtype=torch.float32)
    dv = torch.zeros_like(dk)
    width = key_blocks.shape[-1]
    head_base = torch.arange(heads, device=q.device)[:, None, None] * num_blocks
    for first, last in _chunks(num_blocks, width, block_size, batch * heads):
        kb, vis = key_blocks[:, first:last], valid[:, first:last]
        keys, values = _gather(k_blocks, kb), _gather(v_blocks, kb)
        qc, doc = q_blocks[:, :, first:last], do_blocks[:, :, first:last]
        scores = torch.matmul(qc, keys.transpose(-1, -2)) * scale
        visible = _chunk_mask(kb, vis, first, block_size, seq_len, window, key_padding_mask)
        # Masked scores can exceed the row's LSE by any amount: mask before exp, never after.
        probs = torch.exp(scores.masked_fill(~visible, float("-inf")) - lse_blocks[:, :, first:last])
        dprobs = torch.matmul(doc, values.transpose(-1, -2))
        dscores = probs * (dprobs - delta[:, :, first:last])
        dq[:, :, first:last] = torch.matmul(dscores, keys) * scale
        # Scatter the per-slot key gradients back to their blocks; padded slots carry zeros.
        target = (head_base + kb).expand(heads, -1, -1).reshape(-1)
        chunk = last - first
        dv_slots = torch.matmul(probs.transpose(-1, -2), doc)
        dk_slots = torch.matmul(dscores.transpose(-1, -2), qc) * scale
        dv.index_add_(1, target, dv_slots.reshape(batch, heads * chunk * width, block_size, dim))
        dk.index_add_(1, target, dk_slots.reshape(batch, heads * chunk * width, block_size, dim))

    def unblock(t):
        return t.reshape(batch, heads, num_blocks * block_size, dim)[:, :, :seq_len].to(q.dtype).contiguous()

    return unblock(dq), unblock(dk), unblock(dv)


def _per_sequence(cu_seqlens, *tensors):
    """Varlen [total, heads, dim] tensors -> per-sequence [1, heads, len, dim] views."""
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        yield start, end, [t[start:end].transpose(0, 1)[None] for t in tensors]


def gathered_forward(q, k, v, row_offsets, col_indices, block_size, window, scale, key_padding_mask, cu_seqlens):
    if cu_seqlens is None:
        return gathered_forward_padded(q, k, v, row_offsets, col_indices, block_size, window, scale,
                                       key_padding_mask)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(q.shape[1], q.shape[0], device=q.device, dtype=torch.float32)
    for start, end, seq in _per_sequence(cu_seqlens, q, k, v):
        if end > start:
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
