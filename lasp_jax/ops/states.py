"""The d_k x d_v state terms shared by every implementation and by the sequence-parallel machinery.

A piece of L positions interacts with the rest of the sequence only through two fp32 states per head:
the state flowing in, S_in, and the state flowing out, S_end. Every formula here is a [L, d] x [d, d]
product (cheap next to the intra-chunk work) and is written once, for all implementations:

    local_state:        m     = sum_x lambda^(L - x) k_x^T v_x            (S_end of the piece when S_in = 0)
    apply_state:        o_x  += lambda^x q_x S_in                         (forward, the incoming state)
    apply_state_dq:     dq_x += lambda^x dO_x S_in^T                      (backward of the above, w.r.t. q)
    query_state_grad:   d     = sum_x lambda^x q_x^T dO_x                 (backward of the above, w.r.t. S_in)
    end_state_grads:    dk_x += lambda^(L - x) v_x dS_end^T,  dv_x += lambda^(L - x) k_x dS_end

Shapes: q, dO [B, L, H, D]; k, v [B, L, Hkv, D] with H % Hkv == 0 (query head h reads K/V head h // (H/Hkv));
s [H] decay rates; states [B, H, Dk, Dv] float32. Powers are exp(-s * n) with n >= 0, so they only underflow.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def decay_pow(s: jax.Array, n) -> jax.Array:
    """lambda^n = exp(-s * n) in float32; n >= 0 (broadcasts)."""
    return jnp.exp(-s.astype(jnp.float32) * jnp.asarray(n, jnp.float32))


def _position_decay(s, length, hkv, from_end):
    """[L, Hkv, G] weights lambda^x (or lambda^(L - x) when from_end)."""
    x = jnp.arange(length, dtype=jnp.float32)
    n = length - x if from_end else x
    return decay_pow(s.reshape(1, hkv, -1), n[:, None, None])


def local_state(k, v, s):
    """State at the end of the piece with S_in = 0. k [B,L,Hkv,Dk], v [B,L,Hkv,Dv], s [H] -> [B,H,Dk,Dv]."""
    b, length, hkv, dk = k.shape
    w = _position_decay(s, length, hkv, from_end=True)
    m = jnp.einsum("tkg,btkd,btke->bkgde", w, k.astype(jnp.float32), v.astype(jnp.float32), precision=_HIGHEST)
    return m.reshape(b, s.shape[0], dk, v.shape[-1])


def apply_state(q, s, state):
    """lambda^x q_x S_in for every local x. q [B,L,H,Dk], state [B,H,Dk,Dv] -> [B,L,H,Dv] float32."""
    b, length, h, _ = q.shape
    w = _position_decay(s, length, 1, from_end=False)[:, 0]  # [L, H]
    return jnp.einsum("th,bthd,bhde->bthe", w, q.astype(jnp.float32), state, precision=_HIGHEST)


def apply_state_dq(do, s, state):
    """lambda^x dO_x S_in^T. do [B,L,H,Dv], state [B,H,Dk,Dv] -> [B,L,H,Dk] float32."""
    length = do.shape[1]
    w = _position_decay(s, length, 1, from_end=False)[:, 0]
    return jnp.einsum("th,bthe,bhde->bthd", w, do.astype(jnp.float32), state, precision=_HIGHEST)


def query_state_grad(q, do, s):
    """sum_x lambda^x q_x^T dO_x, the cotangent of S_in. q [B,L,H,Dk], do [B,L,H,Dv] -> [B,H,Dk,Dv]."""
    length = q.shape[1]
    w = _position_decay(s, length, 1, from_end=False)[:, 0]
    return jnp.einsum("th,bthd,bthe->bhde", w, q.astype(jnp.float32), do.astype(jnp.float32), precision=_HIGHEST)


def end_state_grads(k, v, s, ds_end):
    """Cotangents of k and v through S_end. k [B,L,Hkv,Dk], v [B,L,Hkv,Dv], ds_end [B,H,Dk,Dv] -> (dk, dv) f32."""
    b, length, hkv, dk = k.shape
    w = _position_decay(s, length, hkv, from_end=True)
    g = ds_end.reshape(b, hkv, -1, dk, v.shape[-1])
    dk_ = jnp.einsum("tkg,btke,bkgde->btkd", w, v.astype(jnp.float32), g, precision=_HIGHEST)
    dv_ = jnp.einsum("tkg,btkd,bkgde->btke", w, k.astype(jnp.float32), g, precision=_HIGHEST)
    return dk_, dv_
