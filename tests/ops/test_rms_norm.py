"""lasp_jax.ops.rms_norm: the fused SRMSNorm kernels (interpreted on CPU) against the xla path, and in a model.

CPU (CI): small launch sizes so that several row blocks run and the last one runs past the rows' end; widths 64
and 48 (not a power of two: padding columns masked); the forward and the gradient in float32 and bf16; rows of
zeros and of large values; srms_norm_residual's two cotangents; lowered to Triton for abstract GPUs; a tiny TNL
with norm_impl interpreted, per device on a mesh, against the one-device "xla" model.
GPU (`pytest -m gpu`): the compiled kernels at [65536, 2048] and [65536, 2560] bf16 against xla in float32, and
srms_norm_residual's at [65536, 2048].
"""

import dataclasses
import functools
import re
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental.pallas import triton as pl_triton
from jax.sharding import AbstractMesh, AxisType, NamedSharding, PartitionSpec as P

import models
from lasp_jax.ops import kernel_support, rms_norm
from tests.models import helpers
from tests.util import A100, H200, cuda_mlir, rel_err

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")

EPS = 1e-6
# Relative errors against xla in float32 on the same inputs, ~3x the worst measured over seeds 0-2, widths 48 and
# 64, either forward (XLA:CPU, interpreted kernels, 2026-11-30): fp32 y 6.0e-8, dx 7.8e-8; bf16 1.7e-3 for both,
# the same as xla's own bf16 path (one bf16 rounding of y and of dx).
F32_TOL = 2.5e-7
BF16_TOL = 4e-3


# The CPU launch sizes: 4-row forward blocks, 2-row backward blocks (widths padded to 64); 75 rows (leading dims
# [3, 25]) leave the last block of each partly past the end.
SMALL = rms_norm.Config(fwd_block=4 * 64, bwd_block=2 * 64)
LEAD = (3, 25)


def _fwd_bwd(impl, config=SMALL):
    """jit(x, cotangent -> (y, dx)) of srms_norm."""
    def run(x, g):
        y, vjp = jax.vjp(functools.partial(rms_norm.srms_norm, eps=EPS, impl=impl, config=config), x)
        return y, vjp(g)[0]

    return jax.jit(run)


def _inputs(rng, shape, dtype, scale=3.0):
    """x (normal, times scale) and y's cotangent (normal), in dtype."""
    keys = jax.random.split(jax.random.key(int(rng.integers(2**31))))  # on device: quick at 64K rows
    return ((scale * jax.random.normal(keys[0], shape)).astype(dtype),
            jax.random.normal(keys[1], shape).astype(dtype))


def _f32(*arrays):
    return tuple(a.astype(jnp.float32) for a in arrays)


def test_launch_runs_past_the_end():
    """SMALL at the tests' 75 rows: several blocks each way, the last forward and backward blocks partly past
    the end (the masked rows)."""
    for block in (SMALL.fwd_block, SMALL.bwd_block):
        rows = kernel_support.block_rows(block, 64)
        assert rows in (2, 4) and 75 % rows and 75 // rows >= 2


@pytest.mark.parametrize(("dtype", "width", "xla_forward"), [
    (jnp.float32, 64, False), (jnp.bfloat16, 48, False), (jnp.float32, 48, False), (jnp.bfloat16, 64, True),
], ids=["f32_64", "bf16_48", "f32_48", "bf16_64_xla_fwd"])
def test_kernels_match_xla(dtype, width, xla_forward, rng):
    """The interpreted kernels' y and dx against xla in float32 on the same inputs. Width 48: padded to 64, the
    padding columns masked. xla_forward: XLA's forward under the custom_vjp, the kernel's backward."""
    x, g = _inputs(rng, (*LEAD, width), dtype)
    y, dx = _fwd_bwd("pallas_triton_interpret", dataclasses.replace(SMALL, xla_forward=xla_forward))(x, g)
    want = _fwd_bwd("xla")(*_f32(x, g))
    assert y.dtype == dx.dtype == dtype
    errs = (rel_err(y, want[0]), rel_err(dx, want[1]))
    assert max(errs) < (F32_TOL if dtype == jnp.float32 else BF16_TOL), errs


