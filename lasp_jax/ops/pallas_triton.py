"""Fused Pallas kernels (Triton lowering) for the per-device contract: the LASP split, one level down.

One program per (batch, head, piece, tile) walks the chunks of its piece with the d_k x d_v state kept on chip.
A sequence of T positions is cut into P pieces of whole chunks, so that B * H * P * tiles programs fill the GPU
even at B = 1, H = 16 (one program per (batch, head) would leave most of it idle):

    forward   state pass   m_p   = sum_{x in p} lambda^(end_p - x) k_x^T v_x         (reads K, V)
              piece scan   S_p   = lambda^(L p) S_in + sum_{j < p} lambda^(L (p - 1 - j)) m_j   ([P, P], XLA)
              output pass  O     = chunkwise [(Q K^T) * M] V + lambda^i Q S, S walks   (reads Q, K, V, S_p)
    backward  mirrored:    d_p   = sum_{x in p} lambda^(x - start_p) q_x^T dO_x        (reads Q, dO)
              reverse scan G_p   = lambda^(L (P - 1 - p)) G + sum_{j > p} lambda^(L (j - p - 1)) d_j
              dQ walks forward with S from the saved S_p (reads dO, K, V); dK and dV walk backward with dS
              from G_p (read Q, K, V, dO), in one kernel when the whole state fits one tile, else one each.

The incoming state S_in and the end-state cotangent G (from another device, or the caller's initial and final
states) enter only the tiny piece scans, so lasp_attention costs no extra pass over the tokens. The piece
states S_p ([B, H, P, Dk, Dv] float32, a few MB) are the backward's residual, so it never re-reads K and V to
rebuild them.

Numerics: every product accumulates in float32; the state is float32 and is rounded to the input dtype only
as a matmul operand (bf16 inputs: one bf16 rounding of the state and of the decayed scores, as in fla); fp32
inputs use full-precision (IEEE, not tf32) matmuls. Powers of lambda are exp(-s * n) with n >= 0. The
attention's `scale` rides on the float32 tables: the intra-chunk mask (every score) and the q-side decay row
lambda^i (the output's and dQ's state terms, the Q, dO state pass and dS's update); the K, V side is unscaled.
q itself is never rescaled, so bf16 q is rounded once, as given. The mask selects (jnp.where), and so do the
piece scans: a non-finite q or k at a later position never reaches an earlier output.
T is zero-padded at the front to whole pieces when it is not already (zeros before the sequence change no
output or state); only such ragged T pays that copy, and, since the zeros would sit between S_in and the first
token, adds S_in's and G's terms with the separate products of `lasp_jax.ops.states` instead.

Platforms: the Triton lowering runs on CUDA GPUs; these kernels are offered only on the GPUs their tests
passed on (the H200 and the H100 80GB HBM3, sm_90). The A100 is expected to work through the same lowering but
is untested here, so `supported` refuses it (fail-closed: "auto" then takes the XLA path). On a GPU they take
bf16 and fp32 at head dims 64, 128 and 256 (what the GPU tests covered; fp32 at 128 and 256 on the H200 only;
others fall back).
`INTERPRET` runs the same kernels in Pallas interpret mode on any platform (CPU tests; also head dims 16 and
32 and float16). jax 0.11 deprecates the Pallas Triton backend (Mosaic GPU is its successor, Hopper and
later); it still lowers and runs in jax 0.11.2, with a DeprecationWarning at each lowering. On Hopper,
`Config.mosaic` runs the four walks (output, dQ, dK, dV) as `pallas_mosaic` kernels instead (whole states on
wgmma, TMA-fed), keeping these state passes and scans: impl "pallas_mosaic", offered on the H200 only (on the
H100 its GPU tests have not yet completed: benchmarks/results/KERNEL_NOTES.md).
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

from lasp_jax.ops import pallas_mosaic, states

_F32 = jnp.float32
_HIGHEST = lax.Precision.HIGHEST
# What the kernels run: powers of two the Triton dots take; on a GPU only what the GPU tests covered.
_HEAD_DIMS = (16, 32, 64, 128, 256)
_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
_GPU_HEAD_DIMS = (64, 128, 256)
_GPU_DTYPES = (jnp.bfloat16, jnp.float32)
# Exact device kinds where the GPU tests (tests/ops, `pytest -m gpu`) passed: fail-closed, so a sibling part
# (H100 PCIe, GH200, H800) is refused until its own run. fp32 at head dims 128 and 256 and the Mosaic walks
# (Config.mosaic) completed their tests on the H200 only.
_TESTED_GPUS = ("NVIDIA H200", "NVIDIA H100 80GB HBM3")
_WIDE_F32_TESTED_GPUS = ("NVIDIA H200",)
_MOSAIC_TESTED_GPUS = ("NVIDIA H200",)
_RATE_LANES = 16  # the decay rate travels as a [H, 16] row: a power-of-two block Triton can load
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
    deeper buffers cost). mosaic: None, or the Mosaic GPU walks' config (then the output, dQ, dK and dV passes
    are `pallas_mosaic.walk` kernels, Hopper only; its chunk must equal chunk; they launch one CTA per (batch,
    head, piece) of the same plan, whose pieces count the Triton head-dim tiles: half of target_programs at
    d=128, e.g. 128 CTAs at B=1, H=16; not tuned for the walks). interpret: run in Pallas interpret mode (any
    platform, slow; for tests), the Mosaic walks in Mosaic GPU's interpreter.

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
    mosaic: pallas_mosaic.Config | None = None
    interpret: bool = False

    def __post_init__(self):
        if self.mosaic is not None and self.mosaic.chunk != self.chunk:
            raise ValueError(f"mosaic.chunk={self.mosaic.chunk} must equal chunk={self.chunk} (one chunking for "
                             "the state passes and the walks)")


DEFAULT = Config()


# ---------------------------------------------------------------------------------------------------------
# Kernels. Refs hold one piece: [L, D] rows of one (batch, head), states [Dk or tile, Dv or tile] float32.


def _dot(a, b, precision):
    return jnp.dot(a, b, preferred_element_type=_F32, precision=precision)


def _decays(rate_ref, c, scale):
    """Decay tables of one head from its rate s: the causal mask (keep i >= j) with its weights
    scale lambda^(i - j), scale lambda^i (the q side's), lambda^(C - j) and lambda^C; every power exp(-s n), n >= 0."""
    s = jnp.max(rate_ref[...])
    i = jnp.arange(c, dtype=jnp.int32).astype(_F32)
    gap = i[:, None] - i[None, :]
    mask = _Mask(gap >= 0, scale * jnp.exp(-s * jnp.maximum(gap, 0.0)))
    return mask, scale * jnp.exp(-s * i), jnp.exp(-s * (c - i)), jnp.exp(-s * c)


@dataclasses.dataclass(frozen=True)
class _Mask:
    """The decayed causal mask of a chunk: scores at or before the diagonal times their weights, zero selected
    elsewhere (a non-finite later score is dropped, never multiplied by zero)."""

    keep: jax.Array
    weights: jax.Array

    def __call__(self, scores):
        return jnp.where(self.keep, scores * self.weights, 0.0)


def _weighted(x, w):
    """diag(w) x in x's dtype (a matmul operand)."""
    return (x.astype(_F32) * w[:, None]).astype(x.dtype)


def _state_kernel(rate_ref, x_ref, y_ref, out_ref, *, c, reverse, precision, scale):
    """Forward: sum_x lambda^(L - x) x_x^T y_x (K, V); reverse: scale sum_x lambda^x x_x^T y_x (Q, dO)."""
    n_chunks = x_ref.shape[0] // c
    _, q_decay, k_decay, chunk_decay = _decays(rate_ref, c, scale)
    w = q_decay if reverse else k_decay

    def chunk_sum(n):
        rows = pl.ds((n_chunks - 1 - n if reverse else n) * c, c)
        return _dot(_weighted(x_ref[rows, :], w).T, y_ref[rows, :], precision)

    # The first chunk starts the sum: zeros would not vary over shard_map's manual axes like the refs do.
    out_ref[...] = lax.fori_loop(1, n_chunks, lambda n, acc: chunk_decay * acc + chunk_sum(n), chunk_sum(0))


def _output_kernel(rate_ref, q_ref, k_ref, v_ref, s_ref, o_ref, *, c, precision, scale):
    """O = [(Q K^T) * M] V + scale lambda^i Q S per chunk (M carries the scale); S walks forward from the
    piece's incoming state."""
    n_chunks = q_ref.shape[0] // c
    mask, q_decay, k_decay, chunk_decay = _decays(rate_ref, c, scale)
    dt = q_ref.dtype

    def body(n, state):
        rows = pl.ds(n * c, c)
        q, k, v = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :]
        scores = mask(_dot(q, k.T, precision))
        o = _dot(scores.astype(dt), v, precision) + q_decay[:, None] * _dot(q, state.astype(dt), precision)
        o_ref[rows, :] = o.astype(o_ref.dtype)
        return chunk_decay * state + _dot(_weighted(k, k_decay).T, v, precision)

    lax.fori_loop(0, n_chunks, body, s_ref[...])


