"""The piece driver shared by the fused kernel backends: the LASP split, one level down.

One kernel program (or CTA) per (batch, head, piece, ...) walks the chunks of its piece with the d_k x d_v state
on chip. A sequence of T positions is cut into P pieces of whole chunks (`Plan`), so that the launches fill the
GPU even at B = 1, H = 16; only a recurrence over the pieces' states runs between the passes:

    forward   state pass   m_p   = sum_{x in p} lambda^(end_p - x) k_x^T v_x                  (backend.state_sums)
              piece scan   S_p   = lambda^(L p) S_in + sum_{j < p} lambda^(L (p - 1 - j)) m_j  (`entering`)
              output walk  O     = chunkwise scale [(Q K^T) * M] V + scale lambda^i Q S        (backend.output)
    backward  mirrored:    d_p   = scale sum_{x in p} lambda^(x - start_p) q_x^T dO_x          (backend.state_sums)
              reverse scan G_p   = lambda^(L (P - 1 - p)) G + sum_{j > p} lambda^(L (j - p - 1)) d_j  (`leaving`)
              dQ walks forward from S_p; dK and dV walks backward from G_p                      (backend.grads)

The incoming state S_in and the end-state cotangent G (from another device, or the caller's initial and final
states) enter only the piece scans, so lasp_attention costs no extra pass over the tokens. The piece states S_p
([B, H, P, Dk, Dv] float32, a few MB) are the backward's residual, so it never re-reads K and V to rebuild them.
T is zero-padded at the front to whole pieces when it is not already (zeros before the sequence change no output
or state); since the zeros would sit between S_in and the first token, a ragged T adds S_in's and G's terms with
the separate products of `lasp_jax.ops.states` instead.

The piece scans also take per-piece log decays [B, H, P] instead of the rates (the per-token driver: a piece
passes exp(-its log decay), exactly 0 when a document starts in it); see `entering`.

Numerics and cost: a scan is one pass of a Pallas kernel (`lasp_jax.ops.piece_scan_kernel`, compiled with the
Triton lowering on a GPU, interpreted where the backend is) over the float32 sums: S_(p+1) = a_p S_p + m_p from
S_0 = 0, one program per (batch, head, Dk row tile), which reads each sum and writes each state once (the bytes
floor: 2 x 4 B x H x P x Dk x Dv) and also gives the end state m (the cotangent of S_in d, reverse) in the same
pass, so the forward has no separate boundary sum. S_in's and G's shares are added after (`plus_boundary`),
since S_in may depend on m (lasp_attention). Each decay is exp(-x) of a sum x >= 0 of the pieces' log decays
(`_chain`). A state passes a piece by states.decayed's rule (where(a == 0, 0, a S)): a non-finite sum reaches
only the later pieces, and none past a piece passing nothing (a document start, or a piece's own decay exactly
0), so a NaN does not cross a document start; a product of nonzero decays that underflows across several pieces
is no cut (the pieces depend on each other), nor is a NaN decay; the boundary states select by their weights in
the same way. The kernel forms the products one factor at a time, the boundary shares as exp(-(a sum)): the two
agree to float32 rounding.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp

from lasp_jax.ops import piece_scan_kernel, states

_F32 = jnp.float32


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
    h // (H / Hx) of each input). interpret: whether its kernels run in Pallas interpret mode (then the piece
    scans do too; else they compile for the GPU the kernels run on)."""

    interpret: bool

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
    """How states decay across the pieces (each [1 or B, H, P] float32, every entry exp(-x), x >= 0): decays, each
    piece's own (the recurrence's a_p); from_start, from the call's start to the start of piece p; to_end, from
    the end of piece p to the call's end."""

    decays: jax.Array
    from_start: jax.Array
    to_end: jax.Array


def _chain(decay, plan: Plan) -> _Chain:
    """The decays of rates [H] (each piece: exp(-rate * piece_len)) or per-piece log decays [B, H, P] (piece p:
    exp(-decay[b, h, p]); +inf passes nothing). The log decay from the start to piece p (from piece p to the end)
    is a running sum of the pieces' terms >= 0 from the call's boundary (never a difference of two running
    sums), so +inf gives exactly 0 and never NaN."""
    n = plan.pieces
    decay = jnp.asarray(decay, _F32)
    if decay.ndim != 1 and (decay.ndim != 3 or decay.shape[2] != n):
        raise ValueError(f"decay must be rates [H] or per-piece log decays [B, H, P={n}]; got shape {decay.shape}")
    if decay.ndim == 1:
        decay = jnp.broadcast_to(decay[None, :, None] * plan.piece_len, (1, decay.shape[0], n))
    before = jnp.cumsum(jnp.pad(decay[..., :-1], ((0, 0), (0, 0), (1, 0))), axis=-1)
    after = jnp.flip(jnp.cumsum(jnp.pad(jnp.flip(decay, -1)[..., :-1], ((0, 0), (0, 0), (1, 0))), axis=-1), -1)
    return _Chain(jnp.exp(-decay), jnp.exp(-before), jnp.exp(-after))


def _interpreted(interpret: bool | None) -> bool:
    """interpret, or, when None, whether JAX's default backend is not a GPU (where the scan kernel compiles)."""
    return jax.default_backend() != "gpu" if interpret is None else interpret


