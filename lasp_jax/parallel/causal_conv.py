"""The depthwise causal convolution of Mamba-2 (over x, B, C), on one device and with the sequence sharded.

    y_t = bias + sum_{i < W} weight[i] * x_(t - W + 1 + i)        (per channel; weight [W, C], width W)

A tap reads nothing (contributes zero) before position 0 and, with segment_ids, before the start of t's document:
a document starts where the id changes from t-1 to t, as for linear_attention. The masked taps are selected
away (not multiplied by zero), so a non-finite input in another document never reaches t. The sum runs in
float32 whatever the dtypes; the output is in x's dtype.

Sequence parallel: rank r of the `seq` axis holds positions [rL, (r+1)L) and needs only the previous rank's last
W-1 positions (the halo), never the sequence. One lax.ppermute r -> r+1 brings them (rank 0 receives zeros, the
padding before position 0). Without documents that is the halo itself, and autodiff's transpose of the ppermute
(r+1 -> r) hands the halo's gradient back to the rank that owns those positions. With documents the halo's ids
travel in the same collective (one latency, not two): both are packed as bytes into one uint8 array. Bytes,
not floats: XLA may convert a float carrier (XLA:CPU moves bf16 as f32), which need not keep the bits of ids that
read as NaNs or subnormals. Autodiff cannot see through the bytes, so a custom_vjp sends the halo's gradient back
with one ppermute r+1 -> r.

Activation: activation="silu" applies SiLU to the float32 sum before the one rounding to x's dtype (fused in the
kernels, whose backward recomputes its input rather than saving y). Mamba-2 applies SiLU itself, after rounding:
through XLA that order was the faster on an H200 (benchmarks/results/conv_gpu_h200_s10.md).

Implementations (`impl`): "xla" is the formula above as shifted slices (XLA fuses it; autodiff gives the
backward). "pallas_mosaic" runs lasp_jax.ops.causal_conv_mosaic's forward and backward kernels (compiled, Hopper
GPUs; on the piece itself, its zeros before position 0 never built), "pallas_mosaic_interpret" the same in Mosaic
GPU's interpreter (tests). "pallas_triton" runs lasp_jax.ops.causal_conv_kernel's (compiled, CUDA GPUs of compute
capability >= 8.0), "pallas_triton_interpret" those in Pallas interpret mode. All compute the same sums to float32
rounding. "auto" takes the kernels of QUALIFIED_GPUS on the device kinds it lists for them (where their GPU tests
passed and they beat "xla") when they take the shapes (the Mosaic kernels: channels a multiple of 256, each
piece a multiple of 1024 positions or shorter and of 32), else "xla". The kernels run per device:
sharded_causal_conv1d runs them inside its shard_map; causal_conv1d refuses them under a mesh that XLA
partitions.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from lasp_jax.ops import causal_conv_kernel, causal_conv_mosaic, checks, kernel_support, placement
from lasp_jax.ops.kernel_support import partitioned
from lasp_jax.parallel import layout


IMPLS = ("auto", "xla", "pallas_mosaic", "pallas_mosaic_interpret", "pallas_triton", "pallas_triton_interpret")
# {kernels: exact jax device kinds where their GPU tests passed and they beat "xla" (benchmarks/conv_gpu.py)}, in
# the order "auto" tries them. On an H200 at Mamba-2 1.3B's shape (T 64K, C 4352, W 4, bf16, 16 documents, SiLU
# after rounding as Mamba-2 runs it; benchmarks/results/conv_gpu_h200_s17.md) the Mosaic kernels took 0.672 /
# 1.311 ms forward / forward+backward against XLA's 0.752 / 3.022, and tests/parallel/test_conv_mosaic.py's GPU
# test passed. The Triton kernels lost to XLA (conv_gpu_h200_s10.md, _s13.md, _s14_no_silu.md: 2.513 ms
# forward+backward at best against 2.428 without the SiLU).
QUALIFIED_GPUS: dict[str, tuple[str, ...]] = {"pallas_mosaic": ("NVIDIA H200",), "pallas_triton": ()}


def _supported(name: str, x, width: int) -> str | None:
    """Why the kernels of impl `name` (compiled or interpreted) cannot convolve x [B, L, C] here (None: they can)."""
    interpret = name.endswith("_interpret")
    if name.startswith("pallas_mosaic"):
        return causal_conv_mosaic.supported(x, interpret, width=width, halo=False)
    return causal_conv_kernel.supported(x, interpret=interpret)


def resolve(impl: str, activation, x, width: int, *, per_device: bool) -> str:
    """The implementation `impl` names for x [B, L, C] (L a piece's length) and a width-`width` convolution ("xla"
    or a kernel's name); ValueError if unknown or unusable here. per_device: as if called inside a shard_map over
    the rows (a caller deciding whether to run it in one); else under a mesh that XLA partitions the kernels are
    refused."""
    if activation not in causal_conv_kernel.ACTIVATIONS:
        raise ValueError(f"activation must be one of {causal_conv_kernel.ACTIVATIONS}, got {activation!r}")
    return kernel_support.resolve_per_device(
        impl, IMPLS, QUALIFIED_GPUS, lambda name: _supported(name, x, width),
        split=not per_device and partitioned(x), split_hint="use sharded_causal_conv1d (it runs the kernels per "
        "device inside shard_map), or impl='xla'")


def _check_inputs(x, weight, bias, segment_ids):
    """Validates x [B, T, C], weight [W, C], bias None or [C] and segment_ids; returns the ids ([B, T] or None)."""
    for name, a in (("x", x), ("weight", weight)) + ((("bias", bias),) if bias is not None else ()):
        if not hasattr(a, "shape") or not hasattr(a, "dtype"):
            raise ValueError(f"{name} must be an array, got {type(a).__name__}")
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise ValueError(f"{name} must be a floating-point array, got dtype {a.dtype}")
    if x.ndim != 3:
        raise ValueError(f"x must have rank 3 [B, T, C], got shape {tuple(x.shape)}")
    b, t, c = x.shape
    if t < 1:
        raise ValueError(f"x must hold at least one position, got T={t}")
    if weight.ndim != 2 or weight.shape[1] != c or weight.shape[0] < 1:
        raise ValueError(f"weight must have shape [W, C] with W >= 1 and C = {c} (x's channels), got "
                         f"{tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (c,):
        raise ValueError(f"bias must have shape [C] = [{c}], got {tuple(bias.shape)}")
    return checks.segment_ids(segment_ids, b, t)


def _apply(xe, weight, bias, ide, *, impl: str, activation, head=None):
    """The convolution of one piece, given the W-1 positions before it: xe [B, W-1+L, C] holds them (zeros before
    the sequence) then the piece, ide [B, W-1+L] their ids (documents) or None; by the XLA formula (impl "xla",
    which also takes `xla_convolve`'s additive head) or the Triton kernels. Returns y [B, L, C] in xe's dtype."""
    if impl == "xla":
        return causal_conv_kernel.xla_convolve(xe, weight, bias, ide, activation, head)
    assert impl in ("pallas_triton", "pallas_triton_interpret") and head is None, (impl, "the Triton kernels only")
    return causal_conv_kernel.convolve(xe, weight, bias, ide, activation=activation,
                                       interpret=impl == "pallas_triton_interpret")


def _zero_padded(x, weight, bias, ids, *, impl: str, activation, head=None):
    """`_apply` with zeros before position 0: x [B, L, C], ids [B, L] or None -> y [B, L, C]. The padded ids are
    arbitrary: the padded positions are zeros, which no mask needs to keep out."""
    if impl.startswith("pallas_mosaic"):  # the zeros are the kernels' own: no padded copy of x
        assert head is None, "the kernels take no head term"
        return causal_conv_mosaic.convolve_zero_halo(x, weight, bias, ids, activation=activation,
                                                     interpret=impl == "pallas_mosaic_interpret")
    k = weight.shape[0] - 1
    ide = None if ids is None else jnp.pad(ids, ((0, 0), (k, 0)))
    return _apply(jnp.pad(x, ((0, 0), (k, 0), (0, 0))), weight, bias, ide, impl=impl, activation=activation,
                  head=head)


def _halo_taps(halo, weight, window_ids):
    """float32 [B, W-1, C]: what the halo [B, W-1, C] adds to the piece's first W-1 sums, the taps that read it,
    kept as the documents allow (window_ids [B, 2(W-1)]: the halo's ids, then the piece's first W-1, or None).
    XLA's formula over [halo; W-1 zeros]: the zeros stand for the piece, whose own taps are the one-device
    convolution's."""
    k = halo.shape[1]
    xe = jnp.pad(halo.astype(jnp.float32), ((0, 0), (0, k), (0, 0)))
    return causal_conv_kernel.xla_convolve(xe, weight, None, window_ids)


def _check_unsplit_sequence(x):
    """ValueError if x's T axis is sharded in its type (an Explicit mesh): one device's convolution cannot pad it."""
    spec = jax.typeof(x).sharding.spec
    if len(spec) > 1 and spec[1] is not None:
        raise ValueError(f"x's sequence axis is sharded over {spec[1]!r} (x is {jax.typeof(x).str_short()}): "
                         "use sharded_causal_conv1d, which passes the halo between the ranks")


def causal_conv1d(x, weight, bias=None, *, segment_ids=None, activation=None, impl="auto"):
    """Depthwise causal convolution on one device (see the module docstring for the math and numerics).

    The padding before position 0 is x padded, so it follows x's sharding: x may be sharded over its batch and
    channels (on Explicit and Auto meshes alike); a sharded T is sharded_causal_conv1d's.

    Args:
      x: [B, T, C] floating.
      weight: [W, C]: weight[W-1] multiplies the current position, weight[0] the one W-1 back.
      bias: None or [C].
      segment_ids: None, or [B, T] integers: packed documents; no tap reaches across a document start.
      activation: None or "silu": applied to the float32 sum (module docstring).
      impl: "auto", "xla" or a kernels' impl of IMPLS (module docstring); the kernels refuse
        a mesh that XLA partitions.
    Returns:
      y [B, T, C] in x's dtype, sharded like x.
    """
    ids = _check_inputs(x, weight, bias, segment_ids)
    _check_unsplit_sequence(x)
    impl = resolve(impl, activation, x, weight.shape[0], per_device=False)
    return _zero_padded(x, weight, bias, ids, impl=impl, activation=activation)


def _to_bytes(a):
    """a [..., K] -> uint8 [..., K * itemsize], bit for bit."""
    return jax.lax.bitcast_convert_type(a, jnp.uint8).reshape(*a.shape[:-1], -1)


def _from_bytes(u, dtype):
    """The inverse of _to_bytes."""
    size = np.dtype(dtype).itemsize
    return jax.lax.bitcast_convert_type(u.reshape(*u.shape[:-1], -1, size) if size > 1 else u, dtype)


def _forward_pairs(n):
    return [(r, r + 1) for r in range(n - 1)]


def _backward_pairs(n):
    return [(r + 1, r) for r in range(n - 1)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _pass_halo_with_ids(halo, halo_ids, axis, n):
    """(halo [B, K, C], halo_ids [B, K]) of rank r arrive at rank r+1 in one collective (zeros at rank 0)."""
    c = halo.shape[-1]
    packed = jnp.concatenate([_to_bytes(halo), _to_bytes(halo_ids[..., None])], axis=-1)
    packed = jax.lax.ppermute(packed, axis, _forward_pairs(n))
    split = c * np.dtype(halo.dtype).itemsize
    return _from_bytes(packed[..., :split], halo.dtype), _from_bytes(packed[..., split:], halo_ids.dtype)[..., 0]


def _pass_halo_with_ids_fwd(halo, halo_ids, axis, n):
    return _pass_halo_with_ids(halo, halo_ids, axis, n), halo_ids


def _pass_halo_with_ids_bwd(axis, n, halo_ids, cotangents):
    d_halo, _ = cotangents
    # The gradient of the positions rank r sent goes back to it; the ids have none.
    return jax.lax.ppermute(d_halo, axis, _backward_pairs(n)), np.zeros(halo_ids.shape, jax.dtypes.float0)


_pass_halo_with_ids.defvjp(_pass_halo_with_ids_fwd, _pass_halo_with_ids_bwd)


# Under jit always (inlined in a caller's jit): an eager shard_map body crashes the CPU runtime of jax 0.11.2.
@functools.partial(jax.jit, static_argnames=("seq_axis", "n", "impl", "activation"))
def _local(x, weight, bias, ids, *, seq_axis, n, impl, activation):
    """One rank: the piece convolved as on one device, with what the received halo (the previous rank's last W-1
    positions and ids) adds to its first W-1 outputs.

    With impl "xla" the halo's taps are a [B, W-1, C] float32 sum of their own (`_halo_taps`), added to the first
    W-1 sums before the bias and the one rounding: the rank's graph is the one-device convolution's plus that
    term, and the cotangent of y reaches the piece's convolution unchanged. Those W-1 outputs sum the piece's taps
    and the halo's apart, so they differ from one device's by float32 rounding (the rest are the same sums in the
    same order). The former form recomputed the first W-1 outputs over [halo; first W-1 positions] and wrote them
    over y: XLA, which fuses the convolution into its consumers, then carried both convolutions and the overwrite
    into every fusion that read y, and its transpose zeroed the cotangent's first rows in the backward's. In a
    Mamba-2 1.3B seq-2 step on H200s the change alone did not move the step time (1.864 s against 1.838 to 1.881
    s for the former form; the fusions' excess over one GPU was the weight's layout, models/mamba2.py), and the
    former form was not timed with that fixed (benchmarks/results/TRAIN_GPU_NOTES.md, session 15). Earlier forms
    read the halo in every pass over the piece: [halo; piece] as a concatenated copy (129 ms of that step) or as a
    select of two pads.

    The kernels' output is a buffer of their own, so there the first W-1 outputs are convolved again over [halo;
    first W-1 positions] by XLA's formula and selected over it (a kernel launch each way would cost more than that
    work). A select, not a dynamic_update_slice: XLA fuses the select into y's consumers, while it made the update
    of a Mosaic GPU kernel's output an in-place slice fusion that it then refused to compile ("DUS target must be
    a fusion parameter", jax 0.11.2 on an H200).
    """
    k = weight.shape[0] - 1
    # Varying once for both terms: their gradients are summed on the rank, then all-reduced once.
    weight = kernel_support.vary_like(weight, x)
    bias = None if bias is None else kernel_support.vary_like(bias, x)
    if not k or n == 1:  # one rank (or W = 1): only the padding before position 0
        return _zero_padded(x, weight, bias, ids, impl=impl, activation=activation)
    halo, halo_ids = x[:, x.shape[1] - k:], None if ids is None else ids[:, ids.shape[1] - k:]
    if ids is None:
        halo = jax.lax.ppermute(halo, seq_axis, _forward_pairs(n))
    else:
        halo, halo_ids = _pass_halo_with_ids(halo, halo_ids, seq_axis, n)
    window_ids = None if ids is None else jnp.concatenate([halo_ids, ids[:, :k]], axis=1)
    if impl == "xla":
        return _zero_padded(x, weight, bias, ids, impl=impl, activation=activation,
                            head=_halo_taps(halo, weight, window_ids))
    y = _zero_padded(x, weight, bias, ids, impl=impl, activation=activation)
    head = _apply(jnp.concatenate([halo, x[:, :k]], axis=1), weight, bias, window_ids, impl="xla",
                  activation=activation)
    first = jax.lax.broadcasted_iota(jnp.int32, (1, y.shape[1], 1), 1) < head.shape[1]
    return jnp.where(first, jnp.pad(head, ((0, 0), (0, y.shape[1] - head.shape[1]), (0, 0))), y)


def _check_piece(length, w, seq_axis):
    if length < w - 1:
        raise ValueError(f"each rank's piece of the sequence (L={length} positions) must hold at least W-1 = {w - 1} "
                         f"positions (the halo of a width-{w} convolution) over {seq_axis!r}: use fewer ranks or a "
                         "longer sequence")


def sharded_causal_conv1d(x, weight, bias=None, *, segment_ids=None, mesh=None, seq_axis="seq", batch_axes=None,
                          activation=None, impl="auto"):
    """`causal_conv1d` (same math, same shapes) with T sharded over the mesh axis `seq_axis`.

    Of the sequence only the halo [B, W-1, C] (and its ids) crosses devices, one ppermute each way (forward,
    backward); autodiff adds the all-reduce of the replicated weight's and bias's gradients.

    Args:
      x: [B, T, C]; weight: [W, C]; bias: None or [C]; segment_ids: None or [B, T] integers; global shapes, T
        divisible by the size n of `seq_axis`, and each rank's piece L = T / n at least W-1 long. Called where
        `seq_axis` is already manual (inside the caller's shard_map), x and segment_ids are the local pieces.
      mesh: a Mesh or AbstractMesh; default: the ambient one (`jax.set_mesh`). Explicit and Auto axes both work.
      batch_axes: the mesh axis (a name) or axes B is sharded over; default as in lasp_attention. Channels
        sharded over other axes (as lasp_attention's heads) stay sharded: each device convolves its own.
      activation, impl: as in `causal_conv1d`; the kernels run per device, inside the shard_map. In a caller's
        shard_map, impl="pallas_triton_interpret" needs check_vma=False (jax 0.11.2's Pallas interpreter; this
        function's own shard_map turns it off for that impl); the compiled kernels take check_vma on.
    Returns:
      y [B, T, C] in x's dtype, sharded like x (as lasp_attention's output is like q).
    """
    ids = _check_inputs(x, weight, bias, segment_ids)
    mesh = layout.current_mesh(mesh)
    n = layout.check_seq_axis(mesh, seq_axis)
    w = weight.shape[0]
    if layout.seq_is_manual(seq_axis):
        _check_piece(x.shape[1], w, seq_axis)
        impl = resolve(impl, activation, x, w, per_device=True)
        return _local(x, weight, bias, ids, seq_axis=seq_axis, n=n, impl=impl, activation=activation)
    # layout.place reads [B, T, H, D]: the channels stand as heads (independent, so they may stay sharded).
    x4_in = x[..., None]
    x4, _, _, spec, _ = layout.place(x4_in, x4_in, x4_in, mesh, seq_axis, batch_axes)
    _check_piece(x.shape[1] // n, w, seq_axis)
    specs = (P(*spec[:3]), P(None, spec[2]), P(spec[2]), P(*spec[:2]))
    # The kernels take (or refuse) what one device holds: its piece of the rows, sequence and channels.
    local = tuple(d // placement.size(mesh, placement.axes(a)) for d, a in zip(x.shape, spec[:3]))
    impl = resolve(impl, activation, jax.ShapeDtypeStruct(local, x.dtype), w, per_device=True)
    args = (x4[..., 0], weight, bias, ids)
    if AxisType.Explicit in tuple(mesh.axis_types):
        args = tuple(a if a is None else jax.sharding.reshard(a, NamedSharding(mesh, s)) for a, s in zip(args, specs))
    y = _sharded(*args, mesh=mesh, specs=specs, seq_axis=seq_axis, n=n, impl=impl, activation=activation)
    return placement.like_q(y[..., None], x4_in)[..., 0]


# Under jit always, as lasp_attention: an eager shard_map crashes the CPU runtime of jax 0.11.2.
@functools.partial(jax.jit, static_argnames=("mesh", "specs", "seq_axis", "n", "impl", "activation"))
def _sharded(x, weight, bias, ids, *, mesh, specs, seq_axis, n, impl, activation):
    body = functools.partial(_local, seq_axis=seq_axis, n=n, impl=impl, activation=activation)
    in_specs = tuple(None if a is None else s for a, s in zip((x, weight, bias, ids), specs))
    return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=specs[0],
                         check_vma=kernel_support.checks_vma(impl))(x, weight, bias, ids)
