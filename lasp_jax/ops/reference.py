"""The definition of decayed causal linear attention: the oracle every implementation is tested against.

    o_p = scale (sum_{r <= p} lambda_h^(p - r) (q_p . k_r) v_r  +  lambda_h^p q_p S_0),   lambda_h = exp(-s_h)
    S(P) = lambda_h^P S_0 + sum_{r < P} lambda_h^(P - r) k_r^T v_r              (the state "at the start of P")

Two independent formulations, written for clarity rather than speed: a dense one (O(T^2) memory, the oracle
for tests) and a token recurrence (the same recurrence a decoder steps through). Both compute in float32 with
full-precision matmuls, whatever the input dtype; every power of lambda is exp(-s * n) with n >= 0, and
`scale` multiplies the float32 decay weights. The causal mask selects (a later position's score is replaced,
not multiplied by zero), so a non-finite q or k at a later position never reaches an earlier output.

Heads: q [B, T, Hq, Dk], k [B, T, Hk, Dk], v [B, T, Hv, Dv] with H = max(Hq, Hv) output heads; output head h
reads head h // (H / Hx) of each input (MHA, GQA / MQA, GVA), viewed as head groups (states.grouped), never
repeated.

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


def _grouped(dtype, *xs):
    """q, k, v ([..., heads, D] each) as head groups [..., Hs, heads / Hs, D] in dtype (states.grouped): output
    head s * G + g reads them by index, nothing is repeated."""
    groups = states.head_groups(*xs)
    return tuple(states.grouped(x.astype(dtype), groups) for x in xs)


def dense(q, k, v, rates, initial_state=None, scale=1.0):
    """Dense oracle.

    Args:
      q: [B, T, Hq, Dk]; k: [B, T, Hk, Dk]; v: [B, T, Hv, Dv] (output head h reads head h // (H / Hx) of each;
      H = max(Hq, Hv)); rates: [H] decay rates >= 0; initial_state: optional [B, H, Dk, Dv]; scale: a float
      multiplying every q.
    Returns:
      (o [B, T, H, Dv] float32, final_state [B, H, Dk, Dv] float32).
    """
    b, t = q.shape[:2]
    h, dv = rates.shape[0], v.shape[-1]
    qg, kg, vg = _grouped(jnp.float32, q, k, v)
    rates_g = rates.astype(jnp.float32).reshape(qg.shape[2], -1)
    pos = jnp.arange(t, dtype=jnp.float32)
    gap = pos[:, None] - pos[None, :]  # p - r
    weights = scale * jnp.exp(-rates_g[..., None, None] * jnp.maximum(gap, 0.0))  # [Hs, G, T, T]
    scores = jnp.where(gap >= 0, jnp.einsum("bpkgd,brkgd->bkgpr", qg, kg, precision=_HIGHEST) * weights, 0.0)
    o = jnp.einsum("bkgpr,brkge->bpkge", scores, vg, precision=_HIGHEST).reshape(b, t, h, dv)
    final = states.local_state(k, v, rates)
    if initial_state is not None:
        initial_state = initial_state.astype(jnp.float32)
        o = o + states.apply_state(q, rates, initial_state, scale)
        final = final + states.decay_pow(rates, t)[None, :, None, None] * initial_state
    return o, final


def _step_update(k, v, decayed_state):
    """decayed_state [B, H, Dk, Dv] + k^T v per output head, as head groups [B, Hs, G, Dk, Dv] float32."""
    b, h, dim_k, dim_v = decayed_state.shape
    kg, vg = _grouped(jnp.float32, k, v)
    kv = jnp.einsum("bkgd,bkge->bkgde", kg, vg, precision=_HIGHEST)
    return decayed_state.reshape(b, kg.shape[1], -1, dim_k, dim_v) + kv


def _step_read(q, u, scale):
    """scale q u per output head: q [B, Hq, Dk], u [B, Hs, G, Dk, Dv] -> [B, H, Dv] float32."""
    qg = states.grouped(q.astype(jnp.float32), u.shape[1])
    o = jnp.einsum("bkgd,bkgde->bkge", qg, u, precision=_HIGHEST)
    return scale * o.reshape(o.shape[0], -1, o.shape[-1])


def step(q, k, v, rates, state, scale=1.0):
    """One token of the recurrence; the decoder's step.

    Args:
      q: [B, Hq, Dk]; k: [B, Hk, Dk]; v: [B, Hv, Dv]; rates: [H]; state: [B, H, Dk, Dv] float32, S(p); scale: a
      float multiplying q (applied to the float32 product).
    Returns:
      (o [B, H, Dv] float32, S(p + 1) [B, H, Dk, Dv] float32).
    """
    u = _step_update(k, v, state)
    lam = jnp.exp(-rates.astype(jnp.float32)).reshape(1, u.shape[1], -1, 1, 1)
    return _step_read(q, u, scale), (lam * u).reshape(state.shape)


def step_tokens(q, k, v, rates, state, scale=1.0, reset=None):
    """One token under per-token decay: H_t = exp(-s_t) H_(t-1) + k_t^T v_t (H_(t-1) dropped where `reset`, a
    document start), o_t = scale q_t H_t.

    Args:
      q: [B, Hq, Dk]; k: [B, Hk, Dk]; v: [B, Hv, Dv]; rates: [B, H], this position's s_t; state: [B, H, Dk, Dv]
      float32, H_(t-1); scale: a float multiplying q; reset: None or [B] bool.
    Returns:
      (o [B, H, Dv] float32, H_t [B, H, Dk, Dv] float32).
    """
    decayed = jnp.exp(-rates.astype(jnp.float32))[:, :, None, None] * state
    if reset is not None:
        decayed = jnp.where(reset[:, None, None, None], 0.0, decayed)
    u = _step_update(k, v, decayed)
    return _step_read(q, u, scale), u.reshape(state.shape)


def recurrent(q, k, v, rates, initial_state=None, scale=1.0):
    """Token-by-token oracle (lax.scan over `step`); same signature and returns as `dense`."""
    b, dim_k, dim_v = q.shape[0], q.shape[-1], v.shape[-1]
    if initial_state is None:
        initial_state = jnp.zeros((b, rates.shape[0], dim_k, dim_v), jnp.float32)

    def body(state, qkv):
        o, state = step(*qkv, rates, state, scale)
        return state, o

    xs = (jnp.moveaxis(q, 1, 0), jnp.moveaxis(k, 1, 0), jnp.moveaxis(v, 1, 0))
    final, o = jax.lax.scan(body, initial_state.astype(jnp.float32), xs)
    return jnp.moveaxis(o, 0, 1), final


def _pairs(scores, cumulative, docs, scale):
    """scale exp(-(c_p - c_r)) scores[p, r] for r <= p in one document, else 0 (selected: a non-finite score of
    another document or a later position is dropped). scores [B, Hs, 1 or G, T, T]; cumulative [B, T, H]."""
    t = cumulative.shape[1]
    gap = cumulative[:, :, None] - cumulative[:, None, :]  # [B, P, R, H]
    keep = (jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]) & (docs[:, :, None] == docs[:, None, :])
    w = jnp.exp(-jnp.where(keep[..., None], gap, 0.0))
    w = jnp.moveaxis(w, 3, 1).reshape(w.shape[0], scores.shape[1], -1, t, t)
    return jnp.where(keep[:, None, None], scale * w * scores, 0.0)


def _selected_sum(spec, w, keep, *xs):
    """einsum of w [B, T, H] (grouped like xs) and xs over the positions where keep [B, T] (selected)."""
    keep = keep.reshape(keep.shape + (1,) * (xs[0].ndim - 2))
    w = states.grouped(w[..., None], xs[0].shape[2])[..., 0]
    return jnp.einsum(spec, w, *(jnp.where(keep, x, 0.0) for x in xs), precision=_HIGHEST)


def dense_tokens(q, k, v, rates, segment_ids=None, initial_state=None, scale=1.0):
    """Dense oracle with per-token decay and documents (module docstring), in float32 or wider (float64 inputs
    compute in float64). The scores of pairs in two documents and the states' terms of other documents are
    selected out (the score-times-value matmul still multiplies a non-finite value by the zero scores of other
    documents' rows: this dense row is one chunk).

    Args:
      q: [B, T, Hq, Dk]; k: [B, T, Hk, Dk]; v: [B, T, Hv, Dv] (heads as in `dense`); rates: [B, T, H] >= 0;
      segment_ids: None or [B, T] integers; initial_state: optional [B, H, Dk, Dv]; scale: a float multiplying
      every q.
    Returns:
      (o [B, T, H, Dv], final_state [B, H, Dk, Dv]) in the computation's dtype.
    """
    dtype = jnp.promote_types(q.dtype, jnp.float32)
    b, t, _, dim_k = q.shape
    h, dim_v = rates.shape[2], v.shape[-1]
    qg, kg, vg = _grouped(dtype, q, k, v)
    cumulative = jnp.cumsum(rates.astype(dtype), axis=1)  # c_t = s_0 + ... + s_t
    docs = jnp.zeros((b, t), jnp.int32) if segment_ids is None else states.document_numbers(segment_ids)
    scores = _pairs(jnp.einsum("bpkgd,brkgd->bkgpr", qg, kg, precision=_HIGHEST), cumulative, docs, scale)
    o = jnp.einsum("bkgpr,brkge->bpkge", scores, vg, precision=_HIGHEST).reshape(b, t, h, dim_v)
    last = docs == docs[:, -1:]
    w_end = jnp.exp(-jnp.where(last[..., None], cumulative[:, -1:] - cumulative, 0.0))
    final = _selected_sum("btkg,btkgd,btkge->bkgde", w_end, last, kg, vg).reshape(b, h, dim_k, dim_v)
    if initial_state is not None:
        s0 = initial_state.astype(dtype).reshape(b, qg.shape[2], -1, dim_k, dim_v)
        first = docs == 0
        w_in = scale * jnp.exp(-cumulative)
        o_in = jnp.einsum("btkg,btkgd,bkgde->btkge", states.grouped(w_in[..., None], qg.shape[2])[..., 0], qg, s0,
                          precision=_HIGHEST)
        o = o + jnp.where(first[..., None, None], o_in.reshape(o.shape), 0.0)
        into_final = (docs[:, -1] == 0)[:, None, None, None]  # the row is one document
        s0_end = jnp.exp(-cumulative[:, -1])[..., None, None] * initial_state.astype(dtype)
        final = final + jnp.where(into_final, s0_end, 0.0)
    return o, final


# Per-device contract (S_in = 0, dS_end = 0); the LASP machinery adds the state terms itself.

def local_output(q, k, v, rates, scale=1.0):
    return dense(q, k, v, rates, scale=scale)[0].astype(q.dtype)


local_state = states.local_state


def local_backward(q, k, v, rates, do, scale=1.0):
    _, vjp = jax.vjp(lambda q, k, v: dense(q, k, v, rates, scale=scale)[0], q, k, v)
    return vjp(do.astype(jnp.float32))


def local_output_tokens(q, k, v, tok, scale=1.0):
    """Per-token contract (states.TokenDecay of the piece): the dense output with S_in = 0, in q's dtype."""
    b, t = q.shape[:2]
    qg, kg, vg = _grouped(jnp.float32, q, k, v)
    scores = _pairs(jnp.einsum("bpkgd,brkgd->bkgpr", qg, kg, precision=_HIGHEST), tok.cumulative, tok.counts, scale)
    return jnp.einsum("bkgpr,brkge->bpkge", scores, vg, precision=_HIGHEST).reshape(b, t, -1, v.shape[-1]).astype(
        q.dtype)


def local_backward_tokens(q, k, v, tok, do, scale=1.0):
    """(dq, dk, dv, x) of local_output_tokens; x_t = k_t . dk_t - q_t . dq_t per output head [B, T, H] float32,
    from the dense pair terms P[p, r] = scale w[p, r] (q_p . k_r) (dO_p . v_r)."""
    b, t, _, _ = q.shape
    h = tok.rates.shape[2]
    _, vjp = jax.vjp(lambda q, k, v: local_output_tokens(q, k, v, tok, scale).astype(jnp.float32), q, k, v)
    dq, dk, dv = vjp(do.astype(jnp.float32))
    qg, kg, vg = _grouped(jnp.float32, q, k, v)
    dog = states.grouped(do.astype(jnp.float32), qg.shape[2])
    qk = jnp.einsum("bpkgd,brkgd->bkgpr", qg, kg, precision=_HIGHEST)
    pairs = _pairs(qk * jnp.einsum("bpkge,brkge->bkgpr", dog, vg, precision=_HIGHEST), tok.cumulative, tok.counts,
                   scale)
    x = jnp.sum(pairs, axis=-2) - jnp.sum(pairs, axis=-1)  # [B, Hs, G, T]
    return dq, dk, dv, jnp.moveaxis(x.reshape(b, h, t), 1, 2)


def supported(q, k, v) -> str | None:
    return None
