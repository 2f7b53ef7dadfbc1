"""Log-depth scan: ppermute shifts 1, 2, 4, ...: ceil(log2 W) rounds of one state each.

Each rank keeps an inclusive partial I (covering the last k ranks up to itself) and an exclusive partial E
(the k-1 ranks before it). In the round with shift k it receives I from rank r-k, which covers ranks
[r-2k+1, r-k], and extends both:  E += a^(k-1) I_recv,  I += a^k I_recv.  After the last round E spans every
rank before r: the exclusive prefix, with no extra shift and no division by a (which can underflow to 0).
"""

from __future__ import annotations

import jax

from lasp_jax.ops.states import decay_pow


def _scan(x, rate, axis_name, axis_size, direction):
    inclusive, exclusive = x, jax.numpy.zeros_like(x)
    k = 1
    while k < axis_size:
        pairs = [(i, i + k) if direction > 0 else (i + k, i) for i in range(axis_size - k)]
        received = jax.lax.ppermute(inclusive, axis_name, pairs)
        exclusive = exclusive + decay_pow(rate, k - 1)[None, :, None, None] * received
        inclusive = inclusive + decay_pow(rate, k)[None, :, None, None] * received
        k *= 2
    return exclusive


def exclusive_prefix(m, rate, axis_name, axis_size):
    """sum_{j < r} a^(r-1-j) m_j on rank r, a = exp(-rate). m [B, H, Dk, Dv]; rate [H]."""
    return _scan(m, rate, axis_name, axis_size, +1)


def exclusive_suffix(d, rate, axis_name, axis_size):
    """sum_{j > r} a^(j-r-1) d_j on rank r."""
    return _scan(d, rate, axis_name, axis_size, -1)
