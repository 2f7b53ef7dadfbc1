"""The piece scans of the fused kernel path as one Pallas kernel (Triton lowering): the recurrence over the pieces.

`lasp_jax.ops.pieces` carries each piece's state sum to the pieces after it (the forward) and each piece's
cotangent sum to the pieces before it (the backward). As a recurrence over the P pieces of one (batch, head):

    forward   S_0 = 0,      S_1 = m_0,          S_(p+1) = dec(a_p, S_p) + m_p   out[p] = S_p, end = S_P
    reverse   G_(P-1) = 0,  G_(P-2) = d_(P-1),  G_(p-1) = dec(a_p, G_p) + d_p   out[p] = G_p, end = G_(-1)

with dec(a, x) = where(a == 0, 0, a x) (states.decayed's rule): a piece passing nothing (a document starts in it, or
its decay is exactly 0) cuts the chain, so a NaN or inf sum never crosses it, while a NaN decay is no cut and keeps
the NaN going. A non-finite sum reaches only the pieces after its own (before it, reverse), elementwise. `end` is
the sums carried to the call's boundary: the end state from zero (forward) or the cotangent of the incoming state
(reverse). The first piece's decay (the last's, reverse) multiplies nothing (the zero state entering it), so a NaN
there does not reach the next piece's state, exactly as in the products S_p = sum_{j < p} (prod_{j < q < p} a_q)
m_j. Given `against` (states [B, H, P, Dk, Dv]; reverse), the pass also gives dots[p] = <against[p + 1], out[p]> (0
for the last piece): with the states entering the pieces against the reverse scan, the decay gradient's crossing
terms <S_(p+1), G_p> (pieces_tokens), without a separate pass over both.

Cost: one program per (batch, head, row tile of Dk) holds a [block, Dv] float32 tile and loops over the pieces in
order, reading each sum once and writing each exclusive state once: 2 x 4 x B H P Dk Dv bytes in all, the floor of
the scan (3 x with `against`, read once too). The former XLA form (a [P, P] x [P, Dk Dv] matmul at full float32
precision plus the routing of the non-finite parts) took about 9x its floor on an H200 at P = 128 (0.57 ms against
0.064, B = 1, H = 16, d = 128; benchmarks/profile_pieces.py). The programs' count, B x H x Dk / block, is the
parallelism; `block` defaults to the tile that gives about TARGET_PROGRAMS programs (not tuned on a GPU yet).

Numerics: float32 throughout; each product of decays is built one factor at a time (a_p a_(p+1) ... applied to
the running state), where the XLA form took exp(-(a sum of log decays)): the two agree to float32 rounding (a few
ulp per piece), and a product that underflows to 0 across several pieces does so in both (no cut either way: the
cut is per piece, by its own decay). Runs compiled on CUDA GPUs of compute capability 8.0 or newer, and anywhere
with interpret=True (Pallas interpret mode; CPU tests).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from lasp_jax.ops import kernel_support

_F32 = jnp.float32
TARGET_PROGRAMS = 256  # programs per launch the default tile aims at (an H200 has 132 SMs)
MIN_BLOCK = 8  # fewest Dk rows per program: [8, Dv] float32 loads of 4 KB at Dv = 128
# Largest default tile, in float32 elements: the tiles that have run on an H200 (2026-11-30: [8, 128] at B = 1,
# H = 16, up to [32, 64] in Mamba-2 1.3B's step); larger ones (all of Dk at B x H >= 256) would hold [Dk, Dv]
# float32 per 4-warp program plus NUM_STAGES staged loads of that size: untested, so the default stops here.
MAX_TILE = 2048
NUM_WARPS = 4
NUM_STAGES = 3  # the pipeline depth of the loads of the next pieces' sums (they do not depend on the state)


def default_block(b: int, h: int, dk: int, dv: int) -> int:
    """The Dk rows per program: the largest power-of-two divisor of dk that still gives about TARGET_PROGRAMS
    programs over B x H, with tiles of at most MAX_TILE elements, down to MIN_BLOCK rows (or fewer where dk's
    largest power-of-two divisor is smaller)."""
    block = dk & -dk  # the largest power of two dividing dk (Triton blocks are powers of two)
    while block > MIN_BLOCK and (b * h * (dk // block) < TARGET_PROGRAMS or block * dv > MAX_TILE):
        block //= 2
    return block


def _scan_kernel(*refs, reverse: bool, dots: bool):
    """One (batch, head, Dk tile): a_ref [P] float32 decays, x_ref [P, block, Dv] float32 sums, (dots: against_ref
    [P, block, Dv]); writes the exclusive running states out_ref [P, block, Dv], the state after the last piece
    end_ref [block, Dv] and (dots) dots_ref [P], the tile's share of <against[p + 1], out[p]>."""
    if dots:
        a_ref, x_ref, against_ref, out_ref, end_ref, dots_ref = refs
    else:
        (a_ref, x_ref, out_ref, end_ref), against_ref, dots_ref = refs, None, None
    n = x_ref.shape[0]
    first = n - 1 if reverse else 0
    # The first piece enters from zero and passes its sum on as it is: its decay multiplies nothing (a NaN one
    # included, as in the products of the formula: S_1 = m_0).
    out_ref[first] = jnp.zeros(end_ref.shape, _F32)
    if dots:
        dots_ref[first] = jnp.float32(0.0)  # reverse: the last piece has no next state

    def body(i, state):
        p = n - 1 - i if reverse else i
        out_ref[p] = state
        if dots:
            dots_ref[p] = jnp.sum(against_ref[p + 1] * state)
        a = a_ref[p]
        return jnp.where(a == 0, 0.0, a * state) + x_ref[p]

    end_ref[...] = lax.fori_loop(1, n, body, x_ref[first])


