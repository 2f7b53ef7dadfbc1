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
    """Checks q [B,T,Hq,Dk], k [B,T,Hk,Dk], v [B,T,Hv,Dv] and decay: None, [H] constant rates or [B, T, H]
    per-token rates, every rate >= 0. Heads: H = max(Hq, Hv) output heads; k has q's heads or v's, and the
    smaller of Hq, Hv divides the larger. (Hq, Hk, Hv) is then MHA, GQA / MQA (Hq = H, Hk = Hv), GVA (Hv = H,
    Hk = Hq, Mamba-2's groups), or one of the two layouts that mix them: v with fewer heads than q and k
    (Hq = Hk = H, e.g. (4, 4, 2): a value head serves H / Hv query/key heads) or q with fewer heads than k and v
    (Hk = Hv = H, e.g. (2, 4, 4): a query head serves H / Hq key/value heads). Output head h reads head
    h // (H / Hx) of each input (`output_heads`).

    Returns the rates as a float32 array of decay's shape ([H] zeros for None). A concrete decay (a Python/NumPy
    value or a committed array) with a negative or non-finite rate is a ValueError naming it. A traced decay
    (under jit) cannot be read here, so a bad rate is made loud instead of silently wrong: constant rates: the
    rate becomes NaN, which turns every output, gradient and final state of that head NaN (every position reads
    the head's lambda^0 = exp(-NaN * 0)); per-token rates: that rate becomes NaN, which turns NaN every output
    of its (batch row, head) that depends on it (from its position on, to the end of its document at least;
    also on later sequence-parallel ranks), its gradients and the final state it reaches, while the outputs before
    it stay exact (an elementwise rule: checking a whole row would cost a collective under sequence parallelism).
    The other heads (rows) are unaffected.
    """
    qs, ks, vs = _shape("q", q), _shape("k", k), _shape("v", v)
    for name, shape in (("q", qs), ("k", ks), ("v", vs)):
        if len(shape) != 4:
            raise ValueError(f"{name} must have rank 4 [B, T, heads, head_dim], got shape {shape}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    (b, t, hq, dim_k), (bk, tk, hk, dim_k_of_k), (bv, tv, hv, _) = qs, ks, vs
    if (bk, tk) != (b, t) or (bv, tv) != (b, t):
        raise ValueError(f"q, k, v must share batch and sequence dims [B, T]: got q {qs}, k {ks}, v {vs}")
    if dim_k_of_k != dim_k:
        raise ValueError(f"q and k must have the same head dim: q has {dim_k}, k has {dim_k_of_k}")
    if hk not in (hq, hv):
        raise ValueError(f"k must have the same number of heads as q (GVA) or as v (MHA, GQA, MQA): q has {hq}, "
                         f"k {hk}, v {hv} (shapes q {qs}, k {ks}, v {vs})")
    h = max(hq, hv)
    if min(hq, hv) == 0 or h % min(hq, hv):
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hv}) (MHA, GQA or MQA), or "
                         f"value heads a multiple of query/key heads (GVA): got q {qs}, k {ks}, v {vs}")
    if t < 1:
        raise ValueError(f"the sequence must hold at least one position, got T={t}")
    for name, n in (("batch B", b), ("heads H", h), ("head dim Dk", dim_k), ("head dim Dv", vs[3])):
        if n < 1:
            raise ValueError(f"{name} must be >= 1, got shapes q {qs}, k {ks}, v {vs}")
    if decay is None:
        return jnp.zeros((h,), jnp.float32)
    if np.shape(decay) not in ((h,), (b, t, h)):
        raise ValueError(f"decay must have shape [H] = [{h}] (one constant rate per output head) or [B, T, H] = "
                         f"{[b, t, h]} (per-token rates), got {np.shape(decay)}")
    per_token = np.ndim(decay) == 3
    if per_token and not jnp.issubdtype(jnp.result_type(decay), jnp.floating):
        raise ValueError(f"per-token decay rates must be a floating-point array, got dtype {jnp.result_type(decay)}")
    if isinstance(decay, jax.core.Tracer):
        rates = jnp.asarray(decay, jnp.float32)
        return jnp.where(jnp.isfinite(rates) & (rates >= 0), rates, jnp.nan)
    values = np.asarray(decay, dtype=np.float64)
    kind = "per-token decay rates" if per_token else "decay rates"
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{kind} must be finite, got {np.count_nonzero(~np.isfinite(values))} non-finite "
                         f"(first at index {tuple(int(i) for i in np.argwhere(~np.isfinite(values))[0])})")
    if np.any(values < 0):
        raise ValueError(f"{kind} must be >= 0 (lambda = exp(-s) <= 1), got a minimum of {values.min()} "
                         f"(at index {tuple(int(i) for i in np.argwhere(values < 0)[0])})")
    return jnp.asarray(decay, jnp.float32)


def output_heads(q, v) -> int:
    """H = max(Hq, Hv): the heads of the output, the rates and the states (after attention_inputs)."""
    return max(q.shape[2], v.shape[2])


def beyond_gqa(q, k, v) -> bool:
    """The heads are not MHA / GQA / MQA (q with all H heads, k and v with one count): k and v with different
    counts (GVA, or v with fewer heads than q and k), or q with fewer heads than k and v. Every impl takes them; the
    kernels are qualified for them separately (impls.QUALIFIED_GVA_GPUS)."""
    return k.shape[2] != v.shape[2] or v.shape[2] > q.shape[2]


def softmax_inputs(q, k, v) -> None:
    """ValueError unless q [B, L, H, D], k [B, S, Hkv, D], v [B, S, Hkv, Dv] fit MHA/GQA."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"{name} must have rank 4 [B, T, heads, head_dim], got shape {getattr(x, 'shape', x)}")
    (b, _, h, d), (bk, tk, hkv, d_of_k), (bv, tv, hv, _) = q.shape, k.shape, v.shape
    if (bk, bv) != (b, b) or tk != tv:
        raise ValueError(f"q, k, v must share the batch dim and k, v the sequence dim: q {q.shape}, k {k.shape}, "
                         f"v {v.shape}")
    if hv != hkv or d_of_k != d or hkv == 0 or h % hkv:
        raise ValueError(f"heads/head dims do not fit MHA/GQA: q {q.shape}, k {k.shape}, v {v.shape}")


def segment_ids(ids, b: int, t: int) -> jax.Array | None:
    """None, or ids as a [B, T] integer array (documents: the state resets where the id changes)."""
    if ids is None:
        return None
    if np.shape(ids) != (b, t):
        raise ValueError(f"segment_ids must have shape [B, T] = {[b, t]}, got {list(np.shape(ids))}")
    dtype = jnp.result_type(ids)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"segment_ids must be an integer array, got dtype {dtype}")
    return jnp.asarray(ids)


def state(name, x, shape) -> jax.Array:
    got = _shape(name, x)
    if got != tuple(shape):
        raise ValueError(f"{name} must have shape [B, H, Dk, Dv] = {list(shape)}, got {list(got)}")
    return x.astype(jnp.float32)
