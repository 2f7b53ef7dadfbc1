"""Ring (LASP, Sun et al. 2024): W-1 neighbour hops r -> r+1, no wrap-around.

Every rank sends in every round (SPMD), and after round t rank r holds the decayed sum of the t states before
it; after W-1 rounds that is the whole exclusive prefix. Each round moves one [B, H, Dk, Dv] state per rank.
A rank decays what passes through it by its own a = exp(-rate) (rate [H], the same on every rank, or [B, H], the
rank's own log-decay: per-token rates, +inf (a = 0) where a document starts in the rank), so the same hops serve
both. A state crosses a = 0 by a select (states.decayed): a non-finite state stops at a document start.
"""

from __future__ import annotations

import jax

from lasp_jax.ops.states import decay_pow, decayed


def _ring(x, rate, axis_name, axis_size, step):
    pairs = [(i, i + step) for i in range(axis_size - 1)] if step > 0 else \
        [(i + 1, i) for i in range(axis_size - 1)]
    a = (decay_pow(rate, 1)[None] if rate.ndim == 1 else decay_pow(rate, 1))[:, :, None, None]  # this rank's
    received, carry = jax.numpy.zeros_like(x), x
    for _ in range(axis_size - 1):
        received = jax.lax.ppermute(carry, axis_name, pairs)
        carry = decayed(a, received) + x
    return received


def exclusive_prefix(m, rate, axis_name, axis_size):
    """sum_{j < r} (prod_{j < i < r} a_i) m_j on rank r, a = exp(-rate). m [B, H, Dk, Dv]; rate [H] or [B, H]."""
    return _ring(m, rate, axis_name, axis_size, +1)


def exclusive_suffix(d, rate, axis_name, axis_size):
    """sum_{j > r} (prod_{r < i < j} a_i) d_j on rank r."""
    return _ring(d, rate, axis_name, axis_size, -1)