def _residual_fwd_bwd(impl, fused=True):
    """jit(x, d, g -> ((x out, y), dx)) of srms_norm_residual (fused=False: the kernel's srms_norm beside x, the
    cotangents added by autodiff, as before the residual op), d and g the two outputs' cotangents."""
    def residual(x):
        return rms_norm.srms_norm_residual(x, eps=EPS, impl=impl, config=SMALL)

    def separate(x):
        return x, rms_norm.srms_norm(x, eps=EPS, impl=impl, config=SMALL)

    def run(x, d, g):
        out, vjp = jax.vjp(residual if fused else separate, x)
        return out, vjp((d, g))[0]

    return jax.jit(run)


# dx = d + dx_norm against float64 (module docstring's formulas), measured over seeds 0-2 and widths 48, 64
# (2026-12-01): bf16 1.65-1.71e-3 with the add in the kernel (one rounding) against 1.80-1.86e-3 with autodiff's
# add of the kernel's bf16 dx_norm (two roundings; the xla path's error is the same), a ratio of 0.91-0.92; fp32
# 3.0-3.3e-8 either way. Against xla in float32: fp32 6.5e-8, bf16 1.7e-3 (within F32_TOL, BF16_TOL).
RESIDUAL_BF16_GAIN = 0.97


@pytest.mark.parametrize(("dtype", "width"), [(jnp.float32, 64), (jnp.bfloat16, 48)], ids=["f32_64", "bf16_48"])
def test_residual_adds_the_pass_through_cotangent(dtype, width, rng):
    """srms_norm_residual interpreted: x comes back bit-equal, y is srms_norm's, and dx (both cotangents random,
    non-zero) matches autodiff of the xla path in float32; in bf16 it is closer to float64 than autodiff's add of
    the kernel's rounded dx_norm (the add in float32, one rounding)."""
    x, g = _inputs(rng, (*LEAD, width), dtype)
    d = _inputs(rng, x.shape, dtype)[1]
    (x_out, y), dx = _residual_fwd_bwd("pallas_triton_interpret")(x, d, g)
    (_, y_separate), dx_separate = _residual_fwd_bwd("pallas_triton_interpret", fused=False)(x, d, g)
    (_, want_y), want_dx = _residual_fwd_bwd("xla")(*_f32(x, d, g))
    assert x_out.dtype == y.dtype == dx.dtype == dtype
    np.testing.assert_array_equal(np.asarray(x_out, np.float32), np.asarray(x, np.float32))
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_separate, np.float32))
    errs = (rel_err(y, want_y), rel_err(dx, want_dx))
    assert max(errs) < (F32_TOL if dtype == jnp.float32 else BF16_TOL), errs
    if dtype == jnp.bfloat16:
        _, exact = _float64_reference(x, g)
        exact = exact + np.asarray(d, np.float64)
        assert rel_err(dx, exact) < RESIDUAL_BF16_GAIN * rel_err(dx_separate, exact)


def test_residual_lowers_to_one_backward_kernel():
    """Without a GPU, for an H200 at T = 64K, d_model 2048, bf16: the pass-through output is the program's input
    itself (no copy), and forward and backward are two Triton kernels, the backward reading x, g and d."""
    mesh = AbstractMesh((1,), ("x",), axis_types=(AxisType.Auto,), abstract_device=H200)
    x = jax.ShapeDtypeStruct((1, 65536, 2048), jnp.bfloat16)

    def fwd_bwd(x, d, g):
        out, vjp = jax.vjp(lambda x: rms_norm._fused_residual(x, rms_norm._Launch(EPS, rms_norm.DEFAULT, False)), x)
        return out, vjp((d, g))

    main = cuda_mlir(fwd_bwd, mesh, x, x, x).split("func.func public @main")[1]
    returned = next(line.split() for line in main.splitlines() if line.strip().startswith("return"))
    assert returned[1] == "%arg0,", returned
    calls = re.findall(r"stablehlo\.custom_call @" + re.escape(pl_triton.CUSTOM_CALL_TARGET_NAME) + r"\(([^)]*)\)",
                       main)
    assert sorted(len(operands.split(",")) for operands in calls) == [1, 3], calls


def _row_errors(got, want) -> np.ndarray:
    """rel_err of each row of [..., D] arrays (a row's error cannot hide in the others' norm)."""
    got, want = (np.asarray(a, np.float64).reshape(-1, a.shape[-1]) for a in (got, want))
    return np.linalg.norm(got - want, axis=1) / np.maximum(np.linalg.norm(want, axis=1), 1e-300)


