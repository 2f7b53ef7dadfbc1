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
Residuals are q, k, v and what the implementation saves (S_in, or the kernels' per-piece states): never a
per-chunk state.

`scale` is a static float that every implementation applies in float32 where it forms the scores and the
q-side state products (never as a pass over q or dq). The decay rates are constants for autodiff: their
cotangent is zero.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp

from lasp_jax.ops import states

StateFn = Callable[[jax.Array], jax.Array]


class Exchange(Protocol):
    """How states cross the pieces of a sequence (lasp_jax.parallel implements it over a mesh axis).

    Both take per-piece states [B, H, Dk, Dv] fp32 and the per-piece decay rate [H] (rates * L), and must be
    hashable (they are static arguments of the custom_vjp).
    """

    def prefix(self, m: jax.Array, rate: jax.Array) -> jax.Array:
        """S_in of piece r: sum_{j < r} lambda^(L (r - 1 - j)) m_j."""

    def suffix(self, d: jax.Array, rate: jax.Array) -> jax.Array:
        """G of piece r: sum_{j > r} lambda^(L (j - r - 1)) d_j."""


class Impl(Protocol):
    """The per-device contract every implementation meets (hashable: a static argument of the custom_vjp).

    q [B, L, H, Dk], k [B, L, Hkv, Dk], v [B, L, Hkv, Dv], rates [H]; states [B, H, Dk, Dv] float32; scale a
    float that multiplies q (in the attention's float32 arithmetic, not q in its dtype).
    `partitionable`: XLA's partitioner can split it over devices (jnp code can; Pallas kernels cannot, and run
    only per device, inside shard_map).
    """

    partitionable: bool

    def forward(self, q, k, v, rates, incoming: StateFn | None, scale: float) -> tuple[jax.Array, jax.Array, Any, Any]:
        """(o in q.dtype, m, S_in or None, saved): incoming maps m to S_in (None: S_in = 0); `saved` is what
        `backward` needs besides q, k, v (a pytree)."""

    def backward(self, q, k, v, rates, saved, do, outgoing: StateFn | None, scale: float) -> tuple[jax.Array, ...]:
        """(dq, dk, dv, d) in input dtypes (d float32): outgoing maps d to G (None: G = 0)."""

    def supported(self, q, k, v) -> str | None:
        """None when usable here, else the reason."""


@dataclasses.dataclass(frozen=True)
class Split:
    """`Impl` from a module of S_in = 0 functions (local_output, local_state, local_backward, supported), with
    the S_in and G terms of `states` as separate products that never wait on the intra-chunk work (nor it on
    them)."""

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
            dq = (dq.astype(jnp.float32) + states.apply_state_dq(do, rates, s_in, scale)).astype(q.dtype)
        if g is not None:
            dk_end, dv_end = states.end_state_grads(k, v, rates, g)
            dk = (dk.astype(jnp.float32) + dk_end).astype(k.dtype)
            dv = (dv.astype(jnp.float32) + dv_end).astype(v.dtype)
        return dq, dk, dv, d

    def supported(self, q, k, v):
        return self.module.supported(q, k, v)


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
      q [B, L, H, Dk], k [B, L, Hkv, Dk], v [B, L, Hkv, Dv]; rates [H] float32; s_init [B, H, Dk, Dv] fp32 or
      None (zero); impl: an `Impl`; exchange: None on one device (S_in = s_init), else the strategy that
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
