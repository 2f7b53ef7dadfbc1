"""The fused convolution kernels (lasp_jax.ops.causal_conv_kernel, impl="pallas_triton_interpret" on CPU) against
the XLA formula (`xla_convolve`, impl="xla"): y and the gradients of x (the halo rows' too), weight and bias, in
float32 and bf16, without and with documents (starting inside a tile, at a forward tile's and a backward run's
boundary, documents of one position), activation None and "silu", C not a multiple of the channel block and L
not a multiple of the row block; widths 1 to 3 and a piece shorter than the halo; a NaN in one document reaching
no other; sharded_causal_conv1d on data x seq meshes equal to one device; `impl` selection; the compiled kernels'
Triton lowering for an H200 and an A100, and in a shard_map with check_vma on (no GPU needed); and on a GPU, the
compiled kernels against "xla" at Mamba-2 1.3B's shape.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import triton as pl_triton
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from lasp_jax.ops import causal_conv_kernel
from lasp_jax.parallel import causal_conv
from lasp_jax.parallel.causal_conv import causal_conv1d, sharded_causal_conv1d
from tests.util import A100, H200, conv_inputs, conv_values_and_grads, document_ids, per_rank_errors, rel_err

# Small blocks, so that the test shapes span several of each: L = 45 is 6 forward tiles of 8 rows (the last
# partial) and 3 backward runs of 16 rows (of 2 blocks each) from xe row 3, C = 40 channels 3 blocks of 16 (the
# last partial).
SMALL = causal_conv_kernel.Config(fwd_block_t=8, bwd_block_t=8, block_c=16, bwd_rows=16)
B, L, C, W = 2, 45, 40, 4
# Document starts (positions t): 5 inside a tile, 16 at a forward tile's and a backward run's start, 17 one
# position long (16), 24 at a backward block's start, 40 in the last partial tile (row 0; row 1 is one document).
STARTS = [5, 16, 17, 24, 40]
# Kernel against the XLA formula, worst over LASP_TEST_SEED 0-2 and the cases of test_kernel_matches_xla
# (2026-11-30, XLA:CPU): float32 2.5e-7 (y, dxe, dweight, dbias). bf16 x (float32 weight and bias): y and dxe are
# the same float32 sums in other orders, each rounded once to bf16, so an element may differ by one bf16 ulp where
# the two sums straddle a rounding boundary (y's norm error up to 1.3e-4); every element stays within one ulp
# (`_ulps`: worst 0.79 ulp); dweight and dbias are float32 sums (F32_TOL).
F32_TOL = 7e-7
# The GPU test at T = 65536: the float32 sums of dweight and dbias run over 65536 rows in other orders; on an H200
# dweight's error at this shape was 1.9e-7 (benchmarks/results/conv_gpu_h200_s10.md; dbias not measured there).
GPU_SUM_TOL = 6e-7


def _ulps(a, ref) -> float:
    """max |a - ref| in units of ref's bf16 ulp bound 2^-7 |ref| (plus 1e-6 of ref's rms, for elements that
    the float32 sums leave near 0): <= 1 when a and ref are the same value rounded to bf16 twice."""
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    floor = 1e-6 * np.sqrt(np.mean(ref ** 2))
    return float(np.max(np.abs(a - ref) / (2.0 ** -7 * np.abs(ref) + floor)))


_inputs = functools.partial(conv_inputs, b=B, t=L, c=C, w=W)


def _documents(b, t, starts):
    """[b, t] ids, documents starting at `starts`; the last row one document."""
    ids = document_ids([starts] * b, t)
    ids[-1] = 3
    return jnp.asarray(ids)


def _kernel(ide, activation, config=SMALL):
    return lambda xe, w, b: causal_conv_kernel.convolve(xe, w, b, ide, activation=activation, interpret=True,
                                                        config=config)


def _xla(ide, activation):
    return lambda xe, w, b: causal_conv_kernel.xla_convolve(xe, w, b, ide, activation)


@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("docs", [False, True], ids=["one-document", "documents"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_kernel_matches_xla(dtype, docs, activation, rng):
    xe, weight, bias, g = _inputs(rng, dtype)
    ide = _documents(B, W - 1 + L, [s + W - 1 for s in STARTS]) if docs else None
    y, grads = conv_values_and_grads(_kernel(ide, activation), xe, weight, bias, g)
    y_ref, grads_ref = conv_values_and_grads(_xla(ide, activation), xe, weight, bias, g)
    assert y.dtype == dtype and y.shape == g.shape
    assert [a.dtype for a in grads] == [dtype, jnp.float32, jnp.float32]
    errors = {name: rel_err(a, ref) for name, a, ref in zip(("y", "dxe", "dweight", "dbias"), (y, *grads),
                                                               (y_ref, *grads_ref))}
    if dtype == jnp.float32:
        assert max(errors.values()) < F32_TOL, errors
    else:
        ulps = {"y": _ulps(y, y_ref), "dxe": _ulps(grads[0], grads_ref[0])}
        assert max(ulps.values()) <= 1.0, (ulps, errors)
        assert errors["dweight"] < F32_TOL and errors["dbias"] < F32_TOL, errors


@pytest.mark.parametrize(("w", "length"), [(1, L), (2, L), (3, L), (4, 2)], ids=["w1", "w2", "w3", "w4-L2"])
def test_other_widths_match_xla(w, length, rng):
    """Widths other than Mamba-2's 4 (W = 3: 2W-1 = 5 shifted loads, 2 halo rows; W = 1: no halo), and a piece
    shorter than the halo (L = 2 < W-1): documents and SiLU, float32."""
    xe, weight, bias, g = _inputs(rng, jnp.float32, t=length, w=w)
    ide = _documents(B, w - 1 + length, [s + w - 1 for s in STARTS if s + w - 1 < w - 1 + length] or [1])
    y, grads = conv_values_and_grads(_kernel(ide, "silu"), xe, weight, bias, g)
    y_ref, grads_ref = conv_values_and_grads(_xla(ide, "silu"), xe, weight, bias, g)
    errors = {name: rel_err(a, ref) for name, a, ref in zip(("y", "dxe", "dweight", "dbias"), (y, *grads),
                                                               (y_ref, *grads_ref))}
    assert max(errors.values()) < F32_TOL, errors


def test_nan_stays_in_its_document(rng):
    """A NaN input in the first document of row 0: y and dxe of the later documents are those of the same
    inputs without it (selected away, forward and backward, through the SiLU's recomputed input)."""
    xe, weight, bias, g = _inputs(rng, jnp.float32)
    ide = _documents(B, W - 1 + L, [s + W - 1 for s in STARTS])
    first_later = STARTS[0] + W - 1  # xe row of the second document
    poisoned = xe.at[0, first_later - 2, 3].set(jnp.nan)
    y, (dxe, _, _) = conv_values_and_grads(_kernel(ide, "silu"), poisoned, weight, bias, g)
    y_ref, (dxe_ref, _, _) = conv_values_and_grads(_kernel(ide, "silu"), xe, weight, bias, g)
    assert np.isnan(y[0, :STARTS[0]]).any() and np.isnan(dxe[0, :first_later]).any()  # it is there
    np.testing.assert_array_equal(y[0, STARTS[0]:], y_ref[0, STARTS[0]:])
    np.testing.assert_array_equal(dxe[0, first_later:], dxe_ref[0, first_later:])
    np.testing.assert_array_equal(dxe[1], dxe_ref[1])


# (data, seq), axis type, L per rank, document starts: at a rank boundary, inside a piece, and one shorter than
# the halo crossing a boundary.
MESHES = {
    "4x2-explicit": ((4, 2), AxisType.Explicit, 7, [3, 7, 12, 13]),
    "2x3-auto": ((2, 3), AxisType.Auto, 5, [2, 5, 9, 10]),
}


@pytest.mark.parametrize("case", MESHES)
def test_sharded_kernels_match_one_device(case, rng):
    """sharded_causal_conv1d with the interpreted kernels (SiLU, documents) equals one-device causal_conv1d
    ("xla"): y, dx on every rank (a rank's last W-1 positions get part of theirs from the next rank's dxe),
    dweight and dbias (summed over the ranks)."""
    (data, n), kind, length, starts = MESHES[case]
    b, t, c = data, length * n, 24
    xe, weight, bias, g = _inputs(rng, jnp.float32, b=b, t=t, c=c)
    x = xe[:, W - 1:]
    ids = _documents(b, t, starts)
    mesh = jax.make_mesh((data, n), ("data", "seq"), axis_types=(kind,) * 2, devices=jax.devices()[:data * n])
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, NamedSharding(mesh, P("data", "seq")))
        y, grads = conv_values_and_grads(
            lambda x, w, b_: sharded_causal_conv1d(x, w, b_, segment_ids=ids, activation="silu",
                                                   impl="pallas_triton_interpret"), xs, weight, bias, g)
    y_ref, grads_ref = conv_values_and_grads(
        lambda x, w, b_: causal_conv1d(x, w, b_, segment_ids=ids, activation="silu", impl="xla"), x, weight, bias, g)
    assert max(per_rank_errors(y, y_ref, n)) < F32_TOL
    assert max(per_rank_errors(grads[0], grads_ref[0], n)) < F32_TOL
    for name, a, ref in zip(("dweight", "dbias"), grads[1:], grads_ref[1:]):
        assert rel_err(a, ref) < F32_TOL, name