def _float64_reference(x, g):
    """(y, dx) of the module docstring's formulas in float64 numpy."""
    x, g = (np.asarray(a, np.float64) for a in (x, g))
    r = 1 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS)
    y = x * r
    return y, r * (g - y * np.mean(g * y, axis=-1, keepdims=True))


# Per row against float64, the worst over seeds 0-2 (2026-11-30): fp32 1.5e-7; bf16 2.3e-3 (48 roundings: a noisier
# norm than a whole tensor's). xla's own dx is 0.10 to 0.27 off on the rows near 1e17: autodiff's r^3 term
# (1e-51) underflows float32, where the kernel's r (g - y mean(g y)) does not.
ROW_F32_TOL = 4e-7
ROW_BF16_TOL = 6e-3


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_zero_and_large_rows(dtype, rng):
    """Rows of zeros (r = eps^-1/2: y = 0, dx = g eps^-1/2) and rows near 1e17 (squares near 1e34, their sums
    still finite in float32) among normal ones, width 48: every row of y and dx against float64."""
    x, g = _inputs(rng, (*LEAD, 48), dtype)
    zeros, large = ((0, 0), (1, 10), (2, 24)), ((0, 5), (2, 3))
    x = np.array(x, np.float32)
    for row in zeros:
        x[row] = 0
    for row in large:
        x[row] *= 3e16
    x = jnp.asarray(x, dtype)
    y, dx = _fwd_bwd("pallas_triton_interpret")(x, g)
    want_y, want_dx = _float64_reference(x, g)
    for row in zeros:
        assert not np.any(np.asarray(y[row], np.float32))
    tol = ROW_F32_TOL if dtype == jnp.float32 else ROW_BF16_TOL
    assert _row_errors(y, want_y).max() < tol and _row_errors(dx, want_dx).max() < tol
    assert np.abs(want_dx[zeros[0]]).max() > 100 and np.abs(want_dx[large[0]]).max() < 1e-15  # both extremes


