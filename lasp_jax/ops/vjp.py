"""The LASP custom_vjp: one piece of the sequence, its incoming state, and the way states cross pieces.

Forward, for a piece of L positions (a whole sequence on one device, or one rank's share of it):
    m      = sum_x lambda^(L - x) k_x^T v_x      the piece's own end state (S_in = 0)
    S_in   = exchange.prefix(m)  or  initial     the state entering the piece (a collective, or given)
    O      = the piece's attention, starting from S_in, its queries times `scale`
    S_end  = lambda^L S_in + m
Backward, given dO and dS_end:
    d      = scale sum_x lambda^x q_x^T dO_x     the cotangent of S_in through O
    G      = dS_end + exchange.suffix(d)         the cotangent of this piece's end state
    dQ, dK, dV                                   the piece's backward, starting from S_in and from G

An implementation gets the exchange as a function (`incoming`: m -> S_in; `outgoing`: d -> G) and calls it
where it suits it: `Split` (the XLA and reference paths) adds the S_in and G terms as separate products, so
the intra-chunk work never waits on a collective and XLA may overlap them (tests check this in the compiled
HLO); the fused kernels start their own piece scans from S_in and G, which saves a pass over the tokens.
Residuals are q, k, v and what the implementation saves (S_in, or the kernels' per-piece states), under
per-token decay also the piece's TokenDecay: never a per-chunk state.

`scale` is a static float that every implementation applies in float32 where it forms the scores and the
q-side state products (never as a pass over q or dq). The constant [H] decay rates are constants for autodiff:
their cotangent is zero.

Per-token decay and documents (`attend_tokens`): the same split with the piece's states.TokenDecay. Each piece
acts on the state affinely, S_end = a S_in + m with a = exp(-(the piece's rate sum)), 0 where a document starts
in it; the exchange receives log a ([B, H], +inf for 0). The rates are differentiable: the decay gradient is
    ds_u = sum_{t >= u, t in u's document} x_t  -  sum_{t < u} z_t  -  a <S_in, G>,   0 at a document start,
x_t = k_t . dk_t - q_t . dq_t per output head over the pairs inside the piece, less the S_in term of q_t . dq_t
(the pairs that cross u inside the piece and from S_in), z_t = k_t . dk_t's G term (pairs from t < u to beyond
the piece; nonzero in the piece's last document only). Every sum runs in float32 and within one document, so the
terms of other documents never enter it, not even as rounding; no sum from later pieces is needed beyond G.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from lasp_jax.ops import states

# Names of what the forward rules hand the backward, for remat policies (jax.checkpoint_policies
# .save_only_these_names): saving both lets a rematerialized block skip the attention's forward entirely (its
# kernels run once per step), at the cost of o and the per-piece states per layer.
OUTPUT_NAME = "lasp_output"
STATES_NAME = "lasp_states"
SAVEABLE_NAMES = (OUTPUT_NAME, STATES_NAME)


def _named(o, saved):
    """o and the implementation's saved pytree, named for remat policies (SAVEABLE_NAMES)."""
    return checkpoint_name(o, OUTPUT_NAME), jax.tree.map(lambda a: checkpoint_name(a, STATES_NAME), saved)


StateFn = Callable[[jax.Array], jax.Array]


class Exchange(Protocol):
    """How states cross the pieces of a sequence (lasp_jax.parallel implements it over a mesh axis).

    Both take per-piece states [B, H, Dk, Dv] fp32 and the piece's log-decay `rate`, a_r = exp(-rate): [H] (rates
    * L, the same on every piece) or [B, H] (this piece's own, +inf where a document starts in it, a_r = 0). They
    must be hashable (they are static arguments of the custom_vjp).
    """

    def prefix(self, m: jax.Array, rate: jax.Array) -> jax.Array:
        """S_in of piece r: sum_{j < r} (prod_{j < i < r} a_i) m_j."""

    def suffix(self, d: jax.Array, rate: jax.Array) -> jax.Array:
        """G of piece r: sum_{j > r} (prod_{r < i < j} a_i) d_j."""

    def starts_at_boundary(self, segment_ids: jax.Array) -> jax.Array:
        """[B] bool: piece r's first id differs from piece r-1's last (False on the first piece)."""


