"""Block-sparse attention in Triton: one kernel with three passes, and its launchers.

The forward and the two backward passes share one program grid (axis 0: tiles of the rows a
program owns, query tiles for the forward and dq, key tiles for dk/dv; axis 1: batch * heads), one
argument list and one prologue: find the program's sequence and its layout row, point at the
sequence's first token, then run the pass (attention_fwd.py, attention_bwd.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backends import autotuning
from .attention_bwd import dkdv_rows, dq_rows
from .attention_common import UNBOUNDED, dot_precision, layout_entries, program_rows, sequence_base, sequence_offset
from .attention_fwd import forward_rows
from .configs import all_configs, fixed_launch, pruner

PASSES = {"fwd": 0, "dq": 1, "dkdv": 2}  # the PASS constexpr
PASS_FWD = tl.constexpr(PASSES["fwd"])
PASS_DQ = tl.constexpr(PASSES["dq"])
PASS_DKDV = tl.constexpr(PASSES["dkdv"])


@triton.jit
def block_sparse_attention_kernel(
    Q, K, V, Out, DOut, DQ, DK, DV, Lse, Delta,
    Offsets, Indices, CuSeqlens, KeyMask,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    stride_lb, stride_lh,
    stride_mb,
    layout_head_stride, num_heads, seq_len_padded, window_left, window_right, sm_scale, softcap,
    HEAD_DIM: tl.constexpr, LAYOUT_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KEY_MASK: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr, PASS: tl.constexpr,
):
    """Offsets / Indices: the layout (forward, dq) or its transpose (dk/dv). The o strides are the
    result's: Out in the forward; in the backward Out, DOut, DQ, DK and DV, all contiguous."""
    rows_per_program: tl.constexpr = BLOCK_N if PASS == PASS_DKDV else BLOCK_M
    batch64, head, seq_start, seq_len, start = program_rows(CuSeqlens, num_heads, seq_len_padded, rows_per_program,
                                                            IS_VARLEN)
    if start >= seq_len:
        return
    lo, hi = layout_entries(Offsets, Indices, head, layout_head_stride, start, seq_len, LAYOUT_BLOCK)
    Q_seq = sequence_base(Q, batch64, head, seq_start, stride_qb, stride_qh, stride_qt)
    K_seq = sequence_base(K, batch64, head, seq_start, stride_kb, stride_kh, stride_kt)
    V_seq = sequence_base(V, batch64, head, seq_start, stride_vb, stride_vh, stride_vt)
    o_seq = sequence_offset(batch64, head, seq_start, stride_ob, stride_oh, stride_ot)
    lse_seq = sequence_offset(batch64, head, seq_start, stride_lb, stride_lh, 1)
    KeyMaskRow = KeyMask + batch64 * stride_mb
    if PASS == PASS_FWD:
        forward_rows(Q_seq, K_seq, V_seq, Out + o_seq, Lse + lse_seq, KeyMaskRow, Indices, lo, hi, start, seq_len,
                     window_left, window_right, sm_scale, softcap, stride_qt, stride_kt, stride_vt, stride_ot,
                     HEAD_DIM, LAYOUT_BLOCK, BLOCK_M, BLOCK_N, HAS_WINDOW, HAS_KEY_MASK, HAS_SOFTCAP, DOT_PRECISION)
    elif PASS == PASS_DQ:
        dq_rows(Q_seq, K_seq, V_seq, Out + o_seq, DOut + o_seq, DQ + o_seq, Lse + lse_seq, Delta + lse_seq,
                KeyMaskRow, Indices, lo, hi, start, seq_len, window_left, window_right, sm_scale, softcap, stride_qt,
                stride_kt, stride_vt, stride_ot, HEAD_DIM, LAYOUT_BLOCK, BLOCK_M, BLOCK_N, HAS_WINDOW, HAS_KEY_MASK,
                HAS_SOFTCAP, DOT_PRECISION)
    else:
        dkdv_rows(Q_seq, K_seq, V_seq, DOut + o_seq, DK + o_seq, DV + o_seq, Lse + lse_seq, Delta + lse_seq,
                  KeyMaskRow, Indices, lo, hi, start, seq_len, window_left, window_right, sm_scale, softcap, stride_qt,
                  stride_kt, stride_vt, stride_ot, HEAD_DIM, LAYOUT_BLOCK, BLOCK_M, BLOCK_N, HAS_WINDOW, HAS_KEY_MASK,
                  HAS_SOFTCAP, DOT_PRECISION)


# Tile shapes and pipelining depth are tuned per GPU and pass at first call, among the candidates
# that configs.configs_for() lists for the layout block, head_dim and dtype.
TUNED = {
    name: triton.autotune(
        configs=all_configs(name),
        key=["LAYOUT_BLOCK", "HEAD_DIM", "IS_VARLEN", "HAS_WINDOW", "HAS_KEY_MASK", "HAS_SOFTCAP", "PASS"],
        prune_configs_by={"early_config_prune": pruner(name)},
    )(block_sparse_attention_kernel)
    for name in PASSES
}