def test_xla_path_is_the_models_former_code(rng):
    """impl "xla" is bit for bit the former models.layers.srms_norm (copied here as it was) in bf16, and its
    gradient XLA autodiff's of it; "auto" on CPU is "xla"; srms_norm_residual's "xla" is (x, that) with autodiff's
    gradient."""
    x, g = _inputs(rng, (2, 8, 48), jnp.bfloat16)

    def former(x):
        xf = x.astype(jnp.float32)
        return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + EPS)).astype(x.dtype)

    want = jax.jit(lambda x, g: (former(x), jax.vjp(former, x)[1](g)[0]))(x, g)
    for impl in ("xla", "auto"):
        for a, b in zip(_fwd_bwd(impl)(x, g), want, strict=True):
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    d = _inputs(rng, x.shape, jnp.bfloat16)[1]  # srms_norm_residual's "xla": autodiff adds its two cotangents
    want = jax.jit(lambda x, d, g: ((x, former(x)), jax.vjp(lambda x: (x, former(x)), x)[1]((d, g))[0]))(x, d, g)
    for a, b in zip(jax.tree.leaves(_residual_fwd_bwd("xla")(x, d, g)), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def _compiled_fwd_bwd(x, g):
    """Forward and backward through the compiled kernels (`_fused`: "pallas_triton" is refused off a GPU)."""
    y, vjp = jax.vjp(lambda x: rms_norm._fused(x, rms_norm._Launch(EPS, rms_norm.DEFAULT, False)), x)
    return y, vjp(g)


@pytest.mark.parametrize("width", [2048, 2560, 8192])
@pytest.mark.parametrize("device", [H200, A100], ids=["h200", "a100"])
def test_lowers_to_triton(device, width):
    """Without a GPU: forward and backward at T = 64K in bf16 lower to two Triton kernels for an H200 and an A100
    (sm_80), at d_model 2048, 2560 (Mamba-2 2.7B: padded to 4096, masked) and the widest, 8192."""
    mesh = AbstractMesh((1,), ("x",), axis_types=(AxisType.Auto,), abstract_device=device)
    x = jax.ShapeDtypeStruct((1, 65536 if width < 8192 else 64, width), jnp.bfloat16)
    assert cuda_mlir(_compiled_fwd_bwd, mesh, x, x).count(pl_triton.CUSTOM_CALL_TARGET_NAME) == 2


def test_lowers_to_triton_under_shard_map():
    """Without a GPU: the compiled kernels per shard in a shard_map over 8 abstract H200s with check_vma on (the
    rows sharded): the kernels' outputs vary with the rows."""
    mesh = AbstractMesh((8,), ("rows",), axis_types=(AxisType.Explicit,), abstract_device=H200)
    rows = P(None, "rows")
    x = jax.ShapeDtypeStruct((2, 64, 256), jnp.bfloat16, sharding=NamedSharding(mesh, rows))
    local = jax.shard_map(_compiled_fwd_bwd, mesh=mesh, in_specs=(rows, rows), out_specs=(rows, (rows,)))
    assert cuda_mlir(local, mesh, x, x).count(pl_triton.CUSTOM_CALL_TARGET_NAME) == 2


@functools.cache
def _tiny_model():
    """A 2-layer TNL (d 32), its state, a batch and its one-device "xla" results."""
    cfg = helpers.tiny("tnl-tiny", norm_impl="xla")
    graphdef, state = nnx.split(models.build_model(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(1)
    batch = (helpers.tokens(rng, t=16), helpers.tokens(rng, t=16), jnp.ones((2, 16), jnp.float32))
    return cfg, state, batch, helpers.loss_grads_logits(graphdef)(state, *batch)


def test_model_on_a_mesh_with_kernels_equals_xla():
    """norm_impl="pallas_triton_interpret" on an Explicit 2 x 2 (data, seq) mesh with FSDP parameters, the kernels
    per device inside models.sharding.per_device's shard_map, gives the one-device "xla" model's loss, logits and
    every gradient. 15 kernel calls: the five norms (two per block, the final one) forward for the loss and for
    the logits, and backward for the loss, the blocks' four (srms_norm_residual) adding the residual's cotangent
    (three inputs and dx: four block mappings). Measured: loss equal, logits 1.5e-7, gradients 4.5e-7 (worst
    leaf; on one device 5.5e-7; 6.8e-7 and 5.9e-7 before the residual op)."""
    cfg, state, batch, ((ref_loss, ref_logits), ref_grads) = _tiny_model()
    cfg = cfg.replace(norm_impl="pallas_triton_interpret")
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: models.build_model(cfg, rngs=nnx.Rngs(0))))
    mesh = helpers.make_mesh((2, 2))
    state = helpers.shard_state(state, mesh, cfg)
    run = helpers.loss_grads_logits(graphdef)
    with jax.set_mesh(mesh):
        batch = tuple(helpers.shard_batch(a, mesh) for a in batch)
        traced = run.trace(state, *batch)
        launches = [line.count("BlockMapping(") for line in traced.jaxpr.pretty_print().splitlines()
                    if "grid_mapping=GridMapping(" in line]
        assert Counter(launches) == {2: 10, 3: 1, 4: 4}, launches  # forwards; the final norm's backward; blocks'
        (loss, logits), grads = traced.lower().compile()(state, *batch)
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-6)
    assert helpers.max_rel(logits, ref_logits) < 6e-7
    assert helpers.max_rel(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)) < 2e-6


@pytest.mark.parametrize(("x", "message"), [
    (jnp.zeros((2, 4), jnp.int32), "x must be a floating-point array"),
    (jnp.zeros((), jnp.float32), "at least 1 dim"),
    ([1.0, 2.0], "x must be a floating-point array"),
], ids=["int", "scalar", "list"])
def test_bad_inputs_refused(x, message):
    with pytest.raises(ValueError, match=message):
        rms_norm.srms_norm(x, eps=EPS)


def test_bad_launch_sizes_refused():
    with pytest.raises(ValueError, match="Config.elems_per_warp must be a positive int; got 0"):
        rms_norm.Config(elems_per_warp=0)
    with pytest.raises(ValueError, match="Config.fwd_block must be a positive int; got -8"):
        rms_norm.Config(fwd_block=-8)


