"""lasp_attention: linear attention with the sequence sharded over a mesh axis (LASP / LASP-2).

Rank r of the `seq` axis holds positions [rL, (r+1)L) of every sequence. It computes its own piece, gets the
state entering it from the ranks before it through one of the strategies (only [B, H, Dk, Dv] fp32 states
cross devices, so communication does not grow with T), and adds that state's contribution. The custom_vjp
(lasp_jax.ops.vjp) runs the same strategy the reverse way in the backward, from the cached incoming state.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from lasp_jax.ops import checks, impls, vjp
from lasp_jax.parallel import allgather, ring, scan

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


def _current_mesh(mesh):
    if mesh is not None:
        return mesh
    ambient = jax.sharding.get_abstract_mesh()
    if ambient.empty:
        raise ValueError("lasp_attention needs a mesh: pass mesh=... or call it under `with jax.set_mesh(mesh):`")
    return ambient


def _batch_axes_of(x) -> tuple[str, ...] | None:
    """The mesh axes an Explicit-sharded array's batch dim lives on (None when it is not sharded)."""
    entry = jax.typeof(x).sharding.spec[0]
    if entry is None:
        return None
    return (entry,) if isinstance(entry, str) else tuple(entry)


def lasp_attention(q, k, v, decay=None, *, mesh=None, seq_axis="seq", strategy="ring", scale=1.0, impl="auto",
                   batch_axes=None):
    """Sequence-parallel `linear_attention` (same math, same shapes) over the mesh axis `seq_axis`.

    Args:
      q: [B, T, H, Dk]; k: [B, T, Hkv, Dk]; v: [B, T, Hkv, Dv], global shapes, T sharded over `seq_axis`.
        T must divide by the size W of that axis.
      decay: None or [H] rates >= 0; a constant for autodiff (zero cotangent).
      mesh: a Mesh or AbstractMesh; default: the ambient one (`jax.set_mesh`). Explicit and Auto axes both work.
        Called where `seq_axis` is already manual (inside the caller's own shard_map), q, k, v are the local
        pieces and no shard_map is added.
      strategy: "ring" (LASP: W-1 hops), "allgather" (LASP-2: one all_gather) or "scan" (ceil(log2 W) hops).
      impl: the per-device implementation, as for linear_attention.
      batch_axes: mesh axes B is sharded over; default: how q's batch dim is already sharded on an Explicit
        mesh, else every other mesh axis.
    Returns:
      o [B, T, H, Dv] in q's dtype, sharded like q.
    """
    s = checks.attention_inputs(q, k, v, decay)
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}: expected one of {sorted(STRATEGIES)}")
    mesh = _current_mesh(mesh)
    if seq_axis not in mesh.axis_names:
        raise ValueError(f"the mesh has no axis {seq_axis!r} (seq_axis); its axes are {tuple(mesh.axis_names)}")
    w = mesh.shape[seq_axis]
    module = impls.resolve(impl, q, k, v)
    if scale != 1.0:
        q = q * jnp.asarray(scale, q.dtype)
    exchange = SeqExchange(strategy, seq_axis, w)
    if seq_axis in jax.sharding.get_abstract_mesh().manual_axes:
        return vjp.attend(q, k, v, s, None, module, exchange, False)

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
    spec = P(batch_axes or None, seq_axis, None, None)
    if explicit:
        q, k, v = (jax.sharding.reshard(x, NamedSharding(mesh, spec)) for x in (q, k, v))
    return _sharded(q, k, v, s, module=module, exchange=exchange, mesh=mesh, spec=spec)


# Always under jit: an eager shard_map of this body crashes the CPU runtime of jax 0.11.2 (segfault, seen
# with every strategy); inside a caller's jit this inner jit is simply inlined.
@functools.partial(jax.jit, static_argnames=("module", "exchange", "mesh", "spec"))
def _sharded(q, k, v, s, *, module, exchange, mesh, spec):
    def local(q, k, v, s):
        return vjp.attend(q, k, v, s, None, module, exchange, False)

    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, P()), out_specs=spec)(q, k, v, s)
