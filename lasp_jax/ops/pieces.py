"""The piece driver shared by the fused kernel backends: the LASP split, one level down.

One kernel program (or CTA) per (batch, head, piece, ...) walks the chunks of its piece with the d_k x d_v state
on chip. A sequence of T positions is cut into P pieces of whole chunks (`Plan`), so that the launches fill the
GPU even at B = 1, H = 16; only tiny [P, P] scans over the pieces' states run between the passes:

    forward   state pass   m_p   = sum_{x in p} lambda^(end_p - x) k_x^T v_x                  (backend.state_sums)
              piece scan   S_p   = lambda^(L p) S_in + sum_{j < p} lambda^(L (p - 1 - j)) m_j  (`entering`, XLA)
              output walk  O     = chunkwise scale [(Q K^T) * M] V + scale lambda^i Q S        (backend.output)
    backward  mirrored:    d_p   = scale sum_{x in p} lambda^(x - start_p) q_x^T dO_x          (backend.state_sums)
              reverse scan G_p   = lambda^(L (P - 1 - p)) G + sum_{j > p} lambda^(L (j - p - 1)) d_j  (`leaving`)
              dQ walks forward from S_p; dK and dV walk backward from G_p                      (backend.grads)

The incoming state S_in and the end-state cotangent G (from another device, or the caller's initial and final
states) enter only the piece scans, so lasp_attention costs no extra pass over the tokens. The piece states S_p
([B, H, P, Dk, Dv] float32, a few MB) are the backward's residual, so it never re-reads K and V to rebuild them.
T is zero-padded at the front to whole pieces when it is not already (zeros before the sequence change no output
or state); since the zeros would sit between S_in and the first token, a ragged T adds S_in's and G's terms with
the separate products of `lasp_jax.ops.states` instead.

The piece scans also take per-piece log decays [B, H, P] instead of the rates (the per-token driver: a piece
passes exp(-its log decay), exactly 0 when a document starts in it); see `entering`.

Numerics: the scans are float32 (a batched matmul at full float32 precision, `_scan`), every decay exp(-x) of
a sum x >= 0 of the pieces' log decays (`_chain`). A non-finite later piece never reaches an earlier one: the
matmul sees only the finite parts of the sums, and the non-finite parts reach the later pieces through an
exclusive running sum that stops at a piece passing nothing (a document start, or a decay underflowing to 0), so
a NaN does not cross a document start either; the boundary states (S_in, G, the boundary sums) select by their
weights in the same way.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp

from lasp_jax.ops import states

_F32 = jnp.float32
_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class Plan:
    """How a call is cut: `pieces` pieces of `piece_len` positions (whole chunks) after `pad` zero positions."""

    chunk: int
    pieces: int
    piece_len: int
    pad: int


def make_plan(t: int, chunk: int, target_pieces: int, min_piece_chunks: int) -> Plan:
    """About target_pieces pieces of at least min_piece_chunks chunks over T positions; a piece count that
    divides the chunks (no padding) is preferred unless it would halve the parallelism."""
    n_chunks = -(-t // chunk)
    want = max(1, min(target_pieces, n_chunks // min_piece_chunks))
    pieces = next((p for p in range(want, (want - 1) // 2, -1) if n_chunks % p == 0), want)
    per_piece = -(-n_chunks // pieces)
    pieces = -(-n_chunks // per_piece)
    return Plan(chunk, pieces, per_piece * chunk, pieces * per_piece * chunk - t)


class Saved(NamedTuple):
    """The forward's residual besides q, k, v: the state entering each piece [B, H, P, Dk, Dv] float32, and
    S_in when T is ragged (then added by `states`), else None."""

    pieces_in: jax.Array
    unfused_s_in: jax.Array | None


class Backend(Protocol):
    """A kernel family's passes over padded inputs (T = P * piece_len; q [B, T, Hq, Dk], k [B, T, Hk, Dk],
    v [B, T, Hv, Dv], dO [B, T, H, Dv], H = max(Hq, Hv) the heads of the rates: output head h reads head
    h // (H / Hx) of each input)."""

    def plan(self, q, v) -> Plan:
        """How these inputs are cut into pieces."""

    def state_sums(self, x, y, rates, plan: Plan, *, reverse: bool, scale: float) -> jax.Array:
        """Per-piece sums [B, H, P, Dx, Dy] float32: sum_x lambda^(L - x) x_x^T y_x (K, V, unscaled), or, when
        reverse, scale sum_x lambda^x x_x^T y_x (Q, dO); x of Hx heads and y of Hy map to the H of rates."""

    def output(self, q, k, v, rates, pieces_in, plan: Plan, scale: float) -> jax.Array:
        """o [B, T, H, Dv] in q.dtype, each piece walked from its entering state."""

    def grads(self, q, k, v, do, rates, pieces_in, pieces_out, plan: Plan, scale: float) -> tuple[jax.Array, ...]:
        """(dq, dk, dv), each per output head [B, T, H, D] where its input has fewer heads than H (GQA's dk, dv,
        GVA's dq, dk; `backward` sums them in float32)."""