def scan(sums, decays, *, reverse: bool, interpret: bool, block: int | None = None, against=None):
    """The exclusive decayed running sums over the pieces and the carried total (module docstring).

    Args:
      sums: [B, H, P, Dk, Dv] float32, each piece's sum (m_p, or d_p when reverse).
      decays: [B, H, P] float32, each piece's decay a_p (exp of minus a log decay >= 0: in [0, 1], or NaN).
      reverse: run from the last piece to the first (the cotangents).
      interpret: Pallas interpret mode (any platform) instead of the compiled Triton kernel (a CUDA GPU).
      block: Dk rows per program (a power of two dividing Dk); None: `default_block`.
      against: None, or (reverse only) states [B, H, P, Dk, Dv] float32 to dot with out (module docstring).
    Returns:
      (out [B, H, P, Dk, Dv] float32: S_p or G_p, end [B, H, Dk, Dv] float32: S_P, or G_(-1) when reverse), and
      given against, dots [B, H, P] float32: <against[p + 1], out[p]>, 0 for the last piece (float32 sums of
      each tile's products, then over the tiles). One piece (P = 1) launches nothing: out is 0, end the sum.
    """
    if sums.ndim != 5:
        raise ValueError(f"sums must be [B, H, P, Dk, Dv] (5 dims); got shape {sums.shape}")
    b, h, n, dk, dv = sums.shape
    if decays.shape != (b, h, n):
        raise ValueError(f"decays must be [B, H, P] = {(b, h, n)} for sums of shape {sums.shape}; got {decays.shape}")
    block = default_block(b, h, dk, dv) if block is None else block
    if block <= 0 or block & (block - 1) or dk % block:
        raise ValueError(f"block must be a power of two dividing Dk={dk}; got {block}")
    if against is not None and (not reverse or against.shape != sums.shape):
        raise ValueError(f"against is for the reverse scan, of the sums' shape {sums.shape}; got {against.shape} "
                         f"(reverse={reverse})")
    if n == 1:  # nothing to carry: no launch (and no state pass kept alive for it when `end` goes unused)
        zero = jnp.zeros(sums.shape, _F32)
        return (zero, sums[:, :, 0].astype(_F32)) + ((jnp.zeros((b, h, 1), _F32),) if against is not None else ())
    tiles = dk // block
    typed = lambda shape: kernel_support.typed_like(shape, _F32, sums)  # noqa: E731
    states = pl.BlockSpec((None, None, n, block, dv), lambda i, j, r: (i, j, 0, r, 0))
    dots = against is not None
    got = pl.pallas_call(
        functools.partial(_scan_kernel, reverse=reverse, dots=dots),
        grid=(b, h, tiles),
        in_specs=[pl.BlockSpec((None, None, n), lambda i, j, r: (i, j, 0)), states] + ([states] if dots else []),
        out_specs=[states, pl.BlockSpec((None, None, block, dv), lambda i, j, r: (i, j, r, 0))]
        + ([pl.BlockSpec((None, None, None, n), lambda i, j, r: (i, j, r, 0))] if dots else []),
        out_shape=[typed(sums.shape), typed((b, h, dk, dv))] + ([typed((b, h, tiles, n))] if dots else []),
        compiler_params=pl_triton.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
        interpret=interpret,
    )(decays.astype(_F32), sums.astype(_F32), *([against.astype(_F32)] if dots else []))
    if not dots:
        return tuple(got)
    out, end, partial = got
    return out, end, jnp.sum(partial, axis=2)
