"""Where sequence-parallel inputs live: the mesh, the seq axis, the batch axes, and the shard_map spec.

Shared by every sequence-parallel op (lasp_attention, the LASP-2H softmax attention) so that they accept the
same meshes and reject the same inputs with the same messages.
"""

from __future__ import annotations

import math

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P


def current_mesh(mesh):
    """`mesh` if given, else the ambient one (`jax.set_mesh`); a ValueError if there is neither."""
    if mesh is not None:
        return mesh
    ambient = jax.sharding.get_abstract_mesh()
    if ambient.empty:
        raise ValueError("a sequence-parallel op needs a mesh: pass mesh=... or call it under "
                         "`with jax.set_mesh(mesh):`")
    return ambient


def check_seq_axis(mesh, seq_axis: str) -> int:
    """The size of `seq_axis`; a ValueError naming the mesh's axes if it has none of that name."""
    if seq_axis not in mesh.axis_names:
        raise ValueError(f"the mesh has no axis {seq_axis!r} (seq_axis); its axes are {tuple(mesh.axis_names)}")
    return mesh.shape[seq_axis]


def seq_is_manual(seq_axis: str) -> bool:
    """True inside a caller's shard_map over `seq_axis`: the arrays are already the local pieces."""
    return seq_axis in jax.sharding.get_abstract_mesh().manual_axes


def _batch_axes_of(x) -> tuple[str, ...] | None:
    """The mesh axes an Explicit-sharded array's batch dim lives on (None when it is not sharded)."""
    entry = jax.typeof(x).sharding.spec[0]
    if entry is None:
        return None
    return (entry,) if isinstance(entry, str) else tuple(entry)


def place(q, k, v, mesh, seq_axis: str, batch_axes):
    """Validates the layout and returns (q, k, v, spec): spec = P(batch_axes, seq_axis, None, None), and on an
    Explicit mesh the arrays resharded to it.

    batch_axes: the mesh axes B is sharded over; default: how q's batch dim is already sharded on an Explicit
    mesh, else every other mesh axis.
    """
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
        raise ValueError(f"batch B={b} must be divisible by the batch axes {tuple(batch_axes)} (size {n_batch}); "
                         "pass batch_axes=() to replicate the batch over them")
    spec = P(tuple(batch_axes) or None, seq_axis, None, None)
    if explicit:
        q, k, v = (jax.sharding.reshard(x, NamedSharding(mesh, spec)) for x in (q, k, v))
    return q, k, v, spec
