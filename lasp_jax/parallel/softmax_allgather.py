"""LASP-2H: causal softmax attention with the sequence sharded, for the softmax layers of hybrid models.

Softmax attention has no d x d state to pass, so each rank all-gathers K and V over the seq axis (GQA keeps
that gather Hkv/H the size of the queries') and attends with its local queries. The causal mask is taken in
global positions: rank r holds rows rL + i, and row rL + i sees every column c <= rL + i of the gathered K.
(A local mask, i >= c, would be wrong on every rank but the first; the tests check this across ranks.)
The backward needs nothing special: autodiff turns the all_gather into a reduce-scatter of dK and dV.

Numerics: the two matmuls take q, k, v (and the probabilities) in the input dtype and accumulate in fp32, as
flash attention does (fp32 inputs use full-precision matmuls); the softmax statistics are fp32 and the output
returns in q's dtype. The attention is blockwise with an online softmax (flash-style, rematerialised in the
backward), so per rank the memory is that of the gathered K/V plus one block of scores, never [L, T].
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from lasp_jax.parallel import layout

_HIGHEST = jax.lax.Precision.HIGHEST


def _check(q, k, v):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"{name} must have rank 4 [B, T, heads, head_dim], got shape {getattr(x, 'shape', x)}")
    (b, _, h, d), (bk, tk, hkv, dk), (bv, tv, hv, _) = q.shape, k.shape, v.shape
    if (bk, bv) != (b, b) or tk != tv:
        raise ValueError(f"q, k, v must share the batch dim and k, v the sequence dim: q {q.shape}, k {k.shape}, "
                         f"v {v.shape}")
    if hv != hkv or dk != d or hkv == 0 or h % hkv:
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
    _check(q, k, v)
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


def _local(q, k, v, *, seq_axis, scale, block_q, block_k):
    """One rank: gather K, V over seq_axis, then attend with this rank's rows at their global positions."""
    kg = jax.lax.all_gather(k, seq_axis, axis=1, tiled=True)
    vg = jax.lax.all_gather(v, seq_axis, axis=1, tiled=True)
    offset = jax.lax.axis_index(seq_axis) * q.shape[1]
    return causal_softmax_attention(q, kg, vg, q_offset=offset, scale=scale, block_q=block_q, block_k=block_k)


def softmax_allgather_attention(q, k, v, *, mesh=None, seq_axis="seq", scale=None, batch_axes=None, block_q=512,
                                block_k=512):
    """Causal softmax attention with T sharded over `seq_axis` (LASP-2H): K/V all-gathered, global mask.

    Args:
      q: [B, T, H, D]; k: [B, T, Hkv, D]; v: [B, T, Hkv, Dv], global shapes; T divisible by the seq axis size.
        Where `seq_axis` is already manual (inside the caller's shard_map) they are the local pieces.
      mesh: a Mesh or AbstractMesh; default: the ambient one. Explicit and Auto axes both work.
      scale: default 1/sqrt(D).
      batch_axes: mesh axes B is sharded over; default as in lasp_attention.
      block_q, block_k: block sizes of the blockwise attention (causal_softmax_attention).
    Returns:
      o [B, T, H, Dv] in q's dtype, sharded like q.
    """
    _check(q, k, v)
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"self-attention needs q and k of the same length, got {q.shape[1]} and {k.shape[1]}")
    mesh = layout.current_mesh(mesh)
    layout.check_seq_axis(mesh, seq_axis)
    if layout.seq_is_manual(seq_axis):
        return _local(q, k, v, seq_axis=seq_axis, scale=scale, block_q=block_q, block_k=block_k)
    q, k, v, spec = layout.place(q, k, v, mesh, seq_axis, batch_axes)
    return _sharded(q, k, v, mesh=mesh, spec=spec, seq_axis=seq_axis, scale=scale, block_q=block_q, block_k=block_k)


# Under jit always, as lasp_attention: an eager shard_map crashes the CPU runtime of jax 0.11.2.
@functools.partial(jax.jit, static_argnames=("mesh", "spec", "seq_axis", "scale", "block_q", "block_k"))
def _sharded(q, k, v, *, mesh, spec, seq_axis, scale, block_q, block_k):
    body = functools.partial(_local, seq_axis=seq_axis, scale=scale, block_q=block_q, block_k=block_k)
    return jax.shard_map(body, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec)(q, k, v)
