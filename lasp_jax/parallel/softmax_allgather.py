"""LASP-2H: causal softmax attention with the sequence sharded, for the softmax layers of hybrid models.

Softmax attention has no d x d state to pass, so each rank all-gathers K and V over the seq axis (GQA keeps
that gather Hkv/H the size of the queries') and attends with its local queries. The causal mask is taken in
global positions: rank r holds rows rL + i, and row rL + i sees every column c <= rL + i of the gathered K.
(A local mask, i >= c, would be wrong on every rank but the first; the tests check this across ranks.)
The backward needs nothing special: autodiff turns the all_gather into a reduce-scatter of dK and dV.
Packed documents: the [B, T] int32 segment ids are gathered with K/V (T * 4 bytes per row, beside the
2 * T * Hkv * D of K/V) and every pair of positions in different documents is masked.

Per rank the memory is that of the gathered K/V plus one block of scores (lasp_jax.ops.softmax), never [L, T].
"""

from __future__ import annotations

import functools

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from lasp_jax.ops import placement
from lasp_jax.ops import checks, kernel_support
from lasp_jax.ops.softmax import causal_softmax_attention, check_segment_ids, flash_unqualified, warn_passed_over
from lasp_jax.parallel import layout

IMPLS = ("auto", "blockwise", "pallas_triton", "pallas_triton_interpret")  # see softmax_allgather_attention


# Under jit always (inlined in a caller's jit): eagerly inside a caller's shard_map the CPU runtime of jax 0.11.2
# crashes on such bodies.
@functools.partial(jax.jit, static_argnames=("seq_axis", "scale", "block_q", "block_k", "impl"))
def _local(q, k, v, ids, *, seq_axis, scale, block_q, block_k, impl):
    """One rank: gather K, V (and the ids) over seq_axis, then attend with this rank's rows at their global
    positions."""
    gather = functools.partial(jax.lax.all_gather, axis_name=seq_axis, axis=1, tiled=True)
    kg, vg, ids = gather(k), gather(v), None if ids is None else gather(ids)
    offset = jax.lax.axis_index(seq_axis) * q.shape[1]
    if impl == "auto":  # never cuDNN here (see softmax_allgather_attention's impl)
        why = flash_unqualified(q, kg, vg)
        if why is not None:
            warn_passed_over(q, kg, vg, why)
        impl = "blockwise" if why else "pallas_triton"
    return causal_softmax_attention(q, kg, vg, segment_ids=ids, q_offset=offset, scale=scale, block_q=block_q,
                                    block_k=block_k, impl=impl)


def softmax_allgather_attention(q, k, v, *, segment_ids=None, mesh=None, seq_axis="seq", scale=None,
                                batch_axes=None, block_q=512, block_k=512, impl="auto"):
    """Causal softmax attention with T sharded over `seq_axis` (LASP-2H): K/V all-gathered, global mask.

    Args:
      q: [B, T, H, D]; k: [B, T, Hkv, D]; v: [B, T, Hkv, Dv], global shapes; T divisible by the seq axis size.
        Where `seq_axis` is already manual (inside the caller's shard_map) they are the local pieces.
      segment_ids: None, or [B, T] integers sharded like q's first two axes (packed documents): pairs of
        positions with different ids are masked, also across ranks.
      mesh: a Mesh or AbstractMesh; default: the ambient one. Explicit and Auto axes both work.
      scale: default 1/sqrt(D).
      batch_axes: mesh axes B is sharded over; default as in lasp_attention.
      block_q, block_k: as for causal_softmax_attention, per rank.
      impl: "pallas_triton" (or "pallas_triton_interpret"): each rank runs causal_softmax_attention's fused
        flash kernels (lasp_jax.ops.softmax_kernel: the rank's queries at their global offset, documents skipping
        whole key blocks; the interpreted kernels inside a caller's shard_map need its check_vma=False);
        "blockwise": its blockwise XLA loop; "auto": the flash kernels where
        lasp_jax.ops.softmax.flash_unqualified is None (where their GPU test passed: an H200, bf16 at head dims
        33 to 128, fp32 at 33 to 64; on two H200s a Mamba-2 1.3B hybrid step at 64K tokens per GPU took 2.18 s
        with them (session 13), 44.5 s with the blockwise loop (session 11), benchmarks/results/
        TRAIN_GPU_NOTES.md), else the blockwise loop. "cudnn" is refused:
        cuDNN's attention inside this shard_map (queries at a global offset, a dense mask) crashed the process
        (segmentation fault) on two H200s with jax 0.11.2, with and without documents, while the same call on one
        device and cuDNN inside a data-parallel shard_map ran (benchmarks/cudnn_shardmap_probe.py,
        benchmarks/results/gpu_s11_log_excerpts.txt).
    Returns:
      o [B, T, H, Dv] in q's dtype, sharded like q.
    """
    checks.softmax_inputs(q, k, v)
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"self-attention needs q and k of the same length, got {q.shape[1]} and {k.shape[1]}")
    ids = check_segment_ids(segment_ids, q, k, 0)
    if impl == "cudnn":
        raise ValueError("impl='cudnn' is refused for LASP-2H: cuDNN's attention inside its shard_map crashed "
                         "(segmentation fault) on two H200s with jax 0.11.2 (benchmarks/cudnn_shardmap_probe.py); "
                         "use 'auto', 'pallas_triton' or 'blockwise'")
    if impl not in IMPLS:
        raise ValueError(f"unknown LASP-2H impl {impl!r}: expected one of {IMPLS}")
    mesh = layout.current_mesh(mesh)
    layout.check_seq_axis(mesh, seq_axis)
    options = dict(seq_axis=seq_axis, scale=scale, block_q=block_q, block_k=block_k, impl=impl)
    if layout.seq_is_manual(seq_axis):
        return _local(q, k, v, ids, **options)
    q_in = q
    q, k, v, spec, _ = layout.place(q, k, v, mesh, seq_axis, batch_axes)
    if ids is not None and AxisType.Explicit in tuple(mesh.axis_types):
        ids = jax.sharding.reshard(ids, NamedSharding(mesh, P(*spec[:2])))
    out = _sharded(q, k, v, ids, mesh=mesh, spec=spec, **options)
    return placement.like_q(out, q_in)


# Under jit always, as lasp_attention: an eager shard_map crashes the CPU runtime of jax 0.11.2.
@functools.partial(jax.jit, static_argnames=("mesh", "spec", "seq_axis", "scale", "block_q", "block_k", "impl"))
def _sharded(q, k, v, ids, *, mesh, spec, seq_axis, scale, block_q, block_k, impl):
    body = functools.partial(_local, seq_axis=seq_axis, scale=scale, block_q=block_q, block_k=block_k, impl=impl)
    in_specs = (spec, spec, spec, None if ids is None else P(*spec[:2]))
    return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=spec,
                         check_vma=kernel_support.checks_vma(impl))(q, k, v, ids)
