"""TransNormerLLM's SRMSNorm (no learned scale) over the last axis, as fused Pallas kernels (Triton lowering) or
plain XLA: the pre-norm of every block (TNL: two per block; Mamba-2: one) and the model's final norm.

    y = x r,   r = rsqrt(mean(x^2) + eps)              per row of D channels (x [..., D])
    dx = r (g - y mean(g y))                           g: y's cotangent

Why: in a Mamba-2 1.3B training step on an H200 (T = 64K, d_model 2048, bf16, 48 layers;
benchmarks/results/profile_train_h200_s17_mamba2_conv.md) XLA's backward fusions of this norm took 31.6 ms (0.66
ms a call, most of it one row reduction at ~1 TB/s) where the backward need only read x and g and write dx
(3 x 268 MB, about 0.2 ms at the H200's ~4 TB/s). The kernels hold each row whole in registers: the forward
reads x once and writes y; the backward recomputes r and y from x (the only residual) and writes dx.

Kernels (`impl="pallas_triton"`): the rows are the flattened leading dims, one program per block of rows, each
row whole (its width padded to a power of two, as Triton's tensors must be; the padding columns masked on load
and store, so D need not be one: 2560 for Mamba-2 2.7B); rows past the end of the last block are masked too.
`Config.xla_forward` keeps XLA's forward ops under the same custom_vjp (XLA may fuse them with their neighbours:
the statistics into one reduction, the scaling into its consumer), the backward still the kernel.

Numerics: float32 inside (x and g upcast on load, the statistics, dx); y rounded once to x's dtype, dx to x's
dtype. `impl="xla"` is the model's former code, operation for operation (bit-identical; its gradient is XLA
autodiff's). Kernels and xla differ by float32 summation order of the row sums, except on rows of rms beyond
~1e15, where autodiff's r^3 term underflows float32 (xla's dx 10-27% off on CPU at 1e17) and the kernel's
r (g - y mean(g y)) does not (tests/ops/test_rms_norm.py: test_zero_and_large_rows).

Residual (`srms_norm_residual`): a pre-norm block `x + mixer(srms_norm(x))` gives x two cotangents, the residual
path's d and the norm's dx_norm; XLA added them in a fusion of its own after the backward kernel (8.8 ms of the step
above beside the kernel's 9.7: per layer two [65536, 2048] bf16 arrays read, one written). The op returns (x, y)
under one custom_vjp, x being the input itself (no copy), and its backward kernel reads d too and writes dx = d +
dx_norm: one more read, no extra pass (in the step on an H200 the kernel went 9.7 -> 12.4 ms and the 8.8 ms fusion
is gone; benchmarks/results/TRAIN_GPU_NOTES.md, session 19). The add is in float32, rounded once to x's dtype, where
autodiff rounds dx_norm first and then the sum (bf16 on CPU: 1.65-1.71e-3 relative to float64 against 1.80-1.86e-3).
"xla" returns (x, y) and leaves the add to autodiff.

Placement: the kernels run per device. Under a mesh that XLA partitions (`kernel_support.partitioned`) "auto" takes
"xla" and naming "pallas_triton" is an error: call it inside a shard_map over the rows (models.layers.srms_norm and
srms_norm_residual do, through models.sharding.per_device); each row is independent.

Platforms: compiled on CUDA GPUs of compute capability 8.0 or newer (A100, Hopper); "pallas_triton_interpret"
runs the same kernels in Pallas interpret mode anywhere (CPU tests). "auto" takes the kernels only on the device
kinds in QUALIFIED_GPUS, where their GPU test passed, else "xla".
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from lasp_jax.ops import kernel_support

_F32 = jnp.float32
IMPLS = ("auto", "xla", "pallas_triton", "pallas_triton_interpret")
# Exact jax device kinds where tests/ops/test_rms_norm.py's GPU test passed and the kernels beat "xla"
# (benchmarks/rms_norm_gpu.py); "auto" takes "xla" elsewhere. On an H200 (2026-11-30,
# benchmarks/results/rms_norm_gpu_h200_s18.md, bf16) the kernels took 0.147 / 0.348 ms forward / forward+backward
# at [65536, 2048] against xla's 0.149 / 0.404, and 0.278 / 0.666 at [65536, 4096] against 0.291 / 0.792; the GPU
# test passed there (widths 2048 and 2560). In Mamba-2 1.3B's step (with ssd_inputs' kernel) the norm's backward
# fusions (31.6 ms) became 10.2 ms of kernel and an 8.8 ms XLA fusion at its call, its forward (6.9 ms of XLA
# fusion, fused with its neighbours) a 12.7 ms kernel: 38.5 -> 31.7 ms in all (TRAIN_GPU_NOTES.md, session 18;
# Config.xla_forward was not tried in the step). TNL-1B's step took 0.783 s with either (0.5 GiB more peak memory
# with the kernels).
QUALIFIED_GPUS: tuple[str, ...] = ("NVIDIA H200",)
MAX_WIDTH = 8192  # one program holds whole rows: [rows, padded D] float32 tiles in registers
DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


@dataclasses.dataclass(frozen=True)
class Config:
    """Launch sizes. Swept on an H200 (benchmarks/results/rms_norm_gpu_h200_s18.md): elems_per_warp 512 took
    0.348 / 0.666 ms forward+backward at D = 2048 / 4096 against 0.360 / 0.700 at 256 and 0.359 / 0.699 at 128;
    the block sizes swept (fwd 4096-16384, bwd 2048-8192) and xla_forward were within 0.356-0.371 / 0.700-0.722.

    fwd_block, bwd_block: elements per program's block of rows, the forward's and the backward's (rows: the
    largest power of two <= max(1, block // padded width)). elems_per_warp: num_warps = block elements / this,
    clamped to [4, 16], a power of two (kernel_support.warps). num_stages: Triton's software pipelining depth.
    xla_forward: the forward as XLA's ops (fusible with their neighbours), the backward still the kernel."""

    fwd_block: int = 8192
    bwd_block: int = 4096
    elems_per_warp: int = 512
    num_stages: int = 2
    xla_forward: bool = False

    def __post_init__(self):
        for name in ("fwd_block", "bwd_block", "elems_per_warp", "num_stages"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Config.{name} must be a positive int; got {value!r}")


DEFAULT = Config()


# ---------------------------------------------------------------------------------------------------------
# Kernels: refs hold a [rows, P] block of the [R, D] rows, P the power of two >= D.


def _valid(ref, n_rows: int, width: int):
    """The block's [rows, 1] (or [rows, P] when P > D) mask of elements inside the [n_rows, width] array."""
    rows, padded = ref.shape
    valid = (pl.program_id(0) * rows + jnp.arange(rows) < n_rows)[:, None]
    return valid if padded == width else valid & (jnp.arange(padded) < width)[None, :]


def _normalized(x, width: int, eps: float):
    """(y = x r, r [rows, 1]) of float32 rows x [rows, P] whose padding columns are zeros."""
    r = lax.rsqrt(jnp.sum(x * x, axis=1, keepdims=True) / width + eps)
    return x * r, r


def _forward_kernel(x_ref, y_ref, *, n_rows, width, eps):
    """One block of rows: y in y_ref's dtype (elements outside the array neither read nor written)."""
    valid = _valid(x_ref, n_rows, width)
    y, _ = _normalized(pl_triton.load(x_ref, mask=valid, other=0).astype(_F32), width, eps)
    pl_triton.store(y_ref, y.astype(y_ref.dtype), mask=valid)


def _backward_kernel(x_ref, g_ref, *refs, n_rows, width, eps):
    """One block of rows: dx = r (g - y mean(g y)) in dx_ref's dtype, r and y recomputed from x; refs: (dx_ref,),
    or (d_ref, dx_ref) to add d (srms_norm_residual's pass-through cotangent) to dx in float32 before rounding."""
    *d_ref, dx_ref = refs
    valid = _valid(x_ref, n_rows, width)
    y, r = _normalized(pl_triton.load(x_ref, mask=valid, other=0).astype(_F32), width, eps)
    g = pl_triton.load(g_ref, mask=valid, other=0).astype(_F32)
    dx = r * (g - y * (jnp.sum(g * y, axis=1, keepdims=True) / width))
    if d_ref:
        dx = dx + pl_triton.load(d_ref[0], mask=valid, other=0).astype(_F32)
    pl_triton.store(dx_ref, dx.astype(dx_ref.dtype), mask=valid)


# ---------------------------------------------------------------------------------------------------------
# Launches over the [R, D] rows.


@dataclasses.dataclass(frozen=True)
class _Launch:
    """What the kernels take besides the arrays (hashable: the custom_vjp's static argument)."""

    eps: float
    config: Config
    interpret: bool


def _launch(kernel, block: int, launch: _Launch, *arrays):
    """pallas_call of kernel(*refs, out_ref) over the [R, D] arrays in blocks of `block` elements: the output
    [R, D] in the first array's dtype."""
    n, width = arrays[0].shape
    padded = pl.next_power_of_2(width)
    rows = kernel_support.block_rows(block, padded)
    spec = pl.BlockSpec((rows, padded), lambda i: (i, 0))  # past D: the padding columns, masked
    return pl.pallas_call(
        functools.partial(kernel, n_rows=n, width=width, eps=launch.eps),
        grid=(pl.cdiv(n, rows),),
        name="srms_norm" + kernel.__name__.removesuffix("_kernel"),  # for profiles
        in_specs=[spec] * len(arrays),
        out_specs=spec,
        out_shape=kernel_support.typed_like((n, width), arrays[0].dtype, arrays[0]),
        compiler_params=pl_triton.CompilerParams(
            num_warps=kernel_support.warps(rows * padded, launch.config.elems_per_warp),
            num_stages=launch.config.num_stages),
        interpret=launch.interpret,
    )(*arrays)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _fused(x, launch: _Launch):
    return _fused_fwd(x, launch)[0]


def _fused_fwd(x, launch: _Launch):
    if launch.config.xla_forward:
        return _xla(x, launch.eps), x
    width = x.shape[-1]
    y = _launch(_forward_kernel, launch.config.fwd_block, launch, x.reshape(-1, width))
    return y.reshape(x.shape), x


def _backward(launch: _Launch, x, *cotangents):
    """x's cotangent (a 1-tuple) from y's, g, and optionally the pass-through's, d, each shaped as x."""
    width = x.shape[-1]
    dx = _launch(_backward_kernel, launch.config.bwd_block, launch, x.reshape(-1, width),
                 *(c.reshape(-1, width) for c in cotangents))
    return (dx.reshape(x.shape),)


_fused.defvjp(_fused_fwd, _backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _fused_residual(x, launch: _Launch):
    return _fused_residual_fwd(x, launch)[0]


def _fused_residual_fwd(x, launch: _Launch):
    y, saved = _fused_fwd(x, launch)
    return (x, y), saved  # x itself, no copy


def _fused_residual_bwd(launch: _Launch, x, cotangents):
    d, g = cotangents
    return _backward(launch, x, g, d)


_fused_residual.defvjp(_fused_residual_fwd, _fused_residual_bwd)


def _xla(x, eps: float):
    """The model's former models.layers.srms_norm, operation for operation."""
    xf = x.astype(_F32)
    return (xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


# ---------------------------------------------------------------------------------------------------------
# Entry point.


def _check(x) -> None:
    if not hasattr(x, "shape") or not jnp.issubdtype(x.dtype, jnp.floating) or x.ndim < 1:
        raise ValueError(f"x must be a floating-point array [..., D] (at least 1 dim), got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")


def supported(x, interpret: bool = False) -> str | None:
    """None when the kernels can run x [..., D] here (compiled: a CUDA GPU of compute capability >= 8.0), else
    the reason."""
    if not math.prod(x.shape[:-1]) or not x.shape[-1]:
        return f"x {tuple(x.shape)} is empty (no rows or no columns)"
    if x.shape[-1] > MAX_WIDTH:
        return f"the width D = {x.shape[-1]} is over {MAX_WIDTH} (one program holds whole rows)"
    if jnp.dtype(x.dtype) not in {jnp.dtype(d) for d in DTYPES}:
        return (f"x is {jnp.dtype(x.dtype).name}; the kernels take "
                f"{', '.join(jnp.dtype(d).name for d in DTYPES)}")
    if interpret:
        return None
    return kernel_support.triton_unavailable()


def resolve(impl: str, x, *, per_device: bool = False) -> str:
    """What `impl` names for x here: "xla", "pallas_triton" or "pallas_triton_interpret" (ValueError if unknown
    or unusable). per_device: as if called inside a shard_map over the rows (a caller deciding whether to wrap
    the call in one); else under a mesh that XLA partitions the kernels are refused."""
    return kernel_support.resolve_rows(
        impl, IMPLS, QUALIFIED_GPUS, lambda interpret: supported(x, interpret=interpret), x, per_device=per_device)


def _kernel_launch(x, eps: float, impl: str, config: Config) -> _Launch | None:
    """The kernels' launch for x under `impl`, None where it resolves to "xla" (ValueError for bad x or impl)."""
    _check(x)
    impl = resolve(impl, x)
    return None if impl == "xla" else _Launch(float(eps), config, impl == "pallas_triton_interpret")


def srms_norm(x, *, eps: float, impl: str = "auto", config: Config = DEFAULT):
    """SRMSNorm (module docstring): x / sqrt(mean(x^2) + eps) over the last axis, no learned scale.

    Args:
      x: [..., D] any float dtype; D up to MAX_WIDTH for the kernels (any width for "xla").
      eps: added to the mean square.
      impl: "auto" (the kernels on QUALIFIED_GPUS, else "xla"), "xla", "pallas_triton" (compiled, CUDA GPUs of
        compute capability >= 8.0) or "pallas_triton_interpret" (Pallas interpret mode, any platform).
      config: the kernels' launch sizes.
    Returns:
      [..., D] in x's dtype (statistics in float32); x's gradient in x's dtype.
    """
    launch = _kernel_launch(x, eps, impl, config)
    return _xla(x, eps) if launch is None else _fused(x, launch)


def srms_norm_residual(x, *, eps: float, impl: str = "auto", config: Config = DEFAULT):
    """(x, srms_norm(x)) for a pre-norm residual block `x + mixer(srms_norm(x))`, whose x has two cotangents: the
    kernels' backward adds the pass-through's (module docstring, "Residual"). Arguments as srms_norm's.

    Returns:
      (x itself, unchanged and not copied; y [..., D] in x's dtype). x's gradient: both cotangents' sum, in x's
      dtype ("xla": autodiff's).
    """
    launch = _kernel_launch(x, eps, impl, config)
    return (x, _xla(x, eps)) if launch is None else _fused_residual(x, launch)
