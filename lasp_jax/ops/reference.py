"""The definition of decayed causal linear attention: the oracle every implementation is tested against.

    o_p = scale (sum_{r <= p} lambda_h^(p - r) (q_p . k_r) v_r  +  lambda_h^p q_p S_0),   lambda_h = exp(-s_h)
    S(P) = lambda_h^P S_0 + sum_{r < P} lambda_h^(P - r) k_r^T v_r              (the state "at the start of P")

Two independent formulations, written for clarity rather than speed: a dense one (O(T^2) memory, the oracle
for tests) and a token recurrence (the same recurrence a decoder steps through). Both compute in float32 with
full-precision matmuls, whatever the input dtype; every power of lambda is exp(-s * n) with n >= 0, and
`scale` multiplies the float32 decay weights. The causal mask selects (a later position's score is replaced,
not multiplied by zero), so a non-finite q or k at a later position never reaches an earlier output.

The `local_*` functions at the bottom give the reference the per-device contract that every implementation
module exposes (see `lasp_jax.ops.contract`), so `impl="reference"` runs through the same LASP machinery.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lasp_jax.ops import states

_HIGHEST = jax.lax.Precision.HIGHEST


def _grouped(q, k, v, rates):
    """Views the query heads as [Hkv, G] groups so K/V heads are indexed, never repeated."""
    b, t, h, dim_k = q.shape
    hkv = k.shape[2]
    g = h // hkv
    return (
        q.astype(jnp.float32).reshape(b, t, hkv, g, dim_k),
        k.astype(jnp.float32),
        v.astype(jnp.float32),
        rates.astype(jnp.float32).reshape(hkv, g),
    )


def dense(q, k, v, rates, initial_state=None, scale=1.0):
    """Dense oracle.

    Args:
      q: [B, T, H, Dk]; k: [B, T, Hkv, Dk]; v: [B, T, Hkv, Dv]; rates: [H] decay rates >= 0;
      initial_state: optional [B, H, Dk, Dv]; scale: a float multiplying every q.
    Returns:
      (o [B, T, H, Dv] float32, final_state [B, H, Dk, Dv] float32).
    """
    b, t, h, _ = q.shape
    dv = v.shape[-1]
    qg, kf, vf, rates_g = _grouped(q, k, v, rates)
    pos = jnp.arange(t, dtype=jnp.float32)
    gap = pos[:, None] - pos[None, :]  # p - r
    weights = scale * jnp.exp(-rates_g[..., None, None] * jnp.maximum(gap, 0.0))  # [Hkv, G, T, T]
    scores = jnp.where(gap >= 0, jnp.einsum("bpkgd,brkd->bkgpr", qg, kf, precision=_HIGHEST) * weights, 0.0)
    o = jnp.einsum("bkgpr,brke->bpkge", scores, vf, precision=_HIGHEST).reshape(b, t, h, dv)
    final = states.local_state(k, v, rates)
    if initial_state is not None:
        initial_state = initial_state.astype(jnp.float32)
        o = o + states.apply_state(q, rates, initial_state, scale)
        final = final + states.decay_pow(rates, t)[None, :, None, None] * initial_state
    return o, final


def step(q, k, v, rates, state, scale=1.0):
    """One token of the recurrence; the decoder's step.

    Args:
      q: [B, H, Dk]; k: [B, Hkv, Dk]; v: [B, Hkv, Dv]; rates: [H]; state: [B, H, Dk, Dv] float32, S(p); scale: a
      float multiplying q (applied to the float32 product).
    Returns:
      (o [B, H, Dv] float32, S(p + 1) [B, H, Dk, Dv] float32).
    """
    b, h, dim_k = q.shape
    hkv = k.shape[1]
    g = h // hkv
    kv = jnp.einsum("bkd,bke->bkde", k.astype(jnp.float32), v.astype(jnp.float32), precision=_HIGHEST)
    u = state.reshape(b, hkv, g, dim_k, -1) + kv[:, :, None]
    o = jnp.einsum("bkgd,bkgde->bkge", q.astype(jnp.float32).reshape(b, hkv, g, dim_k), u, precision=_HIGHEST)
    lam = jnp.exp(-rates.astype(jnp.float32)).reshape(1, hkv, g, 1, 1)
    return scale * o.reshape(b, h, -1), (lam * u).reshape(state.shape)


def recurrent(q, k, v, rates, initial_state=None, scale=1.0):
    """Token-by-token oracle (lax.scan over `step`); same signature and returns as `dense`."""
    b, t, h, dim_k = q.shape
    dv = v.shape[-1]
    if initial_state is None:
        initial_state = jnp.zeros((b, h, dim_k, dv), jnp.float32)

    def body(state, qkv):
        o, state = step(*qkv, rates, state, scale)
        return state, o

    xs = (jnp.moveaxis(q, 1, 0), jnp.moveaxis(k, 1, 0), jnp.moveaxis(v, 1, 0))
    final, o = jax.lax.scan(body, initial_state.astype(jnp.float32), xs)
    return jnp.moveaxis(o, 0, 1), final


# Per-device contract (S_in = 0, dS_out = 0); the LASP machinery adds the state terms itself.

def local_output(q, k, v, rates, scale=1.0):
    return dense(q, k, v, rates, scale=scale)[0].astype(q.dtype)


local_state = states.local_state


def local_backward(q, k, v, rates, do, scale=1.0):
    _, vjp = jax.vjp(lambda q, k, v: dense(q, k, v, rates, scale=scale)[0], q, k, v)
    return vjp(do.astype(jnp.float32))


def supported(q, k, v) -> str | None:
    return None
