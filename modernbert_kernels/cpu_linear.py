"""CPU linears at the machine's GEMM ceiling: the fastest GEMM per precision, chosen by measurement.

Four GEMMs serve fp32 and bf16 linears on the CPU:
- ``"aten"``: ``F.linear`` as PyTorch dispatches it (MKL's sgemm for fp32, oneDNN for bf16);
- ``"onednn_packed"``: the weight reordered once into oneDNN's blocked layout
  (``torch.ops.mkldnn._reorder_linear_weight``), then oneDNN's inner product on it;
- ``"onednn_packed_fp32"`` (bf16 linears only): the same fp32 GEMM on a packed fp32 copy of the
  bf16 weight, the bf16 input widened (exactly) and the output rounded to bf16 once, as a bf16
  GEMM with fp32 accumulation rounds it. Where the CPU has no bf16 units, oneDNN has no bf16
  inner product and ``F.linear`` emulates bf16 (a fifth of the packed fp32 rate on a Zen 4 with
  every library capped to AVX2), so a bf16 model there computes its linears in fp32;
- ``"streamed"``: this library's GEMM for a few tokens (streamed_gemm.py), whose weight is packed
  to be read once, front to back, with the bias, the GeGLU gate and the residual in its epilogue.
  Timed for the few-token regimes only: at thousands of tokens a call is compute-bound, and
  oneDNN's blocking wins.

Which is faster depends on the CPU, not on its vendor's name: MKL's sgemm reaches 125-180 GFLOP/s
at the encoder's shapes on a 2-core AMD EPYC Zen 4, where oneDNN's packed fp32 reaches 165-225
(benchmarks/NOTES.md "CPU linears"). Nor on the shape alone: at a few tokens a GEMM streams its
weight, and MKL's sgemm copies all of it on every call, so the packed GEMM is 1.13-1.22x faster at
16 tokens on a 2-core Xeon, where the two are even at 2048 and MKL's gemv is 1.5-1.8x faster at
one token (NOTES "The short query again"); the streamed GEMM reads the weight faster still at 1
and 16 fp32 tokens (NOTES "A GEMM that streams its weight"). ``cpu_gemm(dtype, in_features, out_features,
tokens)`` times every GEMM that runs the dtype here the first time a linear of that dtype, shape
and token regime (``TIMING_TOKEN_COUNTS``: the nearest of 1, 16 and 2048 tokens) runs, and keeps
the fastest; MODERNBERT_KERNELS_CPU_GEMM=aten|onednn_packed|onednn_packed_fp32|streamed forces one (fp32
linears take onednn_packed under the last). ``Linear`` is an ``nn.Linear`` (same parameters,
same state dict) whose inference calls on the CPU run the chosen GEMM; anything that needs
gradients runs ``F.linear``.
"""

from __future__ import annotations

import functools
import os
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import native
from .backends import cpu_capabilities
from .encoder_layer import NativeLinear
from .streamed_gemm import GATES, pack_streamed_weight, streamed_linear
from .streamed_gemm import supports as supports_streamed
from .tensor_cache import TensorCache

