"""The implementations of the per-device contract, and how `impl=` names resolve to one.

Each entry meets `vjp.Impl` (forward and backward of one piece with its incoming state, and
`supported(q, k, v) -> str | None`: None when usable here, else the reason). "auto" takes the first usable
entry of `AUTO_ORDER`, which lists only implementations whose tests pass on that platform.
"""

from __future__ import annotations

import jax

from lasp_jax.ops import pallas_triton, reference, vjp, xla

# "pallas_triton" runs on the GPUs its tests passed on (see its `supported`: H200 and H100), and "auto" takes it
# there; elsewhere "auto" is the chunked XLA path. "pallas_triton_interpret" is the same kernels in Pallas
# interpret mode, on any platform (slow: for tests). "pallas_mosaic" is those kernels with the four walks as
# Mosaic GPU kernels (bf16, head dims 128, no GQA; offered on the H200, where all their tests passed),
# "pallas_mosaic_interpret" the same interpreted; "auto" prefers it where it runs (faster than "pallas_triton"
# there: benchmarks/results/KERNEL_NOTES.md).
IMPLS: dict[str, vjp.Impl] = {
    "reference": vjp.Split(reference),
    "xla": vjp.Split(xla),
    "pallas_triton": pallas_triton.KERNELS,
    "pallas_triton_interpret": pallas_triton.INTERPRET,
    "pallas_mosaic": pallas_triton.MOSAIC,
    "pallas_mosaic_interpret": pallas_triton.MOSAIC_INTERPRET,
}
AUTO_ORDER: tuple[str, ...] = ("pallas_mosaic", "pallas_triton", "xla")


def partitioned(x) -> bool:
    """Whether XLA's partitioner splits a call on x over several devices: the ambient mesh (jax.set_mesh), else
    x's own mesh (committed arrays, Explicit or Auto, also as traced under jit), has an axis of size > 1 that is
    not manual (inside shard_map the call is per device). Not seen: uncommitted inputs given shardings only by
    jit's in_shardings, with no ambient mesh (the trace carries no mesh then)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
    if mesh is None or mesh.empty:
        return False
    return any(size > 1 for name, size in mesh.shape.items() if name not in mesh.manual_axes)


def resolve(impl: str, q, k, v, *, partitioned: bool = False) -> vjp.Impl:
    """Returns the implementation for `impl` ("auto" or a name of IMPLS); ValueError if unusable.

    partitioned: the call is split over several devices by XLA's partitioner (rather than run per device inside
    shard_map, as lasp_attention does). Only implementations XLA can partition run there: "auto" skips the
    others, and naming one is an error (a Pallas kernel would be gathered onto every device, or rejected).
    """
    if impl == "auto":
        for name in AUTO_ORDER:
            candidate = IMPLS[name]
            if (candidate.partitionable or not partitioned) and candidate.supported(q, k, v) is None:
                return candidate
        raise ValueError("no implementation supports these inputs")  # unreachable while xla is in AUTO_ORDER
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}: expected 'auto' or one of {sorted(IMPLS)}")
    reason = IMPLS[impl].supported(q, k, v)
    if reason is not None:
        raise ValueError(f"impl {impl!r} cannot run these inputs: {reason}")
    if partitioned and not IMPLS[impl].partitionable:
        raise ValueError(f"impl {impl!r} runs per device (its kernels have no sharding rule), but this call is "
                         "under a multi-device mesh that XLA partitions: use lasp_attention (it runs the kernels "
                         "per device inside shard_map, with a seq axis of any size), call it inside your own "
                         "shard_map, or use impl='xla'")
    return IMPLS[impl]