def _has_kernel(fn, *args) -> bool:
    return "pallas_call" in str(jax.make_jaxpr(fn)(*args))


def test_impl_selection(rng):
    """"auto" takes "xla" for these shapes (C = 4: no kernels of QUALIFIED_GPUS take it; the Triton kernels are
    qualified nowhere); unknown names, a bad activation and the compiled kernels off a GPU are clear errors; the
    kernels refuse a mesh XLA partitions in causal_conv1d."""
    xe, weight, bias, _ = _inputs(rng, jnp.float32, t=8, c=4)
    x = xe[:, W - 1:]
    assert causal_conv.QUALIFIED_GPUS["pallas_triton"] == ()
    assert not _has_kernel(lambda x: causal_conv1d(x, weight, bias, activation="silu"), x)
    assert _has_kernel(lambda x: causal_conv1d(x, weight, bias, impl="pallas_triton_interpret"), x)
    for conv in (causal_conv1d, lambda *a, **k: sharded_causal_conv1d(*a, mesh=jax.make_mesh((1,), ("seq",)), **k)):
        with pytest.raises(ValueError, match="unknown impl 'triton': expected .*'pallas_mosaic'.*'pallas_triton'"):
            conv(x, weight, impl="triton")
        with pytest.raises(ValueError, match="activation must be one of .*'silu'"):
            conv(x, weight, activation="gelu")
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="impl 'pallas_triton' cannot run these inputs: .*needs a CUDA GPU"):
            causal_conv1d(x, weight, impl="pallas_triton")
    mesh = jax.make_mesh((2,), ("data",), axis_types=(AxisType.Explicit,))
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="runs per device.*sharded_causal_conv1d"):
        causal_conv1d(jax.device_put(x, NamedSharding(mesh, P("data"))), weight, impl="pallas_triton_interpret")
    with pytest.raises(ValueError, match="block_c must be a power of two"):
        causal_conv_kernel.Config(block_c=96)
    with pytest.raises(ValueError, match="bwd_rows must be a positive multiple of bwd_block_t=16"):
        causal_conv_kernel.Config(bwd_rows=40)




