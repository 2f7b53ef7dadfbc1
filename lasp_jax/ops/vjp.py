"""The LASP custom_vjp: one piece of the sequence, its incoming state, and the way states cross pieces.

Forward, for a piece of L positions (a whole sequence on one device, or one rank's share of it):
    m      = local_state(K, V)                   the piece's own end state (S_in = 0)
    S_in   = exchange.prefix(m)  or  initial     the state entering the piece (a collective, or given)
    O      = local_output(Q, K, V) + lambda^x Q S_in
    S_end  = lambda^L S_in + m
Backward, given dO and dS_end:
    d      = sum_x lambda^x q_x^T dO_x           the cotangent of S_in
    G      = dS_end + exchange.suffix(d)         the cotangent of this piece's end state
    dQ, dK, dV = local_backward(Q, K, V, dO) + the S_in and G terms of `states`

`local_output` and `local_backward` never see S_in, G or a collective: the expensive intra-chunk work is
independent of the exchange, so XLA may overlap the collective with it (tests check this in the compiled HLO).
Residuals are q, k, v and S_in (the "KV state cache", [B, H, Dk, Dv] fp32): no per-chunk state is saved.

The decay rates are constants for autodiff: their cotangent is zero.
"""

from __future__ import annotations

import functools
from typing import Protocol

import jax
import jax.numpy as jnp

from lasp_jax.ops import states


class Exchange(Protocol):
    """How states cross the pieces of a sequence (lasp_jax.parallel implements it over a mesh axis).

    Both take per-piece states [B, H, Dk, Dv] fp32 and the per-piece decay rate [H] (s * L), and must be
    hashable (they are static arguments of the custom_vjp).
    """

    def prefix(self, m: jax.Array, rate: jax.Array) -> jax.Array:
        """S_in of piece r: sum_{j < r} lambda^(L (r - 1 - j)) m_j."""

    def suffix(self, d: jax.Array, rate: jax.Array) -> jax.Array:
        """G of piece r: sum_{j > r} lambda^(L (j - r - 1)) d_j."""


class Impl(Protocol):
    """The per-device contract every implementation module meets (S_in = 0 and dS_end = 0 throughout)."""

    def local_output(self, q, k, v, s): ...
    def local_state(self, k, v, s): ...
    def local_backward(self, q, k, v, s, do): ...


def _forward(q, k, v, s, s_init, impl, exchange):
    length = q.shape[1]
    m = impl.local_state(k, v, s)
    s_in = exchange.prefix(m, s * length) if exchange is not None else s_init
    o = impl.local_output(q, k, v, s)
    if s_in is None:
        return o, m, s_in
    o = (o.astype(jnp.float32) + states.apply_state(q, s, s_in)).astype(q.dtype)
    s_end = m + states.decay_pow(s, length)[None, :, None, None] * s_in
    return o, s_end, s_in


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def attend(q, k, v, s, s_init, impl: Impl, exchange: Exchange | None, final_state: bool):
    """Linear attention over one piece with its incoming state.

    Args:
      q [B, L, H, Dk], k [B, L, Hkv, Dk], v [B, L, Hkv, Dv]; s [H] float32 rates; s_init [B, H, Dk, Dv] fp32 or
      None (zero); impl: an implementation module; exchange: None on one device (S_in = s_init), else the
      strategy that computes S_in from the other pieces (then s_init must be None); final_state: also return
      S_end (static, so that the backward skips the end-state terms when nobody uses it).
    Returns:
      o [B, L, H, Dv] in q.dtype, and S_end [B, H, Dk, Dv] float32 when final_state.
    """
    o, s_end, _ = _forward(q, k, v, s, s_init, impl, exchange)
    return (o, s_end) if final_state else o


def _attend_fwd(q, k, v, s, s_init, impl, exchange, final_state):
    o, s_end, s_in = _forward(q, k, v, s, s_init, impl, exchange)
    return ((o, s_end) if final_state else o), (q, k, v, s, s_in)


def _attend_bwd(impl, exchange, final_state, res, cotangents):
    q, k, v, s, s_in = res
    do, ds_end = cotangents if final_state else (cotangents, None)
    length = q.shape[1]
    dq, dk, dv = impl.local_backward(q, k, v, s, do)
    d = states.query_state_grad(q, do, s)
    g = ds_end
    if exchange is not None:
        g_ex = exchange.suffix(d, s * length)
        g = g_ex if g is None else g + g_ex
    if g is not None:
        dk_end, dv_end = states.end_state_grads(k, v, s, g)
        dk = (dk.astype(jnp.float32) + dk_end).astype(k.dtype)
        dv = (dv.astype(jnp.float32) + dv_end).astype(v.dtype)
    ds_init = None
    if s_in is not None:
        dq = (dq.astype(jnp.float32) + states.apply_state_dq(do, s, s_in)).astype(q.dtype)
        if exchange is None:
            ds_init = d if ds_end is None else d + states.decay_pow(s, length)[None, :, None, None] * ds_end
    return dq, dk, dv, jnp.zeros_like(s), ds_init


attend.defvjp(_attend_fwd, _attend_bwd)