class Impl(Protocol):
    """The per-device contract every implementation meets (hashable: a static argument of the custom_vjp).

    q [B, L, Hq, Dk], k [B, L, Hk, Dk], v [B, L, Hv, Dv] (any layout of checks.attention_inputs: output head h of
    H = max(Hq, Hv) reads head h // (H / Hx) of each), rates [H]; states [B, H, Dk, Dv] float32; scale a
    float that multiplies q (in the attention's float32 arithmetic, not q in its dtype).
    `partitionable`: XLA's partitioner can split it over devices (jnp code can; Pallas kernels cannot, and run
    only per device, inside shard_map).
    """

    partitionable: bool

    def forward(self, q, k, v, rates, incoming: StateFn | None, scale: float) -> tuple[jax.Array, jax.Array, Any, Any]:
        """(o in q.dtype, m, S_in or None, saved): incoming maps m to S_in (None: S_in = 0); `saved` is what
        `backward` needs besides q, k, v (a pytree of arrays and Nones: each array is named STATES_NAME)."""

    def backward(self, q, k, v, rates, saved, do, outgoing: StateFn | None, scale: float) -> tuple[jax.Array, ...]:
        """(dq, dk, dv, d) in input dtypes (d float32): outgoing maps d to G (None: G = 0)."""

    def supported(self, q, k, v) -> str | None:
        """None when usable here, else the reason."""


class TokenImpl(Impl, Protocol):
    """An `Impl` that also runs `attend_tokens` (per-token decay and documents): the same contract with the
    piece's states.TokenDecay `tok` in place of the [H] rates."""

    def forward_tokens(self, q, k, v, tok, incoming: StateFn | None, scale: float) -> tuple[jax.Array, ...]:
        """(o in q.dtype, m, S_in or None, saved): as `Impl.forward`; m is the state after the piece's last
        position with S_in = 0."""

    def backward_tokens(self, q, k, v, tok, saved, do, outgoing: StateFn | None,
                        scale: float) -> tuple[jax.Array, ...]:
        """(dq, dk, dv, d, G or None, ds): as `Impl.backward`, plus G (what outgoing returned) and ds [B, L, H]
        float32, the cotangent of tok.rates (module docstring)."""

    def supported_tokens(self, q, k, v) -> str | None:
        """None when per-token decay and documents run on these inputs here, else the reason."""