def test_bad_impls_refused():
    """An unknown impl names the choices; the kernels refuse (with the reason) a width over MAX_WIDTH, no rows,
    float8 and, compiled, a CPU; named, they are refused under a mesh XLA partitions, where "auto" takes xla."""
    call = functools.partial(rms_norm.srms_norm, eps=EPS)
    x = jnp.zeros((2, 8, 32))
    with pytest.raises(ValueError, match=r"unknown impl 'triton': expected one of \('auto', 'xla'"):
        call(x, impl="triton")
    for bad, message in ((jnp.zeros((2, 8192 + 64)), "width D = 8256 is over 8192"), (jnp.zeros((0, 32)), "is empty"),
                         (jnp.zeros((2, 32), jnp.float8_e4m3fn), "x is float8_e4m3fn")):
        with pytest.raises(ValueError, match=message):
            call(bad, impl="pallas_triton_interpret")
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        call(x, impl="pallas_triton")
    mesh = jax.make_mesh((8,), ("rows",), axis_types=(AxisType.Auto,))
    sharded = jax.device_put(x, NamedSharding(mesh, P(None, "rows")))
    with pytest.raises(ValueError, match="runs per device"):
        jax.jit(functools.partial(call, impl="pallas_triton_interpret"))(sharded)
    assert rms_norm.resolve("pallas_triton_interpret", sharded, per_device=True) == "pallas_triton_interpret"
    assert jax.jit(call)(sharded).shape == x.shape  # "auto" takes xla there


def test_auto_takes_the_kernels_only_where_qualified(monkeypatch):
    """"auto" consults QUALIFIED_GPUS by device kind: "xla" unless this device's kind is listed, and then still
    "xla" where the kernels cannot run x (supported's reason) or the call is partitioned by XLA."""
    x = jnp.zeros((2, 8, 32))
    monkeypatch.setattr(rms_norm, "supported", lambda *a, **k: None)
    assert rms_norm.resolve("auto", x) == "xla"
    monkeypatch.setattr(rms_norm, "QUALIFIED_GPUS", (jax.devices()[0].device_kind,))
    assert rms_norm.resolve("auto", x) == "pallas_triton"
    mesh = jax.make_mesh((8,), ("rows",), axis_types=(AxisType.Auto,))
    assert rms_norm.resolve("auto", jax.device_put(x, NamedSharding(mesh, P(None, "rows")))) == "xla"
    monkeypatch.setattr(rms_norm, "supported", lambda *a, **k: "a reason")
    assert rms_norm.resolve("auto", x) == "xla"


def test_model_config_checks_norm_impl():
    assert models.ModelConfig().norm_impl == "auto"
    with pytest.raises(ValueError, match="norm_impl must be one of"):
        models.ModelConfig(norm_impl="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("width", [2048, 2560])
def test_gpu_matches_xla(width, rng):
    """The compiled kernels (default launch sizes) at [65536, D] bf16 (D 2048: Mamba-2 1.3B; 2560: 2.7B, padding
    columns masked), y and dx against xla in float32 on the same inputs: within the CPU tests' bf16 bound, and
    within 1.1x xla's own bf16 path's error (both round y and dx to bf16 once)."""
    x, g = _inputs(rng, (1, 65536, width), jnp.bfloat16)
    want = _fwd_bwd("xla")(*_f32(x, g))
    errs = {impl: [rel_err(a, b) for a, b in zip(_fwd_bwd(impl, rms_norm.DEFAULT)(x, g), want, strict=True)]
            for impl in ("pallas_triton", "xla")}
    assert max(errs["pallas_triton"]) < BF16_TOL, errs
    assert all(k <= 1.1 * a for k, a in zip(errs["pallas_triton"], errs["xla"], strict=True)), errs


@pytest.mark.gpu
def test_gpu_residual_matches_xla(rng):
    """srms_norm_residual compiled (default launch sizes) at [65536, 2048] bf16, both cotangents random: x passed
    through bit-equal; y and dx against the xla path in float32 within the CPU tests' bf16 bound, dx no further off
    than the xla path's own bf16 autodiff (CPU: 0.91-0.92x of it, one rounding instead of two)."""
    x, g = _inputs(rng, (1, 65536, 2048), jnp.bfloat16)
    d = _inputs(rng, x.shape, jnp.bfloat16)[1]

    def run(impl, *args):
        out, vjp = jax.vjp(functools.partial(rms_norm.srms_norm_residual, eps=EPS, impl=impl), args[0])
        return out, vjp(args[1:])[0]

    (x_out, y), dx = jax.jit(functools.partial(run, "pallas_triton"))(x, d, g)
    (_, want_y), want_dx = jax.jit(functools.partial(run, "xla"))(*_f32(x, d, g))
    _, xla_dx = jax.jit(functools.partial(run, "xla"))(x, d, g)
    np.testing.assert_array_equal(np.asarray(x_out, np.float32), np.asarray(x, np.float32))
    errs = (rel_err(y, want_y), rel_err(dx, want_dx), rel_err(xla_dx, want_dx))
    assert max(errs[:2]) < BF16_TOL and errs[1] <= errs[2], errs
