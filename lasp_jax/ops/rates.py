"""Decay rates: the per-head rates of TransNormerLLM / Lightning Attention (ALiBi's slopes).

A rate s >= 0 gives the per-position decay lambda = exp(-s); lasp_jax takes rates, not lambdas, so that every
power is exp(-s * n) with n >= 0 (it can only underflow).
"""

from __future__ import annotations

import numpy as np


def tnl_slopes(n_heads: int) -> np.ndarray:
    """[n_heads] float32 rates s_i = 2^(-8 (i + 1) / n_heads), i = 0 .. n_heads - 1 (TNL's base rates; models
    scale them per layer)."""
    if n_heads < 1:
        raise ValueError(f"n_heads must be >= 1, got {n_heads}")
    i = np.arange(n_heads, dtype=np.float64)
    return (2.0 ** (-8.0 * (i + 1.0) / n_heads)).astype(np.float32)
