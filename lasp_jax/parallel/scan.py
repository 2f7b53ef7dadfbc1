"""Log-depth scan: ppermute shifts 1, 2, 4, ...: ceil(log2 W) rounds of one state each.

Each rank keeps an inclusive partial I (covering the last k ranks up to itself) and an exclusive partial E
(the k-1 ranks before it). In the round with shift k it receives I from rank r-k, which covers ranks
[r-2k+1, r-k], and extends both:  E += a^(k-1) I_recv,  I += a^k I_recv.  After the last round E spans every
rank before r: the exclusive prefix, with no extra shift and no division by a (which can underflow to 0).
With per-rank decays (per-token rates) the partials carry their log-decays (sums of the ranks' rate sums, +inf
past a document start) and send them along: one [B, H] array beside each state; a received state crosses a
zero decay by a select (states.decayed), so a non-finite state stops at a document start.
"""

from __future__ import annotations

import jax

from lasp_jax.ops.states import decay_pow, decayed


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


def _scan_pairs(x, rate, axis_name, axis_size, direction):
    """Per-rank log-decays [B, H]: each partial carries the log-decay of the ranks it spans (a sum, +inf past a
    document start) and sends it with its state: the pairs (a, S) of the module docstring."""
    inclusive, exclusive = x, jax.numpy.zeros_like(x)
    log_in, log_ex = rate, jax.numpy.zeros_like(rate)  # the ranks inclusive / exclusive span (none yet: 0)
    k = 1
    while k < axis_size:
        pairs = [(i, i + k) if direction > 0 else (i + k, i) for i in range(axis_size - k)]
        received, log_received = jax.lax.ppermute((inclusive, log_in), axis_name, pairs)
        exclusive = exclusive + decayed(decay_pow(log_ex, 1)[:, :, None, None], received)
        inclusive = inclusive + decayed(decay_pow(log_in, 1)[:, :, None, None], received)
        log_ex, log_in = log_ex + log_received, log_in + log_received
        k *= 2
    return exclusive


def exclusive_prefix(m, rate, axis_name, axis_size):
    """sum_{j < r} (prod_{j < i < r} a_i) m_j on rank r, a = exp(-rate). m [B, H, Dk, Dv]; rate [H] (the same
    on every rank) or [B, H] (the rank's own log-decay)."""
    return (_scan if rate.ndim == 1 else _scan_pairs)(m, rate, axis_name, axis_size, +1)


def exclusive_suffix(d, rate, axis_name, axis_size):
    """sum_{j > r} (prod_{r < i < j} a_i) d_j on rank r."""
    return (_scan if rate.ndim == 1 else _scan_pairs)(d, rate, axis_name, axis_size, -1)
