"""Fused Pallas kernels (Triton lowering): the `lasp_jax.ops.pieces` backend of impl "pallas_triton".

The passes of the piece driver (`pieces`: the state passes, the output walk, the dQ walk and the dK, dV walks)
as Pallas Triton kernels, one program per (batch, head, piece, head-dim tile):

    state pass   m_p = sum_{x in p} lambda^(end_p - x) k_x^T v_x, and d_p = scale sum_x lambda^(x - start_p) q_x^T dO_x
    output walk  O   = chunkwise [(Q K^T) * M] V + scale lambda^i Q S, S walking forward from the piece's state
    dQ walk      dQ  = [(dO V^T) * M] K + scale lambda^i dO S^T
    dK, dV walks dK  = [(dO V^T) * M]^T Q + lambda^(C - j) V dS^T, dV = [(Q K^T) * M]^T dO + lambda^(C - j) K dS,
                 dS walking backward from the piece's outgoing cotangent (one kernel when the whole state is
                 one tile, else one each)

with M[i, j] = scale lambda^(i - j) for i >= j, else 0 (selected).

Heads: the grid has one row per output head h of H = max(Hq, Hv), and each operand is read at its own head
h // (H / Hx) (q's, k's, v's count; dO and O have H): GQA / MQA and GVA (Mamba-2's groups) without repeating an
input in memory. The gradients come per output head, in float32 where the input has fewer heads than H, and
the drivers sum each input head's shares. The per-token state pass for GVA (x of fewer heads than y and the
output) instead takes 2 output heads of one x head per program (`_grouped_state_kernel`: each x chunk loaded
once, one dot for both heads).

Per-token decay and documents (`pieces_tokens`, the TokenBackend methods): the same walks as kernel variants
behind a static flag (`tokens`; the constant kernels trace as before, no extra loads). The decay comes in as
float32 tables per position (pieces_tokens.ChunkTables, one [C] row of each per chunk): M[i, j] = scale
exp(-max(bc_i - bc_j, 0)) for j <= i in one document (else selected out), the q side's and k side's rows in
place of lambda^i and lambda^(C - j), the chunk decay from the q side's last row; the state pass takes
per-position weights instead of powers (rounding w x to the input dtype, the grouped pass w y). The dQ and dK
walks also write each row's float32 q . dQ and k . dK (per head-dim tile, summed in XLA) for the decay gradient.

Numerics: every product accumulates in float32; the state is float32 and is rounded to the input dtype only
as a matmul operand (bf16 inputs: one bf16 rounding of the state and of the decayed scores, as in fla; under
per-token decay the dQ and dK kernels take the state as two bf16 operands, `_dq_kernel` says why); fp32
inputs use full-precision (IEEE, not tf32) matmuls. Powers of lambda are exp(-s * n) with n >= 0. The
attention's `scale` rides on the float32 tables: the intra-chunk mask (every score) and the q-side decay row
lambda^i (the output's and dQ's state terms, the Q, dO state pass and dS's update); the K, V side is unscaled.
q itself is never rescaled, so bf16 q is rounded once, as given. The mask selects (jnp.where): a non-finite q
or k at a later position never reaches an earlier output.

Platforms: the Triton lowering runs on CUDA GPUs of compute capability 8.0 or newer (`supported`); which of
them, and which head dims and dtypes, their GPU tests qualified is decided in `lasp_jax.ops.impls`. `Kernels(
interpret=True)` runs the same kernels in Pallas interpret mode on any platform (CPU tests; head dims 16 to 256,
bf16, fp16, fp32). jax 0.11 deprecates the Pallas Triton backend (Mosaic GPU is its successor, Hopper and
later); it still lowers and runs in jax 0.11.2, with a DeprecationWarning at each lowering. `pallas_mosaic`
reuses these state passes with its own walks.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from lasp_jax.ops import checks, kernel_support, pieces, pieces_tokens

_F32 = jnp.float32
_HIGHEST = lax.Precision.HIGHEST
# What the kernels run (interpreted, and compiled on a GPU): powers of two the Triton dots take.
HEAD_DIMS = (16, 32, 64, 128, 256)
DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
_RATE_LANES = 16  # the decay rate travels as a [H, 16] row: a power-of-two block Triton can load
# The largest float32 sum a program of the grouped state pass holds (in registers: 128 per thread at 8 warps).
_GROUPED_STATE_FLOATS = 128 * 256
_STAGE_BYTES = 160 * 1024  # shared memory for the pipelined chunk loads (Hopper: 227 KB per block in all)


@dataclasses.dataclass(frozen=True)
class Config:
    """Block sizes and launch parameters.

    chunk: positions per chunk (the dense intra-chunk block). block_k, block_v: head-dim tiles of the state
    (capped at the head dims); the output and dV passes tile Dv, the dQ and dK passes tile Dk. state_block:
    both tiles of the state pass (each tile re-reads its inputs, so whole states read K and V once).
    target_programs: the forward grid is sized to about this many programs by the piece count. min_piece_chunks:
    fewest chunks per piece (shorter pieces spend more on the piece scan than they gain). fuse_dkdv: one
    backward kernel for dK and dV when the whole state is one tile (reads Q and dO once instead of twice).
    tiles_first: launch the head-dim tiles of one (batch, head, piece) as neighbouring programs, so that the
    inputs they all read (Q K^T needs every column) are likely to come from L2 rather than HBM (the Triton
    lowering otherwise makes batch x head the fastest launch index).
    num_warps: warps per program. wide_warps: warps for programs holding a state tile of more than 64 x 128
    (whole 128 x 128 states and larger), whose fp32 accumulator would otherwise crowd the registers.
    num_stages: the deepest software pipeline; each kernel takes fewer where its chunk loads would overflow
    shared memory (see `_stages`). crowded_stages: the deepest where batch x heads x tiles alone exceed
    target_programs, so each sequence is one piece (a long loop, several programs per SM, whose occupancy the
    deeper buffers cost).
    grouped_heads, grouped_warps, grouped_stages: the weighted state pass (per-token decay) where x has fewer
    heads than y and the output (GVA: K or Q of Mamba-2's groups against V or dO of every head) sums up to
    grouped_heads output heads of one x head per program (`_grouped_state_kernel`), under these warps and at
    most these stages (capped to fit _STAGE_BYTES only); grouped_heads 1 keeps the per-head kernel.
    grouped_one_dot: one dot of all their columns per chunk, else one dot per head (no reshape of the tile).
    Its pieces are split up to target_programs programs, each split at least grouped_min_chunks chunks. On an
    H200 at Mamba-2 1.3B's shape (T 64K, one group of Dx 128, 64 heads of Dy 64, bf16; benchmarks/results/
    KERNEL_NOTES.md session 18) R_blk 2 with 8 warps took 0.264-0.280 ms (one dot; 0.282 a dot per head) against
    the per-head kernel's 0.517-0.525; 3 stages against 2: 0.264 against 0.481 ms; target_programs 256 (2 splits)
    against 128 (none) and 512: 0.264 against 0.372 and 0.284. R_blk 4, and 4 warps at either R_blk, failed
    Triton's compile ("'ttg.local_alloc' op element type bit width must be a multiple of 8": a boolean tile staged
    in shared memory), hence grouped_heads at most 2 compiled. grouped_min_chunks (16) was not swept.

    Defaults: the fastest variants of three timing sweeps on an H200 at T=64K (benchmarks/results/
    KERNEL_NOTES.md): 256 programs and 3 stages (~9% under 512 and 2), then whole-state tiles for the state
    pass with tiles_first (4-6% under the same run's default rows, whose two timings differed by 3%). At
    B=8, H=32, T=8K (one piece per sequence, 512 programs per launch) 2 stages beat 3 by 18% (forward) and 8%
    (forward+backward) in one sweep on an H200, hence crowded_stages.
    """

    chunk: int = 64
    block_k: int = 64
    block_v: int = 64
    state_block: int = 128
    target_programs: int = 256
    min_piece_chunks: int = 4
    fuse_dkdv: bool = True
    tiles_first: bool = True
    num_warps: int = 4
    wide_warps: int = 4
    num_stages: int = 3
    crowded_stages: int = 2
    grouped_heads: int = 2
    grouped_one_dot: bool = True
    grouped_warps: int = 8
    grouped_stages: int = 3
    grouped_min_chunks: int = 16


DEFAULT = Config()


# ---------------------------------------------------------------------------------------------------------
# Kernels. Refs hold one piece: [L, D] rows of one (batch, head), states [Dk or tile, Dv or tile] float32.


def _dot(a, b, precision):
    return jnp.dot(a, b, preferred_element_type=_F32, precision=precision)


def _decays(rate_ref, c, scale):
    """Decay tables of one head from its rate s: the causal mask (keep i >= j) with its weights
    scale lambda^(i - j), scale lambda^i (the q side's), lambda^(C - j) and lambda^C; every power exp(-s n), n >= 0."""
    rate = jnp.max(rate_ref[...])
    i = jnp.arange(c, dtype=jnp.int32).astype(_F32)
    gap = i[:, None] - i[None, :]
    mask = _Mask(gap >= 0, scale * jnp.exp(-rate * jnp.maximum(gap, 0.0)))
    return _Chunk(mask, scale * jnp.exp(-rate * i), jnp.exp(-rate * (c - i)), jnp.exp(-rate * c), select=False)


def _token_decays(table_refs, rows, c, scale):
    """The decay tables of one chunk (`rows` of the piece) under per-token decay, from the refs of
    pieces_tokens.ChunkTables (cum, counts, q_side, k_side; [L] rows of one (batch, head)): the mask keeping
    j <= i in one document with weights scale exp(-(bc_i - bc_j)), scale q_side, k_side, and the chunk decay
    (q_side at the chunk's last row). Every exponent is minus a non-negative difference of running sums."""
    cum_ref, counts_ref, q_side_ref, k_side_ref = table_refs
    cum, counts, q_side = cum_ref[rows], counts_ref[rows], q_side_ref[rows]
    i = jnp.arange(c, dtype=jnp.int32)
    keep = (i[:, None] >= i[None, :]) & (counts[:, None] == counts[None, :])
    mask = _Mask(keep, scale * jnp.exp(-jnp.maximum(cum[:, None] - cum[None, :], 0.0)))
    chunk_decay = jnp.sum(jnp.where(i == c - 1, q_side, 0.0))
    return _Chunk(mask, scale * q_side, k_side_ref[rows], chunk_decay, select=True)


def _decay_source(refs, c, scale, tokens):
    """(decays(rows) -> the chunk's `_Chunk`, the refs after the decay's): the constant rate's tables once per
    program (its first ref), or, per-token (tokens), each chunk's from its four table refs."""
    if tokens:
        return (lambda rows: _token_decays(refs[:4], rows, c, scale)), refs[4:]
    fixed = _decays(refs[0], c, scale)
    return (lambda rows: fixed), refs[1:]


def _times(w, x, select: bool):
    """w x (broadcast), or, when select, 0 where w == 0 and w x elsewhere (states.decayed's rule: a non-finite x
    never passes a zero weight, under per-token decay the zeros are document starts, while a NaN weight, from a
    traced NaN rate, still multiplies, so what follows it is NaN as the xla path's is)."""
    return jnp.where(w == 0, 0.0, w * x) if select else w * x


@dataclasses.dataclass(frozen=True)
class _Chunk:
    """The decay of one chunk as the walks apply it: the intra-chunk mask, the q side's row (with the scale),
    the k side's row and the chunk's decay of the state; per-token (select), zero weights select."""

    mask: "_Mask"
    q_side: jax.Array  # [C] float32
    k_side: jax.Array  # [C] float32
    decay: jax.Array  # scalar float32
    select: bool

    def q_term(self, x):
        """diag(q side) x for a float32 [C, D] product."""
        return _times(self.q_side[:, None], x, self.select)

    def k_term(self, x):
        return _times(self.k_side[:, None], x, self.select)

    def carry(self, state):
        """The state (or its cotangent) decayed across the chunk."""
        return _times(self.decay, state, self.select)

    def q_update(self, x, y, precision):
        """(diag(q side) x)^T y, the chunk's share of the state cotangent (x, y [C, D] rows)."""
        return _weighted_outer(x, y, self.q_side, self.select, precision)

    def k_update(self, x, y, precision):
        """(diag(k side) x)^T y, the chunk's share of the state it passes on."""
        return _weighted_outer(x, y, self.k_side, self.select, precision)


@dataclasses.dataclass(frozen=True)
class _Mask:
    """The decayed causal mask of a chunk: scores at or before the diagonal times their weights, zero selected
    elsewhere (a non-finite later score is dropped, never multiplied by zero)."""

    keep: jax.Array
    weights: jax.Array

    def __call__(self, scores):
        return jnp.where(self.keep, scores * self.weights, 0.0)


def _weighted(x, w, select: bool = False):
    """diag(w) x in x's dtype (a matmul operand): w [C] weighs the rows of x [C, D], w [C, R] those of each
    head of x [C, R, D]; select: rows of zero weight are zeros (`_times`)."""
    return _times(w[..., None], x.astype(_F32), select).astype(x.dtype)


def _weighted_outer(x, y, w, select: bool, precision):
    """sum_i w_i x_i^T y_i [Dx, Dy] float32; select: the rows of zero weight of both x and y are zeros, so
    that a non-finite row of another document adds nothing (not 0 * inf in the product)."""
    if select:
        y = jnp.where(w[:, None] == 0, jnp.zeros_like(y), y)
    return _dot(_weighted(x, w, select).T, y, precision)


def _state_kernel(rate_ref, x_ref, y_ref, out_ref, *, c, reverse, precision, scale):
    """Forward: sum_x lambda^(L - x) x_x^T y_x (K, V); reverse: scale sum_x lambda^x x_x^T y_x (Q, dO)."""
    n_chunks = x_ref.shape[0] // c
    decays = _decays(rate_ref, c, scale)
    w, chunk_decay = (decays.q_side if reverse else decays.k_side), decays.decay

    def chunk_sum(n):
        rows = pl.ds((n_chunks - 1 - n if reverse else n) * c, c)
        return _dot(_weighted(x_ref[rows, :], w).T, y_ref[rows, :], precision)

    # The first chunk starts the sum: zeros would not vary over shard_map's manual axes like the refs do.
    out_ref[...] = lax.fori_loop(1, n_chunks, lambda n, acc: chunk_decay * acc + chunk_sum(n), chunk_sum(0))


def _weighted_state_kernel(w_ref, x_ref, y_ref, out_ref, *, c, precision):
    """sum_x w_x x_x^T y_x over the piece (per-token decay: the weights w [L] float32 carry all of it)."""
    n_chunks = x_ref.shape[0] // c

    def chunk_sum(n):
        rows = pl.ds(n * c, c)
        return _weighted_outer(x_ref[rows, :], y_ref[rows, :], w_ref[rows], True, precision)

    out_ref[...] = lax.fori_loop(1, n_chunks, lambda n, acc: acc + chunk_sum(n), chunk_sum(0))


def _grouped_state_kernel(w_ref, x_ref, y_ref, out_ref, *, c, precision, one_dot):
    """sum_x x_x^T [w_(r, x) y_(x, r, :)]_r [Dx, R * Dy] over the rows: R output heads that read one x head.

    w_ref [R, L] float32, x_ref [L, Dx], y_ref [L, R, Dy], out_ref [Dx, R * Dy] float32 (head r's sum in
    columns [r Dy, (r + 1) Dy)). Each chunk loads and transposes x once for all R heads, then does one dot of
    R * Dy columns (one_dot: the weighted [C, R, Dy] tile reshaped to [C, R * Dy]) or R dots of Dy columns
    against the same x. The weights round w y to y's dtype (the per-head kernel rounds w x: one rounding either
    way). Selects: y's rows of zero weight are zeros per head, and x's rows where all R weights are zero (a
    document start, where every head's weight is zero) are zeros, so a non-finite row there adds nothing. A
    non-finite x row where only some heads' weights are zero (an underflowed decay inside a document) reaches
    those heads too, as 0 * inf in the dot."""
    n_chunks, _, r, dim_y = y_ref.shape[0] // c, *y_ref.shape

    def chunk_sums(n):
        rows = pl.ds(n * c, c)
        w, x = w_ref[:, rows], x_ref[rows, :]
        xt = jnp.where((jnp.sum(jnp.abs(w), axis=0) == 0)[:, None], jnp.zeros_like(x), x).T
        if one_dot:
            return [_dot(xt, _weighted(y_ref[rows, :, :], w.T, True).reshape(c, r * dim_y), precision)]
        return [_dot(xt, _weighted(y_ref[rows, i, :], w_ref[i, rows], True), precision) for i in range(r)]

    sums = lax.fori_loop(1, n_chunks, lambda n, acc: [a + s for a, s in zip(acc, chunk_sums(n))], chunk_sums(0))
    cols = sums[0].shape[-1]
    for i, total in enumerate(sums):
        out_ref[:, pl.ds(i * cols, cols)] = total


def _output_kernel(*refs, c, precision, scale, tokens):
    """O = [(Q K^T) * M] V + scale lambda^i Q S per chunk (M carries the scale); S walks forward from the
    piece's incoming state. Refs: the decay's (`_decay_source`), Q, K, V, S, then O."""
    decays, (q_ref, k_ref, v_ref, state_ref, o_ref) = _decay_source(refs, c, scale, tokens)
    n_chunks = q_ref.shape[0] // c
    dt = q_ref.dtype

    def body(n, state):
        rows = pl.ds(n * c, c)
        chunk = decays(rows)
        q, k, v = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :]
        scores = chunk.mask(_dot(q, k.T, precision))
        o = _dot(scores.astype(dt), v, precision) + chunk.q_term(_dot(q, state.astype(dt), precision))
        o_ref[rows, :] = o.astype(o_ref.dtype)
        return chunk.carry(state) + chunk.k_update(k, v, precision)

    lax.fori_loop(0, n_chunks, body, state_ref[...])


def _row_dots(x, y):
    """[C] float32 x_i . y_i (y float32)."""
    return jnp.sum(x.astype(_F32) * y, axis=1)


def _state_product(x, state, precision, split: bool):
    """x state^T [C, Dy] float32 for a float32 state [Dy, Dx] (x [C, Dx] in the matmul dtype): state rounded to
    x's dtype once, or (split, x not float32) as that rounding plus a second product with the residual state -
    rounded, which leaves the state term the residual's rounding from float32 (the dQ and dK walks under
    per-token decay: `_dq_kernel`'s docstring)."""
    out = _dot(x, state.astype(x.dtype).T, precision)
    if split and jnp.dtype(x.dtype) != _F32:
        low = state - kernel_support.rounded_to(state, x.dtype)
        out = out + _dot(x, low.astype(x.dtype).T, precision)
    return out


def _consistent_row_dots(w, intra, inter, side, select):
    """Each row's w . (intra + diag(side) inter), its state part from diag(side) w rounded to w's dtype as the
    other walk's state update rounds those rows (`_weighted`), so that every pair term crossing a chunk appears
    with the same roundings in the q . dq and the k . dk of the decay gradient (`_dq_kernel`'s docstring). w
    [C, D] in the matmul dtype, intra and inter [C, D] float32, side [C] float32."""
    side = side[:, None]
    rounded = kernel_support.rounded_to(_times(side, w.astype(_F32), select), w.dtype)
    state_part = jnp.where(side == 0, 0.0, rounded * inter) if select else rounded * inter  # as `_times`
    return _row_dots(w, intra) + jnp.sum(state_part, axis=1)


def _dq_kernel(*refs, c, precision, scale, tokens):
    """dQ = [(dO V^T) * M] K + scale lambda^i dO S^T; S (a Dk tile) walks forward. Refs: the decay's, dO, K,
    V, S, (tokens: Q's Dk tile), then dQ, (tokens: q . dQ over the tile, float32 [L], for the decay gradient).

    With tokens the decay gradient sums x_t = k_t . dk_t - q_t . dq_t over runs of positions
    (`pieces_tokens`), where every pair term that crosses a chunk boundary must cancel between the two walks as it
    does in exact arithmetic. Here that pair enters through the state operand S and the dK walk's state update
    rows bf16(q_side q); there through dS and this walk's update rows bf16(k_side k). Rounded alike in neither,
    their residues add up like the square root of the run's length (6.5e-3 against float32 at pieces of 512
    for a Mamba-2 1.3B layer on an H200, growing with the piece). So under tokens the state term is taken
    with S split in two bf16 operands (`_state_product`) and q . dq's state part from the rows the dK walk
    rounds (`_consistent_row_dots`), and the dK walk does the mirror: 1.9e-3 at any piece length
    (benchmarks/results/walks_gpu_h200_s17.md; the fix costs these walks 0.8 ms at a Mamba-2 1.3B layer at equal
    pieces, and the pieces of 512 it made needless cost more)."""
    decays, refs = _decay_source(refs, c, scale, tokens)
    do_ref, k_ref, v_ref, state_ref = refs[:4]
    q_ref, dq_ref, qdq_ref = refs[4:] if tokens else (None, refs[4], None)
    n_chunks = do_ref.shape[0] // c
    dt = k_ref.dtype

    def body(n, state):
        rows = pl.ds(n * c, c)
        chunk = decays(rows)
        do, k, v = do_ref[rows, :], k_ref[rows, :], v_ref[rows, :]
        a = chunk.mask(_dot(do, v.T, precision))
        intra, inter = _dot(a.astype(dt), k, precision), _state_product(do, state, precision, tokens)
        dq = intra + chunk.q_term(inter)
        dq_ref[rows, :] = dq.astype(dq_ref.dtype)
        if tokens:
            qdq_ref[rows] = _consistent_row_dots(q_ref[rows, :], intra, inter, chunk.q_side, chunk.select)
        return chunk.carry(state) + chunk.k_update(k, v, precision)

    lax.fori_loop(0, n_chunks, body, state_ref[...])


def _dkdv_kernel(*refs, c, precision, scale, with_dk, with_dv, tokens):
    """dK = [(dO V^T) * M]^T Q + lambda^(C - j) V dS^T and dV = [(Q K^T) * M]^T dO + lambda^(C - j) K dS, dS
    walking backward from the piece's outgoing cotangent and gathering scale lambda^i Q^T dO (M carries the
    scale; the K, V side of the state terms does not). Refs: the decay's, Q, K (with_dv, or with_dk under
    tokens: K's Dk tile), V (with_dk), dO, G, then dK, dV, (with_dk under tokens: k . dK over the tile, float32
    [L], for the decay gradient). One of the two per Dk tile (dK) or Dv tile (dV) of dS, or both from the whole
    dS (Q and dO read once)."""
    decays, refs = _decay_source(refs, c, scale, tokens)
    refs = iter(refs)
    q_ref = next(refs)
    k_ref = next(refs) if with_dv or tokens else None
    v_ref = next(refs) if with_dk else None
    do_ref, g_ref = next(refs), next(refs)
    dk_ref = next(refs) if with_dk else None
    dv_ref = next(refs) if with_dv else None
    kdk_ref = next(refs) if with_dk and tokens else None
    n_chunks = q_ref.shape[0] // c
    dt = q_ref.dtype

    def body(n, ds):
        rows = pl.ds((n_chunks - 1 - n) * c, c)
        chunk = decays(rows)
        q = q_ref[rows, :]
        k = k_ref[rows, :] if k_ref is not None else None
        v = v_ref[rows, :] if with_dk else None
        do = do_ref[rows, :]
        if with_dk:
            a = chunk.mask(_dot(do, v.T, precision))
            intra, inter = _dot(a.astype(dt).T, q, precision), _state_product(v, ds, precision, tokens)
            dk = intra + chunk.k_term(inter)
            dk_ref[rows, :] = dk.astype(dk_ref.dtype)
            if tokens:  # `_dq_kernel`'s docstring
                kdk_ref[rows] = _consistent_row_dots(k, intra, inter, chunk.k_side, chunk.select)
        if with_dv:
            scores = chunk.mask(_dot(q, k.T, precision))
            dv = _dot(scores.astype(dt).T, do, precision) + chunk.k_term(_dot(k, ds.astype(dt), precision))
            dv_ref[rows, :] = dv.astype(dv_ref.dtype)
        return chunk.carry(ds) + chunk.q_update(q, do, precision)

    lax.fori_loop(0, n_chunks, body, g_ref[...])


# ---------------------------------------------------------------------------------------------------------
# Launch plumbing.


def _precision(dtype):
    return _HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _tiles_first(spec):
    """The same block with its index map taking the grid as (tile, batch, head, piece)."""
    index_map = spec.index_map
    return pl.BlockSpec(spec.block_shape, lambda j, b, h, p: index_map(b, h, p, j))


def _stages(config: Config, grid, in_specs, args) -> int:
    """Software-pipelining depth: crowded_stages for one-piece launches of more than target_programs programs
    (grid (batch, head, piece, tile)), else num_stages. Every stage buffers one chunk of each row input in
    shared memory, so the stages are also capped to fit _STAGE_BYTES. A measured rule, not an exact count: on an
    H200, 3 stages of bf16 chunk loads of 64 KB (the whole-state dK+dV kernel at d=128) and 72 KB (the output
    pass at d=256) failed, 48 KB ran, and 64 KB of fp32 at d=64 ran (fp32 operands are not staged for the
    tensor cores)."""
    chunk = config.chunk
    per_stage = sum(chunk * spec.block_shape[-1] * jnp.dtype(x.dtype).itemsize
                    for spec, x in zip(in_specs, args) if len(spec.block_shape) == 4)
    crowded = grid[2] == 1 and math.prod(grid) > config.target_programs
    deepest = min(config.num_stages, config.crowded_stages) if crowded else config.num_stages
    return max(1, min(deepest, _STAGE_BYTES // per_stage))


def _warps(config: Config, specs) -> int:
    """wide_warps when the program's state tile (its one 5-d block) holds more than 64 x 128 floats."""
    state = next(spec.block_shape for spec in specs if len(spec.block_shape) == 5)
    return config.wide_warps if state[-2] * state[-1] > 64 * 128 else config.num_warps


def _call(kernel, grid, in_specs, out_specs, out_shape, *args, config: Config, interpret: bool):
    """Launches `kernel` over grid (batch, head, piece, tile); every index map takes (b, h, p, j)."""
    stages = _stages(config, grid, in_specs, args)
    warps = _warps(config, in_specs + (out_specs if isinstance(out_specs, list) else [out_specs]))
    if config.tiles_first:
        # The Triton lowering folds the leading grid axes into CUDA's x, first axis fastest.
        grid = (grid[3], *grid[:3])
        in_specs = [_tiles_first(spec) for spec in in_specs]
        out_specs = ([_tiles_first(spec) for spec in out_specs] if isinstance(out_specs, list)
                     else _tiles_first(out_specs))
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=pl_triton.CompilerParams(num_warps=warps, num_stages=stages),
        interpret=interpret,
    )(*args)


def _rates(rates):
    return jnp.broadcast_to(rates.astype(_F32)[:, None], (rates.shape[0], _RATE_LANES))


def _rate_spec():
    return pl.BlockSpec((None, _RATE_LANES), lambda b, h, p, j: (h, 0))


def _rows_spec(plan: pieces.Plan, d_block, head, tile):
    """A piece of rows [L, d_block] of x [B, T, Hx, D]: head(h) picks the head, tile(j) the column block."""
    return pl.BlockSpec((None, plan.piece_len, None, d_block), lambda b, h, p, j: (b, p, head(h), tile(j)))


def _state_spec(rows_block, cols_block, row_tile, col_tile):
    return pl.BlockSpec((None, None, None, rows_block, cols_block),
                        lambda b, h, p, j: (b, h, p, row_tile(j), col_tile(j)))


def _same(h):
    return h


def _zero(_):
    return 0


def _head_map(n_heads, x):
    """Index map from output head h to x's head h // (H / Hx) (GQA/MQA, GVA: inputs of fewer heads are indexed,
    never repeated); the identity when x has all H heads."""
    group = n_heads // x.shape[2]
    return _same if group == 1 else (lambda h: h // group)


def plan(q, v, config: Config = DEFAULT) -> pieces.Plan:
    """The pieces of q [B, T, Hq, Dk], v [B, T, Hv, Dv] under config: about target_programs programs per
    launch over the H = max(Hq, Hv) output heads, counting the Dv tiles of the output pass."""
    b, t = q.shape[:2]
    h = checks.output_heads(q, v)
    tiles = v.shape[-1] // min(config.block_v, v.shape[-1])
    target_pieces = max(1, -(-config.target_programs // (b * h * tiles)))
    return pieces.make_plan(t, config.chunk, target_pieces, config.min_piece_chunks)


def state_sums(x, y, rates, plan: pieces.Plan, config: Config = DEFAULT, *, reverse: bool, scale: float = 1.0,
               interpret: bool = False):
    """Per-piece state sums [B, H, P, Dx, Dy] float32 (`pieces.Backend.state_sums`, `_state_kernel`): x [B, T,
    Hx, Dx], y [B, T, Hy, Dy] with T = P * piece_len; output head h reads x's head h // (H / Hx) and y's
    h // (H / Hy)."""
    b, h = x.shape[0], rates.shape[0]
    dim_x, dim_y = x.shape[-1], y.shape[-1]
    bx, by = min(config.state_block, dim_x), min(config.state_block, dim_y)
    ny = dim_y // by
    kernel = functools.partial(_state_kernel, c=plan.chunk, reverse=reverse, precision=_precision(x.dtype),
                               scale=scale)
    return _call(
        kernel, (b, h, plan.pieces, (dim_x // bx) * ny),
        [_rate_spec(), _rows_spec(plan, bx, _head_map(h, x), lambda j: j // ny),
         _rows_spec(plan, by, _head_map(h, y), lambda j: j % ny)],
        _state_spec(bx, by, lambda j: j // ny, lambda j: j % ny),
        kernel_support.typed_like((b, h, plan.pieces, dim_x, dim_y), _F32, x),
        _rates(rates), x, y, config=config, interpret=interpret)


@dataclasses.dataclass(frozen=True)
class _Decay:
    """The decay as kernel operands: the constant rate row ([H] rates), or per-token the four
    pieces_tokens.ChunkTables (tokens), with their block specs."""

    specs: list
    args: list
    tokens: bool


def _constant_decay(rates) -> _Decay:
    return _Decay([_rate_spec()], [_rates(rates)], tokens=False)


def _token_decay(tables, plan: pieces.Plan) -> _Decay:
    """tables: pieces_tokens.ChunkTables (cum, counts, q_side, k_side), each row a piece's [L] block."""
    row = pl.BlockSpec((None, None, plan.piece_len), lambda b, h, p, j: (b, h, p))
    counts = pl.BlockSpec((None, plan.piece_len), lambda b, h, p, j: (b, p))
    return _Decay([row, counts, row, row], list(tables), tokens=True)


def _row_sums_spec(plan: pieces.Plan, tile):
    """Per-position float32 partial sums [B, H, tiles, T]: the piece's [L] row of head-dim tile tile(j)."""
    return pl.BlockSpec((None, None, None, plan.piece_len), lambda b, h, p, j: (b, h, tile(j), p))


def _with_row_sums(spec, shape, plan: pieces.Plan, row_sums, tokens: bool):
    """(out_specs, out_shape) of a walk writing rows of one head-dim tile, plus, per-token, its float32 row dots
    of that tile (row_sums: their [B, H, tiles, T] shape)."""
    if not tokens:
        return spec, shape
    return [spec, _row_sums_spec(plan, _same)], [shape, row_sums]


def _output(q, k, v, decay: _Decay, pieces_in, plan: pieces.Plan, config: Config, interpret: bool, scale: float):
    """`pieces.Backend.output` (and output_tokens): the output walk, one program per (batch, output head, piece,
    Dv tile), each of q, k, v read at its own head h // (H / Hx)."""
    b, t, _, dim_k = q.shape
    h = checks.output_heads(q, v)
    q_head, k_head, v_head = (_head_map(h, x) for x in (q, k, v))
    dim_v = v.shape[-1]
    bv = min(config.block_v, dim_v)
    return _call(
        functools.partial(_output_kernel, c=plan.chunk, precision=_precision(q.dtype), scale=scale,
                          tokens=decay.tokens),
        (b, h, plan.pieces, dim_v // bv),
        [*decay.specs, _rows_spec(plan, dim_k, q_head, _zero), _rows_spec(plan, dim_k, k_head, _zero),
         _rows_spec(plan, bv, v_head, _same), _state_spec(dim_k, bv, _zero, _same)],
        _rows_spec(plan, bv, _same, _same),
        kernel_support.typed_like((b, t, h, dim_v), q.dtype, q),
        *decay.args, q, k, v, pieces_in, config=config, interpret=interpret)


def _grads(q, k, v, do, decay: _Decay, pieces_in, pieces_out, plan: pieces.Plan, config: Config, interpret: bool,
           scale: float):
    """`pieces.Backend.grads`: dQ, dK, dV per OUTPUT head [B, T, H, D] (each in float32 where its input has fewer
    heads than H: GQA's dK, dV, GVA's dQ, dK; `pieces.backward` sums the shares of each input head) from the
    Triton kernels, one program per (batch, output head, piece, tile), each operand read at its own head
    h // (H / Hx) (dO has all H); dK and dV in one kernel when the whole state is one tile (fuse_dkdv), else one
    each. Per-token (decay.tokens) also x [B, H, T] float32, k . dK - q . dQ per output head from the kernels'
    float32 values (summed over the head-dim tiles here)."""
    b, t, _, dim_k = q.shape
    h = checks.output_heads(q, v)
    dim_v = v.shape[-1]
    bk, bv = min(config.block_k, dim_k), min(config.block_v, dim_v)
    q_head, k_head, v_head = (_head_map(h, x) for x in (q, k, v))
    precision = _precision(q.dtype)
    c, n = plan.chunk, plan.pieces
    tokens = decay.tokens
    call = functools.partial(_call, config=config, interpret=interpret)
    tile_k = dim_k // bk
    row_sums = kernel_support.typed_like((b, h, tile_k, t), _F32, q)

    def share(x, dim):
        """Output shape of x's gradient per output head: x's dtype, or float32 shares (summed by the driver)."""
        return kernel_support.typed_like((b, t, h, dim), x.dtype if x.shape[2] == h else _F32, q)

    dq = call(
        functools.partial(_dq_kernel, c=c, precision=precision, scale=scale, tokens=tokens), (b, h, n, tile_k),
        [*decay.specs, _rows_spec(plan, dim_v, _same, _zero), _rows_spec(plan, bk, k_head, _same),
         _rows_spec(plan, dim_v, v_head, _zero), _state_spec(bk, dim_v, _same, _zero)]
        + ([_rows_spec(plan, bk, q_head, _same)] if tokens else []),
        *_with_row_sums(_rows_spec(plan, bk, _same, _same), share(q, dim_k), plan, row_sums, tokens),
        *decay.args, do, k, v, pieces_in, *([q] if tokens else []))
    dq, qdq = dq if tokens else (dq, None)

    dk_shape, dv_shape = share(k, dim_k), share(v, dim_v)
    dkdv = functools.partial(_dkdv_kernel, c=c, precision=precision, scale=scale, tokens=tokens)
    if config.fuse_dkdv and bk == dim_k and bv == dim_v:
        outs = call(
            functools.partial(dkdv, with_dk=True, with_dv=True), (b, h, n, 1),
            [*decay.specs, _rows_spec(plan, dim_k, q_head, _zero), _rows_spec(plan, dim_k, k_head, _zero),
             _rows_spec(plan, dim_v, v_head, _zero), _rows_spec(plan, dim_v, _same, _zero),
             _state_spec(dim_k, dim_v, _zero, _zero)],
            [_rows_spec(plan, dim_k, _same, _zero), _rows_spec(plan, dim_v, _same, _zero)]
            + ([_row_sums_spec(plan, _zero)] if tokens else []),
            [dk_shape, dv_shape] + ([kernel_support.typed_like((b, h, 1, t), _F32, q)] if tokens else []),
            *decay.args, q, k, v, do, pieces_out)
        dk, dv = outs[:2]
        kdk = outs[2] if tokens else None
    else:
        outs = call(
            functools.partial(dkdv, with_dk=True, with_dv=False), (b, h, n, tile_k),
            [*decay.specs, _rows_spec(plan, bk, q_head, _same)]
            + ([_rows_spec(plan, bk, k_head, _same)] if tokens else [])
            + [_rows_spec(plan, dim_v, v_head, _zero), _rows_spec(plan, dim_v, _same, _zero),
               _state_spec(bk, dim_v, _same, _zero)],
            *_with_row_sums(_rows_spec(plan, bk, _same, _same), dk_shape, plan, row_sums, tokens),
            *decay.args, q, *([k] if tokens else []), v, do, pieces_out)
        dk, kdk = outs if tokens else (outs, None)
        dv = call(
            functools.partial(dkdv, with_dk=False, with_dv=True), (b, h, n, dim_v // bv),
            [*decay.specs, _rows_spec(plan, dim_k, q_head, _zero), _rows_spec(plan, dim_k, k_head, _zero),
             _rows_spec(plan, bv, _same, _same), _state_spec(dim_k, bv, _zero, _same)],
            _rows_spec(plan, bv, _same, _same), dv_shape,
            *decay.args, q, k, do, pieces_out)
    if not tokens:
        return dq, dk, dv
    return dq, dk, dv, jnp.sum(kdk, axis=2) - jnp.sum(qdq, axis=2)


def _grouped_heads(config: Config, x, y, h: int) -> int:
    """R_blk, the output heads per program of `_grouped_state_sums`, for x [B, T, Hx, Dx], y [B, T, Hy, Dy] and
    H = h output heads: the largest power of two up to config.grouped_heads dividing H / Hx whose [Dx, R_blk
    * Dy] float32 sum fits _GROUPED_STATE_FLOATS; 0 (the per-head kernel) when that is 1 or unless Hx < Hy == H."""
    hx, hy, dim_x, dim_y = x.shape[2], y.shape[2], x.shape[-1], y.shape[-1]
    if not hx < hy == h:
        return 0
    fits = [r for r in (2 ** i for i in range(1, config.grouped_heads.bit_length()))
            if (h // hx) % r == 0 and dim_x * r * dim_y <= _GROUPED_STATE_FLOATS]
    return max(fits, default=0)


def _grouped_state_sums(x, y, w, plan: pieces.Plan, config: Config, interpret: bool, r: int):
    """`_weighted_state_sums` for x of fewer heads than y and the output (`_grouped_heads`; GVA: Mamba-2's groups)
    by `_grouped_state_kernel`: one program per (R_blk heads, batch, x head, split of a piece), R_blk = r, the
    head blocks of one piece neighbouring launches (they read the same x rows). Each piece is cut into S splits
    (S a power of two dividing its chunks, the grid up to about config.target_programs: the R_blk heads of a
    program would otherwise leave SMs idle), their float32 sums added here, in the reshape and transpose of the
    [B, H / R_blk, P * S, Dx, R_blk * Dy] sums to [B, H, P, Dx, Dy]."""
    if not interpret and (r > 2 or config.grouped_warps < 8):
        raise ValueError(f"the grouped state pass with R_blk={r} heads and grouped_warps={config.grouped_warps} "
                         "fails Triton's compile on an H200 (a boolean tile staged in shared memory): use "
                         "Config.grouped_heads <= 2 and grouped_warps >= 8, or grouped_heads=1 (the per-head pass)")
    b, _, hx, dim_x = x.shape
    h, dim_y = w.shape[1], y.shape[-1]
    blocks = h // (hx * r)  # head blocks of one x head
    programs = blocks * b * hx * plan.pieces
    n_chunks = plan.piece_len // plan.chunk
    splits = max(s for s in (2 ** i for i in range(n_chunks.bit_length()))
                 if n_chunks % s == 0 and programs * s <= max(programs, config.target_programs)
                 and (s == 1 or n_chunks // s >= config.grouped_min_chunks))
    rows = plan.piece_len // splits
    stages = max(1, min(config.grouped_stages, _STAGE_BYTES // (plan.chunk * (dim_x + r * dim_y)
                                                                * jnp.dtype(x.dtype).itemsize)))
    head = lambda j, g: g * blocks + j
    sums = pl.pallas_call(
        functools.partial(_grouped_state_kernel, c=plan.chunk, precision=_precision(x.dtype),
                          one_dot=config.grouped_one_dot),
        grid=(blocks, b, hx, plan.pieces * splits),
        in_specs=[pl.BlockSpec((None, r, rows), lambda j, b, g, s: (b, head(j, g), s)),
                  pl.BlockSpec((None, rows, None, dim_x), lambda j, b, g, s: (b, s, g, 0)),
                  pl.BlockSpec((None, rows, r, dim_y), lambda j, b, g, s: (b, s, head(j, g), 0))],
        out_specs=pl.BlockSpec((None, None, None, dim_x, r * dim_y), lambda j, b, g, s: (b, head(j, g), s, 0, 0)),
        out_shape=kernel_support.typed_like((b, h // r, plan.pieces * splits, dim_x, r * dim_y), _F32, x),
        compiler_params=pl_triton.CompilerParams(num_warps=config.grouped_warps, num_stages=stages),
        interpret=interpret,
    )(w, x, y)
    sums = sums.reshape(b, h // r, plan.pieces, splits, dim_x, r, dim_y).sum(axis=3)
    return sums.transpose(0, 1, 4, 2, 3, 5).reshape(b, h, plan.pieces, dim_x, dim_y)


def _weighted_state_sums(x, y, w, plan: pieces.Plan, config: Config, interpret: bool):
    """`pieces_tokens.TokenBackend.state_sums_tokens`: sum_{t in p} w[b, h, t] x_t^T y_t [B, H, P, Dx, Dy]
    float32 (`_weighted_state_kernel`), tiled like `state_sums`; `_grouped_state_sums` where x has fewer heads
    than y and the output (`_grouped_heads`)."""
    b, h = w.shape[:2]
    r = _grouped_heads(config, x, y, h)
    if r:
        return _grouped_state_sums(x, y, w, plan, config, interpret, r)
    dim_x, dim_y = x.shape[-1], y.shape[-1]
    bx, by = min(config.state_block, dim_x), min(config.state_block, dim_y)
    ny = dim_y // by
    return _call(
        functools.partial(_weighted_state_kernel, c=plan.chunk, precision=_precision(x.dtype)),
        (b, h, plan.pieces, (dim_x // bx) * ny),
        [pl.BlockSpec((None, None, plan.piece_len), lambda b, h, p, j: (b, h, p)),
         _rows_spec(plan, bx, _head_map(h, x), lambda j: j // ny),
         _rows_spec(plan, by, _head_map(h, y), lambda j: j % ny)],
        _state_spec(bx, by, lambda j: j // ny, lambda j: j % ny),
        kernel_support.typed_like((b, h, plan.pieces, dim_x, dim_y), _F32, x),
        w, x, y, config=config, interpret=interpret)


# ---------------------------------------------------------------------------------------------------------
# What the kernels take, and the kernels as a `vjp.Impl` (whether a GPU is qualified for them: lasp_jax.ops.impls).


def supported(q, k, v, interpret: bool = False) -> str | None:
    """None when these kernels can run these inputs here (compiled: a CUDA GPU of compute capability >= 8.0),
    else the reason. Which GPUs, head dims and dtypes their GPU tests qualified is `impls.qualification`'s."""
    dtypes = {jnp.dtype(x.dtype) for x in (q, k, v)}
    if len(dtypes) != 1 or next(iter(dtypes)) not in {jnp.dtype(d) for d in DTYPES}:
        names = ", ".join(jnp.dtype(d).name for d in DTYPES)
        return f"q, k, v must share one dtype of {names}; got {sorted(map(str, dtypes))}"
    for name, d in (("Dk", q.shape[-1]), ("Dv", v.shape[-1])):
        if d not in HEAD_DIMS:
            return f"head dim {name}={d} is not one of {HEAD_DIMS}"
    if interpret:
        return None
    return kernel_support.triton_unavailable()


@dataclasses.dataclass(frozen=True)
class Kernels(pieces.Driven, pieces_tokens.DrivenTokens):
    """The Triton kernels under one Config as a `vjp.TokenImpl`, a `pieces.Backend` and a
    `pieces_tokens.TokenBackend` (hashable: a custom_vjp static). interpret: run them in Pallas interpret mode
    (any platform, slow; for tests), and the drivers' piece scans (`lasp_jax.ops.piece_scan_kernel`) too."""

    config: Config = DEFAULT
    interpret: bool = False

    def plan(self, q, v) -> pieces.Plan:
        return plan(q, v, self.config)

    def state_sums(self, x, y, rates, plan, *, reverse, scale):
        return state_sums(x, y, rates, plan, self.config, reverse=reverse, scale=scale, interpret=self.interpret)

    def output(self, q, k, v, rates, pieces_in, plan, scale):
        return _output(q, k, v, _constant_decay(rates), pieces_in, plan, self.config, self.interpret, scale)

    def grads(self, q, k, v, do, rates, pieces_in, pieces_out, plan, scale):
        return _grads(q, k, v, do, _constant_decay(rates), pieces_in, pieces_out, plan, self.config, self.interpret,
                      scale)

    def supported(self, q, k, v):
        return supported(q, k, v, self.interpret)

    def state_sums_tokens(self, x, y, w, plan):
        return _weighted_state_sums(x, y, w, plan, self.config, self.interpret)

    def output_tokens(self, q, k, v, tables, pieces_in, plan, scale):
        return _output(q, k, v, _token_decay(tables, plan), pieces_in, plan, self.config, self.interpret, scale)

    def grads_tokens(self, q, k, v, do, tables, pieces_in, pieces_out, plan, scale):
        return _grads(q, k, v, do, _token_decay(tables, plan), pieces_in, pieces_out, plan, self.config,
                      self.interpret, scale)

    def supported_tokens(self, q, k, v):
        return supported(q, k, v, self.interpret)


KERNELS = Kernels()
INTERPRET = Kernels(interpret=True)
