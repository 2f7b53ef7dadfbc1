"""LASP-2H: causal softmax attention with the sequence sharded, for the softmax layers of hybrid models.

Softmax attention has no d x d state to pass, so each rank all-gathers K and V over the seq axis (GQA keeps
that gather Hkv/H the size of the queries') and attends with its local queries. The causal mask is taken in
global positions: rank r holds rows rL + i, and row rL + i sees every column c <= rL + i of the gathered K.
(A local mask, i >= c, would be wrong on every rank but the first; the tests check this across ranks.)
The backward needs nothing special: autodiff turns the all_gather into a reduce-scatter of dK and dV.

Numerics: scores, softmax and the weighted sum run in fp32 (full-precision matmuls), the output returns in q's
dtype. Memory is O(L x T) scores per rank (dense, not blockwise), which suits hybrids with few such layers at
moderate T.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from lasp_jax.parallel.api import _batch_axes_of, _current_mesh

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


def causal_softmax_attention(q, k, v, *, q_offset=0, scale=None):
    """Softmax attention of queries at global positions q_offset + i over keys at positions 0..S-1, causal.

    Args:
      q: [B, L, H, D]; k: [B, S, Hkv, D]; v: [B, S, Hkv, Dv]; H a multiple of Hkv (GQA: K/V heads indexed,
        never repeated). q_offset: global position of q's first row (an int or a traced scalar); rows with
        q_offset + i >= S see all S keys. scale: default 1/sqrt(D).
    Returns:
      o [B, L, H, Dv] in q's dtype.
    """
    _check(q, k, v)
    b, length, h, d = q.shape
    s_len, hkv = k.shape[1], k.shape[2]
    g = h // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qg = q.astype(jnp.float32).reshape(b, length, hkv, g, d)
    scores = jnp.einsum("blkgd,bskd->bkgls", qg, k.astype(jnp.float32), precision=_HIGHEST) * scale
    rows = q_offset + jnp.arange(length)[:, None]
    visible = jnp.arange(s_len)[None, :] <= rows  # [L, S], global positions
    scores = jnp.where(visible, scores, -jnp.inf)
    p = jax.nn.softmax(scores, axis=-1)
    o = jnp.einsum("bkgls,bske->blkge", p, v.astype(jnp.float32), precision=_HIGHEST)
    return o.reshape(b, length, h, -1).astype(q.dtype)


def _local(q, k, v, *, seq_axis, scale):
    """One rank: gather K, V over seq_axis, then attend with this rank's rows at their global positions."""
    kg = jax.lax.all_gather(k, seq_axis, axis=1, tiled=True)
    vg = jax.lax.all_gather(v, seq_axis, axis=1, tiled=True)
    offset = jax.lax.axis_index(seq_axis) * q.shape[1]
    return causal_softmax_attention(q, kg, vg, q_offset=offset, scale=scale)


def softmax_allgather_attention(q, k, v, *, mesh=None, seq_axis="seq", scale=None, batch_axes=None):
    """Causal softmax attention with T sharded over `seq_axis` (LASP-2H): K/V all-gathered, global mask.

    Args:
      q: [B, T, H, D]; k: [B, T, Hkv, D]; v: [B, T, Hkv, Dv], global shapes; T divisible by the seq axis size.
        Where `seq_axis` is already manual (inside the caller's shard_map) they are the local pieces.
      mesh: a Mesh or AbstractMesh; default: the ambient one. Explicit and Auto axes both work.
      scale: default 1/sqrt(D).
      batch_axes: mesh axes B is sharded over; default as in lasp_attention.
    Returns:
      o [B, T, H, Dv] in q's dtype, sharded like q.
    """
    _check(q, k, v)
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"self-attention needs q and k of the same length, got {q.shape[1]} and {k.shape[1]}")
    mesh = _current_mesh(mesh)
    if seq_axis not in mesh.axis_names:
        raise ValueError(f"the mesh has no axis {seq_axis!r} (seq_axis); its axes are {tuple(mesh.axis_names)}")
    if seq_axis in jax.sharding.get_abstract_mesh().manual_axes:
        return _local(q, k, v, seq_axis=seq_axis, scale=scale)
    w = mesh.shape[seq_axis]
    b, t = q.shape[:2]
    if t % w:
        raise ValueError(f"sequence length T={t} must be divisible by the {seq_axis!r} axis size {w}")
    explicit = any(t_ == AxisType.Explicit for t_ in mesh.axis_types)
    if batch_axes is None:
        batch_axes = _batch_axes_of(q) if explicit else None
        if batch_axes is None:
            batch_axes = tuple(a for a in mesh.axis_names if a != seq_axis)
    for a in batch_axes:
        if a not in mesh.axis_names or a == seq_axis:
            raise ValueError(f"batch axis {a!r} is not a non-seq axis of the mesh {tuple(mesh.axis_names)}")
    n_batch = math.prod(mesh.shape[a] for a in batch_axes)
    if b % n_batch:
        raise ValueError(f"batch B={b} must be divisible by the batch axes {batch_axes} (size {n_batch}); "
                         "pass batch_axes=() to replicate the batch over them")
    spec = P(tuple(batch_axes) or None, seq_axis, None, None)
    if explicit:
        q, k, v = (jax.sharding.reshard(x, NamedSharding(mesh, spec)) for x in (q, k, v))
    return _sharded(q, k, v, mesh=mesh, spec=spec, seq_axis=seq_axis, scale=scale)


# Under jit always, as lasp_attention: an eager shard_map crashes the CPU runtime of jax 0.11.2.
@functools.partial(jax.jit, static_argnames=("mesh", "spec", "seq_axis", "scale"))
def _sharded(q, k, v, *, mesh, spec, seq_axis, scale):
    body = functools.partial(_local, seq_axis=seq_axis, scale=scale)
    return jax.shard_map(body, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec)(q, k, v)
