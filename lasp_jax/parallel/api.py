"""lasp_attention: linear attention with the sequence sharded over a mesh axis (LASP / LASP-2).

Rank r of the `seq` axis holds positions [rL, (r+1)L) of every sequence. It computes its own piece, gets the
state entering it from the ranks before it through one of the strategies (only [B, H, Dk, Dv] fp32 states
cross devices, so communication does not grow with T), and adds that state's contribution. The custom_vjp
(lasp_jax.ops.vjp) runs the same strategy the reverse way in the backward, from the cached incoming state.
With per-token decay and documents a rank's effect is the affine pair (a_r, m_r), a_r = exp(-sum of its rates)
per (b, h) (0 past a document start): its log-decay [B, H] travels with the states, and one [B] permute of
segment ids tells a rank whether a document starts at its first position.
"""

from __future__ import annotations

import dataclasses
import functools
import types

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from lasp_jax.ops import checks, impls, kernel_support, placement
from lasp_jax.ops.api import attend, attend_under_jit, static_scale
from lasp_jax.parallel import allgather, layout, ring, scan

STRATEGIES: dict[str, types.ModuleType] = {"ring": ring, "allgather": allgather, "scan": scan}


@dataclasses.dataclass(frozen=True)
class SeqExchange:
    """vjp.Exchange over a mesh axis with one of STRATEGIES."""

    strategy: str
    axis_name: str
    axis_size: int

    def prefix(self, m, rate):
        return STRATEGIES[self.strategy].exclusive_prefix(m, rate, self.axis_name, self.axis_size)

    def suffix(self, d, rate):
        return STRATEGIES[self.strategy].exclusive_suffix(d, rate, self.axis_name, self.axis_size)

    def starts_at_boundary(self, segment_ids):
        """[B] bool: this rank's first id differs from the previous rank's last (one [B] ppermute)."""
        pairs = [(i, i + 1) for i in range(self.axis_size - 1)]
        previous = jax.lax.ppermute(segment_ids[:, -1], self.axis_name, pairs)
        return (jax.lax.axis_index(self.axis_name) > 0) & (previous != segment_ids[:, 0])


def lasp_attention(q, k, v, decay=None, *, segment_ids=None, mesh=None, seq_axis="seq", strategy="ring", scale=1.0,
                   impl="auto", batch_axes=None):
    """Sequence-parallel `linear_attention` (same math, same shapes) over the mesh axis `seq_axis`.

    Args:
      q: [B, T, Hq, Dk]; k: [B, T, Hk, Dk]; v: [B, T, Hv, Dv], global shapes, T sharded over `seq_axis`.
        T must divide by the size W of that axis. Heads as in linear_attention: H = max(Hq, Hv) output heads,
        MHA, GQA / MQA or GVA (q and k with fewer heads than v), never repeated in memory.
      decay: None, [H] constant rates >= 0 (a constant for autodiff: zero cotangent), or [B, T, H] per-token rates
        >= 0 (differentiable; sharded like q's first three axes). Traced, a bad rate makes its head NaN (per-token:
        the outputs of its row's head from its position on), as in linear_attention.
      segment_ids: None or [B, T] integers, sharded like q's first two axes: packed documents, the state resets
        where the id changes from t-1 to t (also across a rank boundary). Each rank acts on the state affinely,
        P_out = a_r P_in + m_r with a_r = exp(-sum of the rank's rates) per (b, h), 0 when a document starts
        inside the rank (or at its first position); every strategy combines these pairs, and only [B, H]-sized
        arrays ride beside the states (the backward's decay gradient needs nothing more).
      mesh: a Mesh or AbstractMesh; default: the ambient one (`jax.set_mesh`). Explicit and Auto axes both work.
        Called where `seq_axis` is already manual (inside the caller's own shard_map), q, k, v (and decay,
        segment_ids) are the local pieces and no shard_map is added.
      strategy: "ring" (LASP: W-1 hops), "allgather" (LASP-2: one all_gather) or "scan" (ceil(log2 W) hops).
      impl: the per-device implementation, as for linear_attention (per-token decay, segment_ids and GVA heads:
        every impl; "auto" takes a kernel only where impls qualifies it for them).
      batch_axes: the mesh axis (a name) or axes B is sharded over; default: how q's batch dim is already
        sharded (Explicit mesh, or a committed q outside jit), else every other mesh axis. Heads sharded over
        other axes stay sharded: each device attends over its own heads when every head count splits evenly.
    Returns:
      o [B, T, H, Dv] in q's dtype, sharded like q: on an Explicit mesh (also under jit) and for a committed q
      outside jit; under jit on an Auto mesh XLA's sharding propagation places it.
    """
    rates = checks.attention_inputs(q, k, v, decay)
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}: expected one of {sorted(STRATEGIES)}")
    b, t = q.shape[:2]
    h = checks.output_heads(q, v)
    ids = checks.segment_ids(segment_ids, b, t)
    if rates.ndim == 1 and ids is not None:  # no initial or final state here: the broadcast rates are the same math
        rates = jax.lax.stop_gradient(jnp.broadcast_to(rates, (b, t, h)))
    mesh = layout.current_mesh(mesh)
    w = layout.check_seq_axis(mesh, seq_axis)
    # Its own shard_map makes every mesh axis manual; inside a caller's shard_map over seq alone, XLA may still
    # partition the other axes.
    per_device = impls.resolve(impl, q, k, v, per_token=rates.ndim == 3,
                               partitioned=layout.seq_is_manual(seq_axis) and kernel_support.partitioned(q))
    scale = static_scale(scale)
    exchange = SeqExchange(strategy, seq_axis, w) if w > 1 else None  # one rank: nothing to exchange
    if layout.seq_is_manual(seq_axis):
        return attend_under_jit(q, k, v, rates, ids, None, per_device, exchange, False, scale)
    q_in = q
    q, k, v, spec, heads = layout.place(q, k, v, mesh, seq_axis, batch_axes)
    if AxisType.Explicit in tuple(mesh.axis_types):
        if rates.ndim == 3:
            rates = jax.sharding.reshard(rates, NamedSharding(mesh, P(*spec[:3])))
        if ids is not None:
            ids = jax.sharding.reshard(ids, NamedSharding(mesh, P(*spec[:2])))
    out = _sharded(q, k, v, rates, ids, per_device=per_device, exchange=exchange, mesh=mesh, spec=spec, heads=heads,
                   scale=scale)
    return placement.like_q(out, q_in)


# Always under jit: an eager shard_map of this body crashes the CPU runtime of jax 0.11.2 (segfault, seen
# with every strategy); inside a caller's jit this inner jit is simply inlined.
@functools.partial(jax.jit, static_argnames=("per_device", "exchange", "mesh", "spec", "heads", "scale"))
def _sharded(q, k, v, rates, ids, *, per_device, exchange, mesh, spec, heads, scale):
    n_heads = placement.size(mesh, heads)

    def local(q, k, v, rates, ids):
        if rates.ndim == 1:
            rates = placement.local_rates(rates, heads, n_heads)
        return attend(q, k, v, rates, ids, None, per_device, exchange, False, scale)

    in_specs = (spec, spec, spec, P() if rates.ndim == 1 else P(*spec[:3]), None if ids is None else P(*spec[:2]))
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=spec)(q, k, v, rates, ids)
