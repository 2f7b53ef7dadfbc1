"""Where sequence-parallel inputs live: the mesh, the seq axis, the batch axes, and the shard_map spec.

Shared by every sequence-parallel op (lasp_attention, the LASP-2H softmax attention) so that they accept the
same meshes and reject the same inputs with the same messages.
"""

from __future__ import annotations

import jax
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec as P

from lasp_jax.ops import placement


def current_mesh(mesh):
    """`mesh` if given, else the ambient one (`jax.set_mesh`); a ValueError if there is neither."""
    if mesh is not None:
        if not isinstance(mesh, (Mesh, AbstractMesh)):
            hint = f" (did you mean seq_axis={mesh!r}?)" if isinstance(mesh, str) else ""
            raise ValueError(f"mesh must be a jax.sharding.Mesh or AbstractMesh, got {type(mesh).__name__} "
                             f"{mesh!r}{hint}")
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


def place(q, k, v, mesh, seq_axis: str, batch_axes):
    """Validates the layout and returns (q, k, v, spec, heads): spec = P(batch_axes, seq_axis, heads, None) and on an
    Explicit mesh the arrays resharded to it.

    batch_axes: the mesh axes B is sharded over (a name or a sequence of names); default: how q's batch dim is
    already sharded (on an Explicit mesh, or a committed q outside jit), else every other mesh axis. heads: the
    axes q's heads are sharded over (known as for batch) when every head count (q's, k's, v's) splits evenly over
    them and batch and seq do not use them (heads are independent, so each device attends over its own heads:
    output-head shard i reads exactly shard i of each input), else ().
    """
    w = mesh.shape[seq_axis]
    b, t, h = q.shape[:3]
    if t % w:
        raise ValueError(f"sequence length T={t} must be divisible by the {seq_axis!r} axis size {w}")
    explicit = AxisType.Explicit in tuple(mesh.axis_types)
    q_spec = placement.explicit_spec(q) if explicit else None
    if q_spec is None and (known := placement.concrete_spec(q)) is not None and any(known[1]):
        q_spec = known[1]  # a committed q outside jit (Auto mesh): its sharding is known too
    if batch_axes is None:
        batch_axes = q_spec[0] if q_spec else ()
        if not batch_axes:
            batch_axes = tuple(a for a in mesh.axis_names if a != seq_axis and a not in (q_spec or ((),) * 3)[2])
    elif isinstance(batch_axes, str):
        batch_axes = (batch_axes,)
    batch_axes = tuple(batch_axes)
    for a in batch_axes:
        if a not in mesh.axis_names or a == seq_axis:
            raise ValueError(f"batch axis {a!r} is not a non-seq axis of the mesh {tuple(mesh.axis_names)}")
    n_batch = placement.size(mesh, batch_axes)
    if b % n_batch:
        raise ValueError(f"batch B={b} must be divisible by the batch axes {batch_axes} (size {n_batch}); "
                         "pass batch_axes=() to replicate the batch over them")
    fewest = min(x.shape[2] for x in (q, k, v))  # the other head counts are multiples of it
    heads = placement.head_axes(q_spec, mesh, max(h, v.shape[2]), fewest, taken=(*batch_axes, seq_axis)) \
        if q_spec else ()
    spec = P(placement.entry(batch_axes), seq_axis, placement.entry(heads), None)
    if explicit:
        q, k, v = (jax.sharding.reshard(x, NamedSharding(mesh, spec)) for x in (q, k, v))
    return q, k, v, spec, heads