@dataclasses.dataclass(frozen=True)
class Split:
    """`Impl` from a module of S_in = 0 functions (local_output, local_state, local_backward, supported), with
    the S_in and G terms of `states` as separate products that never wait on the intra-chunk work (nor it on
    them). With local_output_tokens and local_backward_tokens (the piece's states.TokenDecay instead of [H]
    rates; the backward also returns x, see the module docstring) it is a `TokenImpl`: it runs `attend_tokens`
    (per-token decay and documents), as do the kernels through pieces_tokens.DrivenTokens."""

    module: types.ModuleType
    partitionable = True  # jnp code throughout

    def forward(self, q, k, v, rates, incoming, scale):
        m = self.module.local_state(k, v, rates)
        o = self.module.local_output(q, k, v, rates, scale)
        s_in = None if incoming is None else incoming(m)
        if s_in is not None:
            o = (o.astype(jnp.float32) + states.apply_state(q, rates, s_in, scale)).astype(q.dtype)
        return o, m, s_in, s_in

    def backward(self, q, k, v, rates, s_in, do, outgoing, scale):
        dq, dk, dv = self.module.local_backward(q, k, v, rates, do, scale)
        d = states.query_state_grad(q, do, rates, scale)
        g = None if outgoing is None else outgoing(d)
        if s_in is not None:
            dq = (dq.astype(jnp.float32) + states.apply_state_dq(do, rates, s_in, scale, q.shape[2])).astype(q.dtype)
        if g is not None:
            dk_end, dv_end = states.end_state_grads(k, v, rates, g)
            dk = (dk.astype(jnp.float32) + dk_end).astype(k.dtype)
            dv = (dv.astype(jnp.float32) + dv_end).astype(v.dtype)
        return dq, dk, dv, d

    def supported(self, q, k, v):
        return self.module.supported(q, k, v)

    def supported_tokens(self, q, k, v):
        return self.module.supported(q, k, v)

    def forward_tokens(self, q, k, v, tok, incoming, scale):
        """`forward` under per-token decay (tok: the piece's states.TokenDecay): (o, m, S_in or None, saved);
        saved is S_in."""
        m = states.local_state_tokens(k, v, tok)
        o = self.module.local_output_tokens(q, k, v, tok, scale)
        s_in = None if incoming is None else incoming(m)
        if s_in is not None:
            o = (o.astype(jnp.float32) + states.apply_state_tokens(q, tok, s_in, scale)).astype(q.dtype)
        return o, m, s_in, s_in

    def backward_tokens(self, q, k, v, tok, s_in, do, outgoing, scale):
        """(dq, dk, dv, d, G or None, ds) under per-token decay from forward_tokens' saved (S_in); ds [B, L, H]
        float32 (module docstring)."""
        dq, dk, dv, x = self.module.local_backward_tokens(q, k, v, tok, do, scale)
        d = states.query_state_grad_tokens(q, do, tok, scale)
        g = None if outgoing is None else outgoing(d)
        if s_in is not None:
            dq = (dq.astype(jnp.float32) + states.apply_state_dq_tokens(do, tok, s_in, scale, q.shape[2])).astype(
                q.dtype)
            x = x - jnp.sum(do.astype(jnp.float32) * states.apply_state_tokens(q, tok, s_in, scale), axis=-1)
        ds = states.document_suffix_sum(x, tok.starts)
        if g is not None:
            dk_end, dv_end = states.end_state_grads_tokens(k, v, tok, g)
            dk = (dk.astype(jnp.float32) + dk_end).astype(k.dtype)
            dv = (dv.astype(jnp.float32) + dv_end).astype(v.dtype)
            z = states.end_state_shares(k, v, tok, g)
            ds = ds - jnp.cumsum(jnp.pad(z[:, :-1], ((0, 0), (1, 0), (0, 0))), axis=1)  # sum_{t < u} z_t
            if s_in is not None:
                ds = ds - states.decayed(states.piece_decay(tok), jnp.sum(s_in * g, axis=(2, 3)))[:, None]
        return dq, dk, dv, d, g, jnp.where(tok.starts[..., None], 0.0, ds)


def _forward(q, k, v, rates, s_init, impl, exchange, scale):
    length = q.shape[1]
    if exchange is not None:
        incoming = functools.partial(exchange.prefix, rate=rates * length)
    else:
        incoming = None if s_init is None else (lambda m: s_init.astype(jnp.float32))
    o, m, s_in, saved = impl.forward(q, k, v, rates, incoming, scale)
    s_end = m if s_in is None else m + states.decay_pow(rates, length)[None, :, None, None] * s_in
    return o, s_end, saved


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def attend(q, k, v, rates, s_init, impl: Impl, exchange: Exchange | None, final_state: bool, scale: float = 1.0):
    """Linear attention over one piece with its incoming state.

    Args:
      q [B, L, Hq, Dk], k [B, L, Hk, Dk], v [B, L, Hv, Dv] (H = max(Hq, Hv)); rates [H] float32; s_init
      [B, H, Dk, Dv] fp32 or None (zero); impl: an `Impl`; exchange: None on one device (S_in = s_init), else the strategy that
      computes S_in from the other pieces (then s_init must be None); final_state: also return S_end (static,
      so that the backward skips the end-state terms when nobody uses it); scale: a static float multiplying q
      inside the implementation.
    Returns:
      o [B, L, H, Dv] in q.dtype, and S_end [B, H, Dk, Dv] float32 when final_state.
    """
    o, s_end, _ = _forward(q, k, v, rates, s_init, impl, exchange, scale)
    return (o, s_end) if final_state else o


