"""Per-example global tokens over block-sparse attention (Longformer's and LED's global attention).

A token marked global sees every key of its sequence, and every query of its sequence sees it, on
top of what the layout and the band let through. Globals are few (a CLS token, a question's tokens)
and anywhere, and they change from example to example, so they are not put into the layout: one
layout serves the whole batch, and a global token in a block would make that block's whole row
and column visited for every example (1% of 8192 tokens at random positions: FlexAttention's
block mask for them visits 90% of its tiles). The visible pairs (query i, key j) split three ways instead, each computed
where it is cheap:

  local        what the layout and the band let through: the backend's kernels, unchanged;
  global keys  j global and not local for i: every query against the gathered global keys of its
               sequence ([tokens, globals] scores), merged with the kernels' online softmax through
               their log-sum-exp;
  global rows  i global: the gathered global queries against every key of their sequence
               ([globals, tokens] scores), replacing those rows.

The work is tokens x (local pairs per query + 2 x globals); no [seq, seq] mask or score matrix is
built. The backward runs the kernels' own backward with the merged output and log-sum-exp, so the
probabilities it recomputes are the merged ones, and the gathered products in PyTorch (fp32).
Finding the globals reads their count on the host once per call (the gathered shapes depend on it).
"""

from __future__ import annotations

import dataclasses

import torch

from .block_sparse_layout import BlockSparseLayout


