"""block_sparse_attention against the float64 dense reference, forward and backward.

Without a GPU, backend="triton" runs the real kernels in Triton's interpreter (see conftest.py).
"""

import pytest
import torch

from benchmarks import gpu_cases
from helpers import (
    CPU_BACKENDS,
    CPU_EXTENSION,
    DTYPES,
    GPU_BACKENDS,
    NATIVE_CPU_BACKENDS,
    TOLERANCES,
    backend_matrix,
    random_qkv,
    relative_error,
)
from modernbert_kernels import block_sparse_attention, layouts, native
from modernbert_kernels.reference import attention_mask, block_sparse_attention_reference

HEADS = 2
BLOCK = 32
# Four blocks of 32, the last one partial: as small as the layouts stay varied, because every
# Triton case runs in the interpreter (issue #20: 150 tokens cost ~35% more there).
SEQ = 100  # not a multiple of the block
VARLEN_LENGTHS = [100, 37, 0, 96]  # includes an empty sequence


def random_block_mask(seq_len, block_size, heads):
    num_blocks = -(-seq_len // block_size)
    generator = torch.Generator().manual_seed(7)
    mask = torch.rand(heads, num_blocks, num_blocks, generator=generator) < 0.45
    mask[:, 1] = False  # a query block that sees nothing: its rows must come out as 0
    return mask


LAYOUTS = {
    "sliding_window": lambda: layouts.sliding_window(SEQ, 40, BLOCK),
    "global_tokens": lambda: layouts.global_tokens(SEQ, 32, BLOCK),
    "strided": lambda: layouts.strided(SEQ, 64, BLOCK),
    "fixed": lambda: layouts.fixed(SEQ, 64, 32, BLOCK),
    "dilated": lambda: layouts.dilated(SEQ, 64, 2, BLOCK),
    "bigbird_per_head": lambda: layouts.bigbird(SEQ, 32, 32, 1, BLOCK, seed=0, num_heads=HEADS),
    "from_block_mask_per_head": lambda: layouts.from_block_mask(random_block_mask(SEQ, BLOCK, HEADS), BLOCK),
    "union": lambda: layouts.union(layouts.sliding_window(SEQ, 16, BLOCK), layouts.global_tokens(SEQ, 32, BLOCK)),
    "dense": lambda: layouts.from_block_mask(torch.ones(4, 4, dtype=torch.bool), BLOCK),
}


def make_inputs(mode, dtype, head_dim, heads=HEADS, seed=0):
    """Fresh random q, k, v (and the batch description) for one of the three batch modes."""
    generator = torch.Generator().manual_seed(seed)
    extra = {}
    if mode == "varlen":
        shape = (sum(VARLEN_LENGTHS), heads, head_dim)
        cu = torch.tensor([0] + VARLEN_LENGTHS, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        extra["cu_seqlens"] = cu
    else:
        shape = (2, heads, SEQ, head_dim)
        if mode == "key_padding":
            keep = torch.ones(2, SEQ, dtype=torch.bool)
            keep[1, 70:] = False  # right padding
            keep[0, 10:20] = False  # and a hole, so the mask is not just a length
            extra["key_padding_mask"] = keep
    q, k, v = (torch.randn(shape, generator=generator).to(dtype) for _ in range(3))
    dout = torch.randn(shape, generator=generator).to(dtype)
    return q, k, v, dout, extra


def global_tokens_for(mode):
    """Per-example global tokens: in the middle of a block (45 with blocks of 32), the first and the
    last token, a padding token (key_padding), and an example or a sequence with none."""
    if mode == "varlen":
        starts = [0] + torch.tensor(VARLEN_LENGTHS).cumsum(0).tolist()
        marked = torch.zeros(starts[-1], dtype=torch.bool)
        marked[[starts[0], starts[0] + 45, starts[0] + 99, starts[3] + 70]] = True  # sequence 1 has none
        return marked
    marked = torch.zeros(2, SEQ, dtype=torch.bool)
    marked[0, [0, 45, 99]] = True
    marked[1, [50, 90]] = True  # 90 is padding under key_padding: seen by no one, sees every real key
    return marked


def check_against_reference(backend, layout, mode, window, dtype, head_dim=64, scale=None, magnitude=1.0,
                            tol=None, causal=False, with_globals=False, softcap=None, sinks=None):
    """Forward and backward against float64; ``sinks`` (fp32 [heads]) also checks their gradient."""
    q, k, v, dout, extra = make_inputs(mode, dtype, head_dim)
    if with_globals:
        extra["global_tokens"] = global_tokens_for(mode)
    if softcap is not None:
        extra["softcap"] = softcap
    q, k = q * magnitude, k * magnitude
    leaves = (q, k, v) if sinks is None else (q, k, v, sinks)
    inputs = [t.clone().requires_grad_() for t in leaves]
    ref_inputs = [t.double().requires_grad_() for t in leaves]
    if sinks is not None:
        extra["sinks"], ref_extra = inputs[3], dict(extra, sinks=ref_inputs[3])
    else:
        ref_extra = extra
    out = block_sparse_attention(*inputs[:3], layout, window=window, causal=causal, scale=scale, backend=backend,
                                 **extra)
    out.backward(dout)
    ref = block_sparse_attention_reference(*ref_inputs[:3], layout, window=window, causal=causal, scale=scale,
                                           **ref_extra)
    ref.backward(dout.double())

    assert out.dtype == dtype and out.shape == q.shape
    tol = TOLERANCES[dtype] if tol is None else tol
    for name, actual, expected in [("out", out, ref)] + [
        (f"d{n}", t.grad, r.grad) for n, t, r in zip(["q", "k", "v", "sinks"], inputs, ref_inputs)
    ]:
        assert not torch.isnan(actual).any(), f"{name} has NaN"
        err = relative_error(actual, expected)
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


# Every layout x window x batch mode x dtype on the C++ and PyTorch backends (108 cases, ~0.1 s
# each); in Triton's interpreter (~3 s each) a pairwise covering of them: 27 cases in which every
# layout meets every window, mode and dtype, and every window every mode and dtype.
MATRIX = {"layout_name": list(LAYOUTS), "window": [None, 40], "mode": ["padded", "key_padding", "varlen"],
          "dtype": [torch.float32, torch.float16]}
MATRIX_IDS = {"window": lambda w: "nowindow" if w is None else f"window{w}",
              "dtype": lambda d: {torch.float32: "fp32", torch.float16: "fp16"}[d]}


@pytest.mark.parametrize("backend, layout_name, window, mode, dtype", backend_matrix(MATRIX, MATRIX_IDS))
def test_matches_reference(backend, layout_name, window, mode, dtype, poison_allocations):
    check_against_reference(backend, LAYOUTS[layout_name](), mode, window, dtype)


# bf16 on the C++ backend in every batch mode and head_dim, over a window, a causal window, per-head
# layouts (one with a query block that sees nothing) and a dense one. Where the CPU has AMX (the amx
# build), the forward runs both products on AMX-BF16 tiles, 16 query rows at a time; where it has
# AVX512-BF16 only (the avx512_bf16 build), as bf16 pair dot products, 4 rows at a time; both with
# bf16 probabilities. test_narrower_isa_builds runs the builds below the widest.
BF16_CASES = {
    "window40": (LAYOUTS["sliding_window"], 40, False),
    "causal_window40": (lambda: layouts.sliding_window(SEQ, 40, BLOCK, causal=True), 40, True),
    "bigbird_per_head": (LAYOUTS["bigbird_per_head"], None, False),
    "empty_query_block": (LAYOUTS["from_block_mask_per_head"], None, False),
    "dense": (LAYOUTS["dense"], None, False),
}


@CPU_EXTENSION
@pytest.mark.parametrize("head_dim", [32, 64, 128, 256])
@pytest.mark.parametrize("mode", ["padded", "key_padding", "varlen"])
@pytest.mark.parametrize("case", BF16_CASES)
def test_cpu_bf16_matches_reference(case, mode, head_dim, poison_allocations):
    layout, window, causal = BF16_CASES[case]
    check_against_reference("cpu", layout(), mode, window, torch.bfloat16, head_dim=head_dim, causal=causal)


@CPU_EXTENSION
@pytest.mark.parametrize("block_size", [16, 32, 64, 128])
@pytest.mark.parametrize("mode", ["key_padding", "varlen"])
def test_cpu_bf16_block_sizes(block_size, mode, poison_allocations):
    """bf16 over every block size from 16 (the AMX products' 16-row groups; at 16, value pairs in
    groups of 32 keys past the block's end), with a window narrower and wider than a block."""
    for window in (24, 100):
        check_against_reference("cpu", layouts.sliding_window(SEQ, window, block_size), mode, window, torch.bfloat16)


@CPU_EXTENSION
@pytest.mark.parametrize("extra_columns", [0, 1], ids=["even_token_stride", "odd_token_stride"])
@pytest.mark.parametrize("head_dim", [32, 64])
def test_cpu_bf16_from_a_fused_projection(extra_columns, head_dim, poison_allocations):
    """bf16 q, k, v sliced out of one fused projection, forward and backward: an even token stride
    (keys transposed as 32-bit pairs, whole vectors at a time) and an odd one (pairs that straddle
    32-bit words: key pairs copied one by one)."""
    generator = torch.Generator().manual_seed(5)
    tokens = sum(VARLEN_LENGTHS)
    fused = torch.randn(tokens, 3 * HEADS * head_dim + extra_columns, generator=generator).to(torch.bfloat16)
    q, k, v = fused[:, :3 * HEADS * head_dim].view(tokens, 3, HEADS, head_dim).unbind(1)
    assert k.stride(0) % 2 == extra_columns
    dout = torch.randn(tokens, HEADS, head_dim, generator=generator).to(torch.bfloat16)
    cu = torch.tensor([0] + VARLEN_LENGTHS, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    layout = layouts.sliding_window(SEQ, 40, BLOCK)
    inputs = [t.detach().requires_grad_() for t in (q, k, v)]
    out = block_sparse_attention(*inputs, layout, window=40, cu_seqlens=cu, backend="cpu")
    out.backward(dout)
    ref_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = block_sparse_attention_reference(*ref_inputs, layout, window=40, cu_seqlens=cu)
    ref.backward(dout.double())
    for name, actual, expected in [("out", out, ref)] + [
        (f"d{n}", t.grad, r.grad) for n, t, r in zip("qkv", inputs, ref_inputs)
    ]:
        assert relative_error(actual, expected) <= TOLERANCES[torch.bfloat16], name


# Causal masks (decoders): alone on the lower-triangular layout, with a window on the causal sliding
# layout (0 <= i - j <= w), and over bidirectional layouts whose tiles above the diagonal the
# kernels must mask whole (some query rows then see no key at all).
CAUSAL_CASES = {
    "causal": (lambda: layouts.causal(SEQ, BLOCK), None),
    "causal_window40": (lambda: layouts.sliding_window(SEQ, 40, BLOCK, causal=True), 40),
    "causal_window5": (lambda: layouts.sliding_window(SEQ, 5, BLOCK, causal=True), 5),
    "causal_over_bigbird": (LAYOUTS["bigbird_per_head"], None),
    "causal_over_window40": (LAYOUTS["sliding_window"], 40),
}
CAUSAL_MATRIX = {"case": list(CAUSAL_CASES), "mode": ["padded", "key_padding", "varlen"],
                 "dtype": [torch.float32, torch.float16]}


@pytest.mark.parametrize("backend, case, mode, dtype", backend_matrix(CAUSAL_MATRIX, MATRIX_IDS))
def test_causal_matches_reference(backend, case, mode, dtype, poison_allocations):
    layout, window = CAUSAL_CASES[case]
    check_against_reference(backend, layout(), mode, window, dtype, causal=True)


# Per-example global tokens (Longformer, LED) over a window, a causal window, and layouts without a
# band (where the layout alone decides the local pairs, and a query block that sees nothing).
GLOBAL_CASES = {
    "window40": (LAYOUTS["sliding_window"], 40, False),
    "causal_window40": (lambda: layouts.sliding_window(SEQ, 40, BLOCK, causal=True), 40, True),
    "bigbird_per_head": (LAYOUTS["bigbird_per_head"], None, False),
    "empty_query_block": (LAYOUTS["from_block_mask_per_head"], None, False),
}
GLOBAL_MATRIX = {"case": list(GLOBAL_CASES), "mode": ["padded", "key_padding", "varlen"],
                 "dtype": [torch.float32, torch.float16]}


@pytest.mark.parametrize("backend, case, mode, dtype", backend_matrix(GLOBAL_MATRIX, MATRIX_IDS, triton_strength=1))
def test_global_tokens_match_reference(backend, case, mode, dtype, poison_allocations):
    layout, window, causal = GLOBAL_CASES[case]
    check_against_reference(backend, layout(), mode, window, dtype, causal=causal, with_globals=True)


def test_global_token_mask_is_token_exact():
    """The oracle itself: a global token in the middle of a block makes only itself global, padding
    stays unseen, and everything else is the layout and the band."""
    nothing = layouts.from_block_mask(torch.zeros(4, 4, dtype=torch.bool), BLOCK)
    marked = torch.zeros(1, SEQ, dtype=torch.bool)
    marked[0, 45] = True
    keep = torch.ones(1, SEQ, dtype=torch.bool)
    keep[0, 70:] = False
    mask = attention_mask(nothing, SEQ, key_padding_mask=keep, global_tokens=marked)[0, 0]
    expected = torch.zeros(SEQ, SEQ, dtype=torch.bool)
    expected[45, :70] = True
    expected[:, 45] = True
    assert torch.equal(mask, expected)
    window = attention_mask(layouts.sliding_window(SEQ, 8, BLOCK), SEQ, window=8, global_tokens=marked)[0, 0]
    pos = torch.arange(SEQ)
    band = (pos[:, None] - pos[None, :]).abs() <= 8
    assert torch.equal(window, band | (pos[:, None] == 45) | (pos[None, :] == 45))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
# 16 and 96 (Phi-3's) run zero-padded to 32 and 128; 256 is Gemma 2 and 3's.
@pytest.mark.parametrize("head_dim", [16, 32, 64, 96, 128, 256])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_head_dims(backend, head_dim, dtype, poison_allocations):
    check_against_reference(backend, layouts.sliding_window(SEQ, 40, BLOCK), "varlen", 40, dtype, head_dim)


@pytest.mark.parametrize("backend", [None, "torch"], ids=["default", "torch"])
def test_head_dims_past_the_kernels_run_on_the_torch_backend(backend, poison_allocations):
    """head_dim 512, past the kernels' 256: the PyTorch tile path, chosen by default, against float64."""
    check_against_reference(backend, layouts.sliding_window(SEQ, 40, BLOCK), "key_padding", 40, torch.float32,
                            head_dim=512, causal=True)


# Logit soft-capping (Gemma 2's): scores of magnitude ~12 against a cap of 5, so tanh bends them,
# in every batch mode, over a causal window and a per-head layout, forward and backward. fp32 and
# fp16 on every backend (Triton: a pairwise covering, 6 cases), and bf16 on the C++ and PyTorch ones.
# (layout, window, causal) of the option tests below.
CAUSAL_WINDOW40 = (lambda: layouts.sliding_window(SEQ, 40, BLOCK, causal=True), 40, True)
SOFTCAP_CASES = {"causal_window40": CAUSAL_WINDOW40, "bigbird_per_head": (LAYOUTS["bigbird_per_head"], None, False)}
SOFTCAP_MATRIX = {"case": list(SOFTCAP_CASES), "mode": MATRIX["mode"], "dtype": MATRIX["dtype"]}


def native_bf16_params(cases, modes) -> list:
    """pytest params (backend, case, mode, bf16) on the C++ and PyTorch backends: the interpreter has
    no bf16."""
    backends = [(getattr(b, "values", (b,))[0], getattr(b, "marks", ())) for b in NATIVE_CPU_BACKENDS]
    return [pytest.param(name, case, mode, torch.bfloat16, id=f"{name}-{case}-{mode}-bf16", marks=marks)
            for name, marks in backends for case in cases for mode in modes]


@pytest.mark.parametrize("backend, case, mode, dtype",
                         backend_matrix(SOFTCAP_MATRIX, {"dtype": MATRIX_IDS["dtype"]})
                         + native_bf16_params(SOFTCAP_CASES, SOFTCAP_MATRIX["mode"]))
def test_softcap_matches_reference(backend, case, mode, dtype, poison_allocations):
    layout, window, causal = SOFTCAP_CASES[case]
    check_against_reference(backend, layout(), mode, window, dtype, magnitude=3.0, causal=causal, softcap=5.0)


def test_softcap_changes_the_result():
    """At the magnitudes above the cap bends the scores, so a backend that ignored it could not match
    the reference there."""
    q, k, v, _, extra = make_inputs("padded", torch.float32, 64)
    q, k = q * 3, k * 3
    layout = LAYOUTS["sliding_window"]()
    capped = block_sparse_attention(q, k, v, layout, window=40, softcap=5.0, backend="reference", **extra)
    plain = block_sparse_attention(q, k, v, layout, window=40, backend="reference", **extra)
    assert relative_error(capped, plain) > 0.05


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_cap_far_above_the_scores_keeps_their_digits(backend, poison_allocations):
    """Scores ~3 under a cap of 1e6: tanh near 0, where 1 - e^-2x cancels (an error of ~6e-8 that
    the cap multiplies: 2e-3 off in the C++ kernels before the series took over there)."""
    check_against_reference(backend, LAYOUTS["bigbird_per_head"](), "key_padding", 40, torch.float32, magnitude=1.7,
                            softcap=1e6)


def test_bad_softcaps_are_refused():
    q, k, v, _, extra = make_inputs("padded", torch.float32, 64)
    layout = LAYOUTS["sliding_window"]()
    for cap in (-1.0, float("inf"), float("nan"), True, "5"):
        with pytest.raises(ValueError, match="softcap must be None, 0 or a finite number > 0"):
            block_sparse_attention(q, k, v, layout, softcap=cap, **extra)
    with pytest.raises(ValueError, match="softcap with global_tokens"):
        block_sparse_attention(q, k, v, layout, softcap=5.0, global_tokens=torch.zeros(q.shape[0], SEQ, dtype=torch.bool),
                               **extra)


# Attention sinks (GPT-OSS's): a logit per head in every row's softmax, with no value; sinks of
# magnitude ~2 against scores ~1, so they take a real share of each row. Over a causal window and a
# per-head layout with a query block that sees nothing (its rows: all weight on the sink, output
# 0), in every batch mode, forward and the gradients of q, k, v and the sinks. fp32 and fp16 on
# every backend, and bf16 on the C++ and PyTorch ones. Sinks change no kernel, only what is done with
# each backend's (out, lse): in the interpreter, every value once (3 cases).
SINK_CASES = {"causal_window40": CAUSAL_WINDOW40,
              "from_block_mask_per_head": (LAYOUTS["from_block_mask_per_head"], None, False)}
SINK_MATRIX = {"case": list(SINK_CASES), "mode": MATRIX["mode"], "dtype": MATRIX["dtype"]}


@pytest.mark.parametrize("backend, case, mode, dtype",
                         backend_matrix(SINK_MATRIX, {"dtype": MATRIX_IDS["dtype"]}, triton_strength=1)
                         + native_bf16_params(SINK_CASES, SINK_MATRIX["mode"]))
def test_sinks_match_reference(backend, case, mode, dtype, poison_allocations):
    layout, window, causal = SINK_CASES[case]
    sinks = torch.randn(HEADS, generator=torch.Generator().manual_seed(5)) * 2
    check_against_reference(backend, layout(), mode, window, dtype, causal=causal, sinks=sinks)


def test_sinks_with_softcap_and_a_padded_head_dim(poison_allocations):
    """Sinks beside the other options: a capped score, head_dim 48 (run padded to 64)."""
    sinks = torch.tensor([1.5, -0.5])
    check_against_reference("torch", LAYOUTS["bigbird_per_head"](), "varlen", None, torch.float32, head_dim=48,
                            magnitude=3.0, softcap=5.0, sinks=sinks)


def test_sinks_take_weight_and_bad_sinks_are_refused():
    q, k, v, _, extra = make_inputs("padded", torch.float32, 64)
    layout = LAYOUTS["sliding_window"]()
    plain = block_sparse_attention(q, k, v, layout, window=40, backend="torch", **extra)
    sunk = block_sparse_attention(q, k, v, layout, window=40, sinks=torch.full((HEADS,), 3.0), backend="torch",
                                  **extra)
    assert relative_error(sunk, plain) > 0.1  # e^3 = 20 against ~80 keys of weight ~1: ~20% of each row
    for sinks, error, match in [
        ([1.0, 2.0], TypeError, "sinks must be a torch.Tensor"),
        (torch.zeros(HEADS + 1), ValueError, r"sinks must have shape \(2,\)"),
        (torch.zeros(1, HEADS), ValueError, r"sinks must have shape \(2,\)"),
        (torch.zeros(HEADS, dtype=torch.long), TypeError, "sinks must be floating point"),
        (torch.zeros(HEADS, device="meta"), ValueError, "sinks is on meta"),
    ]:
        with pytest.raises(error, match=match):
            block_sparse_attention(q, k, v, layout, sinks=sinks, **extra)
    with pytest.raises(ValueError, match="sinks with global_tokens"):
        block_sparse_attention(q, k, v, layout, sinks=torch.zeros(HEADS),
                               global_tokens=torch.zeros(q.shape[0], SEQ, dtype=torch.bool), **extra)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_custom_scale(backend):
    check_against_reference(backend, LAYOUTS["bigbird_per_head"](), "padded", None, torch.float32, scale=0.37)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_large_logits(backend, poison_allocations):
    """Scores of several hundred: masked entries far above the row's LSE must not overflow.

    fp32 rounding of a score s perturbs exp(s - lse) by about |s| * 6e-8, so the tolerance grows
    with the logits: 5e-5 here instead of 1e-5.
    """
    check_against_reference(backend, LAYOUTS["sliding_window"](), "key_padding", 40, torch.float32,
                            magnitude=6.0, tol=5e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_logits_of_magnitude_1e4_stay_finite_and_correct(backend, poison_allocations):
    """Scores up to ~1e4: the online softmax subtracts the running max, so nothing overflows. fp32
    rounding of a score s moves exp(s - lse) by about |s| * 6e-8: 1e-3 relative at this size."""
    generator = torch.Generator().manual_seed(23)
    q, k, v = (torch.randn(1, HEADS, 96, 64, generator=generator) for _ in range(3))
    q = q * 1250.0  # |q . k| / sqrt(64) reaches ~1e4
    layout = layouts.sliding_window(96, 40, BLOCK)
    out = block_sparse_attention(q, k, v, layout, window=40, backend=backend)
    ref = block_sparse_attention_reference(q.double(), k.double(), v.double(), layout, window=40)
    scores = (q.double() @ k.double().transpose(-1, -2) / 8).abs().max().item()
    assert scores > 5e3
    assert torch.isfinite(out).all()
    assert relative_error(out, ref) <= 1e-3


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_rows_that_see_no_key_are_zero(backend, poison_allocations):
    q, k, v, _, _ = make_inputs("padded", torch.float32, 32)
    keep = torch.zeros(2, SEQ, dtype=torch.bool)  # batch item 0 has no real key at all
    keep[1] = True
    out = block_sparse_attention(q, k, v, layouts.sliding_window(SEQ, 40, BLOCK), key_padding_mask=keep,
                                 backend=backend)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert out[1].abs().sum() > 0


def nan_rows(t: torch.Tensor) -> set:
    """Token rows (of batch 0, head 0) holding a NaN."""
    return set(t[0, 0].isnan().any(-1).nonzero().flatten().tolist())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16: the pair dot-product kernel's own softmax
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_nan_input_reaches_the_rows_it_reaches(backend, where, dtype, poison_allocations):
    """A NaN in row 40 of q, k or v is never hidden (a row of zeros would look like a masked row):
    in q it makes exactly output row 40 NaN; in k exactly the rows that see key 40; in v at least
    those rows, and at most the rows of the query blocks that visit key 40's block (a tile's matmul
    multiplies a masked key's probability 0 by its NaN, as dense attention does). Every other row
    matches the reference. Gradients of a NaN query row: NaN in dq's row 40 and in the dk / dv rows
    of the keys it sees."""
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter has no bf16")
    seq, nan_token, window = 96, 40, 32
    layout = layouts.sliding_window(seq, window, BLOCK)
    generator = torch.Generator().manual_seed(21)
    q, k, v, dout = (torch.randn(1, HEADS, seq, 32, generator=generator).to(dtype) for _ in range(4))
    dict(q=q, k=k, v=v)[where][0, 0, nan_token, 5] = float("nan")
    sees = attention_mask(layout, seq, window)[0, 0]
    block_visits = layout.to_block_mask()[0][:, nan_token // BLOCK].repeat_interleave(BLOCK)[:seq]
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = block_sparse_attention(*inputs, layout, window=window, backend=backend)
    ref = block_sparse_attention_reference(q.double(), k.double(), v.double(), layout, window=window)
    reached = set(sees[:, nan_token].nonzero().flatten().tolist())
    if where == "q":
        assert nan_rows(out) == {nan_token}
    elif where == "k":
        assert nan_rows(out) == reached
    else:
        assert reached <= nan_rows(out) <= set(block_visits.nonzero().flatten().tolist())
    assert not out[0, 1:].isnan().any()  # other heads
    finite = ~out.isnan().any(-1) & ~ref.isnan().any(-1)  # the dense reference's v matmul spreads NaN wider
    assert relative_error(out[finite], ref[finite]) <= TOLERANCES[dtype]
    if where == "q":
        out.backward(dout)
        dq, dk, dv = (t.grad for t in inputs)
        assert nan_token in nan_rows(dq) and nan_rows(dq) <= set(range(32, 64))  # its own query block
        seen_keys = set(sees[nan_token].nonzero().flatten().tolist())
        assert seen_keys <= nan_rows(dk) and seen_keys <= nan_rows(dv)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_inference_mode_then_no_grad(backend):
    """Buffers a backend keeps between calls (the torch path's workspaces) made under
    torch.inference_mode must not break a later call outside it (an encoder used both ways)."""
    q, k, v, _, _ = make_inputs("padded", torch.float32, 32)
    layout = layouts.sliding_window(SEQ, 40, BLOCK)
    with torch.inference_mode():
        first = block_sparse_attention(q, k, v, layout, window=40, backend=backend)
    with torch.no_grad():
        again = block_sparse_attention(q, k, v, layout, window=40, backend=backend)
    assert torch.equal(first, again)


def non_finite_rows(t: torch.Tensor) -> set:
    """Token rows (of batch 0, head 0) holding a NaN or an infinity."""
    return set((~t[0, 0].isfinite()).any(-1).nonzero().flatten().tolist())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16: the pair dot-product kernel's own softmax
@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("where", ["q", "k"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_an_infinite_input_gives_what_dense_ieee_attention_gives(backend, where, sign, dtype, poison_allocations):
    """An infinity in q row 40 or k row 40 makes scores +-inf. Each output row is non-finite
    exactly where the float64 dense reference's is (a +inf score: exp(inf - inf) = NaN, the row is
    NaN; a -inf score: that key gets weight 0 and the row stays finite and correct), and every
    finite row matches the reference. For q the NaN row's gradients are NaN in dq's row 40 and in
    the dk / dv rows of the keys it sees, and nowhere outside its query block's tiles."""
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter has no bf16")
    seq, token, window = 96, 40, 32
    layout = layouts.sliding_window(seq, window, BLOCK)
    generator = torch.Generator().manual_seed(23)
    q, k, v, dout = (torch.randn(1, HEADS, seq, 32, generator=generator).to(dtype) for _ in range(4))
    dict(q=q, k=k)[where][0, 0, token, 5] = sign * float("inf")
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = block_sparse_attention(*inputs, layout, window=window, backend=backend)
    ref = block_sparse_attention_reference(q.double(), k.double(), v.double(), layout, window=window)
    sees = attention_mask(layout, seq, window)[0, 0]
    expected = non_finite_rows(ref)
    assert expected, "the case must reach some row"
    assert expected <= set(sees[:, token].nonzero().flatten().tolist())
    assert non_finite_rows(out) == expected
    assert out[0, 1:].isfinite().all()  # other heads
    finite = out.isfinite().all(-1) & ref.isfinite().all(-1)
    assert relative_error(out[finite], ref[finite]) <= TOLERANCES[dtype]
    if where == "q":
        out.backward(dout)
        dq, dk, dv = (t.grad for t in inputs)
        seen_keys = set(sees[token].nonzero().flatten().tolist())
        assert token in non_finite_rows(dq) and non_finite_rows(dq) <= set(range(32, 64))
        assert seen_keys <= non_finite_rows(dk) and seen_keys <= non_finite_rows(dv)
        assert non_finite_rows(dk) <= set(range(0, 96)) and dk[0, 1:].isfinite().all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_row_whose_visible_scores_are_all_minus_inf_is_zero(backend, poison_allocations):
    """Every key a query sees scores -inf (q = -inf against positive keys): softmax gives them
    weight 0, so the row is 0, as a row that sees no key, and as the reference computes it
    (PyTorch's SDPA gives NaN there: its -inf mask is added to -inf scores)."""
    generator = torch.Generator().manual_seed(24)
    q, k, v = (torch.randn(1, HEADS, 64, 32, generator=generator) for _ in range(3))
    k[0, 0, :, 5] = k[0, 0, :, 5].abs() + 0.1
    q[0, 0, 3, 5] = -float("inf")
    layout = layouts.sliding_window(64, 8, BLOCK)
    out = block_sparse_attention(q, k, v, layout, window=8, backend=backend)
    ref = block_sparse_attention_reference(q.double(), k.double(), v.double(), layout, window=8)
    assert torch.equal(ref[0, 0, 3], torch.zeros_like(ref[0, 0, 3]))
    assert torch.equal(out[0, 0, 3], torch.zeros_like(out[0, 0, 3]))
    rest = torch.ones(HEADS, 64, dtype=torch.bool)
    rest[0, 3] = False
    assert relative_error(out[0][rest], ref[0][rest]) <= TOLERANCES[torch.float32]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_nan_key_that_no_query_sees_changes_nothing(backend, poison_allocations):
    """Padded keys are masked, not read into scores: a NaN in their k rows stays unseen."""
    generator = torch.Generator().manual_seed(22)
    q, k, v = (torch.randn(2, HEADS, 96, 32, generator=generator) for _ in range(3))
    keep = torch.ones(2, 96, dtype=torch.bool)
    keep[0, 70:] = False
    k[0, :, 85] = float("nan")
    layout = layouts.sliding_window(96, 32, BLOCK)
    out = block_sparse_attention(q, k, v, layout, window=32, key_padding_mask=keep, backend=backend)
    ref = block_sparse_attention_reference(q.double(), k.double(), v.double(), layout, window=32,
                                           key_padding_mask=keep)
    assert not out.isnan().any()
    assert relative_error(out, ref) <= TOLERANCES[torch.float32]


@pytest.mark.interpreter
@pytest.mark.parametrize("tile", [{"BLOCK_M": 16, "BLOCK_N": 32}, {"BLOCK_M": 64, "BLOCK_N": 16}])
@pytest.mark.parametrize("mode", ["padded", "varlen"])
def test_triton_tiles_smaller_than_the_layout_block(tile, mode, poison_allocations):
    """Autotuned tiles may split a layout block; every split must give the same answer."""
    from modernbert_kernels.triton.attention_kernel import attention_backward, attention_forward

    layout = layouts.sliding_window(SEQ, 50, 64)
    q, k, v, dout, extra = make_inputs(mode, torch.float32, 32)
    cu = extra.get("cu_seqlens")
    options = dict(window=(50, 50), scale=0.2, softcap=0.0, key_padding_mask=None, cu_seqlens=cu,
                   max_seqlen=SEQ if cu is not None else None)
    tensors = layout.tensors_on(q.device)
    out, lse = attention_forward(q, k, v, tensors[:2], 64, 1, tile=tile, **options)
    grads = attention_backward(dout, q, k, v, out, lse, tensors, 64, 1, tile=tile, **options)

    ref_inputs = [t.double().requires_grad_() for t in (q, k, v)]
    ref = block_sparse_attention_reference(*ref_inputs, layout, window=50, scale=0.2, cu_seqlens=cu)
    ref.backward(dout.double())
    assert relative_error(out, ref) <= TOLERANCES[torch.float32]
    for grad, ref_input in zip(grads, ref_inputs):
        assert relative_error(grad, ref_input.grad) <= TOLERANCES[torch.float32]


@pytest.mark.interpreter
def test_non_contiguous_inputs_from_a_fused_projection():
    """q, k, v sliced out of one fused [tokens, 3, heads, dim] projection, as in ModernBERT."""
    generator = torch.Generator().manual_seed(3)
    qkv = torch.randn(sum(VARLEN_LENGTHS), 3, HEADS, 64, generator=generator)
    q, k, v = qkv.unbind(1)
    cu = torch.tensor([0] + VARLEN_LENGTHS, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    layout = layouts.sliding_window(SEQ, 40, BLOCK)
    ref = block_sparse_attention_reference(q.double(), k.double(), v.double(), layout, window=40, cu_seqlens=cu)
    for backend in ("triton", "torch") + (("cpu",) if native.cpu_status()[0] else ()):
        out = block_sparse_attention(q, k, v, layout, window=40, cu_seqlens=cu, backend=backend)
        assert relative_error(out, ref) <= TOLERANCES[torch.float32]


@pytest.mark.parametrize("min_run", [1, 10**6], ids=["all_diagonal_runs", "all_gathered"])
@pytest.mark.parametrize("mode", ["key_padding", "varlen"])
def test_torch_backend_tile_groups(min_run, mode, monkeypatch, poison_allocations):
    """The torch path computes diagonal runs as slices and the rest by gathering: both must agree."""
    from modernbert_kernels.torch_backend import plan

    monkeypatch.setattr(plan, "MIN_RUN", min_run)
    for name in ("union", "bigbird_per_head", "dilated"):
        check_against_reference("torch", LAYOUTS[name](), mode, 40, torch.float32)


@pytest.mark.parametrize("layout_name, window", [("dense", None), ("sliding_window", 40)],
                         ids=["dense", "window40"])
@pytest.mark.parametrize("lengths", [[SEQ], [SEQ, SEQ, SEQ], [70, 0, SEQ]],
                         ids=["one_sequence", "three_of_one_length", "three_sequences"])
def test_varlen_on_the_torch_path(lengths, layout_name, window, poison_allocations):
    """Dense layouts on the torch path go to PyTorch's fused kernel, the others to the tile loops.
    Sequences of one length run as one padded batch, whose output, transposed once, is the result;
    other batches run sequence by sequence, copied into place. q, k, v are slices of one fused
    projection, as in ModernBERT."""
    generator = torch.Generator().manual_seed(11)
    qkv = torch.randn(sum(lengths), 3, HEADS, 64, generator=generator)
    dout = torch.randn(sum(lengths), HEADS, 64, generator=generator)
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    layout = LAYOUTS[layout_name]()
    inputs = [t.clone().requires_grad_() for t in qkv.unbind(1)]
    out = block_sparse_attention(*inputs, layout, window=window, cu_seqlens=cu, backend="torch")
    out.backward(dout)
    assert out.is_contiguous()
    ref_inputs = [t.double().requires_grad_() for t in qkv.unbind(1)]
    ref = block_sparse_attention_reference(*ref_inputs, layout, window=window, cu_seqlens=cu)
    ref.backward(dout.double())
    for actual, expected in [(out, ref)] + [(t.grad, r.grad) for t, r in zip(inputs, ref_inputs)]:
        assert relative_error(actual, expected) <= TOLERANCES[torch.float32]


# The C++ CPU kernels beyond the shared matrix above: every layout block size, bf16, the LSE, errors.


@CPU_EXTENSION
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("window", [None, 5, 70], ids=["nowindow", "window5", "window70"])
@pytest.mark.parametrize("block_size", [16, 64, 128])
def test_block_sizes_and_dtypes_varlen_forward_and_backward(block_size, window, dtype, poison_allocations):
    lengths = [300, 1, 0, 129]
    layout = layouts.union(layouts.sliding_window(300, 64, block_size), layouts.global_tokens(300, block_size, block_size))
    q, k, v = random_qkv((sum(lengths), 3, 64), dtype, seed=block_size)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    cu = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = block_sparse_attention(*inputs, layout, window=window, cu_seqlens=cu, backend="cpu")
    out.backward(dout)
    ref_inputs = [t.double().requires_grad_() for t in (q, k, v)]
    ref = block_sparse_attention_reference(*ref_inputs, layout, window=window, cu_seqlens=cu)
    ref.backward(dout.double())
    assert out.dtype == dtype
    for name, actual, expected in [("out", out, ref)] + [
        (f"d{n}", t.grad, r.grad) for n, t, r in zip("qkv", inputs, ref_inputs)
    ]:
        assert actual.dtype == dtype, name
        assert relative_error(actual, expected) <= TOLERANCES[dtype], name


@CPU_EXTENSION
@pytest.mark.parametrize("head_dim", [32, 128])
def test_padded_bf16_with_key_padding(head_dim, poison_allocations):
    q, k, v = random_qkv((2, 2, 200, head_dim), torch.bfloat16, seed=head_dim)
    keep = torch.ones(2, 200, dtype=torch.bool)
    keep[0, 150:] = False
    keep[1, :64] = False  # a whole key block padded out
    layout = layouts.bigbird(200, 32, 32, 2, 32, seed=1, num_heads=2)
    out = block_sparse_attention(q, k, v, layout, key_padding_mask=keep, backend="cpu")
    ref = block_sparse_attention_reference(q.double(), k.double(), v.double(), layout, key_padding_mask=keep)
    assert relative_error(out, ref) <= TOLERANCES[torch.bfloat16]


def native_op_inputs(seq_len, seed):
    """fp32 q, k, v [1, 2, seq_len, 64], a sliding-window layout and its CSR tensors on the CPU."""
    layout = layouts.sliding_window(seq_len, 32, 32)
    return random_qkv((1, 2, seq_len, 64), torch.float32, seed), layout, layout.tensors_on(torch.device("cpu"))[:2]


@CPU_EXTENSION
def test_lse_matches_reference():
    (q, k, v), layout, (row_offsets, col_indices) = native_op_inputs(96, seed=4)
    out, lse = torch.ops.modernbert_kernels.block_sparse_attention_forward_native(
        q, k, v, row_offsets, col_indices, 32, 20, 20, 0.125, 0.0, None, None, 0
    )
    mask = layout.to_dense_mask(96)[0]
    pos = torch.arange(96)
    mask &= (pos[:, None] - pos[None, :]).abs() <= 20
    scores = (q.double() @ k.double().transpose(-1, -2) * 0.125).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(lse.double(), scores.logsumexp(-1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=CPU_EXTENSION), "torch"])
def test_dense_layout_bf16_forward_and_backward(backend):
    """Dense layouts in bf16 (the torch path hands them to PyTorch's fused kernel in bf16)."""
    q, k, v = random_qkv((2, 2, 192, 64), torch.bfloat16, seed=11)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(12)).bfloat16()
    layout = layouts.from_block_mask(torch.ones(3, 3, dtype=torch.bool), 64)
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = block_sparse_attention(*inputs, layout, backend=backend)
    out.backward(dout)
    ref_inputs = [t.double().requires_grad_() for t in (q, k, v)]
    ref = block_sparse_attention_reference(*ref_inputs, layout)
    ref.backward(dout.double())
    assert out.dtype == torch.bfloat16
    for actual, expected in [(out, ref)] + [(t.grad, r.grad) for t, r in zip(inputs, ref_inputs)]:
        assert relative_error(actual, expected) <= TOLERANCES[torch.bfloat16]


@CPU_EXTENSION
def test_native_attention_op_errors_are_clear():
    (q, k, v), layout, (row_offsets, col_indices) = native_op_inputs(64, seed=0)
    forward = torch.ops.modernbert_kernels.block_sparse_attention_forward_native
    with pytest.raises(RuntimeError, match="head_dim must be 32, 64, 128 or 256"):
        forward(q[..., :48], k[..., :48], v[..., :48], row_offsets, col_indices, 32, -1, -1, 1.0, 0.0, None, None, 0)
    with pytest.raises(RuntimeError, match="layout covers 64 tokens"):
        big = [t.repeat(1, 1, 2, 1) for t in (q, k, v)]
        forward(*big, row_offsets, col_indices, 32, -1, -1, 1.0, 0.0, None, None, 0)
    with pytest.raises(RuntimeError, match="int32"):
        forward(q, k, v, row_offsets.long(), col_indices, 32, -1, -1, 1.0, 0.0, None, None, 0)
    with pytest.raises(ValueError, match="runs on cpu tensors"):
        block_sparse_attention(q.to("meta"), k.to("meta"), v.to("meta"), layout, backend="cpu")


# GPU (marked gpu): Triton, and the CUDA fallback when built, bf16 / fp16 / fp32 against float64.
GPU_SEQ = 1000
# The layouts of the matrix; gpu_cases.MATRIX_LAYOUT_BLOCKS lists their blocks for the suite's plan.
GPU_LAYOUTS = {
    "sliding_window_64": lambda: layouts.sliding_window(GPU_SEQ, 64, 64),
    "sliding_window_128": lambda: layouts.sliding_window(GPU_SEQ, 100, 128),
    "bigbird_per_head": lambda: layouts.bigbird(GPU_SEQ, 64, 64, 2, 64, seed=1, num_heads=4),
    "global_tokens": lambda: layouts.global_tokens(GPU_SEQ, 64, 64),
    "fixed_32": lambda: layouts.fixed(GPU_SEQ, 128, 32, 32),
}
assert {name: layout().block_size for name, layout in GPU_LAYOUTS.items()} == gpu_cases.MATRIX_LAYOUT_BLOCKS


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [DTYPES[name] for name in gpu_cases.DTYPES], ids=list(gpu_cases.DTYPES))
@pytest.mark.parametrize("mode", gpu_cases.MATRIX_MODES)
@pytest.mark.parametrize("window", gpu_cases.MATRIX_WINDOWS, ids=["nowindow", "window64"])
@pytest.mark.parametrize("head_dim", gpu_cases.MATRIX_HEAD_DIMS)
@pytest.mark.parametrize("layout_name", list(GPU_LAYOUTS))
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_attention_on_gpu(backend, layout_name, head_dim, window, mode, dtype):
    check_on_gpu(backend, GPU_LAYOUTS[layout_name](), head_dim, mode, dtype, window=window)


def gpu_case_id(case) -> str:
    return f"{case.dtype}-{'varlen' if case.varlen else 'padded'}"


# head_dim 256 (Gemma 2 and 3): its own tile tables, over Gemma 3's causal sliding window.
@pytest.mark.gpu
@pytest.mark.parametrize("case", gpu_cases.WIDE_HEAD_ATTENTION, ids=gpu_case_id)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_head_dim_256_on_gpu(backend, case):
    check_on_gpu(backend, layouts.sliding_window(GPU_SEQ, 64, case.layout_block, causal=True), case.head_dim,
                 "varlen" if case.varlen else "padded", DTYPES[case.dtype], window=64, causal=True)


# Causal windows and per-example global tokens (in the middle of blocks; one sequence without any):
# specializations of the matrix above (window, 64-token blocks, head_dim 64), so nothing more to compile.
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [DTYPES[name] for name in gpu_cases.DTYPES], ids=list(gpu_cases.DTYPES))
@pytest.mark.parametrize("mode", gpu_cases.MATRIX_MODES)
@pytest.mark.parametrize("case", ["causal_window", "global_tokens"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_causal_and_global_tokens_on_gpu(backend, case, mode, dtype):
    if case == "causal_window":
        check_on_gpu(backend, layouts.sliding_window(GPU_SEQ, 64, 64, causal=True), 64, mode, dtype, window=64,
                     causal=True)
        return
    tokens = sum(GPU_VARLEN_LENGTHS) if mode == "varlen" else GPU_SEQ
    marked = torch.zeros(tokens if mode == "varlen" else (2, GPU_SEQ), dtype=torch.bool, device="cuda")
    if mode == "varlen":
        marked[[0, 45, 999, GPU_SEQ + 100, GPU_SEQ + 334 + 5]] = True  # none in the third sequence (1 token)
    else:
        marked[0, [0, 45, 999]] = True
        marked[1, [130, 750]] = True  # 750 is padding
    check_on_gpu(backend, layouts.sliding_window(GPU_SEQ, 64, 64), 64, mode, dtype, window=64, global_tokens=marked)


GPU_VARLEN_LENGTHS = [GPU_SEQ, 333, 1, 640]


def check_on_gpu(backend, layout, head_dim, mode, dtype, **options):
    """Forward and backward against float64 on CUDA: a padded batch with a key padding mask, or varlen."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    extra = {}
    if mode == "varlen":
        shape = (sum(GPU_VARLEN_LENGTHS), 4, head_dim)
        extra["cu_seqlens"] = torch.tensor([0] + GPU_VARLEN_LENGTHS, device="cuda").cumsum(0).to(torch.int32)
    else:
        shape = (2, 4, GPU_SEQ, head_dim)
        keep = torch.ones(2, GPU_SEQ, dtype=torch.bool, device="cuda")
        keep[1, 700:] = False
        extra["key_padding_mask"] = keep
    q, k, v, dout = (torch.randn(shape, device="cuda", generator=generator).to(dtype) for _ in range(4))
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = block_sparse_attention(*inputs, layout, backend=backend, **options, **extra)
    out.backward(dout)
    ref_inputs = [t.double().requires_grad_() for t in (q, k, v)]
    ref = block_sparse_attention_reference(*ref_inputs, layout, **options, **extra)
    ref.backward(dout.double())
    for name, actual, expected in [("out", out, ref)] + [
        (f"d{n}", t.grad, r.grad) for n, t, r in zip("qkv", inputs, ref_inputs)
    ]:
        assert not torch.isnan(actual).any(), name
        assert relative_error(actual, expected) <= TOLERANCES[dtype], name


# Logit soft-capping on the Triton and CUDA kernels; scores ~N(0, 1) against a cap of 1.
@pytest.mark.gpu
@pytest.mark.parametrize("case", gpu_cases.CAPPED_ATTENTION, ids=gpu_case_id)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_softcap_on_gpu(backend, case):
    check_on_gpu(backend, layouts.sliding_window(GPU_SEQ, 64, case.layout_block, causal=True), case.head_dim,
                 "varlen" if case.varlen else "padded", DTYPES[case.dtype], window=64, causal=True, softcap=1.0)


# Attention sinks (GPT-OSS's) on the Triton and CUDA kernels: the rescale and the kernels' backward
# with the sink-aware lse; specializations of the matrix above, so nothing more to compile.
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [DTYPES[name] for name in gpu_cases.DTYPES], ids=list(gpu_cases.DTYPES))
@pytest.mark.parametrize("mode", gpu_cases.MATRIX_MODES)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_sinks_on_gpu(backend, mode, dtype):
    check_on_gpu(backend, layouts.sliding_window(GPU_SEQ, 64, 64, causal=True), 64, mode, dtype, window=64,
                 causal=True, sinks=torch.linspace(-1, 1, 4, device="cuda"))


@pytest.mark.gpu
def test_torch_compile_autotuned_on_gpu():
    layout = layouts.sliding_window(512, 64, 64)
    q, k, v = (torch.randn(2, 4, 512, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    fn = torch.compile(lambda q, k, v: block_sparse_attention(q, k, v, layout, window=64).float().sum(), fullgraph=True)
    fn(q, k, v).backward()
    assert q.grad is not None and not q.grad.isnan().any()
