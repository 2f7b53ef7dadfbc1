"""Input validation shared by linear_attention and lasp_attention: bad input fails early, by name."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _shape(name, x):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise ValueError(f"{name} must be an array, got {type(x).__name__}")
    return tuple(x.shape)


def attention_inputs(q, k, v, decay) -> jax.Array:
    """Checks q [B,T,H,Dk], k [B,T,Hkv,Dk], v [B,T,Hkv,Dv] and decay ([H] rates >= 0 or None).

    Returns the decay rates as a float32 [H] array (zeros for None). A concrete decay (a Python/NumPy value or
    a committed array) with a negative or non-finite rate is a ValueError. A traced decay (under jit) cannot be
    read here, so a bad rate is made loud instead of silently wrong: it becomes NaN, which turns every output,
    gradient and final state of that head NaN (every position reads the head's lambda^0 = exp(-NaN * 0)); the
    other heads are unaffected.
    """
    qs, ks, vs = _shape("q", q), _shape("k", k), _shape("v", v)
    for name, shape in (("q", qs), ("k", ks), ("v", vs)):
        if len(shape) != 4:
            raise ValueError(f"{name} must have rank 4 [B, T, heads, head_dim], got shape {shape}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    (b, t, h, dk), (bk, tk, hkv, dkk), (bv, tv, hv, _) = qs, ks, vs
    if (bk, tk) != (b, t) or (bv, tv) != (b, t):
        raise ValueError(f"q, k, v must share batch and sequence dims [B, T]: got q {qs}, k {ks}, v {vs}")
    if hv != hkv:
        raise ValueError(f"k and v must have the same number of heads: k has {hkv}, v has {hv}")
    if dkk != dk:
        raise ValueError(f"q and k must have the same head dim: q has {dk}, k has {dkk}")
    if hkv == 0 or h % hkv != 0:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({hkv}) (MHA, GQA or MQA)")
    if t < 1:
        raise ValueError(f"the sequence must hold at least one position, got T={t}")
    for name, n in (("batch B", b), ("query heads H", h), ("head dim Dk", dk), ("head dim Dv", vs[3])):
        if n < 1:
            raise ValueError(f"{name} must be >= 1, got shapes q {qs}, k {ks}, v {vs}")
    if decay is None:
        return jnp.zeros((h,), jnp.float32)
    if np.ndim(decay) != 1 or np.shape(decay)[0] != h:
        raise ValueError(f"decay must have shape [H] = [{h}] (one rate per query head), got {np.shape(decay)}")
    if isinstance(decay, jax.core.Tracer):
        rates = jnp.asarray(decay, jnp.float32)
        return jnp.where(jnp.isfinite(rates) & (rates >= 0), rates, jnp.nan)
    values = np.asarray(decay, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise ValueError(f"decay rates must be finite, got {values}")
    if np.any(values < 0):
        raise ValueError(f"decay rates must be >= 0 (lambda = exp(-s) <= 1), got {values}")
    return jnp.asarray(decay, jnp.float32)


def state(name, x, shape) -> jax.Array:
    got = _shape(name, x)
    if got != tuple(shape):
        raise ValueError(f"{name} must have shape [B, H, Dk, Dv] = {list(shape)}, got {list(got)}")
    return x.astype(jnp.float32)