def _cuda_text(fn, mesh, *args) -> str:
    """The StableHLO of jit(fn) lowered for CUDA on an abstract mesh: the Triton IR is built (PTX needs a GPU)."""
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("device", [H200, A100], ids=["h200", "a100"])
def test_kernels_lower_to_triton(device):
    """The compiled kernels (not interpret mode) lower to Triton IR without a GPU, at Mamba-2 1.3B's shape with
    documents and SiLU, for an H200 and an A100 (sm_80, the oldest the lowering targets): the forward and the
    backward, two Triton calls."""
    xe = jax.ShapeDtypeStruct((1, 65539, 4352), jnp.bfloat16)
    params = jax.ShapeDtypeStruct((4, 4352), jnp.float32), jax.ShapeDtypeStruct((4352,), jnp.float32)
    ide = jax.ShapeDtypeStruct((1, 65539), jnp.int32)
    g = jax.ShapeDtypeStruct((1, 65536, 4352), jnp.bfloat16)

    def step(xe, weight, bias, ide, g):
        y, vjp = jax.vjp(lambda *a: causal_conv_kernel.convolve(*a, ide, activation="silu"), xe, weight, bias)
        return y, vjp(g)

    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    assert _cuda_text(step, mesh, xe, *params, ide, g).count(pl_triton.CUSTOM_CALL_TARGET_NAME) == 2