def _attend_fwd(q, k, v, rates, s_init, impl, exchange, final_state, scale):
    o, s_end, saved = _forward(q, k, v, rates, s_init, impl, exchange, scale)
    o, saved = _named(o, saved)
    return ((o, s_end) if final_state else o), (q, k, v, rates, s_init is not None, saved)


def _attend_bwd(impl, exchange, final_state, scale, res, cotangents):
    q, k, v, rates, has_init, saved = res
    do, ds_end = cotangents if final_state else (cotangents, None)
    length = q.shape[1]
    if exchange is not None:
        def outgoing(d):
            g = exchange.suffix(d, rates * length)
            return g if ds_end is None else g + ds_end
    else:
        outgoing = None if ds_end is None else (lambda d: ds_end)
    dq, dk, dv, d = impl.backward(q, k, v, rates, saved, do, outgoing, scale)
    ds_init = None
    if has_init:
        ds_init = d if ds_end is None else d + states.decay_pow(rates, length)[None, :, None, None] * ds_end
    return dq, dk, dv, jnp.zeros_like(rates), ds_init


attend.defvjp(_attend_fwd, _attend_bwd)


def _piece_tokens(rates, segment_ids, exchange):
    """The piece's states.TokenDecay: document starts where the id changes, and at its first position where the
    previous piece ends another document (the initial state belongs to position 0's document)."""
    b, length = rates.shape[:2]
    if segment_ids is None:
        return states.token_decay(rates, jnp.zeros((b, length), bool))
    tok = states.token_decay(rates, states.document_starts(segment_ids))
    return tok if exchange is None else states.cut_at_first(tok, exchange.starts_at_boundary(segment_ids))


def _forward_tokens(q, k, v, rates, segment_ids, s_init, impl, exchange, scale):
    tok = _piece_tokens(rates, segment_ids, exchange)
    if exchange is not None:
        incoming = functools.partial(exchange.prefix, rate=tok.log_decay)
    else:
        incoming = None if s_init is None else (lambda m: s_init.astype(jnp.float32))
    o, m, s_in, saved = impl.forward_tokens(q, k, v, tok, incoming, scale)
    s_end = m if s_in is None else m + states.decayed(states.piece_decay(tok)[:, :, None, None], s_in)
    return o, s_end, tok, saved


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def attend_tokens(q, k, v, rates, segment_ids, s_init, impl: TokenImpl, exchange: Exchange | None,
                  final_state: bool, scale: float = 1.0):
    """`attend` under per-token decay and documents: rates [B, L, H] float32 >= 0 (differentiable),
    segment_ids [B, L] integers or None; the state convention of states.TokenDecay (S_end is the state after the
    piece's last position). impl: a `TokenImpl`. Returns as `attend`."""
    o, s_end, _, _ = _forward_tokens(q, k, v, rates, segment_ids, s_init, impl, exchange, scale)
    return (o, s_end) if final_state else o


def _tokens_fwd(q, k, v, rates, segment_ids, s_init, impl, exchange, final_state, scale):
    o, s_end, tok, saved = _forward_tokens(q, k, v, rates, segment_ids, s_init, impl, exchange, scale)
    o, saved = _named(o, saved)
    return ((o, s_end) if final_state else o), (q, k, v, tok, s_init is not None, saved, segment_ids)


def _tokens_bwd(impl, exchange, final_state, scale, res, cotangents):
    q, k, v, tok, has_init, saved, segment_ids = res
    do, ds_end = cotangents if final_state else (cotangents, None)
    if exchange is not None:
        def outgoing(d):
            g = exchange.suffix(d, tok.log_decay)
            return g if ds_end is None else g + ds_end
    else:
        outgoing = None if ds_end is None else (lambda d: ds_end)
    dq, dk, dv, d, g, ds = impl.backward_tokens(q, k, v, tok, saved, do, outgoing, scale)
    ds_init = None
    if has_init:
        ds_init = d if g is None else d + states.decayed(states.piece_decay(tok)[:, :, None, None], g)
    d_ids = None if segment_ids is None else np.zeros(segment_ids.shape, jax.dtypes.float0)
    return dq, dk, dv, ds, d_ids, ds_init


attend_tokens.defvjp(_tokens_fwd, _tokens_bwd)
