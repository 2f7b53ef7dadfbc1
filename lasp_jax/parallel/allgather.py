"""All-gather (LASP-2, Sun et al. 2025): one collective, then a local decayed prefix sum.

Every rank receives all W states in one all_gather (W-1 of them new) and weights them itself; a single
round of latency instead of the ring's W-1. The states a rank does not read (its own and those on the other
side) are selected out before the weighted sum, not weighted by zero: 0 * NaN is NaN, and a non-finite state at
a later rank must not reach earlier ones (causality holds for non-finite inputs too, as with ring and scan).
With per-rank decays (per-token rates: each rank's log-decay [B, H], +inf where a document starts in it) the
log-decays are gathered too (one [W, B, H] array) and a state's weight is exp(-(the sum over the ranks between)),
0 past a document start: those states are selected out too (states.decayed), so a non-finite state stays in its
document.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lasp_jax.ops.states import decayed, prefix_weights


def _weighted(x, rate, axis_name, axis_size, before):
    gathered = jax.lax.all_gather(x, axis_name)  # [W, B, H, Dk, Dv]
    r = jax.lax.axis_index(axis_name)
    j = jnp.arange(axis_size)
    used = j < r if before else j > r
    gathered = jnp.where(used[:, None, None, None, None], gathered, 0.0)
    if rate.ndim == 2:  # per-rank log-decays [B, H]: gathered too, summed over the ranks between j and r
        rates = jax.lax.all_gather(rate, axis_name)  # [W, B, H]
        i = j[:, None]
        between = ((j[None] < i) & (i < r)) if before else ((r < i) & (i < j[None]))  # [W (i), W (j)]
        log_w = jnp.sum(jnp.where(between[..., None, None], rates[:, None], 0.0), axis=0)  # [W (j), B, H]
        weights = jnp.where(used[:, None, None], jnp.exp(-log_w), 0.0)[..., None, None]
        return jnp.sum(decayed(weights, gathered), axis=0)
    w = prefix_weights(rate, 1, axis_size, axis_size)  # [H, W, W]: w[h, i, j] = a^(i-1-j) for j < i
    # rank r reads j < r with weight w[:, r, j], or j > r with weight w[:, j, r]
    weights = jnp.take(w, r, axis=1) if before else jnp.take(w, r, axis=2)
    return jnp.einsum("hw,wbhde->bhde", weights, gathered, precision=jax.lax.Precision.HIGHEST)


def exclusive_prefix(m, rate, axis_name, axis_size):
    """sum_{j < r} (prod_{j < i < r} a_i) m_j on rank r, a = exp(-rate). m [B, H, Dk, Dv]; rate [H] or [B, H]."""
    return _weighted(m, rate, axis_name, axis_size, before=True)


def exclusive_suffix(d, rate, axis_name, axis_size):
    """sum_{j > r} (prod_{r < i < j} a_i) d_j on rank r."""
    return _weighted(d, rate, axis_name, axis_size, before=False)