def _dq_kernel(rate_ref, do_ref, k_ref, v_ref, s_ref, dq_ref, *, c, precision, scale):
    """dQ = [(dO V^T) * M] K + scale lambda^i dO S^T; S (a Dk tile) walks forward."""
    n_chunks = do_ref.shape[0] // c
    mask, q_decay, k_decay, chunk_decay = _decays(rate_ref, c, scale)
    dt = k_ref.dtype

    def body(n, state):
        rows = pl.ds(n * c, c)
        do, k, v = do_ref[rows, :], k_ref[rows, :], v_ref[rows, :]
        a = mask(_dot(do, v.T, precision))
        dq = _dot(a.astype(dt), k, precision) + q_decay[:, None] * _dot(do, state.astype(dt).T, precision)
        dq_ref[rows, :] = dq.astype(dq_ref.dtype)
        return chunk_decay * state + _dot(_weighted(k, k_decay).T, v, precision)

    lax.fori_loop(0, n_chunks, body, s_ref[...])


def _dkdv_kernel(*refs, c, precision, scale, with_dk, with_dv):
    """dK = [(dO V^T) * M]^T Q + lambda^(C - j) V dS^T and dV = [(Q K^T) * M]^T dO + lambda^(C - j) K dS, dS
    walking backward from the piece's outgoing cotangent and gathering scale lambda^i Q^T dO (M carries the
    scale; the K, V side of the state terms does not). Refs: rate, Q, K (with_dv), V (with_dk), dO, G, then dK, dV.
    One of the two per Dk tile (dK) or Dv tile (dV) of dS, or both from the whole dS (Q and dO read once)."""
    refs = iter(refs)
    rate_ref, q_ref = next(refs), next(refs)
    k_ref = next(refs) if with_dv else None
    v_ref = next(refs) if with_dk else None
    do_ref, g_ref = next(refs), next(refs)
    dk_ref = next(refs) if with_dk else None
    dv_ref = next(refs) if with_dv else None
    n_chunks = q_ref.shape[0] // c
    mask, q_decay, k_decay, chunk_decay = _decays(rate_ref, c, scale)
    dt = q_ref.dtype

    def body(n, ds):
        rows = pl.ds((n_chunks - 1 - n) * c, c)
        q = q_ref[rows, :]
        k = k_ref[rows, :] if with_dv else None
        v = v_ref[rows, :] if with_dk else None
        do = do_ref[rows, :]
        ds_op = ds.astype(dt)
        if with_dk:
            a = mask(_dot(do, v.T, precision))
            dk = _dot(a.astype(dt).T, q, precision) + k_decay[:, None] * _dot(v, ds_op.T, precision)
            dk_ref[rows, :] = dk.astype(dk_ref.dtype)
        if with_dv:
            scores = mask(_dot(q, k.T, precision))
            dv = _dot(scores.astype(dt).T, do, precision) + k_decay[:, None] * _dot(k, ds_op, precision)
            dv_ref[rows, :] = dv.astype(dv_ref.dtype)
        return chunk_decay * ds + _dot(_weighted(q, q_decay).T, do, precision)

    lax.fori_loop(0, n_chunks, body, g_ref[...])


