"""What the Pallas kernel modules share: whether a compiled Triton kernel can run on this device, outputs typed
like their inputs and inputs cast to vary as the rows do inside shard_map, whether XLA partitions a call
(`partitioned`), how a per-device kernel's `impl=` resolves (the Mamba-2 pieces: lasp_jax.parallel.causal_conv;
the row-wise ops gated_norm, rms_norm and ssd_inputs through `resolve_rows`) and whether a shard_map
around them checks varying axes (`checks_vma`), the row-block launch sizes
of the row-wise Triton kernels (the norms: `block_rows`, `warps`), and a rounding to a matmul operand's dtype that
the interpreters keep (`rounded_to`).

Inside shard_map (check_vma) an array carries the manual axes it varies over: a kernel's outputs must declare
the ones its rows vary over, and a replicated input that meets those rows (a weight) is cast to vary too, so its
gradient comes back as one sum over the shards (the transpose of the cast) instead of a varying cotangent for an
invariant input, which custom_vjp refuses.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

MIN_CAPABILITY = (8, 0)  # Ampere: bf16 tensor cores, what the Triton lowering targets
HOPPER = "9.0"  # compute capability: wgmma and TMA as the Mosaic GPU kernels use them (sm_90a)


def power_of_two_below(n: int) -> int:
    """The largest power of two <= n (n >= 1): Triton's block sizes and warp counts are powers of two."""
    return 1 << (n.bit_length() - 1)