def from_zero(sums, decay, plan: Plan, *, reverse: bool, interpret: bool | None = None, against=None):
    """The piece scan from a zero boundary state, one pass of `piece_scan_kernel` over the sums [B, H, P, Dk, Dv]:

        forward  out[p] = sum_{j < p} (prod_{j < q < p} a_q) m_j,  end = sum_p (prod_{q > p} a_q) m_p
        reverse  out[p] = sum_{r > p} (prod_{p < q < r} a_q) d_r,  end = sum_p (prod_{q < p} a_q) d_p

    Returns (out [B, H, P, Dk, Dv], end [B, H, Dk, Dv]) float32: the states entering the pieces from zero and the
    end state from zero m (forward), or the cotangents leaving the pieces from a zero end cotangent and the
    cotangent of S_in d (reverse). decay as in `entering`. A non-finite sum reaches only the pieces after its own
    (before it, reverse), and none past a document start. interpret: the kernel in Pallas interpret mode; None:
    interpreted unless JAX's default backend is a GPU (the drivers pass their backend's). against: None, or
    states [B, H, P, Dk, Dv] whose next piece's the pass also dots with out: a third result [B, H, P] float32,
    <against[p + 1], out[p]> (0 for the last piece; `piece_scan_kernel.scan`)."""
    chain = _chain(decay, plan)
    b, h = sums.shape[:2]
    decays = jnp.broadcast_to(chain.decays, (b, h, plan.pieces))
    return piece_scan_kernel.scan(sums, decays, reverse=reverse, interpret=_interpreted(interpret), against=against)


def boundary_weights(decay, plan: Plan, *, reverse: bool):
    """[1 or B, H, P] float32: how S_in reaches the start of each piece (prod_{q < p} a_q), or, reverse, how the
    end of each piece reaches the call's end (prod_{q > p} a_q: the weight of G's share). decay as in `entering`."""
    chain = _chain(decay, plan)
    return chain.to_end if reverse else chain.from_start


def weighted(weights, x):
    """weights [1 or B, H, P] times x (broadcast over its trailing dims), selecting 0 where a weight is 0: a
    non-finite x across a document start (or an underflowed decay) reaches nothing."""
    w = weights.reshape(weights.shape + (1,) * (x.ndim - weights.ndim))
    return jnp.where(w != 0, w * x, 0.0)


def plus_boundary(per_piece, state, decay, plan: Plan, *, reverse: bool):
    """`from_zero`'s per-piece result [B, H, P, Dk, Dv] plus the boundary state's share [B, H, Dk, Dv] (None: 0):
    S_in's (prod_{q < p} a_q) S_in, or, reverse, G's (prod_{q > p} a_q) G, selected to 0 where the product is 0
    (a non-finite S_in or G does not cross a document start)."""
    if state is None:
        return per_piece
    weights = boundary_weights(decay, plan, reverse=reverse)
    return per_piece + weighted(weights, state[:, :, None].astype(_F32))


def entering(sums, s_in, decay, plan: Plan, interpret: bool | None = None):
    """The state entering each piece [B, H, P, Dk, Dv] float32 from the K, V sums m [B, H, P, Dk, Dv] (each
    piece's end state from zero) and S_in [B, H, Dk, Dv] (None: zero):

        S_p = sum_{j < p} (prod_{j < q < p} a_q) m_j + (prod_{q < p} a_q) S_in

    decay: rates [H] float32 (constant decay: every piece passes a = exp(-rate * plan.piece_len)), or per-piece
    log decays [B, H, P] float32 >= 0 (a_p = exp(-decay[b, h, p]); +inf where a document starts in piece p: it
    passes nothing, its product is exactly 0). A non-finite m_j reaches only the pieces after j, and none past a
    document start. `from_zero` then `plus_boundary` (the drivers call those two themselves: S_in may depend on
    the end state; this whole form serves tests and benchmarks/mosaic_probe.py)."""
    per_piece, _ = from_zero(sums, decay, plan, reverse=False, interpret=interpret)
    return plus_boundary(per_piece, s_in, decay, plan, reverse=False)


def leaving(sums, g, decay, plan: Plan, interpret: bool | None = None):
    """The state cotangent leaving each piece [B, H, P, Dk, Dv] float32 from the Q, dO sums d [B, H, P, Dk, Dv]
    (each piece's cotangent of its entering state, from a zero end cotangent) and the end state's cotangent g
    [B, H, Dk, Dv] (None: zero), `entering` mirrored:

        G_p = sum_{r > p} (prod_{p < q < r} a_q) d_r + (prod_{q > p} a_q) g

    decay as in `entering`. A non-finite d_r reaches only the pieces before r, and none before a document start."""
    per_piece, _ = from_zero(sums, decay, plan, reverse=True, interpret=interpret)
    return plus_boundary(per_piece, g, decay, plan, reverse=True)


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
    in_from_zero, m = from_zero(sums, rates, plan, reverse=False, interpret=backend.interpret)
    s_in = None if incoming is None else incoming(m)
    fused = plan.pad == 0
    pieces_in = plus_boundary(in_from_zero, s_in if fused else None, rates, plan, reverse=False)
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
    out_from_zero, d = from_zero(sums, rates, plan, reverse=True, interpret=backend.interpret)
    if not fused:
        d = states.query_state_grad(q, do, rates, scale)
    g = None if outgoing is None else outgoing(d)
    pieces_out = plus_boundary(out_from_zero, g if fused else None, rates, plan, reverse=True)
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