def test_kernels_lower_in_a_shard_map_with_check_vma():
    """Without a GPU: sharded_causal_conv1d's per-rank body with the compiled kernels inside a shard_map over a
    2 x 4 (data x seq) mesh of abstract H200s, check_vma on (interpret mode needs it off: causal_conv._sharded):
    two Triton calls, the halo's two collective-permutes."""
    mesh = jax.sharding.AbstractMesh((2, 4), ("data", "seq"), axis_types=(AxisType.Explicit,) * 2,
                                     abstract_device=H200)
    spec = P("data", "seq")
    body = functools.partial(causal_conv._local, seq_axis="seq", n=4, impl="pallas_triton", activation="silu")

    def step(x, weight, bias, ids, g):
        y, vjp = jax.vjp(lambda *a: body(*a, ids), x, weight, bias)
        return y, vjp(g)

    local = jax.shard_map(step, mesh=mesh, in_specs=(spec, P(), P(), spec, spec),
                          out_specs=(spec, (spec, P(), P())))
    typed = lambda shape, dtype, s: jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, s))
    text = _cuda_text(local, mesh, typed((4, 64, 48), jnp.bfloat16, spec), typed((4, 48), jnp.float32, P()),
                      typed((48,), jnp.float32, P()), typed((4, 64), jnp.int32, spec),
                      typed((4, 64, 48), jnp.bfloat16, spec))
    assert text.count(pl_triton.CUSTOM_CALL_TARGET_NAME) == 2
    assert text.count("collective_permute") == 2


@pytest.mark.gpu
def test_gpu_mamba2_shape_matches_xla():
    """Compiled kernels against "xla" at Mamba-2 1.3B's convolution (B=1, T=65536, C=4352, W=4, bf16 x,
    float32 weight and bias, 16 documents, SiLU): y, dx, dweight, dbias."""
    b, t, c, w = 1, 65536, 4352, 4
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (b, t, c), jnp.float32).astype(jnp.bfloat16)
    g = jax.random.normal(keys[1], (b, t, c), jnp.float32).astype(jnp.bfloat16)
    weight = jax.random.uniform(keys[2], (w, c), jnp.float32, -0.5, 0.5)
    bias = jax.random.uniform(keys[3], (c,), jnp.float32, -0.5, 0.5)
    starts = np.sort(np.random.default_rng(0).choice(np.arange(1, t), 15, replace=False))
    ids = jnp.asarray(document_ids([starts], t))
    got = {}
    for impl in ("pallas_triton", "xla"):
        conv = lambda x, w_, b_: causal_conv1d(x, w_, b_, segment_ids=ids, activation="silu", impl=impl)
        got[impl] = jax.block_until_ready(conv_values_and_grads(conv, x, weight, bias, g, compiler_options=None))
    (y, grads), (y_ref, grads_ref) = got["pallas_triton"], got["xla"]
    errors = {name: rel_err(a, ref) for name, a, ref in zip(("y", "dx", "dweight", "dbias"), (y, *grads),
                                                               (y_ref, *grads_ref))}
    ulps = {"y": _ulps(y, y_ref), "dx": _ulps(grads[0], grads_ref[0])}
    print(errors, ulps)  # the measured GPU errors (pytest -s)
    assert max(ulps.values()) <= 1.0, (ulps, errors)
    assert errors["dweight"] < GPU_SUM_TOL and errors["dbias"] < GPU_SUM_TOL, errors
