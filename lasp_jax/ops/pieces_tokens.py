"""The piece driver of the fused kernels under per-token decay and packed documents (`pieces`, generalised).

The same LASP split one level down as `pieces` (read it first): a call of T positions is cut into P pieces of
whole chunks (`pieces.Plan`), one kernel program per (batch, head, piece, ...) walks its piece's chunks with the
state on chip, and only [P]-long scans over the pieces' states run between the passes. With per-token rates s_t
and document starts the decay is no longer a power of one lambda, so everything a kernel needs about it comes
in as float32 tables computed here in XLA (`ChunkTables`, `PieceWeights`), and the piece scans take each
piece's own log-decay [B, H, P] (+inf where a document starts in the piece):

    forward   state pass   m_p = sum_{x in p} w_x k_x^T v_x,   w = PieceWeights.to_end    (state_sums_tokens)
              piece scan   S_p = the state entering piece p, from S_in and the m_j, j < p  (pieces.entering)
              output walk  o   = the chunk walk from S_p                                  (output_tokens)
    backward  state pass   d_p = sum_{x in p} w_x q_x^T dO_x,  w = scale PieceWeights.from_start
              reverse scan G_p = the cotangent leaving piece p, from G and the d_j, j > p   (pieces.leaving)
              dQ walks forward from S_p, dK and dV backward from G_p, and each row's k.dk - q.dq (grads_tokens)

State convention (states.TokenDecay): the state after a position, H_t = exp(-s_t) H_(t-1) + k_t^T v_t, reset to
k_t^T v_t where a document starts. T is zero-padded at the front to whole pieces with rates 0 and no starts:
zero keys and values add nothing, and a rate of 0 decays nothing, so S_in and G enter the piece scans even
for a ragged T (unlike the constant path, no separate products).

Decay gradient (the fused form of vjp.attend_tokens'): ds_u is minus the sum of the pair terms that cross u
(the pairs (r, t) with r < u <= t in one document, those from S_in to t >= u, those from r < u to the end
state's cotangent G, and S_in's to G). With x_t = k_t . dk_t - q_t . dq_t per output head, from the kernels' full
float32 dq and dk (the S_p terms in dq, the G_p terms in dk: every pair of the call once in a k.dk and once in a
q.dq), the sum of x_t over t in [u, E] (E >= u, u and E in one document) counts the pairs from [u, E] to after
E minus those from before u to [u, E]; subtracting every pair that crosses E leaves minus the pairs that cross
u. Per piece p (E its end, or the end of u's document if sooner; the pairs that cross a piece's end are the
state leaving it against that state's cotangent, restricted to the piece's last document):

    ds_u = sum_{t >= u, t in u's piece and document} x_t  -  [u in p's last document] <S_(p+1), G_p>,
    0 at a document start,

S_(p+1) the state leaving piece p (pieces_in[p + 1]; for the last piece the end state S_end = m + a S_in) and G_p
its cotangent (pieces.leaving's [p]; for the last piece G). <S, G> is exactly 0 where the next piece starts a
document (G_p is then 0). The reverse scan's kernel dots each G_p from zero with S_(p+1) as it writes it, so these
terms cost no pass of their own over the piece states but G's share (`crossing_terms`). One piece (P = 1) gives the
whole-document form. Precision: each x_t carries the kernels' rounding (bf16 MMA operands in dq and dk), and
a suffix sum of them keeps it near the other gradients' only because every pair term that crosses a chunk
boundary, which appears once in a q . dq and once in a k . dk, cancels there as in exact arithmetic: the dQ and dK
walks round those terms alike (`pallas_triton._dq_kernel`'s docstring). Before they did, the error grew like the
square root of the summed length (whole documents of 64K: 6.8e-2 against float32 on an H200, where the other
gradients had 2.4e-3), and pieces were cut to 512 positions to bound it; now the sums run over the backend's
own pieces (a Mamba-2 1.3B SSD layer on an H200, T = 64K, 16 documents: the rates' gradient 1.9e-3 at pieces of
512 and at the backend's plan, 4 pieces of 16K, alike; forward+backward 7.03 ms on the Mosaic walks at that
plan against 8.58 at pieces of 512; benchmarks/results/walks_gpu_h200_s17.md). Every sum is float32.

Numerics: every table is float32 and every exponent is minus a sum of rates (a chunk-local or piece-local
running sum of its own, never a difference of two long sums), so each factor is exp of something <= 0; the
kernels' intra-chunk weights are exp(-max(bc_i - bc_j, 0)) of two chunk-local sums. Document masks select.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp

from lasp_jax.ops import pieces, states

_F32 = jnp.float32


class ChunkTables(NamedTuple):
    """What the walks need about the decay, per chunk of C positions (T the padded length; `TokenBackend`
    gives the walks). Every row of a (batch, head) is contiguous, so a chunk is one [C] load per table.

    cum     [B, H, T] float32  bc_i = s_(start of i's chunk) + ... + s_i, the chunk-local inclusive running sum.
    counts  [B, T] int32       document starts in [0, t]: i and j of one chunk are in one document iff equal.
    q_side  [B, H, T] float32  exp(-bc_i) where no document starts in [start of i's chunk, i], else 0: how the
                               state entering the chunk reaches i (UNSCALED: the kernel multiplies by scale).
                               Its value at a chunk's last position is the chunk decay: exp(-bc_(C-1)) where
                               no document starts in the chunk, else 0 (the walks' S <- decay S + ...).
    k_side  [B, H, T] float32  exp(-ec_j), ec_j = s_(j+1) + ... + s_(C-1) (its own reverse sum), where j is in
                               the chunk's last document, else 0: j's share of the state leaving the chunk.

    Intra-chunk pair weight M[i, j] = scale exp(-max(bc_i - bc_j, 0)) where j <= i and counts_i == counts_j,
    else 0 by a select.
    """

    cum: jax.Array
    counts: jax.Array
    q_side: jax.Array
    k_side: jax.Array


class PieceWeights(NamedTuple):
    """Per-position weights of the state passes and the pieces' decays (T padded, P pieces of L positions).

    to_end      [B, H, T] float32  exp(-(s_(x+1) + ... + s_(end of x's piece))) where no document starts in
                                   (x, end], else 0: x's share of its piece's state m_p.
    from_start  [B, H, T] float32  exp(-(s_(start of x's piece) + ... + s_x)) where no document starts in
                                   [start, x], else 0: how the state entering the piece reaches x (unscaled).
    log_decay   [B, H, P] float32  the piece's rate sum, +inf where a document starts in it: S leaving piece p
                                   = exp(-log_decay_p) S entering it + m_p.
    """

    to_end: jax.Array
    from_start: jax.Array
    log_decay: jax.Array


class Saved(NamedTuple):
    """The forward's residual besides q, k, v and the TokenDecay: the state entering each piece [B, H, P, Dk,
    Dv] float32, the end state from zero m and S_in (None: zero), both [B, H, Dk, Dv] float32."""

    pieces_in: jax.Array
    m: jax.Array
    s_in: jax.Array | None


class TokenBackend(Protocol):
    """A kernel family's passes under per-token decay, over front-padded inputs (T = P * piece_len; q, k, v of
    Hq, Hk, Hv heads and dO of H = max(Hq, Hv), as in pieces.Backend: output head h reads head h // (H / Hx) of
    each input; tables per output head). `plan` and `interpret` are pieces.Backend's."""

    interpret: bool

    def plan(self, q, v) -> pieces.Plan:
        """How these inputs are cut into pieces."""

    def state_sums_tokens(self, x, y, w, plan: pieces.Plan) -> jax.Array:
        """Per-piece weighted sums [B, H, P, Dx, Dy] float32: out[b, h, p] = sum_{t in p} w[b, h, t] x_t^T y_t,
        x [B, T, Hx, Dx], y [B, T, Hy, Dy] (read at heads h // (H / Hx), h // (H / Hy)), w [B, H, T] float32
        (any weights: the driver passes PieceWeights.to_end for K, V and scale * from_start for Q, dO)."""

    def output_tokens(self, q, k, v, tables: ChunkTables, pieces_in, plan: pieces.Plan, scale: float) -> jax.Array:
        """o [B, T, H, Dv] in q.dtype. Per (b, h, piece), chunks in order, S from pieces_in [B, H, P, Dk, Dv]:
        o_i = sum_{j} M[i, j] (q_i . k_j) v_j + scale q_side_i (q_i S);  S <- q_side_(C-1) S + sum_j k_side_j
        k_j^T v_j."""

    def grads_tokens(self, q, k, v, do, tables: ChunkTables, pieces_in, pieces_out, plan: pieces.Plan,
                     scale: float) -> tuple[jax.Array, ...]:
        """(dq [B, T, H, Dk], dk [B, T, H, Dk], dv [B, T, H, Dv], x [B, H, T] float32).

        Each gradient per OUTPUT head (in its input's dtype where the input has all H heads; else float32 or
        the input's dtype, the Mosaic walks' bf16 shares: the driver sums each input head's shares in float32,
        `pieces.input_heads`). S walks
        forward from pieces_in, G backward from pieces_out (the cotangent of the state leaving each piece):
          dq_i = sum_j M[i, j] (dO_i . v_j) k_j + scale q_side_i (dO_i S^T)
          dk_j = sum_i M[i, j] (dO_i . v_j) q_i + k_side_j (v_j G^T)
          dv_j = sum_i M[i, j] (q_i . k_j) dO_i + k_side_j (k_j G);   G <- q_side_(C-1) G + scale sum_i q_side_i
          q_i^T dO_i
        x_t = k_t . dk_t - q_t . dq_t per output head from the float32 values of dk and dq before they are
        rounded to any output dtype (the decay gradient's terms; q_t and k_t are the rows of the heads it reads)."""


def _padded(tok: states.TokenDecay, plan: pieces.Plan):
    """(rates [B, H, T] float32, starts [B, T] bool) front-padded by plan.pad with rates 0 and no starts."""
    rates = jnp.moveaxis(tok.rates.astype(_F32), 1, 2)
    return (jnp.pad(rates, ((0, 0), (0, 0), (plan.pad, 0))),
            jnp.pad(tok.starts, ((0, 0), (plan.pad, 0))))


def _blocks(x, size):
    """[..., T] -> [..., T / size, size]."""
    return x.reshape(*x.shape[:-1], -1, size)


def _suffix_exclusive(x):
    """sum of the later entries along the last axis (its own reverse running sum)."""
    later = jnp.pad(x[..., 1:], [(0, 0)] * (x.ndim - 1) + [(0, 1)])
    return jnp.flip(jnp.cumsum(jnp.flip(later, -1), axis=-1), -1)


def _block_tables(rates, counts, size):
    """(inclusive running sum, q-side weight, k-side weight, whether a document starts in the block) over blocks
    of `size` positions: rates [B, H, T], counts [B, T] (starts in [0, t]) -> [B, H, T / size, size] x 3 and
    [B, T / size]."""
    r, c = _blocks(rates, size), _blocks(counts, size)
    before = jnp.pad(c[:, :-1, -1], ((0, 0), (1, 0)))[..., None]  # the count before each block
    cum = jnp.cumsum(r, axis=-1)
    q_side = jnp.where((c == before)[:, None], jnp.exp(-cum), 0.0)
    k_side = jnp.where((c == c[..., -1:])[:, None], jnp.exp(-_suffix_exclusive(r)), 0.0)
    return cum, q_side, k_side, c[..., -1] != before[..., 0]


def tables(rates, starts, plan: pieces.Plan) -> tuple[ChunkTables, PieceWeights]:
    """The chunk tables and piece weights of rates [B, H, T] float32 and starts [B, T] bool, T = P * piece_len
    (front-padded)."""
    b, h, t = rates.shape
    counts = jnp.cumsum(starts.astype(jnp.int32), axis=1)
    cum, q_side, k_side, _ = _block_tables(rates, counts, plan.chunk)
    chunk = ChunkTables(cum.reshape(b, h, t), counts, q_side.reshape(b, h, t), k_side.reshape(b, h, t))
    total, from_start, to_end, has_start = _block_tables(rates, counts, plan.piece_len)
    log_decay = jnp.where(has_start[:, None], jnp.inf, total[..., -1])
    return chunk, PieceWeights(to_end.reshape(b, h, t), from_start.reshape(b, h, t), log_decay)


def _piece_suffix_sums(x, starts, plan: pieces.Plan):
    """sum_{t >= u, t in u's piece and document} x_t of x [B, H, T] float32, starts [B, T] bool (T padded) ->
    [B, P, L, H] float32: each piece a row of states.document_suffix_sum."""
    b, h, _ = x.shape
    rows = jnp.moveaxis(x, 1, 2).reshape(b * plan.pieces, plan.piece_len, h)
    sums = states.document_suffix_sum(rows, starts.reshape(b * plan.pieces, plan.piece_len))
    return sums.reshape(b, plan.pieces, plan.piece_len, h)


def _in_last_of_piece(counts, plan: pieces.Plan):
    """[B, P, L] bool: no document starts after u in u's piece, from counts [B, T] int32 (starts in [0, t])."""
    per_piece = counts.reshape(counts.shape[0], plan.pieces, plan.piece_len)
    return per_piece == per_piece[..., -1:]


def forward(backend: TokenBackend, q, k, v, tok: states.TokenDecay, incoming, scale: float):
    """One piece's attention under per-token decay from its incoming state (vjp's forward_tokens).

    Args:
      q [B,T,Hq,Dk], k [B,T,Hk,Dk], v [B,T,Hv,Dv]; tok: the piece's states.TokenDecay (rates [B,T,H],
      H = max(Hq, Hv)); incoming: None (S_in = 0) or a function from the end state from zero to S_in
      [B,H,Dk,Dv]; scale: static float.
    Returns:
      o [B,T,H,Dv] in q.dtype; m [B,H,Dk,Dv] float32 (the end state from zero); S_in or None; `Saved`.
    """
    plan = backend.plan(q, v)
    q_pad, k_pad, v_pad = (pieces.front_pad(x, plan.pad) for x in (q, k, v))
    chunk, weights = tables(*_padded(tok, plan), plan)
    sums = backend.state_sums_tokens(k_pad, v_pad, weights.to_end, plan)
    in_from_zero, m = pieces.from_zero(sums, weights.log_decay, plan, reverse=False, interpret=backend.interpret)
    s_in = None if incoming is None else incoming(m)
    pieces_in = pieces.plus_boundary(in_from_zero, s_in, weights.log_decay, plan, reverse=False)
    o = backend.output_tokens(q_pad, k_pad, v_pad, chunk, pieces_in, plan, scale)[:, plan.pad:]
    return o, m, s_in, Saved(pieces_in, m, s_in)


def backward(backend: TokenBackend, q, k, v, tok: states.TokenDecay, saved: Saved, do, outgoing, scale: float):
    """Cotangents of `forward` (vjp's backward_tokens).

    Args:
      as `forward`; saved: its `Saved`; do [B,T,H,Dv]; outgoing: None (G = 0) or a function from d (the
      cotangent of S_in) to G (the cotangent of the end state) [B,H,Dk,Dv].
    Returns:
      (dq, dk, dv) in the input dtypes, d [B,H,Dk,Dv] float32, G or None, and ds [B,T,H] float32 (the rates'
      cotangent; the module docstring).
    """
    pieces_in, m, s_in = saved
    plan = backend.plan(q, v)
    do = do.astype(q.dtype)
    q_pad, k_pad, v_pad, do_pad = (pieces.front_pad(x, plan.pad) for x in (q, k, v, do))
    rates, starts = _padded(tok, plan)
    chunk, weights = tables(rates, starts, plan)
    sums = backend.state_sums_tokens(q_pad, do_pad, scale * weights.from_start, plan)
    # the reverse scan also dots each cotangent from zero with the next piece's state (the crossing terms' bulk)
    out_from_zero, d, dots = pieces.from_zero(sums, weights.log_decay, plan, reverse=True,
                                              interpret=backend.interpret, against=pieces_in)
    g = None if outgoing is None else outgoing(d)
    pieces_out = pieces.plus_boundary(out_from_zero, g, weights.log_decay, plan, reverse=True)
    dq, dk, dv, x = backend.grads_tokens(q_pad, k_pad, v_pad, do_pad, chunk, pieces_in, pieces_out, plan, scale)
    dq, dk, dv = (pieces.input_heads(y[:, plan.pad:], n.shape[2]) for y, n in ((dq, q), (dk, k), (dv, v)))
    crossing = crossing_terms(dots, pieces_in, m, s_in, g, tok, weights.log_decay, plan)
    ds = decay_gradient(x, tok, starts, chunk.counts, crossing, plan)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), d, g, ds


def crossing_terms(dots, pieces_in, m, s_in, g, tok: states.TokenDecay, log_decay, plan: pieces.Plan):
    """<S_(p+1), G_p> [B, H, P] float32 (the module docstring's decay gradient) from the reverse scan's dots
    <S_(p+1), G_p from zero> (pieces.from_zero against pieces_in; 0 for the last piece) and G's share: G_p =
    G_p from zero + (prod_{q > p} a_q) G, so the share adds (prod_{q > p} a_q) <S_(p+1), G>, selected to 0 where
    the product is 0 (a document starts after p), and the last piece's <S_end, G>, S_end = m + a S_in the end
    state. Without G (None) the dots are the terms: G_(P-1) = 0 (selected, as S_end may be non-finite).

    pieces_in [B, H, P, Dk, Dv]; m, s_in, g [B, H, Dk, Dv] float32 (s_in, g: None for zero); tok the piece's
    states.TokenDecay; log_decay [B, H, P] (PieceWeights.log_decay)."""
    if g is None:
        return dots
    s_end = m if s_in is None else m + states.decayed(states.piece_decay(tok)[:, :, None, None], s_in)
    share = pieces.weighted(pieces.boundary_weights(log_decay, plan, reverse=True)[..., :-1],
                            jnp.sum(pieces_in[:, :, 1:] * g[:, :, None], axis=(3, 4)))
    last = jnp.sum(s_end * g, axis=(2, 3))[..., None]
    return dots + jnp.concatenate([share, last], axis=2)


def decay_gradient(x, tok: states.TokenDecay, starts, counts, crossing, plan: pieces.Plan):
    """The rates' cotangent ds [B, T, H] float32 (T unpadded) from the gradient walks' rows and the crossing
    terms (the module docstring's decay gradient): each piece's suffix sums of x within u's document, minus the
    crossing term <S_(p+1), G_p> for u in the piece's last document, 0 at a document start.

    Args:
      x [B, H, T] float32 (grads_tokens' k.dk - q.dq, T padded); tok: the piece's states.TokenDecay; starts
      [B, T] bool and counts [B, T] int32 (padded: `_padded`, ChunkTables.counts); crossing [B, H, P] float32
      (`crossing_terms`).
    """
    b, h = x.shape[:2]
    ds = _piece_suffix_sums(x, starts, plan) - jnp.where(_in_last_of_piece(counts, plan)[..., None],
                                                          jnp.moveaxis(crossing, 1, 2)[:, :, None], 0.0)
    ds = ds.reshape(b, -1, h)[:, plan.pad:]
    return jnp.where(tok.starts[..., None], 0.0, ds)


class DrivenTokens:
    """forward_tokens and backward_tokens of `vjp.Impl` for a `TokenBackend` subclass (per device only)."""

    def forward_tokens(self, q, k, v, tok, incoming, scale=1.0):
        return forward(self, q, k, v, tok, incoming, scale)

    def backward_tokens(self, q, k, v, tok, saved, do, outgoing, scale=1.0):
        return backward(self, q, k, v, tok, saved, do, outgoing, scale)
