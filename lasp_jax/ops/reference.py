"""The definition of decayed causal linear attention: the oracle every implementation is tested against.

    o_p = scale (sum_{r <= p} lambda_h^(p - r) (q_p . k_r) v_r  +  lambda_h^p q_p S_0),   lambda_h = exp(-s_h)
    S(P) = lambda_h^P S_0 + sum_{r < P} lambda_h^(P - r) k_r^T v_r              (the state "at the start of P")

Two independent formulations, written for clarity rather than speed: a dense one (O(T^2) memory, the oracle
for tests) and a token recurrence (the same recurrence a decoder steps through). Both compute in float32 with
full-precision matmuls, whatever the input dtype; every power of lambda is exp(-s * n) with n >= 0, and
`scale` multiplies the float32 decay weights. The causal mask selects (a later position's score is replaced,
not multiplied by zero), so a non-finite q or k at a later position never reaches an earlier output.

Per-token decay and documents (`dense_tokens`): rates s_t >= 0 per (b, t, h), lambda_t = exp(-s_t), and document
starts where segment_ids changes from t-1 to t:

    o_t = scale (sum_{r <= t, same document} exp(-(s_(r+1) + ... + s_t)) (q_t . k_r) v_r
                 + [t in position 0's document] exp(-(s_0 + ... + s_t)) q_t S_0)
    final state = sum_{r in the last document} exp(-(s_(r+1) + ... + s_(T-1))) k_r^T v_r
                  (+ exp(-(s_0 + ... + s_(T-1))) S_0 when the row is one document)

i.e. the state after position t, H_t = exp(-s_t) H_(t-1) + k_t^T v_t, reset at a document start; the final state
is H_(T-1), and it chains into a next call's initial state. (The constant-rate path above keeps its own
convention, S(T) = lambda H_(T-1).) The exponents are differences of cumulative sums, computed in the inputs'
precision: in float64 (jax_enable_x64) this is the oracle; in float32 it loses about ulp(s_0 + ... + s_t)
absolutely per exponent, so it is no oracle for long or steep rows.

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


def step_tokens(q, k, v, rates, state, scale=1.0, reset=None):
    """One token under per-token decay: H_t = exp(-s_t) H_(t-1) + k_t^T v_t (H_(t-1) dropped where `reset`, a
    document start), o_t = scale q_t H_t.

    Args:
      q: [B, H, Dk]; k: [B, Hkv, Dk]; v: [B, Hkv, Dv]; rates: [B, H], this position's s_t; state: [B, H, Dk, Dv]
      float32, H_(t-1); scale: a float multiplying q; reset: None or [B] bool.
    Returns:
      (o [B, H, Dv] float32, H_t [B, H, Dk, Dv] float32).
    """
    b, h, dim_k = q.shape
    hkv = k.shape[1]
    kv = jnp.einsum("bkd,bke->bkde", k.astype(jnp.float32), v.astype(jnp.float32), precision=_HIGHEST)
    decayed = jnp.exp(-rates.astype(jnp.float32))[:, :, None, None] * state
    if reset is not None:
        decayed = jnp.where(reset[:, None, None, None], 0.0, decayed)
    u = decayed.reshape(b, hkv, -1, dim_k, v.shape[-1]) + kv[:, :, None]
    o = jnp.einsum("bkgd,bkgde->bkge", q.astype(jnp.float32).reshape(b, hkv, -1, dim_k), u, precision=_HIGHEST)
    return scale * o.reshape(b, h, -1), u.reshape(state.shape)


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


def documents(segment_ids):
    """[B, T] int32 document index: the number of id changes in (0, t] (ids that recur later start a new one)."""
    change = jnp.pad(segment_ids[:, 1:] != segment_ids[:, :-1], ((0, 0), (1, 0)))
    return jnp.cumsum(change.astype(jnp.int32), axis=1)


def _pair_weights(cumulative, docs, hkv):
    """[B, Hkv, G, T, T] exp(-(c_p - c_r)) for r <= p in one document, else 0 (selected). cumulative [B, T, H]."""
    t = cumulative.shape[1]
    gap = cumulative[:, :, None] - cumulative[:, None, :]  # [B, P, R, H]
    keep = (jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]) & (docs[:, :, None] == docs[:, None, :])
    w = jnp.where(keep[..., None], jnp.exp(-jnp.where(keep[..., None], gap, 0.0)), 0.0)
    return jnp.moveaxis(w, 3, 1).reshape(w.shape[0], hkv, -1, t, t)


def dense_tokens(q, k, v, rates, segment_ids=None, initial_state=None, scale=1.0):
    """Dense oracle with per-token decay and documents (module docstring), in float32 or wider (float64 inputs
    compute in float64).

    Args:
      q: [B, T, H, Dk]; k: [B, T, Hkv, Dk]; v: [B, T, Hkv, Dv]; rates: [B, T, H] >= 0; segment_ids: None or
      [B, T] integers; initial_state: optional [B, H, Dk, Dv]; scale: a float multiplying every q.
    Returns:
      (o [B, T, H, Dv], final_state [B, H, Dk, Dv]) in the computation's dtype.
    """
    dtype = jnp.promote_types(q.dtype, jnp.float32)
    b, t, h, dim_k = q.shape
    hkv, dim_v = k.shape[2], v.shape[-1]
    qg = q.astype(dtype).reshape(b, t, hkv, -1, dim_k)
    kf, vf = k.astype(dtype), v.astype(dtype)
    cumulative = jnp.cumsum(rates.astype(dtype), axis=1)  # c_t = s_0 + ... + s_t
    docs = jnp.zeros((b, t), jnp.int32) if segment_ids is None else documents(segment_ids)
    scores = jnp.einsum("bpkgd,brkd->bkgpr", qg, kf, precision=_HIGHEST) * _pair_weights(cumulative, docs, hkv)
    o = scale * jnp.einsum("bkgpr,brke->bpkge", scores, vf, precision=_HIGHEST).reshape(b, t, h, dim_v)
    last = docs == docs[:, -1:]
    w_end = jnp.where(last[..., None], jnp.exp(-jnp.where(last[..., None], cumulative[:, -1:] - cumulative, 0.0)),
                      0.0).reshape(b, t, hkv, -1)
    final = jnp.einsum("btkg,btkd,btke->bkgde", w_end, kf, vf, precision=_HIGHEST).reshape(b, h, dim_k, dim_v)
    if initial_state is not None:
        s0 = initial_state.astype(dtype)
        first = (docs == 0)[..., None]
        w_in = jnp.where(first, jnp.exp(-cumulative), 0.0)
        o = o + scale * jnp.einsum("bth,bthd,bhde->bthe", w_in, q.astype(dtype), s0, precision=_HIGHEST)
        final = final + jnp.where(docs[:, -1:] == 0, jnp.exp(-cumulative[:, -1]), 0.0)[..., None, None] * s0
    return o, final


# Per-device contract (S_in = 0, dS_out = 0); the LASP machinery adds the state terms itself.

def local_output(q, k, v, rates, scale=1.0):
    return dense(q, k, v, rates, scale=scale)[0].astype(q.dtype)


local_state = states.local_state


def local_backward(q, k, v, rates, do, scale=1.0):
    _, vjp = jax.vjp(lambda q, k, v: dense(q, k, v, rates, scale=scale)[0], q, k, v)
    return vjp(do.astype(jnp.float32))


def local_output_tokens(q, k, v, tok, scale=1.0):
    """Per-token contract (states.TokenDecay of the piece): the dense output with S_in = 0, in q's dtype."""
    b, t, h, dim_k = q.shape
    hkv = k.shape[2]
    w = _pair_weights(tok.cumulative, tok.counts, hkv)
    qg, kf, vf, _ = _grouped(q, k, v, jnp.zeros((h,)))
    scores = jnp.einsum("bpkgd,brkd->bkgpr", qg, kf, precision=_HIGHEST) * w
    return (scale * jnp.einsum("bkgpr,brke->bpkge", scores, vf, precision=_HIGHEST)).reshape(b, t, h, -1).astype(
        q.dtype)


