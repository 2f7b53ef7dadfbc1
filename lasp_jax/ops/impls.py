"""The implementations of the per-device contract, how `impl=` names resolve to one, and which GPUs are
qualified for the compiled kernels.

Each entry meets `vjp.Impl` (forward and backward of one piece with its incoming state, and
`supported(q, k, v) -> str | None`: None when it can run these inputs here, else the reason). "auto" takes the
first entry of `AUTO_ORDER` that is supported AND qualified: the compiled kernels are qualified only on the
device kinds (and head dims, dtypes) where their GPU tests (`pytest -m gpu tests/ops`) passed, so "auto" is
fail-closed. On a CUDA GPU where "auto" passes over the Triton kernels for that reason it says so once (an
`UnqualifiedWarning`) and how to opt in: naming impl="pallas_triton" runs on any CUDA GPU of compute
capability 8.0 or newer, with that warning. The Mosaic walks, named on an unqualified Hopper part, are refused
(their GPU tests did not complete on the H100: benchmarks/results/KERNEL_NOTES.md).

Per-token decay and documents (`per_token=True`) ask the same of the token variants (`supported_tokens`, and
`QUALIFIED_TOKEN_GPUS`: the parts where their own GPU tests passed). Every impl takes every head layout of
`checks.attention_inputs` (the kernels read each operand at its own head); heads beyond MHA/GQA/MQA (GVA:
Mamba-2's groups, `checks.beyond_gqa`) are qualified for a kernel only where its GVA GPU tests passed
(`QUALIFIED_GVA_GPUS`), so until then "auto" takes "xla" for them.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp

from lasp_jax.ops import checks, pallas_mosaic, pallas_triton, reference, vjp, xla

# "pallas_triton": the Triton kernels; "pallas_mosaic": the same state passes with the four walks as Mosaic GPU
# kernels (bf16, head dims 64 and 128; Hopper), faster where both run (benchmarks/results/KERNEL_NOTES.md);
# "_interpret": the same in interpret mode, on any platform (slow: for tests).
IMPLS: dict[str, vjp.Impl] = {
    "reference": vjp.Split(reference),
    "xla": vjp.Split(xla),
    "pallas_triton": pallas_triton.KERNELS,
    "pallas_triton_interpret": pallas_triton.INTERPRET,
    "pallas_mosaic": pallas_mosaic.WALKS,
    "pallas_mosaic_interpret": pallas_mosaic.INTERPRET,
}
AUTO_ORDER: tuple[str, ...] = ("pallas_mosaic", "pallas_triton", "xla")

# Exact device kinds where each compiled impl's GPU tests passed: a sibling part (H100 PCIe, GH200, H800) is
# unqualified until its own run. fp32 at head dims above 64 passed on the H200 only; the Triton kernels' GPU
# tests cover head dims 64, 128, 256 in bf16 and fp32.
QUALIFIED_GPUS: dict[str, tuple[str, ...]] = {
    "pallas_triton": ("NVIDIA H200", "NVIDIA H100 80GB HBM3"),
    "pallas_mosaic": ("NVIDIA H200",),
}
# The token walks' GPU tests (tests/ops/test_pallas_mosaic_tokens.py) passed on an H200 on 2026-11-29 (bf16,
# d 64 and 128, GQA); the Triton token kernels' (tests/ops/test_pallas_triton_tokens.py: bf16 and fp32 against
# xla, lasp_attention with every strategy) on an H200 on 2026-11-30.
QUALIFIED_TOKEN_GPUS: dict[str, tuple[str, ...]] = {
    "pallas_triton": ("NVIDIA H200",),
    "pallas_mosaic": ("NVIDIA H200",),
}
# Heads beyond MHA/GQA/MQA (checks.beyond_gqa): qualified by the GPU tests at Mamba-2's shape (`pytest -m gpu
# tests/ops/test_gva.py`: test_gpu_mamba2_shape_matches_xla, G = 1 and 8 groups of q and k, H = 32, Dk 128,
# Dv 64, bf16, per-token decay with documents and constant decay, against xla in float32; and
# test_gpu_lasp_attention_mamba2_shape): all passed for both families on an H200 on 2026-11-30 (G = 1, 8, 32),
# again with the grouped per-token state pass (pallas_triton._grouped_state_kernel; session 18, call 8).
QUALIFIED_GVA_GPUS: dict[str, tuple[str, ...]] = {
    "pallas_triton": ("NVIDIA H200",),
    "pallas_mosaic": ("NVIDIA H200",),
}
# Dk != Dv where a kernel family's GPU tests did not cover it: the Mosaic walks take it since the GVA work
# (Mamba-2's Dk 128, Dv 64; the GVA GPU tests above run them at that shape, with G = 32 also without GVA); the
# Triton kernels' GPU cases include dk128_dv64_mqa_bf16, so QUALIFIED_GPUS covers them.
QUALIFIED_UNEQUAL_DIMS_GPUS: dict[str, tuple[str, ...]] = {
    "pallas_mosaic": ("NVIDIA H200",),
}
_WIDE_F32_GPUS = ("NVIDIA H200",)
_TRITON_HEAD_DIMS = (64, 128, 256)
_TRITON_DTYPES = (jnp.bfloat16, jnp.float32)
# Head dims of the walks' GPU cases (d64_bf16_mosaic, d128_bf16_mosaic_gqa passed on an H200, 2026-11-29).
_MOSAIC_HEAD_DIMS = (64, 128)
# Named on an unqualified GPU, these run (with a warning); the others are refused.
_RUN_WHEN_NAMED = ("pallas_triton",)


class UnqualifiedWarning(UserWarning):
    """A compiled kernel impl was passed over, or runs, on a GPU (or shape) its GPU tests have not qualified."""


def qualification(name: str, q, k, v, *, per_token: bool = False) -> str | None:
    """None when impl `name` is qualified for these inputs on this device (or is not a compiled GPU kernel),
    else why not; per_token: for per-token decay or documents. Call it only where `IMPLS[name].supported` (or
    supported_tokens) is None."""
    if name not in QUALIFIED_GPUS:
        return None
    kind = jax.devices()[0].device_kind
    if kind not in QUALIFIED_GPUS[name]:
        return f"{name} has passed its GPU tests on {QUALIFIED_GPUS[name]} only, not on {kind!r}"
    if per_token and kind not in QUALIFIED_TOKEN_GPUS[name]:
        return (f"{name} with per-token decay or documents has passed its GPU tests on "
                f"{QUALIFIED_TOKEN_GPUS[name] or 'no GPU yet'}, not on {kind!r}")
    if checks.beyond_gqa(q, k, v) and kind not in QUALIFIED_GVA_GPUS[name]:
        return (f"{name} with heads beyond MHA/GQA/MQA (q {q.shape[2]}, k {k.shape[2]}, v {v.shape[2]} heads) has "
                f"passed its GPU tests on {QUALIFIED_GVA_GPUS[name] or 'no GPU yet'}, not on {kind!r}")
    if name == "pallas_triton":
        dtype = jnp.dtype(q.dtype)
        if dtype not in {jnp.dtype(d) for d in _TRITON_DTYPES}:
            return f"{name}'s GPU tests cover bfloat16 and float32, not {dtype.name}"
        for dim_name, d in (("Dk", q.shape[-1]), ("Dv", v.shape[-1])):
            if d not in _TRITON_HEAD_DIMS:
                return f"{name}'s GPU tests cover head dims {_TRITON_HEAD_DIMS}, not {dim_name}={d}"
        if dtype == jnp.float32 and max(q.shape[-1], v.shape[-1]) > 64 and kind not in _WIDE_F32_GPUS:
            return (f"{name} in fp32 at head dims above 64 has passed its GPU tests on {_WIDE_F32_GPUS} only, "
                    f"not on {kind!r}")
    if name == "pallas_mosaic":
        for dim_name, d in (("Dk", q.shape[-1]), ("Dv", v.shape[-1])):
            if d not in _MOSAIC_HEAD_DIMS:
                return f"{name}'s GPU tests cover head dims {_MOSAIC_HEAD_DIMS}, not {dim_name}={d}"
    dims = q.shape[-1], v.shape[-1]
    if dims[0] != dims[1] and kind not in QUALIFIED_UNEQUAL_DIMS_GPUS.get(name, (kind,)):
        return (f"{name} with Dk != Dv (Dk {dims[0]}, Dv {dims[1]}) has passed its GPU tests on "
                f"{QUALIFIED_UNEQUAL_DIMS_GPUS[name] or 'no GPU yet'}, not on {kind!r}")
    return None


warned: set[str] = set()  # the UnqualifiedWarning messages already given (each once per process)


def warn_once(message: str):
    if message not in warned:
        warned.add(message)
        warnings.warn(message, UnqualifiedWarning, stacklevel=4)


def _supported(candidate: vjp.Impl, q, k, v, per_token: bool) -> str | None:
    return candidate.supported_tokens(q, k, v) if per_token else candidate.supported(q, k, v)


def resolve(impl: str, q, k, v, *, partitioned: bool = False, per_token: bool = False) -> vjp.Impl:
    """Returns the implementation for `impl` ("auto" or a name of IMPLS); ValueError if unusable.

    partitioned: the call is split over several devices by XLA's partitioner (rather than run per device inside
    shard_map, as lasp_attention does). Only implementations XLA can partition run there: "auto" skips the
    others, and naming one is an error (a Pallas kernel would be gathered onto every device, or rejected).
    per_token: the call has per-token decay or documents (each candidate's token variant is asked).
    """
    if impl == "auto":
        for name in AUTO_ORDER:
            candidate = IMPLS[name]
            if (not candidate.partitionable and partitioned) or _supported(candidate, q, k, v, per_token):
                continue
            reason = qualification(name, q, k, v, per_token=per_token)
            if reason is None:
                return candidate
            if name in _RUN_WHEN_NAMED:
                warn_once(f"impl='auto' passed over {name!r}: {reason}. Name impl={name!r} to run it anyway "
                           "(unqualified), or qualify this GPU with `pytest -m gpu tests/ops`")
        raise ValueError("no implementation supports these inputs")  # unreachable while xla is in AUTO_ORDER
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}: expected 'auto' or one of {sorted(IMPLS)}")
    reason = _supported(IMPLS[impl], q, k, v, per_token)
    if reason is not None:
        raise ValueError(f"impl {impl!r} cannot run these inputs: {reason}")
    if partitioned and not IMPLS[impl].partitionable:
        raise ValueError(f"impl {impl!r} runs per device (its kernels have no sharding rule), but this call is "
                         "under a multi-device mesh that XLA partitions: use lasp_attention (it runs the kernels "
                         "per device inside shard_map, with a seq axis of any size), call it inside your own "
                         "shard_map, or use impl='xla'")
    reason = qualification(impl, q, k, v, per_token=per_token)
    if reason is not None:
        if impl not in _RUN_WHEN_NAMED:
            raise ValueError(f"impl {impl!r} is not qualified here: {reason} (run `pytest -m gpu tests/ops` on "
                             "this GPU first)")
        warn_once(f"impl {impl!r} runs unqualified: {reason} (run `pytest -m gpu tests/ops` on this GPU to "
                   "qualify it)")
    return IMPLS[impl]
