"""lasp_attention: linear attention with the sequence sharded over a mesh axis (LASP / LASP-2).

Rank r of the `seq` axis holds positions [rL, (r+1)L) of every sequence. It computes its own piece, gets the
state entering it from the ranks before it through one of the strategies (only [B, H, Dk, Dv] fp32 states
cross devices, so communication does not grow with T), and adds that state's contribution. The custom_vjp
(lasp_jax.ops.vjp) runs the same strategy the reverse way in the backward, from the cached incoming state.
"""

from __future__ import annotations

import dataclasses
import functools
import types

import jax
from jax.sharding import PartitionSpec as P

from lasp_jax.ops import checks, impls, placement, vjp
from lasp_jax.ops.api import attend_under_jit, static_scale
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


def lasp_attention(q, k, v, decay=None, *, mesh=None, seq_axis="seq", strategy="ring", scale=1.0, impl="auto",
                   batch_axes=None):
    """Sequence-parallel `linear_attention` (same math, same shapes) over the mesh axis `seq_axis`.

    Args:
      q: [B, T, H, Dk]; k: [B, T, Hkv, Dk]; v: [B, T, Hkv, Dv], global shapes, T sharded over `seq_axis`.
        T must divide by the size W of that axis.
      decay: None or [H] rates >= 0; a constant for autodiff (zero cotangent). Traced, a bad rate makes its head
        NaN, as in linear_attention.
      mesh: a Mesh or AbstractMesh; default: the ambient one (`jax.set_mesh`). Explicit and Auto axes both work.
        Called where `seq_axis` is already manual (inside the caller's own shard_map), q, k, v are the local
        pieces and no shard_map is added.
      strategy: "ring" (LASP: W-1 hops), "allgather" (LASP-2: one all_gather) or "scan" (ceil(log2 W) hops).
      impl: the per-device implementation, as for linear_attention.
      batch_axes: the mesh axis (a name) or axes B is sharded over; default: how q's batch dim is already
        sharded (Explicit mesh, or a committed q outside jit), else every other mesh axis. Heads sharded over
        other axes stay sharded: each device attends over its own heads when H and Hkv split evenly.
    Returns:
      o [B, T, H, Dv] in q's dtype, sharded like q: on an Explicit mesh (also under jit) and for a committed q
      outside jit; under jit on an Auto mesh XLA's sharding propagation places it.
    """
    s = checks.attention_inputs(q, k, v, decay)
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}: expected one of {sorted(STRATEGIES)}")
    mesh = layout.current_mesh(mesh)
    w = layout.check_seq_axis(mesh, seq_axis)
    # Its own shard_map makes every mesh axis manual; inside a caller's shard_map over seq alone, XLA may still
    # partition the other axes.
    per_device = impls.resolve(impl, q, k, v, partitioned=layout.seq_is_manual(seq_axis) and impls.partitioned(q))
    scale = static_scale(scale)
    exchange = SeqExchange(strategy, seq_axis, w) if w > 1 else None  # one rank: nothing to exchange
    if layout.seq_is_manual(seq_axis):
        return attend_under_jit(q, k, v, s, None, per_device, exchange, False, scale)
    q_in = q
    q, k, v, spec, heads = layout.place(q, k, v, mesh, seq_axis, batch_axes)
    out = _sharded(q, k, v, s, per_device=per_device, exchange=exchange, mesh=mesh, spec=spec, heads=heads,
                   scale=scale)
    return placement.like_q(out, q_in)


# Always under jit: an eager shard_map of this body crashes the CPU runtime of jax 0.11.2 (segfault, seen
# with every strategy); inside a caller's jit this inner jit is simply inlined.
@functools.partial(jax.jit, static_argnames=("per_device", "exchange", "mesh", "spec", "heads", "scale"))
def _sharded(q, k, v, s, *, per_device, exchange, mesh, spec, heads, scale):
    n_heads = placement.size(mesh, heads)

    def local(q, k, v, s):
        s = placement.local_rates(s, heads, n_heads)
        return vjp.attend(q, k, v, s, None, per_device, exchange, False, scale)

    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, P()), out_specs=spec)(q, k, v, s)