@dataclasses.dataclass
class GlobalTokens:
    """The batch seen token-major as [rows, tokens] (padded: rows = batch; varlen: one row of all
    tokens, with ``sequence`` telling them apart), and its global tokens gathered per row.
    ``GlobalTokens.find`` makes one; None when no token is global."""

    index: torch.Tensor  # [rows, G] token positions of the globals, padded slots point at token 0
    valid: torch.Tensor  # [rows, G] False on the padded slots
    position: torch.Tensor  # [tokens] position inside the token's own sequence
    sequence: torch.Tensor | None  # [tokens] sequence of each token (varlen), None when padded
    key_real: torch.Tensor | None  # [rows, tokens] key_padding_mask

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """x [rows, heads, tokens, d] -> its global rows [rows, heads, G, d]."""
        return x.gather(2, self.index[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3]))

    def same_sequence(self) -> torch.Tensor | None:
        """[rows or 1, tokens, G]: token i and global g share a sequence (varlen), else None."""
        if self.sequence is None:
            return None
        return self.sequence[:, None] == self.sequence[self.index[0]][None, :]

    def real_globals(self) -> torch.Tensor:
        """[rows, G]: the slot holds a global token that is a real key."""
        if self.key_real is None:
            return self.valid
        return self.valid & self.key_real.gather(1, self.index)

    def attend(self, q_rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """The global rows' attention: ``q_rows`` [rows, heads, G, d] (the global queries, however
        projected) over every real key of their sequence in k, v [rows, heads, tokens, d]; fp32
        [rows, heads, G, d], differentiable by autograd."""
        scores = torch.matmul(q_rows.float() * scale, k.float().transpose(-1, -2))  # [rows, heads, G, tokens]
        mask = self.valid[:, None, :, None]
        if self.key_real is not None:
            mask = mask & self.key_real[:, None, None, :]
        same = self.same_sequence()
        if same is not None:
            mask = mask & same.transpose(0, 1)[None, None]
        # A finite fill keeps a row without any key (a padded slot, a sequence of padding only) free
        # of NaN; its weight of 0 then makes it 0.
        probs = torch.softmax(scores.masked_fill(~mask, torch.finfo(scores.dtype).min), -1)
        return torch.matmul(probs, v.float()) * mask.any(-1, keepdim=True)

    def replace_rows(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """x [rows, heads, tokens, d] with its global rows replaced by ``rows`` [rows, heads, G, d],
        out of place and differentiable."""
        row, slot = self.valid.nonzero(as_tuple=True)
        x = x.clone()
        x[row, :, self.index[row, slot]] = rows[row, :, slot].to(x.dtype)
        return x

    @staticmethod
    def find(global_tokens: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
             cu_seqlens: torch.Tensor | None = None) -> "GlobalTokens | None":
        """From a bool ``[batch, seq]`` (or ``[total_tokens]`` with cu_seqlens) global-token mask."""
        return _find_globals(global_tokens, key_padding_mask, cu_seqlens)


def _find_globals(global_tokens, key_padding_mask, cu_seqlens) -> GlobalTokens | None:
    if cu_seqlens is None:
        rows = global_tokens
        position = torch.arange(global_tokens.shape[1], device=global_tokens.device)
        sequence = None
    else:
        rows = global_tokens[None]
        token = torch.arange(global_tokens.shape[0], device=global_tokens.device, dtype=torch.int32)
        sequence = torch.searchsorted(cu_seqlens[1:], token, right=True)
        position = token - cu_seqlens[sequence]
    counts = rows.sum(1)
    most = int(counts.max()) if counts.numel() else 0  # the one host read
    if most == 0:
        return None
    # A stable sort puts each row's globals first, in token order.
    index = torch.argsort((~rows).to(torch.int8), dim=1, stable=True)[:, :most]
    valid = torch.arange(most, device=rows.device)[None, :] < counts[:, None]
    index = torch.where(valid, index, 0)
    return GlobalTokens(index, valid, position.long(), sequence, key_padding_mask)


def _token_major(x: torch.Tensor, varlen: bool) -> torch.Tensor:
    """[batch, heads, seq, d] as is; varlen [total, heads, d] -> a [1, heads, total, d] view."""
    return x.transpose(0, 1)[None] if varlen else x


def _global_key_mask(globals_: GlobalTokens, layout: BlockSparseLayout, band: tuple[int, int]) -> torch.Tensor:
    """[rows, layout heads, tokens, G]: query i sees global key g through the gathered keys, because
    g is real, in i's sequence, and not already visible to i through the layout and the band."""
    block_mask = layout.block_mask_on(globals_.index.device)  # [layout heads, blocks, blocks]
    key_position = globals_.position[globals_.index]  # [rows, G]
    query_position = globals_.position
    local = block_mask[
        torch.arange(block_mask.shape[0], device=block_mask.device)[None, :, None, None],
        (query_position // layout.block_size)[None, None, :, None],
        (key_position // layout.block_size)[:, None, None, :],
    ]
    distance = query_position[None, None, :, None] - key_position[:, None, None, :]
    left, right = band
    if left >= 0:
        local = local & (distance <= left)
    if right >= 0:
        local = local & (distance >= -right)
    mask = globals_.real_globals()[:, None, None, :] & ~local
    same = globals_.same_sequence()
    return mask if same is None else mask & same[None, None]


def _global_key_softmax(qt, k_global, v_global, mask, scale, lse_local):
    """Every query against the gathered global keys its mask lets through, merged with the local
    softmax: (output part of the global keys fp32 [rows, heads, tokens, d], the weight of the local
    output [.., tokens, 1], the merged LSE with the kernels' +inf for rows that saw nothing).

    One pass per step over the [tokens, G] scores, in place: they are the memory traffic here."""
    scores = torch.matmul(qt, (k_global * scale).transpose(-1, -2))
    scores.masked_fill_(~mask, float("-inf"))
    row_max = scores.amax(-1, keepdim=True)
    row_max.masked_fill_(row_max == float("-inf"), 0.0)
    weights = scores.sub_(row_max).exp_()  # exp(s - row max)
    global_lse = row_max + torch.log(weights.sum(-1, keepdim=True))
    local_lse = lse_local[..., None].masked_fill(lse_local[..., None] == float("inf"), float("-inf"))
    lse = torch.logaddexp(local_lse, global_lse)
    empty = lse == float("-inf")
    lse_safe = lse.masked_fill(empty, 0.0)
    global_part = torch.matmul(weights, v_global).mul_(torch.exp(row_max - lse_safe))
    return global_part, torch.exp(local_lse - lse_safe), lse.masked_fill(empty, float("inf"))[..., 0]


class _LocalAndGlobalKeys(torch.autograd.Function):
    """Every query's attention over its local keys and the global keys of its sequence."""

    @staticmethod
    def forward(ctx, q, k, v, globals_, layout, band, scale, varlen, local_ops):
        o_local, lse_local = local_ops[0](q, k, v)
        mask = _global_key_mask(globals_, layout, band)
        qt, kt, vt = (_token_major(t, varlen).float() for t in (q, k, v))
        global_part, local_weight, lse = _global_key_softmax(
            qt, globals_.gather(kt), globals_.gather(vt), mask, scale, lse_local[None] if varlen else lse_local)
        out = global_part.addcmul_(_token_major(o_local, varlen).float(), local_weight).to(q.dtype)
        out = out[0].transpose(0, 1).contiguous() if varlen else out
        lse = lse[0] if varlen else lse
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.options = (globals_, scale, varlen, local_ops, mask)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        globals_, scale, varlen, local_ops, mask = ctx.options
        dout = dout.contiguous()
        # The kernels' backward with the merged output and LSE: its probabilities exp(s - lse) are
        # the merged softmax's, and delta = rowsum(dout * out) is the merged output's.
        dq, dk, dv = local_ops[1](dout, q, k, v, out, lse)
        qt, kt, vt, ot, dot = (_token_major(t, varlen).float() for t in (q, k, v, out, dout))
        k_global, v_global = globals_.gather(kt), globals_.gather(vt)
        lse_view = lse[None] if varlen else lse
        probs = torch.matmul(qt, (k_global * scale).transpose(-1, -2)).sub_(lse_view[..., None]).exp_()
        probs.masked_fill_(~mask, 0.0)
        delta = (dot * ot).sum(-1, keepdim=True)
        dscores = torch.matmul(dot, v_global.transpose(-1, -2)).sub_(delta).mul_(probs)
        dq_global = torch.matmul(dscores, k_global).mul_(scale)
        index = globals_.index[:, None, :, None].expand(-1, qt.shape[1], -1, qt.shape[3])
        # Padded slots add zeros (their probabilities are masked), so scattering them is harmless.
        dk_global = torch.zeros_like(kt).scatter_add_(2, index, torch.matmul(dscores.transpose(-1, -2), qt).mul_(scale))
        dv_global = torch.zeros_like(vt).scatter_add_(2, index, torch.matmul(probs.transpose(-1, -2), dot))
        grads = []
        for local, extra in ((dq, dq_global), (dk, dk_global), (dv, dv_global)):
            extra = extra[0].transpose(0, 1) if varlen else extra
            grads.append((local.float() + extra).to(q.dtype))
        return (*grads,) + (None,) * 6


def _global_rows(q, k, v, globals_: GlobalTokens, scale: float, varlen: bool) -> torch.Tensor:
    """The global queries' attention over every real key of their sequence, [rows, heads, G, d]
    fp32, differentiable by autograd."""
    qt, kt, vt = (_token_major(t, varlen).float() for t in (q, k, v))
    return globals_.attend(globals_.gather(qt), kt, vt, scale)


def attention_with_global_tokens(q, k, v, global_tokens, layout, band, scale, key_padding_mask, cu_seqlens,
                                 local_ops) -> torch.Tensor:
    """block_sparse_attention with ``global_tokens`` (inputs checked by the caller). ``local_ops``:
    the backend's ``forward(q, k, v) -> (out, lse)`` and ``backward(dout, q, k, v, out, lse) ->
    (dq, dk, dv)`` over the layout and the band, the custom ops with every other argument bound."""
    varlen = cu_seqlens is not None
    globals_ = _find_globals(global_tokens, key_padding_mask, cu_seqlens)
    if globals_ is None:
        return local_ops[0](q, k, v)[0]
    out = _LocalAndGlobalKeys.apply(q, k, v, globals_, layout, band, scale, varlen, local_ops)
    out_t = globals_.replace_rows(_token_major(out, varlen), _global_rows(q, k, v, globals_, scale, varlen))
    return (out_t[0].transpose(0, 1) if varlen else out_t).contiguous()