def input_heads(grad, n_heads: int):
    """A gradient per output head [B, T, H, D] as the gradient of an input of n_heads heads: itself when
    n_heads = H, else the float32 sum of the shares of the H / n_heads output heads reading each input head
    (output head h reads input head h // (H / n_heads))."""
    b, t, h, d = grad.shape
    if n_heads == h:
        return grad
    return grad.astype(_F32).reshape(b, t, n_heads, h // n_heads, d).sum(3)


def front_pad(x, pad: int):
    return x if pad == 0 else jnp.pad(x, ((0, 0), (pad, 0), (0, 0), (0, 0)))


class _Chain(NamedTuple):
    """How states decay between the pieces' boundaries (each [1 or B, H, ...] float32, every entry exp(-x), x >= 0):
    between [.., P, P] w[i, j], from the end of piece i to the start of piece j (0 unless i < j); from_start
    [.., P], from the call's start to the start of piece p; to_end [.., P], from the end of piece p to the call's
    end."""

    between: jax.Array
    from_start: jax.Array
    to_end: jax.Array
    passes: jax.Array  # [.., P] bool: piece p passes a state on (its decay is not 0)


def _chain(decay, plan: Plan) -> _Chain:
    """The decays between boundaries from rates [H] (each piece: exp(-rate * piece_len)) or per-piece log decays
    [B, H, P] (piece p: exp(-decay[b, h, p]); +inf passes nothing). Boundary i sits before piece i (boundary P
    after the last); the log decay from boundary i to k >= i is the sum over pieces i..k-1, a sum of terms >= 0
    from its first term on (never a difference of two running sums), so +inf gives exactly 0 and never NaN."""
    n = plan.pieces
    decay = jnp.asarray(decay, _F32)
    if decay.ndim != 1 and (decay.ndim != 3 or decay.shape[2] != n):
        raise ValueError(f"decay must be rates [H] or per-piece log decays [B, H, P={n}]; got shape {decay.shape}")
    i = jnp.arange(n + 1)[:, None]
    k = jnp.arange(n + 1)[None, :]
    if decay.ndim == 1:
        log_gap = decay[None, :, None, None] * (plan.piece_len * jnp.maximum(k - i, 0).astype(_F32))
    else:
        from_i = jnp.where(k[:, :n] >= i, decay[:, :, None, :], 0.0)  # [B, H, i, piece]: the pieces from i on
        log_gap = jnp.pad(jnp.cumsum(from_i, axis=-1), ((0, 0), (0, 0), (0, 0), (1, 0)))  # [B, H, i, k]
    w = jnp.where(k >= i, jnp.exp(-log_gap), 0.0)
    passes = jnp.diagonal(w[..., :n, 1:], axis1=-2, axis2=-1) != 0  # piece p's decay; a NaN one is not a cut
    return _Chain(between=w[..., 1:, :n], from_start=w[..., 0, :n], to_end=w[..., 1:, n], passes=passes)


def _scan(w, passes, sums, *, reverse: bool):
    """The exclusive decayed prefix over pieces, out[j] = sum_i w[i, j] x[i] (or the suffix when reverse,
    out[i] = sum_j w[i, j] x[j]) of sums [B, H, P, Dk, Dv], float32: one batched matmul at full float32 precision
    over the finite parts (w's zeros then multiply finite numbers only), and the non-finite parts carried to the
    later pieces (earlier, when reverse) by a running sum that a piece passing nothing (passes [1 or B, H, P]
    False: a document starts in it, its decay is exactly 0) cuts, by states.decayed's rule: a NaN never crosses a
    document start, while a NaN decay (a traced NaN rate) is no cut and keeps the NaN going."""
    b, h, n = sums.shape[:3]
    x = sums.astype(_F32).reshape(b, h, n, -1)
    finite = jnp.isfinite(x)
    spec = "bhij,bhjn->bhin" if reverse else "bhij,bhin->bhjn"
    out = jnp.einsum(spec, jnp.broadcast_to(w, (b, h, n, n)), jnp.where(finite, x, 0.0), precision=_HIGHEST)
    cut = jnp.broadcast_to(~passes, (b, h, n))[..., None]

    def combine(earlier, later):  # in scan order; a cut drops what came before it
        (c1, x1), (c2, x2) = earlier, later
        return c1 | c2, jnp.where(c2, x2, x1 + x2)

    _, running = jax.lax.associative_scan(combine, (cut, jnp.where(finite, 0.0, x)), axis=2, reverse=reverse)
    if reverse:
        exclusive = jnp.pad(running[:, :, 1:], ((0, 0), (0, 0), (0, 1), (0, 0)))
    else:
        exclusive = jnp.pad(running[:, :, :-1], ((0, 0), (0, 0), (1, 0), (0, 0)))
    return (out + exclusive).reshape(sums.shape)


def _weighted(weights, x):
    """weights [1 or B, H, P] times x (broadcast over its trailing dims), selecting 0 where a weight is 0: a
    non-finite x across a document start (or an underflowed decay) reaches nothing."""
    w = weights.reshape(weights.shape + (1,) * (x.ndim - weights.ndim))
    return jnp.where(w != 0, w * x, 0.0)


def _plus_share(per_piece, weights, state):
    """per_piece [B, H, P, Dk, Dv] plus each piece's weights [1 or B, H, P] times state [B, H, Dk, Dv] (None: 0)."""
    if state is None:
        return per_piece
    return per_piece + _weighted(weights, state[:, :, None].astype(_F32))


def entering(sums, s_in, decay, plan: Plan):
    """The state entering each piece [B, H, P, Dk, Dv] float32 from the K, V sums m [B, H, P, Dk, Dv] (each
    piece's end state from zero) and S_in [B, H, Dk, Dv] (None: zero):

        S_p = sum_{j < p} (prod_{j < q < p} a_q) m_j + (prod_{q < p} a_q) S_in

    decay: rates [H] float32 (constant decay: every piece passes a = exp(-rate * plan.piece_len)), or per-piece
    log decays [B, H, P] float32 >= 0 (a_p = exp(-decay[b, h, p]); +inf where a document starts in piece p: it
    passes nothing, its product is exactly 0). Every product is exp(-(sum of the log decays)) (see `_chain`).
    A non-finite m_j reaches only the pieces after j, and none past a document start (`_scan`)."""
    chain = _chain(decay, plan)
    from_zero = (_scan(chain.between, chain.passes, sums, reverse=False) if plan.pieces > 1
                 else jnp.zeros(sums.shape, _F32))
    return _plus_share(from_zero, chain.from_start, s_in)


def boundary_sum(sums, decay, plan: Plan, *, from_end: bool):
    """The per-piece sums [B, H, P, Dk, Dv] carried to the call's boundary [B, H, Dk, Dv] float32: its end
    (from_end: sum_p (prod_{q > p} a_q) m_p, the end state from zero) or its start (sum_p (prod_{q < p} a_q) d_p,
    the cotangent of S_in). decay as in `entering`."""
    chain = _chain(decay, plan)
    w = chain.to_end if from_end else chain.from_start
    return jnp.sum(_weighted(w, sums.astype(_F32)), axis=2)


def leaving(sums, g, decay, plan: Plan):
    """The state cotangent leaving each piece [B, H, P, Dk, Dv] float32 from the Q, dO sums d [B, H, P, Dk, Dv]
    (each piece's cotangent of its entering state, from a zero end cotangent) and the end state's cotangent g
    [B, H, Dk, Dv] (None: zero), `entering` mirrored:

        G_p = sum_{r > p} (prod_{p < q < r} a_q) d_r + (prod_{q > p} a_q) g

    decay as in `entering`. A non-finite d_r reaches only the pieces before r, and none before a document start."""
    chain = _chain(decay, plan)
    from_end = (_scan(chain.between, chain.passes, sums, reverse=True) if plan.pieces > 1
                else jnp.zeros(sums.shape, _F32))
    return _plus_share(from_end, chain.to_end, g)


def forward(backend: Backend, q, k, v, rates, incoming, scale: float):
    """One piece's attention from its incoming state (the `vjp.Impl` forward): state pass, piece scan, walk.

    Args:
      q [B,T,Hq,Dk], k [B,T,Hk,Dk], v [B,T,Hv,Dv], rates [H] float32 (H = max(Hq, Hv)); incoming: None
      (S_in = 0) or a function from the end state from zero to S_in [B,H,Dk,Dv] (a collective in lasp_attention);
      scale: static float.
    Returns:
      o [B,T,H,Dv] in q.dtype; m [B,H,Dk,Dv] float32 (the end state from zero); S_in or None; `Saved`.
    """
    plan = backend.plan(q, v)
    q_pad, k_pad, v_pad = (front_pad(x, plan.pad) for x in (q, k, v))
    sums = backend.state_sums(k_pad, v_pad, rates, plan, reverse=False, scale=1.0)
    m = boundary_sum(sums, rates, plan, from_end=True)
    s_in = None if incoming is None else incoming(m)
    fused = plan.pad == 0
    pieces_in = entering(sums, s_in if fused else None, rates, plan)
    o = backend.output(q_pad, k_pad, v_pad, rates, pieces_in, plan, scale)[:, plan.pad:]
    unfused_s_in = None if fused else s_in
    if unfused_s_in is not None:
        o = (o.astype(_F32) + states.apply_state(q, rates, unfused_s_in, scale)).astype(q.dtype)
    return o, m, s_in, Saved(pieces_in, unfused_s_in)


def backward(backend: Backend, q, k, v, rates, saved: Saved, do, outgoing, scale: float):
    """Cotangents of `forward` (the `vjp.Impl` backward): the Q, dO state pass, its reverse scan, the walks.

    Args:
      as `forward`; saved: its `Saved`; do [B,T,H,Dv]; outgoing: None (G = 0) or a function from d (the
      cotangent of S_in) to G (the cotangent of the end state) [B,H,Dk,Dv].
    Returns:
      dq, dk, dv in the input dtypes, and d [B,H,Dk,Dv] float32.
    """
    pieces_in, unfused_s_in = saved
    plan = backend.plan(q, v)
    fused = plan.pad == 0
    do = do.astype(q.dtype)
    q_pad, k_pad, v_pad, do_pad = (front_pad(x, plan.pad) for x in (q, k, v, do))
    sums = backend.state_sums(q_pad, do_pad, rates, plan, reverse=True, scale=scale)
    if fused:
        d = boundary_sum(sums, rates, plan, from_end=False)
    else:
        d = states.query_state_grad(q, do, rates, scale)
    g = None if outgoing is None else outgoing(d)
    pieces_out = leaving(sums, g if fused else None, rates, plan)
    dq, dk, dv = backend.grads(q_pad, k_pad, v_pad, do_pad, rates, pieces_in, pieces_out, plan, scale)
    dq, dk, dv = (input_heads(x[:, plan.pad:], n.shape[2]) for x, n in ((dq, q), (dk, k), (dv, v)))
    if unfused_s_in is not None:
        dq = dq.astype(_F32) + states.apply_state_dq(do, rates, unfused_s_in, scale, q.shape[2])
    if g is not None and not fused:
        dk_end, dv_end = states.end_state_grads(k, v, rates, g)
        dk, dv = dk.astype(_F32) + dk_end, dv.astype(_F32) + dv_end
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), d


class Driven:
    """`vjp.Impl` forward and backward for a `Backend` subclass (per device only: pallas_call has no sharding
    rule, so these run inside lasp_attention's shard_map or on unsharded inputs)."""

    partitionable = False

    def forward(self, q, k, v, rates, incoming, scale=1.0):
        return forward(self, q, k, v, rates, incoming, scale)

    def backward(self, q, k, v, rates, saved, do, outgoing, scale=1.0):
        return backward(self, q, k, v, rates, saved, do, outgoing, scale)
