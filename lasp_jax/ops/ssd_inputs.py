"""Mamba-2's SSD inputs from the convolution's output: SiLU, the split into x, B, C, v = dt x and the rates, as
plain XLA or with its backward as one fused Pallas kernel (Triton lowering).

    s = silu(xbc)                                   xbc [..., C], C = H*P + 2 G*N, in the compute dtype
    x = s[:H*P] -> [..., H, P];   k = s[H*P : H*P+GN] -> [..., G, N];   q = s[H*P+GN :] -> [..., G, N]
    dt = softplus(dt_raw + dt_bias);  rates = dt exp(A_log)                 [..., H] float32
    v = x bf16(dt)                                  (dt rounded to the compute dtype, the product too)

Why: in Mamba-2 1.3B's training step on an H200 (T = 64K, bf16, C = 4352, H = 64, P = 64) XLA's autodiff of
this runs as two fusions per layer, d_xbc (0.9 ms) and dt's cotangent, a sum over P (0.42 ms): 44.2 + 20.1 ms of a
1.48 s step over 48 layers (benchmarks/results/profile_train_h200_s17_mamba2_conv.md). One pass reads xbc and the
cotangents of x, v, k, q once and writes d_xbc and dt's share from v: about 2.3 GB, 0.57 ms at 4 TB/s. The
forward (0.43 ms per call, already at HBM bandwidth) stays XLA's.

Gradients, with g_x, g_v [..., H, P], g_k, g_q [..., G, N], g_r [..., H] the outputs' cotangents, y = xbc:
    d_xbc = silu'(y) [g_x + g_v dt_b | g_k | g_q],   silu'(y) = sig(y) (1 + y (1 - sig(y)))
    d_dt  = sum_p g_v x_b  +  g_r exp(A_log)          (x_b = bf16(silu(y)), dt_b = bf16(dt): what v was made of)
    d_pre = d_dt sig(dt_raw + dt_bias);   d_dt_raw = d_pre;   d_dt_bias = sum_rows d_pre;   d_A_log = sum_rows g_r rates

Kernel (`impl="pallas_triton"`): a custom_vjp whose forward is the XLA code below (its outputs bit-identical to
"xla"'s) and whose residuals are the inputs alone (xbc, dt_raw, dt_bias, A_log: under remat that is what a
policy keeps); the backward recomputes dt [R, H] in XLA, runs one kernel over the rows (the flattened leading
dims) that writes d_xbc [R, C] and d_dt_v = sum_p g_v x_b [R, H] float32, then does the [R, H] chain above in
XLA. The kernel's grid is (column blocks, row blocks of Config.rows), the column blocks fastest (neighbouring
programs read neighbouring columns of the same rows): first the x part's, each of `heads` whole heads taken one
head at a time as a [rows, P] tile (its d_dt_v row sums stay in the program), then the B and C parts' blocks of
bc_width columns, reading g_k and g_q. Rows past R, a head's columns past P and B's or C's columns past G*N are
masked on load and store (P, G*N and R need not be powers of two; Triton's tiles are).

Numerics: inside the kernel everything in float32 (inputs upcast on load). silu'(y) is evaluated at the same
rounded y the forward's SiLU read. The x part's cotangent g_x + g_v dt_b is formed in float32 and rounded once
(autodiff rounds g_v dt_b to bf16, then adds in bf16: this is more accurate); dt_b is dt rounded to the compute
dtype as the forward's v used it. d_dt_v is the derivative of the forward's v = x_b dt_b in dt_b, so its product
uses x_b: float32 silu(y) rounded to the compute dtype (`kernel_support.rounded_to`), the forward's bf16 x up to
XLA's own SiLU rounding (it may round sig(y) before the product: then 1 ulp apart); the sum over P is float32
(autodiff's is a bf16 cotangent). The [R, H] chain is float32; d_dt_raw is cast to dt_raw's dtype, the parameters'
sums to theirs. `impl="xla"` is the model's former code, op for op (its gradients are XLA autodiff's).

Placement: the kernel runs per device. Under a mesh that XLA partitions (`kernel_support.partitioned`) "auto" takes
"xla" and naming a kernel is an error: call it inside a shard_map over the rows (the model does:
models.sharding.per_device); dt_bias and A_log are cast to vary with the rows, so their gradients come back as one
sum over the shards.

Platforms: compiled on CUDA GPUs of compute capability 8.0 or newer (A100, Hopper); "pallas_triton_interpret"
runs the same kernel in Pallas interpret mode anywhere (CPU tests). "auto" takes the kernel only on the device
kinds in QUALIFIED_GPUS, where its GPU test passed and it beat "xla", else "xla".
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from lasp_jax.ops import kernel_support

_F32 = jnp.float32
IMPLS = ("auto", "xla", "pallas_triton", "pallas_triton_interpret")
# Exact jax device kinds where tests/ops/test_ssd_inputs.py's GPU test passed and the kernel beat "xla"
# (benchmarks/ssd_inputs_gpu.py); "auto" takes "xla" elsewhere. On an H200 (2026-11-30, Mamba-2 1.3B's shape,
# benchmarks/results/ssd_inputs_gpu_h200_s18.md) the backward took 0.726 ms against xla's 1.139 (forward+backward
# 1.160 against 1.581; the floor at copy bandwidth 0.573 / 1.001), its largest error against float32 3.6e-3
# (xla's 4.3e-3); the GPU test passed there.
QUALIFIED_GPUS: tuple[str, ...] = ("NVIDIA H200",)
DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


@dataclasses.dataclass(frozen=True)
class Config:
    """The backward kernel's launch sizes: the defaults give the 1.3B's shape 34 x 1024 programs, 8 warps holding
    16 float32 values per thread per live [64, 64] tile. Swept on an H200 (benchmarks/results/
    ssd_inputs_gpu_h200_s18.md, backward alone): 0.726 ms; the six others 0.716 (32:2:128:4) to 0.854 (128 rows,
    2 heads, 8 warps), so the defaults stay.

    rows: rows per program (a power of two). heads: heads per program of the x part (the largest divisor of H
    up to this; each a [rows, P] tile, P padded to a power of two). bc_width: columns per program of the B and
    C parts (a power of two). num_warps: per program (a power of two)."""

    rows: int = 64
    heads: int = 2
    bc_width: int = 128
    num_warps: int = 8

    def __post_init__(self):
        for name in ("rows", "bc_width", "num_warps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1 or value & (value - 1):
                raise ValueError(f"Config.{name} must be a positive power of two (a Triton tile); got {value!r}")
        if not isinstance(self.heads, int) or self.heads < 1:
            raise ValueError(f"Config.heads must be a positive int; got {self.heads!r}")


DEFAULT = Config()


@dataclasses.dataclass(frozen=True)
class _Dims:
    """The split of C and the launch (hashable: the custom_vjp's static argument)."""

    heads: int
    head_dim: int
    groups: int
    d_state: int
    config: Config
    interpret: bool


def _heads_per_program(heads: int, most: int) -> int:
    return max(d for d in range(1, min(heads, most) + 1) if heads % d == 0)


# ---------------------------------------------------------------------------------------------------------
# Kernel: whole-array refs of the [R, *] operands, loaded and stored as masked [rows, width] slices.


def _silu_parts(y):
    """(silu(y), silu'(y)) float32."""
    sig = jax.nn.sigmoid(y)
    return y * sig, sig * (1.0 + y * (1.0 - sig))


def _backward_kernel(xbc_ref, gx_ref, gv_ref, gk_ref, gq_ref, dt_ref, dxbc_ref, ddt_ref, *, dims: _Dims,
                     x_programs: int, bc_programs: int):
    """Program (j, i): rows i*rows ..; column block j: of the x part (j < x_programs: heads j*heads_per ..), else
    of B (reading gk_ref) or C (gq_ref), bc_width columns each."""
    cfg = dims.config
    n_rows = xbc_ref.shape[0]
    j, r0 = pl.program_id(0), pl.program_id(1) * cfg.rows
    row_ok = r0 + jnp.arange(cfg.rows) < n_rows
    rows = pl.ds(r0, cfg.rows)

    def load(ref, c0, width, mask):
        return pl_triton.load(ref.at[rows, pl.ds(c0, width)], mask=mask, other=0).astype(_F32)

    @pl.when(j < x_programs)
    def _x_part():
        width = pl.next_power_of_2(dims.head_dim)
        mask = row_ok[:, None] & (jnp.arange(width) < dims.head_dim)[None, :]
        per = _heads_per_program(dims.heads, cfg.heads)
        for hh in range(per):
            h = j * per + hh
            c0 = h * dims.head_dim
            y, gv = load(xbc_ref, c0, width, mask), load(gv_ref, c0, width, mask)
            dt = pl_triton.load(dt_ref.at[rows, h], mask=row_ok, other=0).astype(_F32)
            s, ds = _silu_parts(y)
            g = load(gx_ref, c0, width, mask) + gv * dt[:, None]
            pl_triton.store(dxbc_ref.at[rows, pl.ds(c0, width)], (ds * g).astype(dxbc_ref.dtype), mask=mask)
            x_b = kernel_support.rounded_to(s, xbc_ref.dtype)
            pl_triton.store(ddt_ref.at[rows, h], jnp.sum(gv * x_b, axis=1), mask=row_ok)

    inner, gn, width = dims.heads * dims.head_dim, dims.groups * dims.d_state, cfg.bc_width
    for part, g_ref in enumerate((gk_ref, gq_ref)):
        first = x_programs + part * bc_programs

        @pl.when((j >= first) & (j < first + bc_programs))
        def _bc_part():
            c0 = (j - first) * width
            mask = row_ok[:, None] & (c0 + jnp.arange(width) < gn)[None, :]
            col = inner + part * gn + c0
            _, ds = _silu_parts(load(xbc_ref, col, width, mask))
            pl_triton.store(dxbc_ref.at[rows, pl.ds(col, width)],
                            (ds * load(g_ref, c0, width, mask)).astype(dxbc_ref.dtype), mask=mask)


def _kernel_backward(xbc2, gx2, gv2, gk2, gq2, dt2, dims: _Dims):
    """xbc2 [R, C], gx2, gv2 [R, H*P], gk2, gq2 [R, G*N], dt2 [R, H] (the compute dtype's dt) -> d_xbc [R, C]
    xbc2's dtype, d_dt_v [R, H] float32."""
    n, channels = xbc2.shape
    cfg = dims.config
    x_programs = dims.heads // _heads_per_program(dims.heads, cfg.heads)
    bc_programs = pl.cdiv(dims.groups * dims.d_state, cfg.bc_width)
    return pl.pallas_call(
        functools.partial(_backward_kernel, dims=dims, x_programs=x_programs, bc_programs=bc_programs),
        grid=(x_programs + 2 * bc_programs, pl.cdiv(n, cfg.rows)),
        out_shape=[kernel_support.typed_like((n, channels), xbc2.dtype, xbc2),
                   kernel_support.typed_like((n, dims.heads), _F32, xbc2)],
        compiler_params=pl_triton.CompilerParams(num_warps=cfg.num_warps, num_stages=1),
        interpret=dims.interpret,
    )(xbc2, gx2, gv2, gk2, gq2, dt2)


# ---------------------------------------------------------------------------------------------------------
# The XLA code (the model's former `_ssd_inputs`) and the custom_vjp around it.


def _xla(xbc, dt_raw, dt_bias, a_log, heads: int, head_dim: int, groups: int, d_state: int):
    """The model's former `Mamba2Mixer._ssd_inputs`, operation for operation."""
    inner, gn = heads * head_dim, groups * d_state
    xbc = jax.nn.silu(xbc)
    x = xbc[..., :inner].reshape(*xbc.shape[:-1], heads, head_dim)
    k = xbc[..., inner:inner + gn].reshape(*xbc.shape[:-1], groups, d_state)
    q = xbc[..., inner + gn:].reshape(*xbc.shape[:-1], groups, d_state)
    dt = jax.nn.softplus(dt_raw.astype(_F32) + dt_bias.astype(_F32))
    rates = dt * jnp.exp(a_log.astype(_F32))
    v = x * dt[..., None].astype(x.dtype)
    return q, k, v, x, rates


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused(xbc, dt_raw, dt_bias, a_log, dims: _Dims):
    return _xla(xbc, dt_raw, dt_bias, a_log, dims.heads, dims.head_dim, dims.groups, dims.d_state)


def _fused_fwd(xbc, dt_raw, dt_bias, a_log, dims: _Dims):
    return _fused(xbc, dt_raw, dt_bias, a_log, dims), (xbc, dt_raw, dt_bias, a_log)


def _fused_bwd(dims: _Dims, residuals, cotangents):
    xbc, dt_raw, dt_bias, a_log = residuals
    gq, gk, gv, gx, g_rates = cotangents
    pre = dt_raw.astype(_F32) + dt_bias.astype(_F32)
    dt = jax.nn.softplus(pre)
    decay = jnp.exp(a_log.astype(_F32))
    rows = lambda a: a.reshape(-1, math.prod(a.shape[xbc.ndim - 1:]))  # noqa: E731  [..., *] -> [R, *]
    d_xbc, d_dt_v = _kernel_backward(rows(xbc), rows(gx), rows(gv), rows(gk), rows(gq),
                                     rows(dt.astype(xbc.dtype)), dims)
    g_rates = g_rates.astype(_F32)
    d_pre = (d_dt_v.reshape(dt.shape) + g_rates * decay) * jax.nn.sigmoid(pre)
    lead = tuple(range(dt.ndim - 1))
    return (d_xbc.reshape(xbc.shape), d_pre.astype(dt_raw.dtype), jnp.sum(d_pre, axis=lead).astype(dt_bias.dtype),
            jnp.sum(g_rates * dt * decay, axis=lead).astype(a_log.dtype))


_fused.defvjp(_fused_fwd, _fused_bwd)


# ---------------------------------------------------------------------------------------------------------
# Entry point.


def _check(xbc, dt_raw, dt_bias, a_log, heads, head_dim, groups, d_state) -> None:
    for name, value in (("heads", heads), ("head_dim", head_dim), ("groups", groups), ("d_state", d_state)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int; got {value!r}")
    for name, a in (("xbc", xbc), ("dt_raw", dt_raw), ("dt_bias", dt_bias), ("a_log", a_log)):
        if not hasattr(a, "shape") or not jnp.issubdtype(a.dtype, jnp.floating):
            raise ValueError(f"{name} must be a floating-point array, got {getattr(a, 'dtype', type(a).__name__)}")
    channels = heads * head_dim + 2 * groups * d_state
    if xbc.ndim < 1 or xbc.shape[-1] != channels:
        raise ValueError(f"xbc must be [..., H*P + 2*G*N] = [..., {channels}] (H={heads}, P={head_dim}, G={groups}, "
                         f"N={d_state}); got shape {tuple(xbc.shape)}")
    if tuple(dt_raw.shape) != (*xbc.shape[:-1], heads):
        raise ValueError(f"dt_raw must be [..., H] = {(*xbc.shape[:-1], heads)} for xbc of shape "
                         f"{tuple(xbc.shape)}; got {tuple(dt_raw.shape)}")
    for name, a in (("dt_bias", dt_bias), ("a_log", a_log)):
        if tuple(a.shape) != (heads,):
            raise ValueError(f"{name} must be [H] = ({heads},); got {tuple(a.shape)}")


def supported(xbc, interpret: bool = False) -> str | None:
    """None when the kernel can run xbc [..., C] here (compiled: a CUDA GPU of compute capability >= 8.0), else
    the reason. Shapes as `ssd_inputs` checks them."""
    if not math.prod(xbc.shape[:-1]):
        return "there are no rows (an empty leading dim)"
    if xbc.size >= 2**31:
        return (f"xbc has {xbc.size} >= 2^31 elements, past what the kernel was run at on a GPU (int32 element "
                f"offsets): split the rows")
    if jnp.dtype(xbc.dtype) not in {jnp.dtype(d) for d in DTYPES}:
        return (f"xbc is {jnp.dtype(xbc.dtype).name}; the kernel takes "
                f"{', '.join(jnp.dtype(d).name for d in DTYPES)}")
    if interpret:
        return None
    return kernel_support.triton_unavailable()


def resolve(impl: str, xbc, *, per_device: bool = False) -> str:
    """What `impl` names for xbc here: "xla", "pallas_triton" or "pallas_triton_interpret" (ValueError if
    unknown or unusable). per_device: as if called inside a shard_map over the rows (a caller deciding whether
    to wrap the call in one); else under a mesh that XLA partitions the kernel is refused."""
    return kernel_support.resolve_rows(
        impl, IMPLS, QUALIFIED_GPUS, lambda interpret: supported(xbc, interpret=interpret), xbc,
        per_device=per_device)


def ssd_inputs(xbc, dt_raw, dt_bias, a_log, *, heads: int, head_dim: int, groups: int, d_state: int,
               impl: str = "auto", config: Config = DEFAULT):
    """Mamba-2's SSD inputs (module docstring): SiLU of the convolution's output, split into x, B, C; dt, v = dt x
    and the rates.

    Args:
      xbc: [..., C] the convolution's output, C = heads*head_dim + 2*groups*d_state (the compute dtype).
      dt_raw: [..., H] dt before the softplus.   dt_bias, a_log: [H] the parameters (any float dtype).
      heads, head_dim, groups, d_state: H, P, G, N.
      impl: "auto" (the kernel on QUALIFIED_GPUS, else "xla"), "xla", "pallas_triton" (compiled, CUDA GPUs of
        compute capability >= 8.0) or "pallas_triton_interpret" (Pallas interpret mode, any platform). The
        forward is XLA's in every case; the kernel is the backward's.
      config: the backward kernel's launch sizes.
    Returns:
      q = C, k = B [..., G, N] and v = dt x, x [..., H, P] in xbc's dtype; rates = dt exp(A_log) [..., H] float32.
      Gradients flow to every input (each in its dtype).
    """
    _check(xbc, dt_raw, dt_bias, a_log, heads, head_dim, groups, d_state)
    impl = resolve(impl, xbc)
    if impl == "xla":
        return _xla(xbc, dt_raw, dt_bias, a_log, heads, head_dim, groups, d_state)
    return _kernel_path(xbc, dt_raw, dt_bias, a_log,
                        _Dims(heads, head_dim, groups, d_state, config, impl == "pallas_triton_interpret"))


def _kernel_path(xbc, dt_raw, dt_bias, a_log, dims: _Dims):
    """The custom_vjp, dt_bias and A_log cast to vary as the rows do inside shard_map (kernel_support)."""
    return _fused(xbc, dt_raw, kernel_support.vary_like(dt_bias, xbc), kernel_support.vary_like(a_log, xbc), dims)
