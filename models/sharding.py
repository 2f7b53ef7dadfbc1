"""How the models meet a mesh: the one place that reads the ambient mesh.

Parameters carry a PartitionSpec over `param_axes(cfg)` (ZeRO-3 / FSDP: every parameter's largest dim that
divides is split over those axes jointly; ("data", "seq") spans every device of the mesh; a model may keep a
small parameter whole, as Mamba-2 its convolution's weight); activations are
[B, T, ...] split over (batch axes, seq axis). The model code calls the helpers below and never asks whether a
mesh exists: with no mesh (or a mesh without those axes) they are the identity, on an Auto mesh they are
sharding constraints, and on an Explicit mesh they reshard (the weight all-gather of ZeRO-3 is then spelled
out, since Explicit matmuls refuse operands sharded on a contracted dim).
"""

from __future__ import annotations

import math

import jax
from jax.sharding import AxisType, PartitionSpec as P

from models.config import ModelConfig


def ambient_mesh():
    """The mesh set with `jax.set_mesh`, or None when there is none."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def _free_axes(mesh) -> set[str]:
    """Mesh axes that are not already manual (inside a caller's shard_map a manual axis is local)."""
    return set(mesh.axis_names) - set(mesh.manual_axes)


def batch_axes(cfg: ModelConfig, mesh=None) -> tuple[str, ...]:
    """The configured batch axes present (and not manual) on the mesh."""
    mesh = mesh if mesh is not None else ambient_mesh()
    if mesh is None:
        return ()
    free = _free_axes(mesh)
    return tuple(a for a in cfg.batch_axes if a in free)


def seq_size(cfg: ModelConfig, mesh=None) -> int:
    """Size of the sequence-parallel axis (1 when absent); a manual seq axis still counts."""
    mesh = mesh if mesh is not None else ambient_mesh()
    if mesh is None or cfg.seq_axis not in mesh.axis_names:
        return 1
    return mesh.shape[cfg.seq_axis]


def in_seq_shard_map(cfg: ModelConfig, batch: int, mesh=None) -> bool:
    """Whether an op with a shard_map over the seq axis of its own (lasp_attention, sharded_causal_conv1d) runs in
    it rather than its one-device form: under a seq axis of size > 1, and on a mesh with the seq axis of size 1 too
    when the batch axes divide `batch` (the per-device kernels need that shard_map; XLA's forms compute the same in
    it)."""
    mesh = mesh if mesh is not None else ambient_mesh()
    if seq_size(cfg, mesh) > 1:
        return True
    return (mesh is not None and cfg.seq_axis in mesh.axis_names
            and batch % math.prod(mesh.shape[a] for a in batch_axes(cfg, mesh)) == 0)


def _is_explicit(mesh, axes) -> bool:
    return any(mesh._name_to_type[a] == AxisType.Explicit for a in axes)


def constrain(x: jax.Array, spec: P) -> jax.Array:
    """Puts x on `spec` of the ambient mesh (reshard on Explicit axes, a constraint on Auto ones)."""
    mesh = ambient_mesh()
    if mesh is None:
        return x
    used = {a for entry in spec if entry is not None for a in ((entry,) if isinstance(entry, str) else entry)}
    if not used:
        return x
    if _is_explicit(mesh, used):
        return jax.sharding.reshard(x, spec)
    return jax.lax.with_sharding_constraint(x, spec)


def activation_spec(cfg: ModelConfig, ndim: int) -> P:
    """P(batch axes, seq axis, None, ...) restricted to the axes the ambient mesh has free (seq if > 1)."""
    mesh = ambient_mesh()
    if mesh is None:
        return P()
    b = batch_axes(cfg, mesh)
    # A seq axis of size 1 is left out: linear_attention copes with it, but on Explicit meshes the hybrids'
    # one-device softmax path would carry it into a second dim of a spec (a DuplicateSpecError).
    s = cfg.seq_axis if cfg.seq_axis in _free_axes(mesh) and mesh.shape[cfg.seq_axis] > 1 else None
    return P(b or None, s, *([None] * (ndim - 2)))


def constrain_activation(x: jax.Array, cfg: ModelConfig) -> jax.Array:
    """x [B, T, ...] split over (batch axes, seq axis)."""
    return constrain(x, activation_spec(cfg, x.ndim))


def per_device(fn, cfg: ModelConfig, activations: tuple, params: tuple = (), out_ndim: int = 3,
               check_vma: bool = True):
    """fn(*activations, *params) on each device's own rows: inside a shard_map over (batch axes, seq axis) where
    the ambient mesh splits them, for kernels with no sharding rule of their own (Pallas calls), else as is.

    activations: [B, T, ...] arrays, split as constrain_activation puts them; params: gathered whole (a
    varying cast inside fn sums their gradients over the shards); the output [B, T, ...] (out_ndim dims) comes
    back on the activation layout. check_vma: shard_map's (off only for Pallas's interpreter, whose masked loads
    pad with values it rejects).
    """
    mesh = ambient_mesh()
    specs = [activation_spec(cfg, a.ndim) for a in activations]
    axes = {a for spec in specs for entry in spec if entry is not None
            for a in ((entry,) if isinstance(entry, str) else entry)}
    if mesh is None or not any(mesh.shape[a] > 1 for a in axes):
        return fn(*activations, *params)
    activations = tuple(constrain(a, spec) for a, spec in zip(activations, specs))
    params = tuple(gather_param(p) for p in params)
    return jax.shard_map(fn, mesh=mesh, in_specs=(*specs, *(P(),) * len(params)), out_specs=activation_spec(
        cfg, out_ndim), axis_names=frozenset(axes), check_vma=check_vma)(*activations, *params)


def gather_param(w: jax.Array) -> jax.Array:
    """The whole parameter for a matmul: the ZeRO-3 all-gather, explicit on Explicit meshes.

    On Auto meshes XLA places the gather itself (the activations are constrained), so nothing is added.
    """
    mesh = ambient_mesh()
    if mesh is None:
        return w
    spec = getattr(jax.typeof(w).sharding, "spec", None)
    if spec is None or all(entry is None for entry in spec):
        return w
    return jax.sharding.reshard(w, P())


def param_axes(cfg: ModelConfig, mesh=None) -> tuple[str, ...]:
    """The mesh axes parameters shard over jointly: `cfg.param_axis` (one axis name or a tuple of them) in its
    order, restricted to the axes the mesh has (all of them without a mesh).

    FSDP over every device: the seq axis holds identical parameters on each rank just as the data axis does
    (LASP ranks are data-parallel for the weights), so param_axis ("data", "seq") stores 1/(data * seq) of each
    parameter and AdamW moment per device, where "data" alone leaves a data=1 x seq=n mesh fully replicated.
    """
    named = cfg.param_axis
    if named is None:
        return ()
    named = (named,) if isinstance(named, str) else tuple(named)
    mesh = mesh if mesh is not None else ambient_mesh()
    return named if mesh is None else tuple(a for a in named if a in mesh.axis_names)


def param_sharding(shape: tuple[int, ...], cfg: ModelConfig) -> tuple[str | tuple[str, ...] | None, ...]:
    """ZeRO-3 / FSDP spec of a parameter: its largest dim that the product of `param_axes` divides, split over
    those axes together (one name when only one).

    Axis sizes are read from the ambient mesh when one is set at build time; without one, the largest dim is
    taken (paper-size dims are multiples of any practical device count). When no dim divides the whole product,
    the trailing axes are dropped one by one (a dim of 6 on data=2 x seq=4 splits over data only). Vectors,
    parameters with no divisible dim, and any parameter built under a mesh without those axes stay replicated.
    """
    none = (None,) * len(shape)
    if len(shape) < 2:
        return none
    mesh = ambient_mesh()
    axes = param_axes(cfg, mesh)
    for n in range(len(axes), 0, -1):
        size = math.prod(mesh.shape[a] for a in axes[:n]) if mesh is not None else 1
        entry = axes[0] if n == 1 else axes[:n]
        for dim in sorted(range(len(shape)), key=lambda i: (-shape[i], i)):
            if shape[dim] % size == 0:
                return tuple(entry if i == dim else None for i in range(len(shape)))
    return none
