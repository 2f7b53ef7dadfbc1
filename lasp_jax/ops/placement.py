"""Where an op's inputs live on a mesh, read from the arrays themselves: the spec of q, its batch and head axes.

Batch and heads are independent in linear (and softmax) attention, so both ops run per (batch, head) shard inside
shard_map, with no collective, and hand the output back sharded like q. Specs are normalised to 4 entries
[B, T, H, D], each a tuple of mesh axes (empty: not sharded).
"""

from __future__ import annotations

import math

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

Spec = tuple[tuple[str, ...], ...]


def axes(entry) -> tuple[str, ...]:
    """A PartitionSpec entry (None, a name, or a tuple of names) as a tuple of mesh axis names."""
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def size(mesh, names: tuple[str, ...]) -> int:
    return math.prod(mesh.shape[a] for a in names)


def entry(names: tuple[str, ...]):
    """The inverse of `axes`: None, one name, or a tuple."""
    return None if not names else names[0] if len(names) == 1 else names


def explicit_spec(x) -> Spec | None:
    """x's sharding as 4 axis tuples when x is sharded over Explicit mesh axes, else None (replicated, or no
    sharding in its type: an Auto mesh, one device, an uncommitted array, or inside a shard_map over every axis)."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.empty or AxisType.Explicit not in tuple(mesh.axis_types):
        return None
    spec = tuple(sharding.spec) + (None,) * (4 - len(sharding.spec))
    spec = tuple(axes(e) for e in spec)
    return spec if any(spec) else None


def concrete_spec(x) -> tuple | None:
    """(mesh, 4-entry spec) of a committed array with a NamedSharding (known outside jit on any mesh), else None."""
    sharding = None if isinstance(x, jax.core.Tracer) else getattr(x, "sharding", None)
    if not isinstance(sharding, NamedSharding):
        return None
    spec = tuple(sharding.spec) + (None,) * (4 - len(sharding.spec))
    return sharding.mesh, tuple(axes(e) for e in spec)


def head_axes(q_spec: Spec, mesh, h: int, hkv: int, taken: tuple[str, ...] = ()) -> tuple[str, ...]:
    """q's head axes when both H and Hkv split evenly over them (then query-head shard i reads exactly K/V-head
    shard i under GQA) and none is `taken` by batch or sequence; else () (heads computed whole on each device)."""
    heads = q_spec[2]
    n = size(mesh, heads)
    if not heads or set(heads) & set(taken) or h % n or hkv % n:
        return ()
    return heads


def local_rates(s: jax.Array, heads: tuple[str, ...], n_shards: int) -> jax.Array:
    """Inside shard_map: this device's slice of the [H] rates when heads are split over `heads` (n_shards)."""
    if not heads:
        return s
    per = s.shape[0] // n_shards
    return jax.lax.dynamic_slice_in_dim(s, jax.lax.axis_index(heads) * per, per)


def output_spec(q_spec: Spec, mesh, dv: int) -> P:
    """q's spec for an output [B, T, H, Dv]: the last entry is kept where Dv splits over it."""
    last = q_spec[3] if q_spec[3] and dv % size(mesh, q_spec[3]) == 0 else ()
    return P(*(entry(e) for e in (*q_spec[:3], last)))


def like_q(out: jax.Array, q) -> jax.Array:
    """out [B, T, H, Dv] placed as q is: resharded on an Explicit mesh (also under jit); moved outside jit when q
    is a committed array with a NamedSharding. Under jit on an Auto mesh XLA's propagation places it."""
    spec = explicit_spec(q)
    if spec is not None:
        mesh = jax.typeof(q).sharding.mesh
        return jax.sharding.reshard(out, NamedSharding(mesh, output_spec(spec, mesh, out.shape[-1])))
    known = concrete_spec(q)
    if known is not None and not isinstance(out, jax.core.Tracer):
        mesh, spec = known
        return jax.device_put(out, NamedSharding(mesh, output_spec(spec, mesh, out.shape[-1])))
    return out
