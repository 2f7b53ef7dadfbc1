"""Cross-entropy in chunks: the [B, T, V] logits never exist whole, in the forward or the backward.

Each device walks its own positions in chunks of c (a lax.map); a chunk's logits [B, c, V] are made in fp32
(matmul accumulated in fp32), reduced to sum_p w_p (logsumexp_p - logit_p[target_p]), and dropped; the chunk
is rematerialised in the backward (jax.checkpoint), so peak memory is one chunk's logits, not T's.
Backward numerics (`_logits`): the logits' cotangent (softmax - one-hot, times the position's weight over the
count) is cast to the compute dtype before its two products, which accumulate in fp32, as the forward's: left to
autodiff, an fp32 cotangent times a bf16 head runs both as fp32 (TF32) GEMMs, about twice the time (92 ms of a
1.9 s Mamba-2 1.3B step on an H200). The products read one copy of the head cast to the compute dtype before the
chunks; the gradient goes to the head itself (fp32 master weights), so it sums over the chunks in fp32, not in the
compute dtype. On a mesh the walk runs per shard inside a shard_map over the batch and seq axes (the LM head
all-gathered, as ZeRO-3 does for any weight), and the two sums are psum'd. Targets must lie in [0, V); mask
positions with weights.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from models import sharding


def chunk_size(length: int, chunk: int) -> int:
    """The largest divisor of `length` that is <= chunk (so chunks tile the positions exactly)."""
    c = max(1, min(chunk, length))
    while length % c:
        c -= 1
    return c


def _dims(vocab_major: bool):
    """dot_general dims of h [B, c, D] with the head (w [V, D] if vocab_major else [D, V]) -> [B, c, V]."""
    return (((2,), (1,)), ((), ())) if vocab_major else (((2,), (0,)), ((), ()))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _logits(hc, wc, w, vocab_major: bool):
    """hc [B, c, D] times the head -> fp32 logits [B, c, V]. wc: the head in hc's dtype (cast once, outside the
    chunks), for the products; w: the head itself, which takes the gradient (in its own dtype)."""
    return jax.lax.dot_general(hc, wc, _dims(vocab_major), preferred_element_type=jnp.float32)


def _logits_fwd(hc, wc, w, vocab_major):
    return _logits(hc, wc, w, vocab_major), (hc, wc, w)


def _logits_bwd(vocab_major, res, ct):
    hc, wc, w = res
    g = ct.astype(hc.dtype)  # [B, c, V]
    dh = jax.lax.dot_general(g, wc, (((2,), (0,) if vocab_major else (1,)), ((), ())),
                             preferred_element_type=jnp.float32)
    dw = jnp.einsum("bcv,bcd->vd" if vocab_major else "bcv,bcd->dv", g, hc, preferred_element_type=jnp.float32)
    return dh.astype(hc.dtype), None, dw.astype(w.dtype)  # wc's gradient is w's


_logits.defvjp(_logits_fwd, _logits_bwd)


def _local_sums(h, w, targets, weights, *, chunk, vocab_major):
    """One device's sums. h [B, L, D]; w [V, D] if vocab_major else [D, V]; targets int, weights [B, L]."""
    b, length = h.shape[:2]
    c = chunk_size(length, chunk)
    n = length // c
    to_chunks = lambda x: jnp.moveaxis(x.reshape(b, n, c, *x.shape[2:]), 1, 0)
    w_compute = jax.lax.stop_gradient(w.astype(h.dtype))  # one cast for every chunk, forward and backward

    @jax.checkpoint
    def chunk_loss(hc, tc, wc):
        logits = _logits(hc, w_compute, w, vocab_major)  # [B, c, V] fp32
        lse = jax.nn.logsumexp(logits, axis=-1)
        target_logit = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
        return jnp.sum((lse - target_logit) * wc)

    per_chunk = jax.lax.map(lambda xs: chunk_loss(*xs), (to_chunks(h), to_chunks(targets), to_chunks(weights)))
    return jnp.sum(per_chunk), jnp.sum(weights)


def cross_entropy_sums(h, w, targets, weights, *, chunk: int, vocab_major: bool, axes: tuple[str, ...],
                       seq_axis: str | None):
    """(sum_p w_p * CE_p, sum_p w_p), both fp32 scalars.

    Args:
      h: [B, T, D] final hidden states; w: the LM head, [V, D] (tied embedding, vocab_major) or [D, V];
      targets: [B, T] int32 in [0, V); weights: [B, T] float; chunk: positions per chunk per shard;
      axes: mesh axes the batch is split over; seq_axis: the mesh axis T is split over, or None.
    """
    mesh = sharding.ambient_mesh()
    split = tuple(axes) + ((seq_axis,) if seq_axis else ())
    if mesh is None or not split:
        return _local_sums(h, w, targets, weights.astype(jnp.float32), chunk=chunk, vocab_major=vocab_major)
    n_batch = math.prod(mesh.shape[a] for a in axes)
    if h.shape[0] % n_batch:
        raise ValueError(f"batch B={h.shape[0]} must be divisible by the batch axes {tuple(axes)} (size {n_batch})")
    spec2 = P(tuple(axes) or None, seq_axis)
    spec3 = P(tuple(axes) or None, seq_axis, None)
    w = sharding.gather_param(w)
    if any(t == AxisType.Explicit for t in mesh.axis_types):
        h = jax.sharding.reshard(h, NamedSharding(mesh, spec3))
        targets, weights = (jax.sharding.reshard(x, NamedSharding(mesh, spec2)) for x in (targets, weights))
    return _sharded(h, w, targets, weights.astype(jnp.float32), chunk=chunk, vocab_major=vocab_major, mesh=mesh,
                    spec2=spec2, spec3=spec3, split=split)


# Under jit always: an eager shard_map crashes the CPU runtime of jax 0.11.2 (see lasp_jax.parallel.api).
@functools.partial(jax.jit, static_argnames=("chunk", "vocab_major", "mesh", "spec2", "spec3", "split"))
def _sharded(h, w, targets, weights, *, chunk, vocab_major, mesh, spec2, spec3, split):
    def body(h, w, targets, weights):
        # The head is the same on every shard, its gradient a sum over them: marked varying here, the sum is one
        # psum of the fp32 gradient after the chunks (the transpose of this cast), which _logits' rule could
        # not otherwise match to an invariant input.
        w = jax.lax.pcast(w, split, to="varying")
        total, count = _local_sums(h, w, targets, weights, chunk=chunk, vocab_major=vocab_major)
        return jax.lax.psum(total, split), jax.lax.psum(count, split)

    return jax.shard_map(body, mesh=mesh, in_specs=(spec3, P(), spec2, spec2), out_specs=(P(), P()))(
        h, w, targets, weights)
