"""Cross-entropy in chunks, its gradient made in the same pass: the [B, T, V] logits never exist whole, and the
backward does not recompute them.

Why: the loss is the step's final scalar, so its cotangent is a scalar. The forward (the custom_vjp's fwd rule,
`_total_fwd`) makes each chunk's fp32 logits [B, c, V] once and, besides the sum, takes both gradient products
for cotangent 1 right there; the backward only scales them. Rematerialising the chunks in the backward instead
(jax.checkpoint, as this module did before) costs a second LM-head matmul over all T and a second softmax pass:
~30 ms of a 1.44 s Mamba-2 1.3B step on an H200 (T 64K, V 50280, D 2048). Without differentiation (eval) the
primal walk makes the sums alone.

Math, per position p with weight w_p, logits z_p = h_p W^T (fp32) and target t_p: the sum is
sum_p w_p (logsumexp(z_p) - z_p[t_p]); its gradient w.r.t. z_p is g_p = w_p (softmax(z_p) - onehot(t_p)), so
dh_p = g_p W and dW = sum_p g_p^T h_p. The count sum_p w_p takes no gradient w.r.t. h or W.
Numerics, as before but for dh's second rounding: the logits' matmul accumulates in fp32; g is cast to the compute
dtype (h's) before its two products, which accumulate in fp32 (left fp32, a bf16 head makes both fp32/TF32 GEMMs,
about twice the time); dh is cast to h's dtype per chunk, and again after the backward's scaling (two roundings
where the rematerialized backward made one: bf16 dh 3.3e-3 against 2.9e-3 from fp32 on the tests' inputs; kept in
fp32 it would hold T*D*4 bytes from forward to backward, not T*D*2); dW sums over the chunks in fp32 and is cast to
the head's dtype only after the backward's scaling. The products read one copy of the head cast to the compute dtype
before the chunks; the gradient goes to the head itself (fp32 master weights). The weights are data, but their
gradient (the per-position cross-entropy times the cotangent) is exact and cheap: a [B, T] fp32 residual. Targets
take none (integers).
Memory: one chunk's logits at a time in either pass; dh and dW are kept from the forward to the backward, T*D in
the compute dtype plus V*D in fp32 (the latter is the head's gradient accumulator the backward held anyway).
On a mesh the walk runs per shard inside a shard_map over the batch and seq axes (the LM head all-gathered, as
ZeRO-3 does for any weight), and the two sums are psum'd. Targets must lie in [0, V); mask positions with weights.
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


def _chunked(h, targets, weights, chunk: int):
    """[B, L, ...] -> [n, B, c, ...] for lax.map / lax.scan over the n chunks, and the inverse (for [n, B, c, ...])."""
    b, length = h.shape[:2]
    c = chunk_size(length, chunk)
    n = length // c
    to_chunks = lambda x: jnp.moveaxis(x.reshape(b, n, c, *x.shape[2:]), 1, 0)  # noqa: E731
    from_chunks = lambda x: jnp.moveaxis(x, 0, 1).reshape(b, length, *x.shape[3:])  # noqa: E731
    return (to_chunks(h), to_chunks(targets), to_chunks(weights)), from_chunks


def _nll(hc, wc, tc, vocab_major):
    """-> (fp32 logits [B, c, V], their logsumexp [B, c], per-position cross-entropy [B, c])."""
    logits = jax.lax.dot_general(hc, wc, _dims(vocab_major), preferred_element_type=jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    return logits, lse, lse - jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _total(h, w, targets, weights, chunk: int, vocab_major: bool):
    """sum_p weights_p * CE_p over one device's positions, fp32 scalar (the primal walk: no gradient work).

    h [B, L, D]; w fp32 [V, D] if vocab_major else [D, V]; targets int [B, L] in [0, V); weights fp32 [B, L].
    """
    chunks, _ = _chunked(h, targets, weights, chunk)
    wc = w.astype(h.dtype)  # one cast for every chunk

    def chunk_sum(xs):
        hc, tc, pc = xs
        return jnp.sum(_nll(hc, wc, tc, vocab_major)[2] * pc)

    return jnp.sum(jax.lax.map(chunk_sum, chunks))


def _total_fwd(h, w, targets, weights, chunk, vocab_major):
    """The sum, and in the same walk its gradients for cotangent 1: dh [B, L, D] in h's dtype, dW fp32 (an fp32
    carry over the chunks), and the per-position cross-entropy [B, L] fp32 (the weights' gradient)."""
    chunks, from_chunks = _chunked(h, targets, weights, chunk)
    wc = w.astype(h.dtype)
    vocab = wc.shape[0 if vocab_major else 1]

    def step(dw, xs):
        hc, tc, pc = xs
        logits, lse, nll = _nll(hc, wc, tc, vocab_major)
        g = (jnp.exp(logits - lse[..., None]) - jax.nn.one_hot(tc, vocab, dtype=jnp.float32)) * pc[..., None]
        g = g.astype(hc.dtype)  # [B, c, V]: both products in the compute dtype, accumulated in fp32
        dhc = jax.lax.dot_general(g, wc, (((2,), (0,) if vocab_major else (1,)), ((), ())),
                                  preferred_element_type=jnp.float32)
        dw = dw + jnp.einsum("bcv,bcd->vd" if vocab_major else "bcv,bcd->dv", g, hc,
                             preferred_element_type=jnp.float32)
        return dw, (jnp.sum(nll * pc), dhc.astype(hc.dtype), nll)

    # zeros_like keeps w's varying axes (inside _sharded's shard_map), as the carry's type must.
    dw, (sums, dh, nll) = jax.lax.scan(step, jnp.zeros_like(w, dtype=jnp.float32), chunks)
    return jnp.sum(sums), (from_chunks(dh), dw, from_chunks(nll))


def _total_bwd(chunk, vocab_major, res, ct):
    dh, dw, nll = res
    return (ct * dh).astype(dh.dtype), ct * dw, None, ct * nll


_total.defvjp(_total_fwd, _total_bwd)


def _local_sums(h, w, targets, weights, *, chunk, vocab_major):
    """One device's (total, count). h [B, L, D]; w [V, D] if vocab_major else [D, V]; targets, weights [B, L]."""
    # In fp32 (a no-op for fp32 master weights): the cast's transpose takes the fp32 gradient to w's dtype.
    return _total(h, w.astype(jnp.float32), targets, weights, chunk, vocab_major), jnp.sum(weights)


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
        # psum of the gradient after the chunks (the transpose of this cast), which _total's rule could not
        # otherwise match to an invariant input.
        w = jax.lax.pcast(w, split, to="varying")
        total, count = _local_sums(h, w, targets, weights, chunk=chunk, vocab_major=vocab_major)
        return jax.lax.psum(total, split), jax.lax.psum(count, split)

    return jax.shard_map(body, mesh=mesh, in_specs=(spec3, P(), spec2, spec2), out_specs=(P(), P()))(
        h, w, targets, weights)