def block_rows(block: int, width: int) -> int:
    """Rows of a row-wise kernel's block of about `block` elements of rows `width` wide (a power of two, >= 1)."""
    return power_of_two_below(max(1, block // width))


def warps(elements: int, elems_per_warp: int) -> int:
    """num_warps for a program holding `elements` values: one warp per elems_per_warp, a power of two in [4, 16]."""
    return power_of_two_below(min(16, max(4, elements // elems_per_warp)))


def triton_unavailable() -> str | None:
    """None when a compiled Pallas Triton kernel can run here (a CUDA GPU of compute capability >= 8.0), else
    the reason, naming the interpreted impl that runs anywhere."""
    if jax.default_backend() != "gpu":
        return (f"the Triton lowering needs a CUDA GPU (backend here: {jax.default_backend()}); "
                "impl 'pallas_triton_interpret' runs anywhere")
    device = jax.devices()[0]
    capability = getattr(device, "compute_capability", None)
    if capability is None or tuple(int(c) for c in str(capability).split(".")) < MIN_CAPABILITY:
        return (f"the Triton kernels need a CUDA GPU of compute capability >= 8.0 (Ampere or newer); this is "
                f"{device.device_kind!r} (compute capability {capability})")
    return None


def hopper_unavailable(what: str, interpreted: str) -> str | None:
    """None when a compiled Mosaic GPU kernel for Hopper can run here, else the reason: `what` needs Hopper;
    `interpreted` says what runs without one (the interpreted impl)."""
    if jax.default_backend() != "gpu":
        return f"Mosaic GPU needs a CUDA GPU (backend here: {jax.default_backend()}); {interpreted}"
    device = jax.devices()[0]
    capability = getattr(device, "compute_capability", None)
    if capability != HOPPER:
        return (f"{what} needs a Hopper GPU (compute capability {HOPPER}, sm_90a); this is {device.device_kind!r} "
                f"(compute capability {capability})")
    return None


def checks_vma(impl: str) -> bool:
    """shard_map's check_vma for a shard_map around the kernels of `impl`: off only for the Pallas Triton
    interpreter, whose discharged loads and stores do not carry the varying-axes types (it pads masked ones with
    an invariant value, which check_vma rejects; jax 0.11.2); the compiled kernels lower with the check on."""
    return impl != "pallas_triton_interpret"


def typed_like(shape, dtype, like) -> jax.ShapeDtypeStruct:
    """A kernel output's type: shape and dtype, varying over `like`'s manual axes."""
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.typeof(like).manual_axis_type)


def vary_like(a, like):
    """a cast to vary over the manual axes `like` varies over and a does not (a itself where none)."""
    missing = tuple(jax.typeof(like).manual_axis_type.varying - jax.typeof(a).manual_axis_type.varying)
    return lax.pcast(a, missing, to="varying") if missing else a


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


def resolve_per_device(impl: str, impls: tuple[str, ...], qualified: dict[str, tuple[str, ...]],
                       supported: Callable[[str], str | None], split: bool, split_hint: str) -> str:
    """The impl a per-device kernel's `impl=` names: "xla" or one of the kernels' impls in `impls` (each
    compiled one NAME beside its interpreted NAME_interpret).

    "auto" takes the first compiled impl of `qualified` ({NAME: the device kinds where its GPU tests passed and it
    beat "xla"}) that lists this device's kind, when `supported(NAME)` (a reason or None) has none and the call is
    not `split` (under a mesh that XLA partitions); "xla" otherwise. A kernel named outright that cannot run, or a
    split call (the kernels have no sharding rule), is a ValueError; `split_hint` says what to do instead.
    """
    if impl not in impls:
        raise ValueError(f"unknown impl {impl!r}: expected one of {impls}")
    if impl == "auto":
        kind = jax.devices()[0].device_kind
        for name, kinds in qualified.items():
            if kind in kinds and not split and supported(name) is None:
                return name
        return "xla"
    if impl == "xla":
        return impl
    reason = supported(impl)
    if reason is not None:
        raise ValueError(f"impl {impl!r} cannot run these inputs: {reason}")
    if split:
        raise ValueError(f"impl {impl!r} runs per device (its kernels have no sharding rule), but this call is "
                         f"under a multi-device mesh that XLA partitions: {split_hint}")
    return impl


def resolve_rows(impl: str, impls: tuple[str, ...], qualified_gpus: tuple[str, ...],
                 supported: Callable[[bool], str | None], rows, *, per_device: bool) -> str:
    """`resolve_per_device` for the row-wise Pallas Triton ops (gated_norm, rms_norm, ssd_inputs): their kernels'
    impls "pallas_triton" (compiled, "auto" on qualified_gpus) and "pallas_triton_interpret"; supported(interpret)
    gives a reason or None. The call is split where XLA partitions `rows` and the caller is not per_device (their
    rows are independent: run them inside a shard_map over the rows)."""
    return resolve_per_device(
        impl, impls, {"pallas_triton": qualified_gpus}, lambda name: supported(name == "pallas_triton_interpret"),
        split=not per_device and partitioned(rows),
        split_hint="call it inside a shard_map over the rows, or use impl='xla'")


def rounded_to(x, dtype):
    """float32 x rounded to `dtype` (a matmul operand's: float32, bfloat16 or float16) as a kernel's cast
    rounds it, kept in float32.

    Why not x.astype(dtype).astype(f32): in interpret mode a kernel runs as XLA:CPU code, which may drop that
    round trip as excess precision (lax.reduce_precision, which it keeps, has no Pallas Triton lowering). bf16
    is rounded on the bits, by integer ops that lower everywhere (Triton, Mosaic GPU, their interpreters), ties
    to even as the cast: the same bits for every finite or infinite x (overflow to infinity included); a NaN may
    come back as a zero or an infinity (the walks' callers keep it through their other term: S - rounded(S),
    w's own row dot). float16 keeps the round trip (compiled kernels round it; interpreted, XLA may not).
    """
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float32:
        return x
    if dtype != jnp.bfloat16:
        return x.astype(dtype).astype(jnp.float32)
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    bits = bits + (jnp.uint32(0x7FFF) + ((bits >> jnp.uint32(16)) & jnp.uint32(1)))
    return lax.bitcast_convert_type(bits & jnp.uint32(0xFFFF0000), jnp.float32)