GEMMS = ("aten", "onednn_packed", "onednn_packed_fp32", "streamed")
PRECISIONS = (torch.float32, torch.bfloat16)
# (in_features, out_features) of ModernBERT-base's linears: Wqkv, attention Wo, Wi (GeGLU), MLP Wo.
ENCODER_SHAPES = ((768, 2304), (768, 768), (768, 2304), (1152, 768))
# Tokens per GEMM when timing, one count per regime: a single token (a GEMV), a short query (the
# weight streamed from memory) and 4 x 512, the middle of the batches the encoder serves (compute).
TIMING_TOKEN_COUNTS = (1, 16, 2048)
TIMING_TOKENS = TIMING_TOKEN_COUNTS[-1]
# A call of t tokens takes the choice timed at the count nearest t on a log scale: the bounds are
# the geometric means of neighbouring counts (4 and 181).
_REGIME_BOUNDS = tuple((a * b) ** 0.5 for a, b in zip(TIMING_TOKEN_COUNTS[:-1], TIMING_TOKEN_COUNTS[1:]))
# A few-token GEMM is timed on copies of its weight that total this much, more than the L2 caches
# hold, each read once a pass: as an encoder's layers read theirs, forward after forward.
_STREAMED_WEIGHT_BYTES = 16 << 20


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 dot-product units (AVX512_BF16 or AMX-BF16) and oneDNN's bf16 GEMM
    runs here: where bf16 linears and attention run faster than fp32 (elsewhere bf16 is converted
    to fp32 and back). The second part matters where ONEDNN_MAX_CPU_ISA caps oneDNN below the CPU
    (as when an AVX2-only CPU's code paths are run on a wider one)."""
    units = any(cpu_capabilities().get(flag) for flag in ("avx512_bf16", "amx_bf16"))
    return units and onednn_available(torch.bfloat16)


def onednn_available(dtype: torch.dtype) -> bool:
    """Whether the packed oneDNN GEMM runs ``dtype`` here: PyTorch built with oneDNN, oneDNN
    enabled, and the CPU able to (oneDNN's bf16 inner product needs AVX512-BW/VL/DQ or
    AVX-NE-CONVERT, which AVX2-only CPUs lack)."""
    return torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled and _onednn_runs(dtype)


@functools.cache
def _onednn_runs(dtype: torch.dtype) -> bool:
    """Tried once on a tiny problem: what oneDNN refuses on this CPU raises (the ISA it requires is
    oneDNN's to know, and ONEDNN_MAX_CPU_ISA can narrow it below what the CPU reports)."""
    try:
        packed_linear(torch.ones(2, 16, dtype=dtype), pack_weight(torch.ones(8, 16, dtype=dtype), 2), None)
    except RuntimeError:
        return False
    return True


def available_gemms(dtype: torch.dtype) -> tuple[str, ...]:
    """The GEMMs of ``GEMMS`` that run a ``dtype`` linear here."""
    return _available_gemms(dtype, torch.backends.mkldnn.enabled)


@functools.cache
def _available_gemms(dtype: torch.dtype, onednn_enabled: bool) -> tuple[str, ...]:
    # Every CPU linear call asks (through cpu_gemm): the answer is found once per setting.
    if dtype not in PRECISIONS:
        return ("aten",)
    gemms = ["aten"]
    if onednn_available(dtype):
        gemms.append("onednn_packed")
    if dtype == torch.bfloat16 and onednn_available(torch.float32):
        gemms.append("onednn_packed_fp32")
    if native.cpu_status()[0]:
        gemms.append("streamed")
    return tuple(gemms)


def packed_dtype(gemm: str, dtype: torch.dtype) -> torch.dtype | None:
    """The dtype a packed ``gemm`` computes a ``dtype`` linear in; None for ``F.linear``."""
    return {"onednn_packed": dtype, "onednn_packed_fp32": torch.float32, "streamed": dtype}.get(gemm)


def pack_weight(weight: torch.Tensor, tokens_hint: int = TIMING_TOKENS) -> torch.Tensor:
    """``weight`` [N, K] in oneDNN's blocked layout for its inner product (any number of tokens;
    the hint picks the layout)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), tokens_hint)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] @ the packed weight's transpose (+ bias) with oneDNN; x's leading dims kept."""
    rows = x.reshape(-1, x.shape[-1])
    out = torch.ops.mkldnn._linear_pointwise.default(rows, packed, bias, "none", [], "")
    return out.view(*x.shape[:-1], out.shape[-1])


def time_gemms(dtype: torch.dtype, shapes=ENCODER_SHAPES, tokens: int = TIMING_TOKENS,
               rounds: int = 5) -> dict[str, list[float]]:
    """Seconds per pass over ``shapes`` for each GEMM that runs ``dtype`` here, ``rounds`` passes
    after a warm-up, the GEMMs interleaved so a drift in the machine's speed falls on all alike.
    Below ``TIMING_TOKENS`` tokens (where a call streams its weight) a pass calls each GEMM once on
    each of several copies of the weight (``_STREAMED_WEIGHT_BYTES`` of them, at most 64), the same
    copies every pass: fresh copies, read once each, timed the fp32 and bf16 GEMMs even at 16
    tokens, where read as an encoder reads them the packed ones run 1.06-1.48x faster (NOTES "A
    frozen encoder")."""
    gemms = _timed_gemms(dtype, shapes, tokens)
    generator = torch.Generator().manual_seed(0)
    problems = []
    for in_features, out_features in shapes:
        x = torch.randn(tokens, in_features, generator=generator).to(dtype)
        weight = (torch.randn(out_features, in_features, generator=generator) / in_features**0.5).to(dtype)
        weight_bytes = max(1, weight.numel() * weight.element_size())
        copies = min(64, max(2, -(-_STREAMED_WEIGHT_BYTES // weight_bytes))) if tokens < TIMING_TOKENS else 1
        weights = [weight.clone() for _ in range(copies)]
        bias = torch.zeros(out_features, dtype=dtype)
        packed = {gemm: [_pack(gemm, w.to(packed_dtype(gemm, dtype))) for w in weights]  # as Linear packs
                  for gemm in gemms if gemm != "aten"}
        problems.append((x, weights, bias, packed))

    def run_packed(gemm):
        compute = packed_dtype(gemm, dtype)
        if gemm == "streamed":
            return lambda x, w, b, packed, i: streamed_linear(x, packed[gemm][i], w[i].shape[0], b)
        return lambda x, w, b, packed, i: packed_linear(x.to(compute), packed[gemm][i], b.to(compute)).to(dtype)

    runs = {gemm: run_packed(gemm) for gemm in gemms if gemm != "aten"}
    runs["aten"] = lambda x, w, b, packed, i: F.linear(x, w[i], b)
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.no_grad():
        for round_index in range(rounds + 1):  # round 0 warms up
            for name, run in runs.items():
                start = time.perf_counter()
                for x, weights, bias, packed in problems:
                    for copy in range(len(weights)):
                        run(x, weights, bias, packed, copy)
                if round_index:
                    times[name].append(time.perf_counter() - start)
    return times


def _timed_gemms(dtype: torch.dtype, shapes, tokens: int) -> tuple[str, ...]:
    """The GEMMs ``time_gemms`` compares: the streamed one below ``TIMING_TOKENS`` tokens only (at
    thousands a call is compute-bound, and oneDNN's blocking is built for that), and where it
    computes every shape (bf16 needs an even K)."""
    streamed = tokens < TIMING_TOKENS and all(supports_streamed(dtype, in_features) for in_features, _ in shapes)
    return tuple(gemm for gemm in available_gemms(dtype) if gemm != "streamed" or streamed)


def _pack(gemm: str, weight: torch.Tensor, gated: bool = False) -> torch.Tensor:
    """``weight`` in a packed ``gemm``'s layout (oneDNN packs a gated weight's halves one by one)."""
    return pack_streamed_weight(weight, gated) if gemm == "streamed" else pack_weight(weight)


def timing_tokens(tokens: int) -> int:
    """The count of ``TIMING_TOKEN_COUNTS`` whose GEMM choice a call of ``tokens`` tokens takes."""
    for bound, count in zip(_REGIME_BOUNDS, TIMING_TOKEN_COUNTS):
        if tokens < bound:
            return count
    return TIMING_TOKEN_COUNTS[-1]


@functools.cache
def _measured_gemm(dtype: torch.dtype, in_features: int, out_features: int, threads: int, tokens: int) -> str:
    times = time_gemms(dtype, shapes=((in_features, out_features),), tokens=tokens)
    return min(times, key=lambda gemm: statistics.median(times[gemm]))


def forced_gemm() -> str:
    """MODERNBERT_KERNELS_CPU_GEMM as set (read per call), "auto" where it is not."""
    return os.environ.get("MODERNBERT_KERNELS_CPU_GEMM", "auto")


def cpu_gemm(dtype: torch.dtype, in_features: int, out_features: int, tokens: int = TIMING_TOKENS) -> str:
    """The GEMM a CPU linear of this dtype and shape runs on ``tokens`` tokens: the fastest of
    ``available_gemms`` measured once per (dtype, shape, thread count, ``timing_tokens(tokens)``),
    or the one MODERNBERT_KERNELS_CPU_GEMM forces (read per call)."""
    forced = forced_gemm()
    if forced == "auto" and dtype in PRECISIONS:  # the common case first: every CPU linear call asks
        if len(available_gemms(dtype)) == 1:
            return "aten"  # nothing to choose between
        return _measured_gemm(dtype, in_features, out_features, torch.get_num_threads(), timing_tokens(tokens))
    if forced not in ("auto",) + GEMMS:
        raise ValueError(f"MODERNBERT_KERNELS_CPU_GEMM must be auto, {', '.join(GEMMS)}, not {forced!r}")
    if dtype not in PRECISIONS:
        return "aten"
    if forced == "onednn_packed_fp32" and dtype == torch.float32:
        forced = "onednn_packed"  # an fp32 linear widened to fp32 is the packed fp32 GEMM itself
    if forced not in available_gemms(dtype):
        raise RuntimeError(f"MODERNBERT_KERNELS_CPU_GEMM={forced}, but oneDNN's packed GEMM does not run "
                           f"{packed_dtype(forced, dtype)} here (PyTorch built without oneDNN, oneDNN disabled, "
                           "or a CPU oneDNN refuses it on)")
    return forced


def encoder_gemms() -> list[tuple[str, tuple[int, int], dict[int, str]]]:
    """(precision, (in_features, out_features), {timing token count: GEMM}) for ModernBERT-base's
    linears: what ``modernbert-kernels info`` shows (measured here unless forced)."""
    names = {torch.float32: "fp32", torch.bfloat16: "bf16"}
    return [(names[dtype], shape, {tokens: cpu_gemm(dtype, *shape, tokens) for tokens in TIMING_TOKEN_COUNTS})
            for dtype in PRECISIONS for shape in dict.fromkeys(ENCODER_SHAPES)]


_packed_weights = TensorCache()


class Linear(nn.Linear):
    """``nn.Linear`` whose inference calls on the CPU run ``cpu_gemm``'s choice for their dtype.

    The packed copy of the weight is made at the first such call and made again after the weight
    changes (in place, or replaced by ``.to()`` / ``load_state_dict``); it is not in the state dict.
    Training, other devices and ``torch.compile`` (which packs weights itself when freezing) take
    ``F.linear``.
    """

    def _inference_call(self, x: torch.Tensor) -> bool:
        """Whether a call on x is one a packed GEMM may run: on the CPU, in the weight's dtype, not
        under torch.compile, and needing no gradients."""
        weight = self.weight
        return not (x.device.type != "cpu"
                    or x.dtype != weight.dtype
                    or torch.compiler.is_compiling()
                    or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                     or (self.bias is not None and self.bias.requires_grad))))

    def _gemm(self, x: torch.Tensor) -> str | None:
        """The packed GEMM this call runs, or None where it takes ``F.linear``."""
        if not self._inference_call(x):
            return None
        gemm = cpu_gemm(x.dtype, self.in_features, self.out_features, self._tokens(x))
        return None if gemm == "aten" else gemm

    def _tokens(self, x: torch.Tensor) -> int:
        return x.numel() // self.in_features if self.in_features else 0

    def _packed(self, gemm: str, part: str, rows: slice, dtype: torch.dtype):
        """The weight's ``rows`` as ``dtype`` in a packed ``gemm``'s layout; made once per weight
        version (``part`` names it). Keyed by storage and dtype too: Module.to() swaps a parameter's
        data without a version bump."""
        weight = self.weight
        return _packed_weights.get(weight, self._packed_key(gemm, part, dtype),
                                   lambda: _pack(gemm, weight[rows].to(dtype), part == "gated"))

    def _packed_key(self, gemm: str, part: str, dtype: torch.dtype) -> tuple:
        return gemm, part, self.weight.data_ptr(), self.weight.dtype, dtype

    def _bias(self, rows: slice, dtype: torch.dtype) -> torch.Tensor | None:
        bias = self.bias
        if bias is None:
            return None
        return (bias if rows == slice(None) else bias[rows]).to(dtype)

    def forward(self, x: torch.Tensor, gated: str | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x A^T + b; or, with ``gated`` (a name of ``GATED_ACTIVATIONS``), act(x A^T + a) * (x G^T + g)
        where A, G are the first and second halves of the weight's rows (a, g of the bias): the input
        projection of a gated MLP (GeGLU). Gated on the packed path, oneDNN computes the two halves
        as two GEMMs with the activation, and then the product, as their post-ops: the
        [tokens, 2 x intermediate] projection is never written, and no activation or product pass
        reads it back (NOTES "GeGLU in the GEMMs' post-ops"). Called as a module either way, so
        forward hooks (calibration) see it.

        With ``residual`` (the output's shape): residual + x A^T + b, a residual connection. On the
        packed bf16 path the sum is the GEMM's post-op, rounded to bf16 once: PyTorch's bf16 add is a
        pass of its own over three tensors, 1.8 ms a call at 4096 x 768 on a 2-core Xeon (NOTES "The
        runtimes on a Xeon with AMX"). Elsewhere the residual is added into the fresh output
        (``add_residual``): in fp32 the post-op measured no faster than that. ``residual`` is never
        written."""
        run = self.bind(x, gated, residual)
        out_shape = (*x.shape[:-1], self.out_features)
        if residual is not None and residual.shape != out_shape:
            raise ValueError(f"residual {tuple(residual.shape)} must have the output's shape {out_shape}")
        return run(x, residual)

    def bind(self, x: torch.Tensor, gated: str | None = None, residual: torch.Tensor | None = None,
             norm: nn.Module | None = None) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]:
        """What ``forward(x, gated, residual)`` runs, as ``run(x, residual)`` for inputs like these
        (same dtype and device, a token count in the same ``timing_tokens`` regime): the GEMM choice
        and the packed weight's lookup made once. With ``norm`` (a module such as the LayerNorm in
        front of this linear), ``run`` computes ``forward(norm(x), ...)``: an affine LayerNorm in
        the streamed GEMM's own call, where a call of its own costs ~30-50 us on a few tokens
        (NOTES "The streamed GEMM's bf16 on AMX tiles, and one call a layer"). It does not follow
        later changes to the weights or to MODERNBERT_KERNELS_CPU_GEMM: bind again after them.
        Hooks do not see its calls."""
        if gated is not None and residual is not None:
            raise ValueError("a gated projection takes no residual")
        if gated is not None and gated not in GATED_ACTIVATIONS:
            raise ValueError(f"unsupported gated activation {gated!r}; supported: {sorted(GATED_ACTIVATIONS)}")
        gemm, residual_dtype = self._gemm(x), residual is not None and residual.dtype
        if norm is None or isinstance(norm, nn.Identity):
            return self._kernel(gemm, gated, residual_dtype)
        prologue = layer_norm_prologue(norm)
        if gemm == "streamed" and prologue is not None:
            return self._streamed(gated, residual_dtype, prologue)
        run = self._kernel(gemm, gated, residual_dtype)
        # F.layer_norm without the module call (its hooks, which bound calls do not run)
        if isinstance(norm, nn.LayerNorm):
            shape, weight, bias, eps = norm.normalized_shape, norm.weight, norm.bias, norm.eps
            return lambda x, residual: run(F.layer_norm(x, shape, weight, bias, eps), residual)
        return lambda x, residual: run(norm(x), residual)

    def native_operands(self, x: torch.Tensor, gated: bool = False, measured: bool = True) -> NativeLinear | None:
        """This linear as the native encoder layer takes it (``encoder_layer.NativeLinear``: the
        streamed GEMM's packed weight, ``gated`` as a gated projection's, and fp32 bias) for inputs
        like ``x``, or None where their calls run another GEMM. With ``measured=False``, wherever the
        streamed GEMM can compute these calls and no GEMM is forced, whichever the per-shape
        measurement chose, in the few-token regimes it is timed in: for a caller that measures a whole
        layer's choice (the FrozenEncoder)."""
        if self._gemm(x) == "streamed" or not measured and (
                self._inference_call(x) and forced_gemm() == "auto"
                and "streamed" in _timed_gemms(x.dtype, ((self.in_features, self.out_features),),
                                               timing_tokens(self._tokens(x)))):
            return self._streamed_operands(gated)
        return None

    def has_streamed_copy(self, gated: bool = False) -> bool:
        """Whether the streamed GEMM's packed copy of the weight (``gated`` as a gated projection's)
        is kept for this weight version."""
        return _packed_weights.contains(self.weight, self._packed_key("streamed", _part(gated), self.weight.dtype))

    def release_streamed_copy(self, gated: bool = False):
        """Stops keeping the streamed GEMM's packed copy (bound calls that hold it keep it): for a
        caller that packed it to time it and then chose another GEMM (the FrozenEncoder)."""
        _packed_weights.discard(self.weight, self._packed_key("streamed", _part(gated), self.weight.dtype))

    def _streamed_operands(self, gated: bool) -> NativeLinear:
        packed = self._packed("streamed", _part(gated), slice(None), self.weight.dtype)
        return NativeLinear((packed,), None if self.bias is None else self.bias.detach().float())

    def _kernel(self, gemm: str | None, gated: str | None, residual_dtype) -> Callable:
        """run(x, residual) for a packed GEMM (None: F.linear), a gated activation or None, and the
        residual's dtype (False: no residual)."""
        if gemm == "streamed":
            return self._streamed(gated, residual_dtype)
        compute = gemm and packed_dtype(gemm, self.weight.dtype)
        if gated is not None:
            return self._gated(compute, gated)
        if compute is None:
            def run(x, residual):
                out = F.linear(x, self.weight, self.bias)
                return out if residual is None else add_residual(out, residual)
            return run
        everything = slice(None)
        packed, bias = self._packed("onednn_packed", "all", everything, compute), self._bias(everything, compute)
        out_features = self.out_features
        if compute == residual_dtype == torch.bfloat16:  # x is bf16 too
            binary = torch.ops.mkldnn._linear_pointwise.binary

            def run(x, residual):
                rows = x.reshape(-1, x.shape[-1])
                addend = residual.reshape(rows.shape[0], out_features).contiguous()
                return binary(rows, addend, packed, bias, "add").view(*x.shape[:-1], out_features)
            return run

        def run(x, residual):
            out = packed_linear(x.to(compute), packed, bias).to(x.dtype)
            return out if residual is None else add_residual(out, residual)
        return run

    def _streamed(self, gated: str | None, residual_dtype, prologue: dict | None = None) -> Callable:
        """The streamed GEMM: a LayerNorm in its prologue (``layer_norm_prologue``), the bias, the
        gate and a residual of the output's dtype in its epilogue."""
        (packed,), bias = self._streamed_operands(gated is not None)
        gate = gated and GATED_ACTIVATIONS[gated][0]
        out_features = self.out_features if gated is None else self.out_features // 2
        prologue = prologue or {}
        if residual_dtype not in (False, self.weight.dtype):  # kept in the residual's precision
            def run(x, residual):
                return add_residual(streamed_linear(x, packed, out_features, bias, **prologue), residual)
            return run
        return lambda x, residual: streamed_linear(x, packed, out_features, bias, gate, residual, **prologue)

    def _gated(self, compute: torch.dtype | None, activation: str) -> Callable:
        gate_name, post_op, algorithm = GATED_ACTIVATIONS[activation]
        function = GATES[gate_name]
        if compute is None:
            def run(x, residual):
                activated, gate = F.linear(x, self.weight, self.bias).chunk(2, dim=-1)
                return function(activated) * gate
            return run
        half = self.out_features // 2
        first, second = slice(None, half), slice(half, None)
        first_packed, first_bias = self._packed("onednn_packed", "first half", first, compute), self._bias(first, compute)
        second_packed, second_bias = (self._packed("onednn_packed", "second half", second, compute),
                                      self._bias(second, compute))
        unary, binary = torch.ops.mkldnn._linear_pointwise.default, torch.ops.mkldnn._linear_pointwise.binary

        def run(x, residual):
            rows = x.reshape(-1, x.shape[-1]).to(compute)
            activated = unary(rows, first_packed, first_bias, post_op, [], algorithm)
            out = binary(rows, activated, second_packed, second_bias, "mul")
            return out.to(x.dtype).view(*x.shape[:-1], half)
        return run


def _part(gated: bool) -> str:
    """The name of the streamed GEMM's packed copy: the whole weight, or a gated projection's."""
    return "gated" if gated else "all"


def layer_norm_prologue(norm: nn.Module) -> dict | None:
    """``norm`` as the streamed GEMM's LayerNorm prologue takes it (``streamed_linear``'s
    norm_weight, norm_bias in fp32 and eps), or None where it is not an affine LayerNorm over the
    last dimension."""
    if not isinstance(norm, nn.LayerNorm) or norm.weight is None or len(norm.normalized_shape) != 1:
        return None
    return dict(norm_weight=norm.weight.detach().float(),
                norm_bias=None if norm.bias is None else norm.bias.detach().float(), eps=norm.eps)


def add_residual(update: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """hidden + update, written into update: a sublayer's output is a fresh tensor that nothing else
    reads (autograd saves the linears' inputs, not their outputs), and adding into it saves filling a
    new [tokens, hidden] one (the fp32 encoder at 8 x 512: 25-30 ms of 4.7 s; NOTES "Every runtime in
    one run again, and the residual add in place"). Out of place where update's dtype differs
    (autocast): the sum keeps hidden's precision."""
    if update.dtype != hidden.dtype or update.shape != hidden.shape:
        return hidden + update
    return update.add_(hidden)


# Gated MLP activations: (the streamed GEMM's gate, whose PyTorch function streamed_gemm.GATES holds
# for the unpacked path; oneDNN's post-op; its algorithm).
GATED_ACTIVATIONS = {
    "gelu": ("gelu", "gelu", "none"),
    "gelu_tanh": ("gelu_tanh", "gelu", "tanh"),
    "gelu_pytorch_tanh": ("gelu_tanh", "gelu", "tanh"),
    "silu": ("silu", "swish", ""),
    "relu": ("relu", "relu", ""),
}
