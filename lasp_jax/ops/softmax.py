"""Causal softmax attention on one device, blockwise (flash-style), for the softmax layers of hybrid models.

Numerics: the two matmuls take q, k, v (and the probabilities) in the input dtype and accumulate in fp32, as
flash attention does (fp32 inputs use full-precision matmuls); the softmax statistics are fp32 and the output
returns in q's dtype. The attention is blockwise with an online softmax (rematerialised in the backward), so
the memory is that of K/V plus one block of scores, never [L, S]. `q_offset` places the queries at global
positions, which is how the sequence-parallel LASP-2H strategy (lasp_jax.parallel.softmax_allgather) and a KV
cache use it.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def check_inputs(q, k, v):
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


def causal_softmax_attention(q, k, v, *, q_offset=0, scale=None, block_q=512, block_k=512):
    """Softmax attention of queries at global positions q_offset + i over keys at positions 0..S-1, causal.

    Blockwise (flash-style): queries in blocks of block_q, each walking the keys in blocks of block_k with an
    online softmax (running max m, normaliser l, accumulator), so no [L, S] score matrix exists. Each query
    block is rematerialised in the backward and so is each key step, keeping the backward's memory to one
    query block's running statistics. Key blocks wholly after a query block's last row are skipped.

    Args:
      q: [B, L, H, D]; k: [B, S, Hkv, D]; v: [B, S, Hkv, Dv]; H a multiple of Hkv (GQA: K/V heads indexed,
        never repeated). q_offset: global position of q's first row (an int or a traced scalar); rows with
        q_offset + i >= S see all S keys. scale: default 1/sqrt(D). block_q, block_k: block sizes (lengths
        that do not divide are padded with masked positions).
    Returns:
      o [B, L, H, Dv] in q's dtype.
    """
    check_inputs(q, k, v)
    b, length, h, d = q.shape
    s_len, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
    g = h // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    bq, bk = min(block_q, length), min(block_k, s_len)
    nq, nk = -(-length // bq), -(-s_len // bk)

    def blocks(x, n, size):  # [B, N, ...] -> [n, B, size, ...], zero-padded
        x = jnp.pad(x, [(0, 0), (0, n * size - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(b, n, size, *x.shape[2:]), 1, 0)

    dtype = jnp.promote_types(q.dtype, k.dtype)
    precision = _HIGHEST if dtype == jnp.float32 else None  # bf16: the tensor cores' native product
    matmul = functools.partial(jnp.einsum, precision=precision, preferred_element_type=jnp.float32)
    qb = blocks((q * jnp.asarray(scale, q.dtype)).astype(dtype).reshape(b, length, hkv, g, d), nq, bq)
    kb, vb = blocks(k.astype(dtype), nk, bk), blocks(v, nk, bk)
    # qb [nq, B, bq, Hkv, G, D]; kb, vb [nk, B, bk, Hkv, D]. Padded keys are never visible: every row is < S,
    # and a padded key's position is >= S.

    @jax.checkpoint
    def query_block(qi, i):
        rows = q_offset + i * bq + jnp.arange(bq)  # global positions of this block's rows
        zero = jnp.zeros_like(qi[..., 0], jnp.float32).transpose(0, 2, 3, 1)  # [B, Hkv, G, bq], typed like q

        @jax.checkpoint
        def key_step(carry, xs):
            kj, vj, j = xs

            def update(carry):
                m, l, acc = carry
                cols = j * bk + jnp.arange(bk)
                s = matmul("bqkgd,bskd->bkgqs", qi, kj)
                s = jnp.where(cols[None, :] <= rows[:, None], s, -jnp.inf)
                m_new = jnp.maximum(m, s.max(axis=-1))
                m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # rows that have seen nothing yet
                p = jnp.exp(s - m_safe[..., None])
                correction = jnp.exp(m - m_safe)
                acc = acc * correction[..., None] + matmul("bkgqs,bske->bkgqe", p.astype(vj.dtype), vj)
                return m_new, l * correction + p.sum(axis=-1), acc

            visible = j * bk <= rows[-1]  # any column of this key block at or before the block's last row
            return jax.lax.cond(visible, update, lambda c: c, carry), None

        init = (zero - jnp.inf, zero, jnp.zeros((*zero.shape, dv), jnp.float32) + zero[..., None])
        (_, l, acc), _ = jax.lax.scan(key_step, init, (kb, vb, jnp.arange(nk)))
        return acc / l[..., None]  # [B, Hkv, G, bq, Dv]; every row sees key 0, so l > 0

    o = jax.lax.map(lambda xs: query_block(*xs), (qb, jnp.arange(nq)))  # [nq, B, Hkv, G, bq, Dv]
    o = jnp.moveaxis(o, 0, 3).reshape(b, hkv, g, nq * bq, dv)[:, :, :, :length]
    return jnp.moveaxis(o, 3, 1).reshape(b, length, h, dv).astype(q.dtype)