def local_backward_tokens(q, k, v, tok, do, scale=1.0):
    """(dq, dk, dv, x) of local_output_tokens; x_t = k_t . dk_t - q_t . dq_t per query head [B, T, H] float32,
    from the dense pair terms P[p, r] = scale w[p, r] (q_p . k_r) (dO_p . v_r)."""
    b, t, h, dim_k = q.shape
    hkv = k.shape[2]
    _, vjp = jax.vjp(lambda q, k, v: local_output_tokens(q, k, v, tok, scale).astype(jnp.float32), q, k, v)
    dq, dk, dv = vjp(do.astype(jnp.float32))
    qg, kf, vf, _ = _grouped(q, k, v, jnp.zeros((h,)))
    dog = do.astype(jnp.float32).reshape(b, t, hkv, -1, v.shape[-1])
    pairs = scale * _pair_weights(tok.cumulative, tok.counts, hkv) * (
        jnp.einsum("bpkgd,brkd->bkgpr", qg, kf, precision=_HIGHEST)
        * jnp.einsum("bpkge,brke->bkgpr", dog, vf, precision=_HIGHEST))
    x = jnp.sum(pairs, axis=-2) - jnp.sum(pairs, axis=-1)  # [B, Hkv, G, T]
    return dq, dk, dv, jnp.moveaxis(x.reshape(b, h, t), 1, 2)


def supported(q, k, v) -> str | None:
    return None