class _Launch:
    """The arguments every pass shares, built once per call: problem sizes, the (batch, token, head)
    strides of q, k, v and of the contiguous result (out, or dq with dk and dv), lse strides, the
    key mask, the layout's head stride, the band, the scale, the cap and the constexpr flags. ``window``
    is (left, right), -1 for an unbounded side (reference.window_bounds); ``softcap`` 0 for none."""

    def __init__(self, q, k, v, result, lse, layout_block, layout_heads, row_offsets, *,
                 window, scale, softcap, key_padding_mask, cu_seqlens, max_seqlen):
        varlen = cu_seqlens is not None
        self.heads = q.shape[1]
        if varlen:
            self.batch, self.seq_len_padded = cu_seqlens.numel() - 1, max_seqlen
            strides = [(0, t.stride(0), t.stride(1)) for t in (q, k, v, result)]
            lse_strides = (0, lse.stride(0))
        else:
            self.batch, self.seq_len_padded = q.shape[0], q.shape[2]
            strides = [(t.stride(0), t.stride(2), t.stride(1)) for t in (q, k, v, result)]
            lse_strides = (lse.stride(0), lse.stride(1))
        has_key_mask = key_padding_mask is not None
        self.key_mask = (key_padding_mask.to(torch.uint8).contiguous() if has_key_mask
                         else q.new_empty(0, dtype=torch.uint8))
        self.cu_seqlens = cu_seqlens if varlen else q.new_empty(0, dtype=torch.int32)
        self.scalars = (
            *strides[0], *strides[1], *strides[2], *strides[3], *lse_strides,
            self.key_mask.stride(0) if has_key_mask else 0,
            0 if layout_heads == 1 else row_offsets.shape[1],
            self.heads, self.seq_len_padded, *(UNBOUNDED if side < 0 else side for side in window), scale, softcap,
        )
        self.flags = dict(
            HEAD_DIM=q.shape[-1], LAYOUT_BLOCK=layout_block, IS_VARLEN=varlen,
            HAS_WINDOW=tuple(window) != (-1, -1), HAS_KEY_MASK=has_key_mask, HAS_SOFTCAP=softcap > 0,
            DOT_PRECISION=dot_precision(q.dtype),
        )
        self.layout_block, self.dtype, self.device = layout_block, q.dtype, q.device
        self.unused = q.new_empty(0)  # the pointers a pass does not read

    def run(self, name: str, tensors: dict, offsets, indices, tile=None):
        """Run pass ``name`` ("fwd", "dq", "dkdv"), autotuned or with ``tile`` / the arch's first
        candidate; ``tensors`` names the pointers it uses."""
        pointers = [tensors.get(p, self.unused) for p in ("q", "k", "v", "out", "dout", "dq", "dk", "dv", "lse", "delta")]
        args = (*pointers, offsets, indices, self.cu_seqlens, self.key_mask, *self.scalars)
        flags = dict(self.flags, PASS=PASSES[name])
        axis = "BLOCK_N" if name == "dkdv" else "BLOCK_M"
        grid = lambda block: (triton.cdiv(self.seq_len_padded, block), self.batch * self.heads)
        if tile is None and autotuning():
            TUNED[name][lambda meta: grid(meta[axis])](*args, **flags)
        else:
            launch = tile or fixed_launch(name, self.layout_block, flags["HEAD_DIM"], self.dtype, self.device,
                                          flags["HAS_SOFTCAP"])
            block_sparse_attention_kernel[grid(launch[axis])](*args, **flags, **launch)


def attention_forward(q, k, v, layout_tensors, layout_block, layout_heads, *, window, scale, softcap,
                      key_padding_mask, cu_seqlens, max_seqlen, tile=None):
    """The forward pass. Shapes were checked by the caller.

    q, k, v: [batch, heads, seq, head_dim] or [total_tokens, heads, head_dim] with cu_seqlens.
    Returns (out, lse) with lse [batch, heads, seq] or [heads, total_tokens], fp32, natural log.
    """
    row_offsets, col_indices = layout_tensors[:2]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse_shape = (q.shape[1], q.shape[0]) if cu_seqlens is not None else q.shape[:3]
    lse = torch.empty(lse_shape, device=q.device, dtype=torch.float32)
    launch = _Launch(q, k, v, out, lse, layout_block, layout_heads, row_offsets, window=window, scale=scale,
                     softcap=softcap, key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    launch.run("fwd", dict(q=q, k=k, v=v, out=out, lse=lse), row_offsets, col_indices, tile)
    return out, lse


def attention_backward(dout, q, k, v, out, lse, layout_tensors, layout_block, layout_heads, *,
                       window, scale, softcap, key_padding_mask, cu_seqlens, max_seqlen, tile=None):
    """The dq pass, then the dk/dv pass; returns (dq, dk, dv) as contiguous tensors of q's shape."""
    row_offsets, col_indices, col_offsets, row_indices = layout_tensors
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    tensors = dict(q=q, k=k, v=v, out=out.contiguous(), dout=dout.contiguous(), dq=dq, dk=torch.empty_like(dq),
                   dv=torch.empty_like(dq), lse=lse, delta=torch.empty_like(lse))
    launch = _Launch(q, k, v, dq, lse, layout_block, layout_heads, row_offsets, window=window, scale=scale,
                     softcap=softcap, key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    launch.run("dq", tensors, row_offsets, col_indices, tile)
    launch.run("dkdv", tensors, col_offsets, row_indices, tile)
    return dq, tensors["dk"], tensors["dv"]
