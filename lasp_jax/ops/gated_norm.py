"""Mamba-2's gated RMS norm of the SSD output, as one fused Pallas kernel (Triton lowering) or plain XLA.

    y   = (o + D[h] x) * silu(z)                                  o, x [..., H, P]; z [..., H*P]; D [H]
    out = y / sqrt(mean_group(y^2) + eps) * weight                 per group of W = H*P / G channels; weight [H*P]

Why: in Mamba-2 1.3B's training step (T = 64K, bf16, H*P = 4096) XLA runs this tail as several fusions over
[65536, 4096] float32 intermediates, about 150 ms of a 1.89 s step on an H200 (forward, its remat recompute and
backward, 48 layers). The kernel reads the inputs once in their own dtype and writes only the output and a
per-row statistic (forward) or the input gradients (backward; with a projection, the output too), every
intermediate in registers.

Kernels (`impl="pallas_triton"`): the rows are the flattened leading dims; the forward has one program per (block of
rows, group), holding the rows' whole group width W (a power of two up to MAX_GROUP_WIDTH; the mean needs all of
it), and also writes r = rsqrt(mean(y^2) + eps) per row and group (float32 [R, G]), the one residual kept besides
the inputs. The backward recomputes y from the inputs but takes r, so it reduces each row once (mean(gy yn)), not
twice (at Mamba-2's shape, one row per step of its loop for all 16 warps: 2.219 -> 2.117 ms forward+backward on an
H200; the prefetch below took it to 1.710, so the loop waited on its loads more than on its reductions). r carries
the checkpoint name STATS_NAME: a remat policy that keeps it (models.lm's: every policy that keeps the matmuls) runs
no forward kernel in the backward; one that does not reruns the forward kernel for r. The backward has one program
per (run of row blocks, group) walking its row blocks in a loop; each program writes its partial column sums of
dweight and of dD's per-channel terms, which XLA sums over the programs (and dD over each head's P channels). Rows
past the end of the last block are masked on load and store. With Config.prefetch the loop is software-pipelined:
each step issues the next block's loads (o, x, z, g, r, carried in their dtypes) before computing its own block, so
they are in flight while it reduces, computes and stores (at Mamba-2's shape about one 16-warp program fits an SM,
and without it nothing is in flight between its loads); the last step's load addresses the last block again, wholly
masked. `gated_rms_norm_project` adds the projection that follows the norm (Mamba-2's out-projection) to the
custom_vjp: its weight gradient needs the norm's output, which the backward kernel then also writes, so that remat
does not run the forward kernel a second time to recompute it.

Gradients, with yn = y r, r = rsqrt(mean(y^2) + eps), g the output's cotangent:
    dweight = sum_rows g yn,   gy = g weight,   dy = r (gy - yn mean(gy yn)),
    do = dy silu(z),   dx = D do,   dD[h] = sum_(rows, p in h) do x,   dz = dy (o + D x) sig(z) (1 + z (1 - sig(z)))

Numerics: everything in float32 inside (the inputs upcast on load, the statistics, the gate); the output in
out_dtype, each input gradient in its input's dtype; dD and dweight are float32 sums (per program over its rows,
then over programs in XLA) cast to D's and weight's dtypes. The backward's r is the forward's, which it used to
recompute with the same math: interpreted on CPU the two agreed bit for bit at G = 1 and within 3 ulp at G = 2
(XLA:CPU compiles the two kernels' float32 math differently), the gradients' errors against xla unchanged.
`impl="xla"` is the model's former code, operation for operation (bit-identical to it; its gradients are XLA
autodiff's). The kernel and xla paths differ by float32 rounding in the forward (other reduction order) and by
the summation order of the gradients. With the projection w_proj (in out_dtype) the rounding is autodiff's of the
norm and a matmul in out_dtype: the output, the norm's cotangent g w_proj^T and w_proj's gradient (the backward
kernel's output)^T g are each rounded to out_dtype from the matmuls' float32 accumulation, and under shard_map
that gradient's sum over the shards is in out_dtype too.

Placement: the kernels run per device. Under a mesh that XLA partitions (`kernel_support.partitioned`), "auto" takes
"xla" and naming "pallas_triton" is an error: call it inside a shard_map over the rows (each shard's rows are
independent; D and weight are cast to vary with the rows, so their gradients come back as one sum over shards).

Platforms: compiled on CUDA GPUs of compute capability 8.0 or newer (A100, Hopper); "pallas_triton_interpret"
runs the same kernels in Pallas interpret mode anywhere (CPU tests). "auto" takes the kernels only on the device
kinds in QUALIFIED_GPUS, where their GPU tests passed (the H200), else "xla".
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from lasp_jax.ops import kernel_support

_F32 = jnp.float32
IMPLS = ("auto", "xla", "pallas_triton", "pallas_triton_interpret")
# Exact jax device kinds where tests/ops/test_gated_norm.py's GPU test passed and the kernels beat "xla"
# (benchmarks/gated_norm_gpu.py); "auto" takes "xla" elsewhere. On an H200 (2026-12-01, Mamba-2 1.3B's shape,
# benchmarks/results/gated_norm_gpu_h200_s19.md) the kernels took 0.638 / 1.710 ms forward / forward+backward
# against xla's 1.061 / 3.043 (0.647 / 2.368 in session 10, before the saved statistic and the prefetch), their
# largest error over the output and the gradients against fp32 1.7e-3 (xla's own); the GPU tests passed there
# with prefetch on and off (benchmarks/results/gpu_s19_log_excerpts.txt).
QUALIFIED_GPUS: tuple[str, ...] = ("NVIDIA H200",)
# The checkpoint name of the kernels' per-row statistic r [R, G] float32, the one residual they keep besides their
# inputs: a remat policy that saves it (models.lm's: every one that keeps the matmuls) spares the backward a
# forward kernel.
STATS_NAME = "gated_norm_stats"
MAX_GROUP_WIDTH = 8192  # one program holds a row's whole group: [rows, W] float32 tiles in registers
DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


@dataclasses.dataclass(frozen=True)
class Config:
    """Launch sizes. Swept on an H200 at Mamba-2 1.3B's shape (T 64K, 64 heads of 64, bf16;
    benchmarks/results/gated_norm_gpu_h200_s13.md): elems_per_warp 256 (16 warps in the backward, as in the
    forward) took 2.219 ms forward+backward against 2.400 at 512 and 3.826 at 1024; fwd_block 16384 2.706; the
    other sizes swept 2.384 to 2.533.

    fwd_block, bwd_block: elements per row block (rows: the largest power of two <= max(1, block // W)), the forward's
    and the backward's (more values live at once in the backward). elems_per_warp: num_warps = block elements /
    this, clamped to [4, 16], a power of two (by default 16 warps for both: 16 float32 values per thread per live
    tile in the forward, 8 in the backward). target_programs: the backward runs the most row blocks per program that
    still leave about this many programs (a power of two per program); its partial sums are [programs, H*P] float32
    each. num_stages: Triton's own software-pipelining depth (its loops: the backward's; 1, 2 and 3 timed alike).
    prefetch: the backward loads each row block's inputs one step ahead (module docstring): forward+backward 1.710
    against 2.169 ms without it (the backward ~1.07 against ~1.53 ms; benchmarks/results/gated_norm_gpu_h200_s19.md);
    its GPU test passed both ways. It holds two blocks' inputs in registers: at bwd_block 8192 (2 rows a step) it
    took 5.247 ms (measured with prefetch only at the default 4096; without it 8192 took 2.533, session 13)."""

    fwd_block: int = 8192
    bwd_block: int = 4096
    elems_per_warp: int = 256
    target_programs: int = 2048
    num_stages: int = 2
    prefetch: bool = True


DEFAULT = Config()


# ---------------------------------------------------------------------------------------------------------
# Kernels: refs hold [rows, W] blocks of the [R, H*P] inputs (one group), [W] slices of D's and weight's columns.


def _load(ref, start, n, valid):
    """Rows start .. start + n of a block ref in its own dtype, [n, W] ([n] for a [rows] ref), zeros where not
    valid ([n] bool)."""
    if len(ref.shape) == 1:
        return pl_triton.load(ref.at[pl.ds(start, n)], mask=valid, other=0)
    return pl_triton.load(ref.at[pl.ds(start, n), :], mask=valid[:, None], other=0)


def _rows(ref, start, n, valid):
    """_load's rows upcast to float32."""
    return _load(ref, start, n, valid).astype(_F32)


def _gated(o, x, z, d):
    """(a = o + d x, sig(z), silu(z), y = a silu(z)), all float32 [n, W]; d [W]."""
    a = o + d[None, :] * x
    sig = jax.nn.sigmoid(z)
    gate = z * sig
    return a, sig, gate, a * gate


def _forward_kernel(o_ref, x_ref, z_ref, d_ref, w_ref, out_ref, r_ref, *, n_rows, eps):
    """One block of rows: out = y r weight in out_ref's dtype and r = rsqrt(mean(y^2) + eps) per row (r_ref,
    float32 [rows]); rows past n_rows neither read nor written."""
    block = o_ref.shape[0]
    row = pl.program_id(0) * block + jnp.arange(block)
    valid = row < n_rows
    d, w = d_ref[...].astype(_F32), w_ref[...].astype(_F32)
    *_, y = _gated(_rows(o_ref, 0, block, valid), _rows(x_ref, 0, block, valid), _rows(z_ref, 0, block, valid), d)
    r = lax.rsqrt(jnp.mean(y * y, axis=1, keepdims=True) + eps)
    pl_triton.store(out_ref, (y * r * w[None, :]).astype(out_ref.dtype), mask=valid[:, None])
    pl_triton.store(r_ref, r[:, 0], mask=valid)


def _backward_kernel(o_ref, x_ref, z_ref, d_ref, w_ref, r_ref, g_ref, do_ref, dx_ref, dz_ref, dd_ref, dw_ref,
                     *out_refs, n_rows, rows, prefetch):
    """One run of row blocks of `rows` rows, with r per row from the forward (r_ref [run]): the input gradients,
    and the run's column sums of do x (dd_ref) and g yn (dw_ref), float32 [W]; with an out_refs entry, also the
    forward's output yn weight (recomputed here, for a projection's weight gradient). Masked rows load as zeros
    (r too), so they add nothing to the sums. prefetch: each step loads the next block's inputs (carried in their
    dtypes) before computing its own; the last step's load is clamped to the last block and wholly masked."""
    first = pl.program_id(0) * o_ref.shape[0]
    blocks = o_ref.shape[0] // rows
    d, w = d_ref[...].astype(_F32), w_ref[...].astype(_F32)
    in_refs = (o_ref, x_ref, z_ref, g_ref, r_ref)

    def valid(i):
        return first + i * rows + jnp.arange(rows) < n_rows

    def load(i, live=True):
        mask = valid(i) & live
        return tuple(_load(ref, i * rows, rows, mask) for ref in in_refs)

    def step(i, sums, loaded):
        o, x, z, g, r = (a.astype(_F32) for a in loaded)
        r = r[:, None]
        a, sig, gate, y = _gated(o, x, z, d)
        yn = y * r
        gy = g * w[None, :]
        dy = r * (gy - yn * jnp.mean(gy * yn, axis=1, keepdims=True))
        do = dy * gate
        dz = dy * a * sig * (1.0 + z * (1.0 - sig))
        stores = ((do_ref, do), (dx_ref, do * d[None, :]), (dz_ref, dz)) + tuple(
            (ref, yn * w[None, :]) for ref in out_refs)
        for ref, value in stores:
            pl_triton.store(ref.at[pl.ds(i * rows, rows), :], value.astype(ref.dtype), mask=valid(i)[:, None])
        dd_sum, dw_sum = sums
        return dd_sum + jnp.sum(do * x, axis=0), dw_sum + jnp.sum(g * yn, axis=0)

    def pipelined(i, carry):
        *sums, loaded = carry
        following = load(jnp.minimum(i + 1, blocks - 1), i + 1 < blocks)  # in flight while block i computes
        return (*step(i, sums, loaded), following)

    zeros = jnp.zeros((o_ref.shape[1],), _F32)
    if prefetch:
        dd_ref[...], dw_ref[...], _ = lax.fori_loop(0, blocks, pipelined, (zeros, zeros, load(0)))
    else:
        dd_ref[...], dw_ref[...] = lax.fori_loop(0, blocks, lambda i, sums: step(i, sums, load(i)), (zeros, zeros))


# ---------------------------------------------------------------------------------------------------------
# Launches: the inputs as [R, H*P] rows; D as its [H*P] column (D[h] repeated P times).


@dataclasses.dataclass(frozen=True)
class _Launch:
    """What the kernels take besides the arrays (hashable: the custom_vjp's static argument)."""

    groups: int
    eps: float
    out_dtype: jnp.dtype
    config: Config
    interpret: bool


def _columns(d_skip, head_dim: int):
    return jnp.repeat(d_skip.astype(_F32), head_dim)


def _kernel_forward(o2, x2, z2, d_col, weight, launch: _Launch):
    """o2, x2, z2 [R, H*P], d_col, weight [H*P] -> (the output [R, H*P] launch.out_dtype, r [R, G] float32)."""
    n, channels = o2.shape
    width = channels // launch.groups
    rows = kernel_support.block_rows(launch.config.fwd_block, width)
    tile = pl.BlockSpec((rows, width), lambda i, g: (i, g))
    column = pl.BlockSpec((width,), lambda i, g: (g,))
    stats = pl.BlockSpec((rows, None), lambda i, g: (i, g))
    return pl.pallas_call(
        functools.partial(_forward_kernel, n_rows=n, eps=launch.eps),
        grid=(pl.cdiv(n, rows), launch.groups),
        name="gated_norm_forward",  # for profiles, and remat tests that count it
        in_specs=[tile, tile, tile, column, column],
        out_specs=[tile, stats],
        out_shape=[kernel_support.typed_like((n, channels), launch.out_dtype, o2),
                   kernel_support.typed_like((n, launch.groups), _F32, o2)],
        compiler_params=pl_triton.CompilerParams(
            num_warps=kernel_support.warps(rows * width, launch.config.elems_per_warp),
            num_stages=launch.config.num_stages),
        interpret=launch.interpret,
    )(o2, x2, z2, d_col, weight.astype(_F32))


def _run_blocks(n: int, rows: int, groups: int, target: int) -> int:
    """Row blocks per backward program: the largest power of two leaving >= target programs (at least 1)."""
    blocks = 1
    while pl.cdiv(n, rows * blocks * 2) * groups >= target:
        blocks *= 2
    return blocks


def _kernel_backward(o2, x2, z2, d_col, weight, r, g2, launch: _Launch, with_out: bool = False):
    """The input gradients [R, H*P] (o2's, x2's, z2's dtypes) and the float32 column sums of do x and g yn [H*P],
    given the forward's r [R, G]; with_out: then also the forward's output [R, H*P] launch.out_dtype."""
    n, channels = o2.shape
    width = channels // launch.groups
    rows = kernel_support.block_rows(launch.config.bwd_block, width)
    run = rows * _run_blocks(n, rows, launch.groups, launch.config.target_programs)
    programs = pl.cdiv(n, run)
    tile = pl.BlockSpec((run, width), lambda i, g: (i, g))
    column = pl.BlockSpec((width,), lambda i, g: (g,))
    partial = pl.BlockSpec((None, width), lambda i, g: (i, g))
    stats = pl.BlockSpec((run, None), lambda i, g: (i, g))
    out = [kernel_support.typed_like((n, channels), launch.out_dtype, o2)] if with_out else []
    do, dx, dz, dd, dw, *y = pl.pallas_call(
        functools.partial(_backward_kernel, n_rows=n, rows=rows, prefetch=launch.config.prefetch),
        grid=(programs, launch.groups),
        name="gated_norm_backward",
        in_specs=[tile, tile, tile, column, column, stats, tile],
        out_specs=[tile, tile, tile, partial, partial] + [tile] * len(out),
        out_shape=[kernel_support.typed_like((n, channels), a.dtype, o2) for a in (o2, x2, z2)]
        + [kernel_support.typed_like((programs, channels), _F32, o2)] * 2 + out,
        compiler_params=pl_triton.CompilerParams(
            num_warps=kernel_support.warps(rows * width, launch.config.elems_per_warp),
            num_stages=launch.config.num_stages),
        interpret=launch.interpret,
    )(o2, x2, z2, d_col, weight.astype(_F32), r, g2)
    return do, dx, dz, jnp.sum(dd, axis=0), jnp.sum(dw, axis=0), *y


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _fused(o, x, d_skip, z, weight, launch: _Launch):
    return _fused_fwd(o, x, d_skip, z, weight, launch)[0]


def _fused_fwd(o, x, d_skip, z, weight, launch: _Launch):
    channels = z.shape[-1]
    out, r = _kernel_forward(o.reshape(-1, channels), x.reshape(-1, channels), z.reshape(-1, channels),
                             _columns(d_skip, o.shape[-1]), weight, launch)
    # Named so that a remat policy can keep r: else remat runs the forward kernel again for it (see STATS_NAME).
    return out.reshape(z.shape), (o, x, d_skip, z, weight, checkpoint_name(r, STATS_NAME))


def _norm_grads(launch: _Launch, saved, g, with_out: bool = False):
    """The norm's input gradients (as _fused's arguments) for the cotangent g [..., H*P] of its output; with_out:
    and the output [R, H*P] recomputed by the backward kernel."""
    o, x, d_skip, z, weight, r = saved
    heads, head_dim = o.shape[-2:]
    channels = z.shape[-1]
    do, dx, dz, dd, dw, *y = _kernel_backward(o.reshape(-1, channels), x.reshape(-1, channels),
                                              z.reshape(-1, channels), _columns(d_skip, head_dim), weight, r,
                                              g.reshape(-1, channels), launch, with_out)
    dd = jnp.sum(dd.reshape(heads, head_dim), axis=1)
    grads = (do.reshape(o.shape), dx.reshape(x.shape), dd.astype(d_skip.dtype), dz.reshape(z.shape),
             dw.astype(weight.dtype))
    return (grads, *y) if with_out else grads


_fused.defvjp(_fused_fwd, functools.partial(_norm_grads, with_out=False))


# The norm and a projection of its output as one custom_vjp: autodiff of the two would keep the norm's output for
# the projection's weight gradient, which under remat is the forward kernel run again; here the backward kernel,
# which recomputes that output in registers anyway, writes it (one store more) and no forward runs twice (where
# the policy keeps r, STATS_NAME).
@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _fused_project(o, x, d_skip, z, weight, w_proj, launch: _Launch):
    return _fused_project_fwd(o, x, d_skip, z, weight, w_proj, launch)[0]


def _fused_project_fwd(o, x, d_skip, z, weight, w_proj, launch: _Launch):
    y, saved = _fused_fwd(o, x, d_skip, z, weight, launch)
    return jnp.dot(y, w_proj), (saved, w_proj)


def _fused_project_bwd(launch: _Launch, residuals, g):
    saved, w_proj = residuals
    g2 = g.reshape(-1, g.shape[-1])
    grads, y = _norm_grads(launch, saved, jnp.dot(g2, w_proj.T), with_out=True)
    return (*grads, jnp.dot(y.T, g2).astype(w_proj.dtype))


_fused_project.defvjp(_fused_project_fwd, _fused_project_bwd)


def _xla(o, x, d_skip, z, weight, groups: int, eps: float, out_dtype):
    """The model's former `_out` up to the out-projection, operation for operation."""
    y = o.astype(_F32) + d_skip.astype(_F32)[:, None] * x.astype(_F32)
    y = y.reshape(*y.shape[:-2], -1) * jax.nn.silu(z.astype(_F32))
    grouped = y.reshape(*y.shape[:-1], groups, -1)
    grouped = grouped * lax.rsqrt(jnp.mean(grouped * grouped, axis=-1, keepdims=True) + eps)
    y = grouped.reshape(y.shape) * weight.astype(_F32)
    return y.astype(out_dtype)


# ---------------------------------------------------------------------------------------------------------
# Entry point.


def _check(o, x, d_skip, z, weight, groups) -> None:
    for name, a in (("o", o), ("x", x), ("d_skip", d_skip), ("z", z), ("weight", weight)):
        if not hasattr(a, "shape") or not jnp.issubdtype(a.dtype, jnp.floating):
            raise ValueError(f"{name} must be a floating-point array, got {getattr(a, 'dtype', type(a).__name__)}")
    if o.ndim < 2:
        raise ValueError(f"o must be [..., H, P] (at least 2 dims); got shape {tuple(o.shape)}")
    if x.shape != o.shape:
        raise ValueError(f"x must have o's shape {tuple(o.shape)} [..., H, P]; got {tuple(x.shape)}")
    *lead, heads, head_dim = o.shape
    channels = heads * head_dim
    if tuple(z.shape) != (*lead, channels):
        raise ValueError(f"z must be [..., H*P] = {(*lead, channels)} for o of shape {tuple(o.shape)}; got "
                         f"{tuple(z.shape)}")
    if tuple(d_skip.shape) != (heads,):
        raise ValueError(f"d_skip must be [H] = ({heads},); got {tuple(d_skip.shape)}")
    if tuple(weight.shape) != (channels,):
        raise ValueError(f"weight must be [H*P] = ({channels},); got {tuple(weight.shape)}")
    if not isinstance(groups, int) or groups < 1 or channels % groups:
        raise ValueError(f"groups must be a positive int dividing H*P = {channels}; got {groups!r}")


def supported(o, x, z, groups: int, interpret: bool = False) -> str | None:
    """None when the kernels can run these inputs here (compiled: a CUDA GPU of compute capability >= 8.0),
    else the reason. Shapes as `gated_rms_norm` checks them."""
    if not math.prod(z.shape[:-1]):
        return "there are no rows (an empty leading dim)"
    width = z.shape[-1] // groups
    if width > MAX_GROUP_WIDTH or width & (width - 1):
        return (f"the group width H*P / groups = {width} is not a power of two up to {MAX_GROUP_WIDTH} (one "
                "program holds a row's whole group)")
    names = {jnp.dtype(d) for d in DTYPES}
    for name, a in (("o", o), ("x", x), ("z", z)):
        if jnp.dtype(a.dtype) not in names:
            return f"{name} is {jnp.dtype(a.dtype).name}; the kernels take {', '.join(jnp.dtype(d).name for d in DTYPES)}"
    if interpret:
        return None
    return kernel_support.triton_unavailable()


def resolve(impl: str, o, x, z, groups: int, *, per_device: bool = False) -> str:
    """What `impl` names for these inputs here: "xla", "pallas_triton" or "pallas_triton_interpret" (ValueError
    if unknown or unusable). per_device: as if called inside a shard_map over the rows (a caller deciding
    whether to wrap the call in one); else under a mesh that XLA partitions the kernels are refused."""
    return kernel_support.resolve_rows(
        impl, IMPLS, QUALIFIED_GPUS, lambda interpret: supported(o, x, z, groups, interpret=interpret), o,
        per_device=per_device)


def gated_rms_norm(o, x, d_skip, z, weight, *, groups: int, eps: float, out_dtype, impl: str = "auto",
                   config: Config = DEFAULT):
    """Mamba-2's gated RMS norm (module docstring): RMSNorm_G((o + D x) * silu(z)) * weight.

    Args:
      o, x: [..., H, P] the SSD output and its input (any float dtype; the compute dtype in the model).
      d_skip: [H] the skip weight D.   z: [..., H*P] the gate.   weight: [H*P] the norm's weight.
      groups: G, the norm's groups (each of H*P / G channels).   eps: added to the mean square.
      out_dtype: the output's dtype.
      impl: "auto" (the kernels on QUALIFIED_GPUS, else "xla"), "xla", "pallas_triton" (compiled, CUDA GPUs of
        compute capability >= 8.0) or "pallas_triton_interpret" (Pallas interpret mode, any platform).
      config: the kernels' launch sizes.
    Returns:
      [..., H*P] out_dtype. Gradients flow to every input (each in its dtype).
    """
    _check(o, x, d_skip, z, weight, groups)
    out_dtype = jnp.dtype(out_dtype)
    impl = resolve(impl, o, x, z, groups)
    if impl == "xla":
        return _xla(o, x, d_skip, z, weight, groups, eps, out_dtype)
    return _kernels(o, x, d_skip, z, weight, _Launch(groups, float(eps), out_dtype, config,
                                                     impl == "pallas_triton_interpret"))


def gated_rms_norm_project(o, x, d_skip, z, weight, w_proj, *, groups: int, eps: float, out_dtype,
                           impl: str = "auto", config: Config = DEFAULT):
    """`gated_rms_norm(...) @ w_proj` (Mamba-2's norm and out-projection): w_proj [H*P, D_out], cast to out_dtype;
    returns [..., D_out] out_dtype, gradients to every input. With the kernels the backward kernel recomputes the
    norm's output for w_proj's gradient (`_fused_project`), so the backward keeps only the inputs and r, and
    under a remat policy keeping STATS_NAME no forward kernel reruns; the output it recomputes is the forward's
    up to float32 rounding (with the same r). Other arguments as `gated_rms_norm`."""
    _check(o, x, d_skip, z, weight, groups)
    channels = z.shape[-1]
    if (not hasattr(w_proj, "shape") or not jnp.issubdtype(w_proj.dtype, jnp.floating) or w_proj.ndim != 2
            or w_proj.shape[0] != channels):
        raise ValueError(f"w_proj must be a floating-point [H*P, D_out] = [{channels}, D_out] array, got "
                         f"{getattr(w_proj, 'dtype', type(w_proj).__name__)} {tuple(getattr(w_proj, 'shape', ()))}")
    out_dtype = jnp.dtype(out_dtype)
    impl = resolve(impl, o, x, z, groups)
    w_proj = w_proj.astype(out_dtype)
    if impl == "xla":
        return jnp.dot(_xla(o, x, d_skip, z, weight, groups, eps, out_dtype), w_proj)
    return _kernels(o, x, d_skip, z, weight, _Launch(groups, float(eps), out_dtype, config,
                                                     impl == "pallas_triton_interpret"), w_proj)


def _kernels(o, x, d_skip, z, weight, launch: _Launch, w_proj=None):
    """The kernels' custom_vjp (with w_proj: `_fused_project`'s), D, weight and w_proj cast to vary as the rows
    do inside shard_map (kernel_support)."""
    d_skip, weight = kernel_support.vary_like(d_skip, o), kernel_support.vary_like(weight, o)
    if w_proj is None:
        return _fused(o, x, d_skip, z, weight, launch)
    return _fused_project(o, x, d_skip, z, weight, kernel_support.vary_like(w_proj, o), launch)
