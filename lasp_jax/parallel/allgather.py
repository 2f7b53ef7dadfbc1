"""All-gather (LASP-2, Sun et al. 2025): one collective, then a local decayed prefix sum.

Every rank receives all W states in one all_gather (W-1 of them new) and weights them itself; a single
round of latency instead of the ring's W-1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lasp_jax.ops.states import decay_pow


def _weighted(x, rate, axis_name, axis_size, before):
    gathered = jax.lax.all_gather(x, axis_name)  # [W, B, H, Dk, Dv]
    r = jax.lax.axis_index(axis_name)
    j = jnp.arange(axis_size)
    gap = (r - 1 - j) if before else (j - r - 1)  # the power of a each state carries to rank r
    w = jnp.where(gap[:, None] >= 0, decay_pow(rate[None, :], jnp.maximum(gap, 0)[:, None]), 0.0)
    return jnp.einsum("wh,wbhde->bhde", w, gathered, precision=jax.lax.Precision.HIGHEST)


def exclusive_prefix(m, rate, axis_name, axis_size):
    """sum_{j < r} a^(r-1-j) m_j on rank r, a = exp(-rate). m [B, H, Dk, Dv]; rate [H]."""
    return _weighted(m, rate, axis_name, axis_size, before=True)


def exclusive_suffix(d, rate, axis_name, axis_size):
    """sum_{j > r} a^(j-r-1) d_j on rank r."""
    return _weighted(d, rate, axis_name, axis_size, before=False)
