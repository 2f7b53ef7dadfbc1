"""The depthwise causal convolution of one piece (Mamba-2's, before the SSD) as fused Pallas kernels (Triton
lowering), forward and backward, with an optional fused SiLU; and the same formula in XLA (`xla_convolve`):

    s[b, t, c] = bias[c] + sum_{i < W} keep_i(b, t) w[i, c] xe[b, t + i, c]        y = act(s)  (None or SiLU)

xe [B, W-1+L, C] holds the W-1 positions before the piece (any values; lasp_jax.parallel.causal_conv passes zeros
and convolves a rank's halo apart) then the piece; tap i of output t (xe row t + i; tap W-1 is t itself) is kept
unless a document starts in (t + i, t + W-1], i.e. unless ide[q] != ide[q - 1] for some q there. A dropped tap is
selected away, never multiplied by 0, so a non-finite input in another document does not reach t, in the forward
or the backward.

Why (an attempt, not used by the model): XLA differentiates `xla_convolve` as W shifted slices, masks and adds
over [B, T, C] float32 and fuses that backward, with the SiLU's, the gated norm's and the dt path's, into the one
loop fusion that builds Mamba-2 1.3B's in-projection cotangent (2.6 ms per layer, 125 ms of a 1.89 s step on an
H200: benchmarks/results/profile_train_h200_s10_mamba2.md). These kernels read each input once from HBM and keep
every intermediate in registers, with an optional SiLU fused in (its input recomputed in the backward): nothing
beyond the inputs is saved. Measured at that shape on an H200 (benchmarks/results/conv_gpu_h200_s10.md, default
Config): 0.929 / 4.496 ms forward / forward+backward against XLA's 0.747 / 3.024 with SiLU after rounding (what
Mamba-2 runs), so "auto" does not take them; no launch size of later sweeps beat XLA either, with or without the
fused SiLU (conv_gpu_h200_s13.md, conv_gpu_h200_s14_no_silu.md).

Kernels. Forward: one program per (batch, fwd_block_t outputs t, block_c channels): W shifted [rows, block_c]
loads, the float32 sum, one store. Backward: one program per (batch, run of `bwd_rows` rows p >= W-1 of xe,
block_c channels), walking its run bwd_block_t rows at a time. For each row p it recomputes s at t = p - i for each
tap i (2W-1 shifted loads of xe, W of dy), the cotangent of s, ds = dy act'(s) (zero past L), and writes

    dxe[p] = sum_i keep_i(t) w[i] ds[t]        (t = p - i)

and accumulates, from the shift i = W-1 (t = p - (W-1): each output in exactly one block), its partial column
sums dweight[i] = sum_t keep_i(t) ds[t] xe[t + i] and dbias = sum_t ds[t], float32 [B, runs, W, C] and [B, runs,
C], summed in XLA. dxe's first W-1 rows (those before the piece: their outputs are t < W-1 only) come from
`xla_convolve`'s autodiff on xe's first 2(W-1) rows, and run 0's programs store them: so every load and store of the
kernels starts at row >= 0 (Pallas interpret mode clamps a slice that starts before 0). Rows and channels past the
ends (L, C not multiples of the blocks) are masked on load and store.

Numerics: float32 inside (inputs upcast on load); s sums its taps in `xla_convolve`'s order (tap W-1, then W-2
down to 0, the bias last), so the forward matches it to float32 rounding (XLA may contract into FMAs); y and dxe
in xe's dtype (one rounding), dweight and dbias float32 sums (per program, then over programs in XLA) cast to
weight's and bias's dtypes. The backward sums in another order than XLA's autodiff (float32 rounding). SiLU:
s sigmoid(s); its derivative sigmoid(s) (1 + s (1 - sigmoid(s))).

Platforms: compiled on CUDA GPUs of compute capability 8.0 or newer (A100, Hopper); interpret=True runs the same
kernels in Pallas interpret mode anywhere (CPU tests). Which GPUs "auto" trusts is
lasp_jax.parallel.causal_conv.QUALIFIED_GPUS; the kernels run per device (inside shard_map, weight and bias are
cast to vary as xe does, so their gradients come back as the shards' sum).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from lasp_jax.ops import kernel_support

_F32 = jnp.float32
ACTIVATIONS = (None, "silu")
DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


@dataclasses.dataclass(frozen=True)
class Config:
    """Launch sizes (benchmarks/conv_gpu.py times others with --configs; on an H200 none made the kernels faster
    than XLA: conv_gpu_h200_s13.md, conv_gpu_h200_s14_no_silu.md).

    fwd_block_t, bwd_block_t, block_c: the [rows, channels] tiles of the forward and the backward, powers of
    two (Triton's blocks); block_c wide for coalesced rows (256 bf16 channels: 512 contiguous bytes). At 8
    warps a [16, 256] float32 tile is 16 values per thread: the forward holds its sum and a load or two
    (~3 tiles), the backward 2W-1 shifted xe tiles, dxe, ds and s (~10 tiles at W = 4), hence its shorter
    blocks. bwd_rows: rows of xe per backward program (a multiple of bwd_block_t), walked block by block:
    the dweight partials are [B, L / bwd_rows, W, C] float32 (9 MB at Mamba-2 1.3B's shape) and the programs
    B * L / bwd_rows * C / block_c (2176 there, over 132 SMs)."""

    fwd_block_t: int = 32
    bwd_block_t: int = 16
    block_c: int = 256
    bwd_rows: int = 512
    num_warps: int = 8
    num_stages: int = 2

    def __post_init__(self):
        for name in ("fwd_block_t", "bwd_block_t", "block_c"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"Config.{name} must be a power of two (a Triton block), got {value}")
        if self.bwd_rows < self.bwd_block_t or self.bwd_rows % self.bwd_block_t:
            raise ValueError(f"Config.bwd_rows must be a positive multiple of bwd_block_t={self.bwd_block_t}, "
                             f"got {self.bwd_rows}")


DEFAULT = Config()


def supported(xe, interpret: bool = False) -> str | None:
    """None when the kernels can run on xe here (compiled: a CUDA GPU of compute capability >= 8.0), else why."""
    if jnp.dtype(xe.dtype) not in {jnp.dtype(d) for d in DTYPES}:
        return f"x's dtype must be one of {[jnp.dtype(d).name for d in DTYPES]}, got {jnp.dtype(xe.dtype).name}"
    if interpret:
        return None
    return kernel_support.triton_unavailable()


# ---------------------------------------------------------------------------------------------------------
# The XLA formula: impl "xla", and the kernels' backward for the first W-1 rows of dxe.


def xla_convolve(xe, weight, bias, ide, activation=None, head=None):
    """The convolution of one piece (module docstring) as W shifted slices of xe that XLA fuses; autodiff gives
    its backward. xe [B, W-1+L, C], weight [W, C], bias None or [C], ide None or [B, W-1+L], activation None
    or "silu" (on the float32 sum); head None or float32 [B, K, C] (K <= L), added to the first K sums before the
    bias (lasp_jax.parallel.causal_conv: the taps of a sharded piece that read the previous rank's halo). Returns
    y [B, L, C] in xe's dtype."""
    w = weight.shape[0]
    length = xe.shape[1] - (w - 1)
    xf, wf = xe.astype(_F32), weight.astype(_F32)
    acc = xf[:, w - 1:] * wf[w - 1]  # tap W-1: t itself
    if ide is not None:
        linked = ide[:, 1:] == ide[:, :-1]  # [B, W-2+L]: positions p and p+1 (of xe) are in one document
    keep = None
    for i in range(w - 2, -1, -1):
        term = xf[:, i:i + length] * wf[i]
        if ide is not None:  # tap i reaches t through no document start
            keep = linked[:, i:i + length] if keep is None else keep & linked[:, i:i + length]
            term = jnp.where(keep[..., None], term, 0.0)
        acc = acc + term
    if head is not None:
        acc = acc + jnp.pad(head.astype(_F32), ((0, 0), (0, length - head.shape[1]), (0, 0)))
    if bias is not None:
        acc = acc + bias.astype(_F32)
    if activation == "silu":
        acc = jax.nn.silu(acc)
    return acc.astype(xe.dtype)


def _head_rows_grad(xe, weight, bias, ide, g, activation):
    """dxe's first W-1 rows [B, W-1, C] float32: their outputs are t < W-1 only, recomputed by `xla_convolve`
    on xe's first 2(W-1) rows (the backward kernel starts at row W-1, so no load of it starts before row 0)."""
    k = weight.shape[0] - 1
    head = min(k, g.shape[1])  # outputs t < W-1 (all of them when L < W-1)
    _, vjp = jax.vjp(lambda a: xla_convolve(a, weight, bias, None if ide is None else ide[:, :k + head],
                                            activation).astype(_F32), xe[:, :k + head].astype(_F32))
    return vjp(g[:, :head].astype(_F32))[0][:, :k]


# ---------------------------------------------------------------------------------------------------------
# Kernels: whole-array refs, loaded and stored as masked [block_t, block_c] slices that start at row >= 0.


def _load_rows(ref, b, start, c0, shape):
    """float32 ref[b, start : start + block_t, c0 : c0 + block_c] (shape), zeros past the rows or channels."""
    block_t, block_c = shape
    valid = (start + jnp.arange(block_t) < ref.shape[1])[:, None] & (c0 + jnp.arange(block_c) < ref.shape[2])[None, :]
    return pl_triton.load(ref.at[b, pl.ds(start, block_t), pl.ds(c0, block_c)], mask=valid, other=0).astype(_F32)


def _load_ids(ref, b, start, block_t):
    """ide[b, start : start + block_t] (0 past the end: those rows' outputs are masked)."""
    valid = start + jnp.arange(block_t) < ref.shape[1]
    return pl_triton.load(ref.at[b, pl.ds(start, block_t)], mask=valid, other=0)


def _store(ref, b, start, c0, value, rows_valid):
    """ref[b, start : start + block_t, c0 : c0 + block_c] = value at rows_valid [block_t] and channels < C."""
    block_t, block_c = value.shape
    valid = rows_valid[:, None] & (c0 + jnp.arange(block_c) < ref.shape[2])[None, :]
    pl_triton.store(ref.at[b, pl.ds(start, block_t), pl.ds(c0, block_c)], value.astype(ref.dtype), mask=valid)


def _params(w_ref, b_ref, c0, block_c):
    """([W] float32 [block_c] weight rows, float32 [block_c] bias) of the program's channels (0 past C)."""
    valid = c0 + jnp.arange(block_c) < b_ref.shape[0]
    load = lambda ref: pl_triton.load(ref, mask=valid, other=0).astype(_F32)
    weights = [load(w_ref.at[jnp.int32(i), pl.ds(c0, block_c)]) for i in range(w_ref.shape[0])]
    return weights, load(b_ref.at[pl.ds(c0, block_c)])


def _keeps(linked, shift: int, w: int):
    """keep_i for i < W of the outputs t = p - shift, as [block_t] bools (None: every tap kept, no documents);
    linked(d) is ide[p + d] == ide[p + d - 1]. Tap i of t crosses the starts at rows t + q, q in (i, W-1]."""
    keeps = [None] * w
    if linked is None:
        return keeps
    run = None
    for i in range(w - 2, -1, -1):
        link = linked(i + 1 - shift)
        run = link if run is None else run & link
        keeps[i] = run
    return keeps


def _pre_activation(xs, weights, bias, keeps):
    """s = bias + sum_i keep_i w_i xs[i] in `xla_convolve`'s order; xs[i] [block_t, block_c] float32 (xe rows
    t + i), weights[i], bias [block_c] float32, keeps from `_keeps`."""
    w = len(xs)
    acc = xs[w - 1] * weights[w - 1][None, :]
    for i in range(w - 2, -1, -1):
        term = xs[i] * weights[i][None, :]
        if keeps[i] is not None:
            term = jnp.where(keeps[i][:, None], term, 0.0)
        acc = acc + term
    return acc + bias[None, :]


def _silu(s):
    return s * jax.nn.sigmoid(s)


def _silu_grad(s):
    sig = jax.nn.sigmoid(s)
    return sig * (1.0 + s * (1.0 - sig))


def _forward_kernel(*refs, activation, docs, block_t, block_c):
    """One (batch, block of outputs t, block of channels): y[b, t] = act(s[b, t]), reading xe rows t .. t+W-1."""
    if docs:
        xe_ref, w_ref, b_ref, ide_ref, y_ref = refs
    else:
        (xe_ref, w_ref, b_ref, y_ref), ide_ref = refs, None
    b, t0, c0 = pl.program_id(0), pl.program_id(1) * block_t, pl.program_id(2) * block_c
    w = w_ref.shape[0]
    weights, bias = _params(w_ref, b_ref, c0, block_c)
    linked = None
    if docs:
        ids = [_load_ids(ide_ref, b, t0 + d, block_t) for d in range(w)]
        linked = lambda d: ids[d] == ids[d - 1]
    xs = [_load_rows(xe_ref, b, t0 + i, c0, (block_t, block_c)) for i in range(w)]
    s = _pre_activation(xs, weights, bias, _keeps(linked, 0, w))
    _store(y_ref, b, t0, c0, _silu(s) if activation == "silu" else s, t0 + jnp.arange(block_t) < y_ref.shape[1])


def _backward_kernel(*refs, activation, docs, block_t, block_c, bwd_rows, head_block):
    """One (batch, run of bwd_rows rows p >= W-1 of xe, block of channels), block_t rows at a time: dxe[b, p]
    (the run-0 programs also copy the first W-1 rows, given as head_ref), and the run's partial sums of dweight
    (dw_ref [B, runs, W, C]) and dbias (db_ref [B, runs, C])."""
    *inputs, dxe_ref, dw_ref, db_ref = refs
    xe_ref, w_ref, b_ref, *inputs = inputs
    ide_ref = inputs.pop(0) if docs else None
    g_ref, head_ref = inputs if len(inputs) == 2 else (inputs[0], None)  # no head rows when W = 1
    b, run, c0 = pl.program_id(0), pl.program_id(1), pl.program_id(2) * block_c  # not inside the loop (interpret)
    n_rows, w = xe_ref.shape[1], w_ref.shape[0]
    k, length = w - 1, g_ref.shape[1]
    weights, bias = _params(w_ref, b_ref, c0, block_c)
    shape = (block_t, block_c)

    def body(step, sums):
        start = k + run * bwd_rows + step * block_t  # rows p of xe; every load below starts at row >= 0
        rows = start + jnp.arange(block_t)
        linked = None
        if docs:
            ids = {d: _load_ids(ide_ref, b, start + d, block_t) for d in range(-k, w)}
            linked = lambda d: ids[d] == ids[d - 1]
        xs = {d: _load_rows(xe_ref, b, start + d, c0, shape) for d in range(-k, w)}
        dxe = jnp.zeros(shape, _F32)
        for shift in range(w):  # the outputs t = p - shift, which read row p through their tap `shift`
            keeps = _keeps(linked, shift, w)
            ds = _load_rows(g_ref, b, start - shift, c0, shape)  # zero past L
            if activation == "silu":
                s = _pre_activation([xs[i - shift] for i in range(w)], weights, bias, keeps)
                ds = jnp.where((rows - shift < length)[:, None], ds * _silu_grad(s), 0.0)
            term = ds * weights[shift][None, :]
            if keeps[shift] is not None:
                term = jnp.where(keeps[shift][:, None], term, 0.0)
            dxe = dxe + term
            if shift == k:  # t = p - (W-1): each output of [0, L) in exactly one block
                dw_sums, db_sum = sums
                terms = [ds * xs[i - k] if keeps[i] is None else jnp.where(keeps[i][:, None], ds * xs[i - k], 0.0)
                         for i in range(w)]
                sums = tuple(acc + jnp.sum(term, axis=0) for acc, term in zip(dw_sums, terms)), \
                    db_sum + jnp.sum(ds, axis=0)
        _store(dxe_ref, b, start, c0, dxe, rows < n_rows)
        return sums

    zeros = jnp.zeros((block_c,), _F32)
    dw_sums, db_sum = lax.fori_loop(0, bwd_rows // block_t, body, ((zeros,) * w, zeros))
    cols_valid = c0 + jnp.arange(block_c) < xe_ref.shape[2]
    for i, acc in enumerate(dw_sums):
        pl_triton.store(dw_ref.at[b, run, jnp.int32(i), pl.ds(c0, block_c)], acc, mask=cols_valid)
    pl_triton.store(db_ref.at[b, run, pl.ds(c0, block_c)], db_sum, mask=cols_valid)
    if head_ref is not None:  # dxe's first W-1 rows, by the programs of run 0
        head = _load_rows(head_ref, b, 0, c0, (head_block, block_c))
        _store(dxe_ref, b, 0, c0, head, (jnp.arange(head_block) < k) & (run == 0))


# ---------------------------------------------------------------------------------------------------------
# Launches and the custom_vjp.


@dataclasses.dataclass(frozen=True)
class _Launch:
    """What the kernels take besides the arrays (hashable: the custom_vjp's static argument)."""

    activation: str | None
    config: Config
    interpret: bool


def _call(kernel, grid, out_shape, args, launch: _Launch):
    return pl.pallas_call(
        kernel, grid=grid, out_shape=out_shape,
        compiler_params=pl_triton.CompilerParams(num_warps=launch.config.num_warps,
                                                 num_stages=launch.config.num_stages),
        interpret=launch.interpret,
    )(*args)


def _forward(xe, weight, bias, ide, launch: _Launch):
    bsz, n_rows, c = xe.shape
    length = n_rows - (weight.shape[0] - 1)
    cfg = launch.config
    kernel = functools.partial(_forward_kernel, activation=launch.activation, docs=ide is not None,
                               block_t=cfg.fwd_block_t, block_c=cfg.block_c)
    grid = (bsz, pl.cdiv(length, cfg.fwd_block_t), pl.cdiv(c, cfg.block_c))
    args = (xe, weight, bias) + (() if ide is None else (ide,))
    return _call(kernel, grid, kernel_support.typed_like((bsz, length, c), xe.dtype, xe), args, launch)


def _backward(xe, weight, bias, ide, g, launch: _Launch):
    """(dxe [B, W-1+L, C] xe's dtype, dweight [W, C] float32, dbias [C] float32)."""
    bsz, n_rows, c = xe.shape
    w, cfg = weight.shape[0], launch.config
    length = g.shape[1]
    runs = pl.cdiv(length, cfg.bwd_rows)
    head_block = 1 << max(w - 2, 0).bit_length()  # the least power of two >= W-1 (a Triton block)
    kernel = functools.partial(_backward_kernel, activation=launch.activation, docs=ide is not None,
                               block_t=cfg.bwd_block_t, block_c=cfg.block_c, bwd_rows=cfg.bwd_rows,
                               head_block=head_block)
    out_shape = (kernel_support.typed_like(xe.shape, xe.dtype, xe), kernel_support.typed_like((bsz, runs, w, c), _F32, xe),
                 kernel_support.typed_like((bsz, runs, c), _F32, xe))
    head = () if w == 1 else (_head_rows_grad(xe, weight, bias, ide, g, launch.activation),)
    args = (xe, weight, bias) + (() if ide is None else (ide,)) + (g,) + head
    dxe, dw_part, db_part = _call(kernel, (bsz, runs, pl.cdiv(c, cfg.block_c)), out_shape, args, launch)
    return dxe, jnp.sum(dw_part, axis=(0, 1)), jnp.sum(db_part, axis=(0, 1))
def differentiable(forward, backward):
    """A convolution's kernels as one custom_vjp f(xe, weight, bias, mask, launch), differentiable in xe, weight
    and bias; the residuals are the inputs (the backward recomputes what it needs).

    forward(xe, weight, bias, mask, launch) -> y; backward(xe, weight, bias, mask, g, launch) -> (dxe, float32
    dweight, float32 dbias), cast here to weight's and bias's dtypes. mask: None or an integer array (document ids
    or keep bits; no gradient); launch: static (hashable)."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
    def fused(xe, weight, bias, mask, launch):
        return forward(xe, weight, bias, mask, launch)

    def fused_fwd(xe, weight, bias, mask, launch):
        return forward(xe, weight, bias, mask, launch), (xe, weight, bias, mask)

    def fused_bwd(launch, residuals, g):
        xe, weight, bias, mask = residuals
        dxe, dweight, dbias = backward(xe, weight, bias, mask, g, launch)
        d_mask = None if mask is None else np.zeros(mask.shape, jax.dtypes.float0)
        return dxe, dweight.astype(weight.dtype), dbias.astype(bias.dtype), d_mask

    fused.defvjp(fused_fwd, fused_bwd)
    return fused


_fused = differentiable(_forward, _backward)


def convolve(xe, weight, bias, ide, *, activation: str | None = None, interpret: bool = False,
             config: Config = DEFAULT):
    """The convolution of one piece (module docstring), differentiable in xe, weight and bias.

    Args:
      xe: [B, W-1+L, C] floating (`DTYPES`): the W-1 positions before the piece, then the piece.
      weight: [W, C]: weight[W-1] multiplies the current position.   bias: None or [C].
      ide: None, or [B, W-1+L] integers: xe's document ids (a document starts where the id changes).
      activation: None or "silu" (applied to the float32 sum, before the one rounding to xe's dtype).
      interpret: Pallas interpret mode (any platform) instead of the compiled Triton kernels (a CUDA GPU).
      config: launch sizes.
    Returns:
      y [B, L, C] in xe's dtype. Gradients: dxe in xe's dtype (the halo rows' too), dweight, dbias float32
      sums in their own dtypes.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    bias = jnp.zeros(weight.shape[1:], weight.dtype) if bias is None else bias  # its gradient goes nowhere
    # Inside shard_map: weight and bias vary as xe does (kernel_support's docstring says why).
    weight, bias = kernel_support.vary_like(weight, xe), kernel_support.vary_like(bias, xe)
    return _fused(xe, weight, bias, ide, _Launch(activation, config, interpret))
