"""The d_k x d_v state terms shared by every implementation and by the sequence-parallel machinery.

A piece of L positions interacts with the rest of the sequence only through two fp32 states per head:
the state flowing in, S_in, and the state flowing out, S_end. Every formula here is a [L, d] x [d, d]
product (cheap next to the intra-chunk work) and is written once, for all implementations:

    local_state:        m     = sum_x lambda^(L - x) k_x^T v_x            (S_end of the piece when S_in = 0)
    apply_state:        o_x  += scale lambda^x q_x S_in                   (forward, the incoming state)
    apply_state_dq:     dq_x += scale lambda^x dO_x S_in^T                (backward of the above, w.r.t. q)
    query_state_grad:   d     = scale sum_x lambda^x q_x^T dO_x           (backward of the above, w.r.t. S_in)
    end_state_grads:    dk_x += lambda^(L - x) v_x dS_end^T,  dv_x += lambda^(L - x) k_x dS_end

and the weights that chain such states across pieces or devices (prefix_weights, applied by weighted_sum: the
exclusive decayed prefix and suffix over items of a fixed length).

Shapes: q, dO [B, L, H, D]; k, v [B, L, Hkv, D] with H % Hkv == 0 (query head h reads K/V head h // (H/Hkv));
rates [H], the decay rates s (lambda = exp(-s)); states [B, H, Dk, Dv] float32. Powers are exp(-s * n) with
n >= 0, so they only underflow.

Numerics: products accumulate in float32. `scale` (the attention's, a static float) multiplies the float32
decay row of the q-side terms before that row meets the tokens, so q is never rescaled in its own dtype. With
float32 inputs every operand stays float32 at full precision. With bf16 / fp16 inputs the (decay-weighted,
scaled) token operands and the state are rounded to the input dtype, so the products run on the matrix units:
at T=64K, H=16, d=128 on an H200 a product of this form took 0.31 ms against 1.10 ms for apply_state in
full-precision float32 (benchmarks/results/LASP_GPU_NOTES.md), and the rounding is that of the inputs
themselves. XLA:CPU has no bf16 x bf16 -> float32 dot, so on CPU the operands are float32 whatever the input
dtype. `weighted_sum` chains states with a select rather than a product by the zero weights, so a
non-finite later state never reaches an earlier one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def decay_pow(rates: jax.Array, n) -> jax.Array:
    """lambda^n = exp(-s * n) in float32; n >= 0 (broadcasts)."""
    return jnp.exp(-rates.astype(jnp.float32) * jnp.asarray(n, jnp.float32))


def prefix_weights(rates: jax.Array, stride, rows: int, cols: int) -> jax.Array:
    """[H, rows, cols] float32 w[h, r, j] = lambda_h^(stride (r - 1 - j)) for j < r, else 0.

    Row r weighs the items j before it (pieces of `stride` positions, or ranks with stride 1) by the decay from
    the end of item j to the start of item r: sum_j w[h, r, j] m_j is the exclusive decayed prefix entering r,
    and sum_r w[h, r, j] d_r (the transpose) the exclusive decayed suffix leaving j. rates [H]."""
    r = jnp.arange(rows, dtype=jnp.float32)[:, None]
    j = jnp.arange(cols, dtype=jnp.float32)[None, :]
    gap = r - 1.0 - j
    power = decay_pow(jnp.asarray(rates)[:, None, None], jnp.asarray(stride, jnp.float32) * jnp.maximum(gap, 0.0))
    return jnp.where(gap >= 0, power, 0.0)


def weighted_sum(w: jax.Array, x: jax.Array) -> jax.Array:
    """sum_j w[h, r, j] x[b, h, j] over the j with w[h, r, j] != 0: w [H, R, J], x [B, H, J, ...] -> [B, H, R, ...]
    float32 (exact float32 products). The zero weights select their items out instead of multiplying them, so
    a non-finite x_j reaches only the rows that weigh it (with prefix_weights: only later pieces or ranks)."""
    extra = (None,) * (x.ndim - 3)
    w = w[(None, slice(None), slice(None), slice(None)) + extra]
    return jnp.sum(jnp.where(w != 0, w * x[:, :, None].astype(jnp.float32), 0.0), axis=3)


def _compute_dtype(x):
    """(operand dtype, precision) for products of tokens of x's dtype; see the module's numerics."""
    if jnp.dtype(x.dtype).itemsize < 4 and jax.default_backend() != "cpu":
        return x.dtype, jax.lax.Precision.DEFAULT
    return jnp.float32, _HIGHEST


def _einsum(spec, a, b, dtype, precision):
    return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), precision=precision,
                      preferred_element_type=jnp.float32)


def _position_decay(rates, length, hkv, from_end, scale=1.0):
    """[L, Hkv, G] weights scale lambda^x (or scale lambda^(L - x) when from_end), float32."""
    x = jnp.arange(length, dtype=jnp.float32)
    n = length - x if from_end else x
    return scale * decay_pow(rates.reshape(1, hkv, -1), n[:, None, None])


def local_state(k, v, rates):
    """State at the end of the piece with S_in = 0. k [B,L,Hkv,Dk], v [B,L,Hkv,Dv], rates [H] -> [B,H,Dk,Dv]."""
    b, length, hkv, dim_k = k.shape
    dtype, precision = _compute_dtype(k)
    w = _position_decay(rates, length, hkv, from_end=True)  # [L, Hkv, G]
    kw = w[None, :, :, :, None] * k.astype(jnp.float32)[:, :, :, None, :]  # [B, L, Hkv, G, Dk]
    m = _einsum("btkgd,btke->bkgde", kw, v, dtype, precision)
    return m.reshape(b, rates.shape[0], dim_k, v.shape[-1])


def apply_state(q, rates, state, scale=1.0):
    """scale lambda^x q_x S_in for every local x. q [B,L,H,Dk], state [B,H,Dk,Dv] -> [B,L,H,Dv] float32."""
    dtype, precision = _compute_dtype(q)
    w = _position_decay(rates, q.shape[1], 1, False, scale)[:, 0]  # [L, H]
    return _einsum("bthd,bhde->bthe", w[None, :, :, None] * q.astype(jnp.float32), state, dtype, precision)


def apply_state_dq(do, rates, state, scale=1.0):
    """scale lambda^x dO_x S_in^T. do [B,L,H,Dv], state [B,H,Dk,Dv] -> [B,L,H,Dk] float32."""
    dtype, precision = _compute_dtype(do)
    w = _position_decay(rates, do.shape[1], 1, False, scale)[:, 0]
    return _einsum("bthe,bhde->bthd", w[None, :, :, None] * do.astype(jnp.float32), state, dtype, precision)


def query_state_grad(q, do, rates, scale=1.0):
    """scale sum_x lambda^x q_x^T dO_x, the cotangent of S_in. q [B,L,H,Dk], do [B,L,H,Dv] -> [B,H,Dk,Dv]."""
    dtype, precision = _compute_dtype(q)
    w = _position_decay(rates, q.shape[1], 1, False, scale)[:, 0]
    return _einsum("bthd,bthe->bhde", w[None, :, :, None] * q.astype(jnp.float32), do, dtype, precision)


def end_state_grads(k, v, rates, ds_end):
    """Cotangents of k and v through S_end. k [B,L,Hkv,Dk], v [B,L,Hkv,Dv], ds_end [B,H,Dk,Dv] -> (dk, dv) f32."""
    b, length, hkv, dim_k = k.shape
    dtype, precision = _compute_dtype(k)
    w = _position_decay(rates, length, hkv, from_end=True)[None, :, :, :, None]  # [1, L, Hkv, G, 1]
    g = ds_end.reshape(b, hkv, -1, dim_k, v.shape[-1])
    vw = w * v.astype(jnp.float32)[:, :, :, None, :]  # [B, L, Hkv, G, Dv]
    kw = w * k.astype(jnp.float32)[:, :, :, None, :]
    dk = _einsum("btkge,bkgde->btkd", vw, g, dtype, precision)
    dv = _einsum("btkgd,bkgde->btke", kw, g, dtype, precision)
    return dk, dv