# ---------------------------------------------------------------------------------------------------------
# Launch plumbing.


@dataclasses.dataclass(frozen=True)
class _Plan:
    """How a call is cut: `pieces` pieces of `piece_len` positions after `pad` zero positions in front."""

    chunk: int
    pieces: int
    piece_len: int
    pad: int
    block_k: int
    block_v: int


def _plan(q, v, config: Config) -> _Plan:
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    c = config.chunk
    block_k, block_v = min(config.block_k, dk), min(config.block_v, dv)
    n_chunks = -(-t // c)
    want = max(1, -(-config.target_programs // (b * h * (dv // block_v))))
    want = max(1, min(want, n_chunks // config.min_piece_chunks))
    # Prefer a piece count that divides the chunks (no padding) unless it would halve the parallelism.
    pieces = next((p for p in range(want, (want - 1) // 2, -1) if n_chunks % p == 0), want)
    per_piece = -(-n_chunks // pieces)
    pieces = -(-n_chunks // per_piece)
    return _Plan(c, pieces, per_piece * c, pieces * per_piece * c - t, block_k, block_v)


def _front_pad(x, pad):
    return x if pad == 0 else jnp.pad(x, ((0, 0), (pad, 0), (0, 0), (0, 0)))


def _precision(dtype):
    return _HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _out(shape, dtype, like):
    """An output shape that varies over the same manual mesh axes as `like` (inside lasp_attention's
    shard_map, whose check_vma needs it)."""
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.typeof(like).manual_axis_type)


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


def _call(kernel, grid, in_specs, out_specs, out_shape, config: Config, *args):
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
        interpret=config.interpret,
    )(*args)


def _rates(s):
    return jnp.broadcast_to(s.astype(_F32)[:, None], (s.shape[0], _RATE_LANES))


def _rate_spec():
    return pl.BlockSpec((None, _RATE_LANES), lambda b, h, p, j: (h, 0))


def _rows_spec(plan, d_block, head, tile):
    """A piece of rows [L, d_block] of x [B, T, Hx, D]: head(h) picks the head, tile(j) the column block."""
    return pl.BlockSpec((None, plan.piece_len, None, d_block), lambda b, h, p, j: (b, p, head(h), tile(j)))


def _state_spec(rows_block, cols_block, row_tile, col_tile):
    return pl.BlockSpec((None, None, None, rows_block, cols_block),
                        lambda b, h, p, j: (b, h, p, row_tile(j), col_tile(j)))


def _same(h):
    return h


def _zero(_):
    return 0


def _piece_sums(x, y, s, plan: _Plan, config: Config, *, reverse, head, scale=1.0):
    """Per-piece state sums [B, H, P, Dx, Dy] float32 (see `_state_kernel`); head(h) picks x's and y's head."""
    b, h = x.shape[0], s.shape[0]
    dx, dy = x.shape[-1], y.shape[-1]
    bx, by = min(config.state_block, dx), min(config.state_block, dy)
    ny = dy // by
    kernel = functools.partial(_state_kernel, c=plan.chunk, reverse=reverse, precision=_precision(x.dtype),
                               scale=scale)
    return _call(
        kernel, (b, h, plan.pieces, (dx // bx) * ny),
        [_rate_spec(), _rows_spec(plan, bx, head, lambda j: j // ny), _rows_spec(plan, by, head, lambda j: j % ny)],
        _state_spec(bx, by, lambda j: j // ny, lambda j: j % ny),
        _out((b, h, plan.pieces, dx, dy), _F32, x),
        config, _rates(s), x, y)


def _prefix(m, s, plan, rows):
    """Exclusive decayed prefix over pieces: row r < P is the state entering piece r, row P the end state."""
    return states.weighted_sum(states.prefix_weights(s, plan.piece_len, rows, plan.pieces), m)


def _suffix(d, s, plan):
    """Exclusive decayed suffix over pieces: the state cotangent leaving each piece [B, H, P, Dk, Dv]."""
    w = states.prefix_weights(s, plan.piece_len, plan.pieces, plan.pieces)
    return states.weighted_sum(jnp.swapaxes(w, 1, 2), d)


def _kv_head(q, k):
    """Index map from query head to K/V head (GQA/MQA: K/V are indexed, never repeated)."""
    group = q.shape[2] // k.shape[2]
    return _same if group == 1 else (lambda h: h // group)


def _boundary_powers(s, plan: _Plan, from_end: bool):
    """[H, P] lambda^(L p) (how S_in reaches the start of piece p), or lambda^(L (P - 1 - p)) when from_end
    (how a cotangent at the end of the last piece reaches the end of piece p)."""
    p = jnp.arange(plan.pieces, dtype=_F32)
    n = plan.pieces - 1 - p if from_end else p
    return states.decay_pow(s[:, None], plan.piece_len * n[None, :])


def _with_boundary(per_piece, state, s, plan, from_end):
    """per_piece [B, H, P, Dk, Dv] (None: zeros) plus each piece's decayed share of state [B, H, Dk, Dv]."""
    if state is None:
        return per_piece
    term = _boundary_powers(s, plan, from_end)[None, :, :, None, None] * state[:, :, None].astype(_F32)
    return term if per_piece is None else per_piece + term


# ---------------------------------------------------------------------------------------------------------
# The per-device contract (lasp_jax.ops.vjp.Impl).


def forward(q, k, v, s, incoming=None, config: Config = DEFAULT, scale: float = 1.0):
    """One piece's attention from its incoming state: the state pass, the piece scan, the output pass.

    Args:
      q [B,T,H,Dk], k [B,T,Hkv,Dk], v [B,T,Hkv,Dv], s [H] float32; incoming: None (S_in = 0) or a function from
      the piece's end state from zero to S_in [B,H,Dk,Dv] (a collective in lasp_attention).
    Returns:
      o [B,T,H,Dv] in q.dtype; m [B,H,Dk,Dv] float32 (the end state from zero); S_in or None; and what
      `backward` needs: the state entering each kernel piece [B,H,P,Dk,Dv] float32, and S_in when T is
      ragged (front zeros sit between S_in and the first token, so S_in is then added by `states` instead).
    """
    b, _, h, dk = q.shape
    dv = v.shape[-1]
    plan = _plan(q, v, config)
    q_pad, k_pad, v_pad = (_front_pad(x, plan.pad) for x in (q, k, v))
    kv_head = _kv_head(q, k)
    sums = _piece_sums(k_pad, v_pad, s, plan, config, reverse=False, head=kv_head)
    rows = _prefix(sums, s, plan, plan.pieces + 1)
    m = rows[:, :, plan.pieces]
    s_in = None if incoming is None else incoming(m)
    fused = plan.pad == 0
    # One piece: nothing enters it from other pieces (and the state pass is dropped unless m is used).
    from_zero = rows[:, :, :plan.pieces] if plan.pieces > 1 else None
    pieces_in = _with_boundary(from_zero, s_in if fused else None, s, plan, from_end=False)
    if pieces_in is None:
        pieces_in = jnp.zeros((b, h, 1, dk, dv), _F32)
    if config.mosaic is not None:
        o = pallas_mosaic.walk(q_pad, k_pad, v_pad, s, pieces_in, plan.piece_len, reverse=False, scale=scale,
                               config=_mosaic(config))
    else:
        bv = plan.block_v
        o = _call(
            functools.partial(_output_kernel, c=plan.chunk, precision=_precision(q.dtype), scale=scale),
            (b, h, plan.pieces, dv // bv),
            [_rate_spec(), _rows_spec(plan, dk, _same, _zero), _rows_spec(plan, dk, kv_head, _zero),
             _rows_spec(plan, bv, kv_head, _same), _state_spec(dk, bv, _zero, _same)],
            _rows_spec(plan, bv, _same, _same),
            _out(q_pad.shape[:3] + (dv,), q.dtype, q),
            config, _rates(s), q_pad, k_pad, v_pad, pieces_in)
    o = o[:, plan.pad:]
    unfused_s_in = None if fused else s_in
    if unfused_s_in is not None:
        o = (o.astype(_F32) + states.apply_state(q, s, unfused_s_in, scale)).astype(q.dtype)
    return o, m, s_in, (pieces_in, unfused_s_in)


def backward(q, k, v, s, saved, do, outgoing=None, config: Config = DEFAULT, scale: float = 1.0):
    """Cotangents of `forward`: the Q, dO state pass and its reverse piece scan, then dQ and dK, dV.

    Args:
      q, k, v, s as for `forward`; saved: `forward`'s last return; do [B,T,H,Dv]; outgoing: None (G = 0) or a
      function from d (the cotangent of S_in) to G (the cotangent of the end state) [B,H,Dk,Dv].
    Returns:
      dq, dk, dv in the input dtypes, and d [B,H,Dk,Dv] float32.
    """
    pieces_in, unfused_s_in = saved
    b, _, h, dk = q.shape
    hkv, dv = k.shape[2], v.shape[-1]
    group = h // hkv
    plan = _plan(q, v, config)
    fused = plan.pad == 0
    do = do.astype(q.dtype)
    q_pad, k_pad, v_pad, do_pad = (_front_pad(x, plan.pad) for x in (q, k, v, do))
    sums = _piece_sums(q_pad, do_pad, s, plan, config, reverse=True, head=_same, scale=scale)
    if fused:
        d = jnp.einsum("hp,bhpde->bhde", _boundary_powers(s, plan, from_end=False), sums, precision=_HIGHEST)
    else:
        d = states.query_state_grad(q, do, s, scale)
    g = None if outgoing is None else outgoing(d)
    pieces_out = _with_boundary(_suffix(sums, s, plan) if plan.pieces > 1 else None, g if fused else None, s, plan,
                                from_end=True)
    if pieces_out is None:
        pieces_out = jnp.zeros((b, h, 1, dk, dv), _F32)

    if config.mosaic is not None:
        dq, dk_, dv_ = _mosaic_grads(q_pad, k_pad, v_pad, do_pad, s, pieces_in, pieces_out, plan, config, scale)
    else:
        dq, dk_, dv_ = _triton_grads(q_pad, k_pad, v_pad, do_pad, s, pieces_in, pieces_out, plan, config, group,
                                     scale)
    dq, dk_, dv_ = dq[:, plan.pad:], dk_[:, plan.pad:], dv_[:, plan.pad:]
    if group > 1:
        dk_ = dk_.reshape(b, -1, hkv, group, dk).sum(3)
        dv_ = dv_.reshape(b, -1, hkv, group, dv).sum(3)
    if unfused_s_in is not None:
        dq = dq.astype(_F32) + states.apply_state_dq(do, s, unfused_s_in, scale)
    if g is not None and not fused:
        dk_end, dv_end = states.end_state_grads(k, v, s, g)
        dk_, dv_ = dk_.astype(_F32) + dk_end, dv_.astype(_F32) + dv_end
    return dq.astype(q.dtype), dk_.astype(k.dtype), dv_.astype(v.dtype), d


def _mosaic(config: Config) -> pallas_mosaic.Config:
    return dataclasses.replace(config.mosaic, interpret=config.interpret)


def _mosaic_grads(q, k, v, do, s, pieces_in, pieces_out, plan: _Plan, config: Config, scale):
    """dQ, dK, dV as Mosaic walks: each backward product is the output pass's shape with other roles (dQ walks
    forward with S^T over (dO, V, K); dV and dK walk backward with dS over (K, Q, dO) and dS^T over (V, dO, Q))."""
    walk = functools.partial(pallas_mosaic.walk, s=s, piece_len=plan.piece_len, scale=scale, config=_mosaic(config))
    transposed = functools.partial(jnp.swapaxes, axis1=-1, axis2=-2)
    dq = walk(do, v, k, states_in=transposed(pieces_in), reverse=False)
    dv = walk(k, q, do, states_in=pieces_out, reverse=True, scale_update=True)
    dk = walk(v, do, q, states_in=transposed(pieces_out), reverse=True, scale_update=True)
    return dq, dk, dv


def _triton_grads(q_pad, k_pad, v_pad, do_pad, s, pieces_in, pieces_out, plan: _Plan, config: Config, group, scale):
    """dQ, dK, dV (dK and dV in float32 per query head under GQA) from the Triton kernels."""
    b, h, dk, dv = q_pad.shape[0], q_pad.shape[2], q_pad.shape[-1], v_pad.shape[-1]
    kv_head = _kv_head(q_pad, k_pad)
    precision = _precision(q_pad.dtype)
    c, bk, bv, pieces = plan.chunk, plan.block_k, plan.block_v, plan.pieces
    rates = _rates(s)
    dq = _call(
        functools.partial(_dq_kernel, c=c, precision=precision, scale=scale), (b, h, pieces, dk // bk),
        [_rate_spec(), _rows_spec(plan, dv, _same, _zero), _rows_spec(plan, bk, kv_head, _same),
         _rows_spec(plan, dv, kv_head, _zero), _state_spec(bk, dv, _same, _zero)],
        _rows_spec(plan, bk, _same, _same),
        _out(q_pad.shape, q_pad.dtype, q_pad),
        config, rates, do_pad, k_pad, v_pad, pieces_in)

    # With GQA each query head writes its own share in float32; `backward` sums each group once.
    grad_dtype = k_pad.dtype if group == 1 else _F32
    dk_shape = _out(q_pad.shape, grad_dtype, q_pad)
    dv_shape = _out(q_pad.shape[:3] + (dv,), grad_dtype, q_pad)
    if config.fuse_dkdv and bk == dk and bv == dv:
        dk_, dv_ = _call(
            functools.partial(_dkdv_kernel, c=c, precision=precision, scale=scale, with_dk=True, with_dv=True),
            (b, h, pieces, 1),
            [_rate_spec(), _rows_spec(plan, dk, _same, _zero), _rows_spec(plan, dk, kv_head, _zero),
             _rows_spec(plan, dv, kv_head, _zero), _rows_spec(plan, dv, _same, _zero),
             _state_spec(dk, dv, _zero, _zero)],
            [_rows_spec(plan, dk, _same, _zero), _rows_spec(plan, dv, _same, _zero)],
            [dk_shape, dv_shape],
            config, rates, q_pad, k_pad, v_pad, do_pad, pieces_out)
    else:
        dk_ = _call(
            functools.partial(_dkdv_kernel, c=c, precision=precision, scale=scale, with_dk=True, with_dv=False),
            (b, h, pieces, dk // bk),
            [_rate_spec(), _rows_spec(plan, bk, _same, _same), _rows_spec(plan, dv, kv_head, _zero),
             _rows_spec(plan, dv, _same, _zero), _state_spec(bk, dv, _same, _zero)],
            _rows_spec(plan, bk, _same, _same), dk_shape,
            config, rates, q_pad, v_pad, do_pad, pieces_out)
        dv_ = _call(
            functools.partial(_dkdv_kernel, c=c, precision=precision, scale=scale, with_dk=False, with_dv=True),
            (b, h, pieces, dv // bv),
            [_rate_spec(), _rows_spec(plan, dk, _same, _zero), _rows_spec(plan, dk, kv_head, _zero),
             _rows_spec(plan, bv, _same, _same), _state_spec(dk, bv, _zero, _same)],
            _rows_spec(plan, bv, _same, _same), dv_shape,
            config, rates, q_pad, k_pad, do_pad, pieces_out)
    return dq, dk_, dv_


def supported(q, k, v, config: Config = DEFAULT) -> str | None:
    """None when these kernels can run these inputs here, else the reason (then "auto" falls back to XLA)."""
    head_dims, dtypes_ok = (_HEAD_DIMS, _DTYPES) if config.interpret else (_GPU_HEAD_DIMS, _GPU_DTYPES)
    dtypes = {jnp.dtype(x.dtype) for x in (q, k, v)}
    if len(dtypes) != 1 or next(iter(dtypes)) not in {jnp.dtype(d) for d in dtypes_ok}:
        names = ", ".join(jnp.dtype(d).name for d in dtypes_ok)
        return f"q, k, v must share one dtype of {names}; got {sorted(map(str, dtypes))}"
    for name, d in (("Dk", q.shape[-1]), ("Dv", v.shape[-1])):
        if d not in head_dims:
            return f"head dim {name}={d} is not one of {head_dims}"
    if config.mosaic is not None and (reason := pallas_mosaic.supported(q, k, v, _mosaic(config))) is not None:
        return f"the Mosaic walks: {reason}"
    if config.interpret:
        return None
    if jax.default_backend() != "gpu":
        return f"the Triton lowering needs a CUDA GPU (backend here: {jax.default_backend()}); INTERPRET runs anywhere"
    kind = jax.devices()[0].device_kind
    if config.mosaic is not None and kind not in _MOSAIC_TESTED_GPUS:
        return (f"the Mosaic walks are untested on {kind!r}: they completed their GPU tests on "
                f"{_MOSAIC_TESTED_GPUS} only (run `pytest -m gpu tests/ops` there first)")
    if kind not in _TESTED_GPUS:
        return (f"untested on {kind!r}: these kernels passed their GPU tests on {_TESTED_GPUS} only "
                "(the Triton lowering is expected to run on other CUDA GPUs, e.g. A100: run "
                "`pytest -m gpu tests/ops` there first)")
    wide_f32 = jnp.dtype(q.dtype) == jnp.float32 and max(q.shape[-1], v.shape[-1]) > 64
    if wide_f32 and kind not in _WIDE_F32_TESTED_GPUS:
        return (f"fp32 at head dims above 64 is untested on {kind!r}: it passed its GPU tests on "
                f"{_WIDE_F32_TESTED_GPUS} only (cases d128_f32 and d256_f32 of `pytest -m gpu tests/ops`)")
    return None


@dataclasses.dataclass(frozen=True)
class Kernels:
    """These kernels under one Config, as a `vjp.Impl` (hashable: a custom_vjp static)."""

    config: Config = DEFAULT
    partitionable = False  # pallas_call has no sharding rule: per device only (lasp_attention's shard_map)

    def forward(self, q, k, v, s, incoming, scale=1.0):
        return forward(q, k, v, s, incoming, self.config, scale)

    def backward(self, q, k, v, s, saved, do, outgoing, scale=1.0):
        return backward(q, k, v, s, saved, do, outgoing, self.config, scale)

    def supported(self, q, k, v):
        return supported(q, k, v, self.config)


KERNELS = Kernels()
INTERPRET = Kernels(dataclasses.replace(DEFAULT, interpret=True))
MOSAIC = Kernels(dataclasses.replace(DEFAULT, mosaic=pallas_mosaic.DEFAULT))
MOSAIC_INTERPRET = Kernels(dataclasses.replace(MOSAIC.config, interpret=True))
