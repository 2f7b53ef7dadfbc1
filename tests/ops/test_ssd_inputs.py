"""lasp_jax.ops.ssd_inputs: the fused backward kernel (interpreted on CPU) against the xla path's autodiff.

CPU (CI): small launch sizes so that every code path runs (several row blocks with the last one past the rows'
end, x-part programs of two heads, B and C parts of two column blocks with a masked tail, P and G*N not powers of
two); the outputs and every gradient in float32 and bf16; inside a shard_map over 8 CPU devices; lowered to
Triton for abstract GPUs. GPU (`pytest -m gpu`): the compiled kernel at Mamba-2 1.3B's shape against xla.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import triton as pl_triton
from jax.sharding import AbstractMesh, AxisType, NamedSharding, PartitionSpec as P

from lasp_jax.ops import ssd_inputs
from tests.util import A100, H200, cuda_mlir, rel_err

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")

OUTS = ("q", "k", "v", "x", "rates")
GRADS = ("dxbc", "ddt_raw", "ddt_bias", "da_log")
# Relative errors against xla in float32 on the same inputs, ~2-3x the worst measured over seeds 0-2, both
# shapes below (XLA:CPU, interpreted kernel, 2026-11-30). fp32: dxbc 5.6e-8, ddt_raw 1.1e-7; the parameters'
# sums over 74 rows (another order) 2.5e-7. bf16: dxbc 1.73e-3, ddt_raw 1.97e-3, ddt_bias 1.65e-3, da_log 3.6e-7
# (float32 all through: the rates' cotangent is float32); xla's own bf16 autodiff there: dxbc 4.2e-3, ddt_raw
# 4.4e-3, ddt_bias 4.8e-3 (it rounds g_v dt, the sum g_x + g_v dt and the sum over P to bf16; the kernel rounds
# d_xbc once and keeps dt's cotangent float32).
F32_TOL = 3e-7
F32_SUM_TOL = 8e-7
BF16_TOL = {"dxbc": 4e-3, "ddt_raw": 5e-3, "ddt_bias": 5e-3, "da_log": 1e-6}
# (H, P, G, N): Mamba-2's split at test size; the second with P = 12 and G*N = 12 (masked columns).
SHAPES = {"g1": (4, 16, 1, 8), "g2": (4, 12, 2, 6)}
LEAD = (2, 37)  # 74 rows: 9 blocks of 8 and 2 rows past the last
SMALL = ssd_inputs.Config(rows=8, heads=2, bc_width=8)


def _inputs(rng, lead, heads, head_dim, groups, d_state, dtype):
    """((xbc [*lead, C], dt_raw [*lead, H] in dtype, dt_bias, a_log [H] float32), the outputs' cotangents: q, k
    [*lead, G, N], v, x [*lead, H, P] in dtype and the rates' [*lead, H] float32), all random."""
    def normal(*shape, scale=1.0, shift=0.0, dtype=dtype):
        return jnp.asarray(scale * rng.standard_normal(shape, np.float32) + shift, dtype)

    channels = heads * head_dim + 2 * groups * d_state
    a_log = jnp.log(jnp.asarray(rng.uniform(1.0, 16.0, heads), jnp.float32))
    args = (normal(*lead, channels, scale=2.0), normal(*lead, heads), normal(heads, shift=-3.0, dtype=jnp.float32),
            a_log)
    cotangents = (normal(*lead, groups, d_state), normal(*lead, groups, d_state), normal(*lead, heads, head_dim),
                  normal(*lead, heads, head_dim), normal(*lead, heads, dtype=jnp.float32))
    return args, cotangents


def _fwd_bwd(impl, shape, config=ssd_inputs.DEFAULT):
    """jit(inputs, cotangents -> (outputs, gradients)) of ssd_inputs at shape (H, P, G, N)."""
    heads, head_dim, groups, d_state = shape
    op = functools.partial(ssd_inputs.ssd_inputs, heads=heads, head_dim=head_dim, groups=groups, d_state=d_state,
                           impl=impl, config=config)

    def run(args, cotangents):
        outs, vjp = jax.vjp(op, *args)
        return outs, vjp(cotangents)

    return jax.jit(run)


def _f32(tree):
    return jax.tree.map(lambda a: a.astype(jnp.float32), tree)


def _grad_errors(got, want) -> dict[str, float]:
    return {n: rel_err(a, b) for n, a, b in zip(GRADS, got[1], want[1], strict=True)}


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_kernel_matches_xla(dtype, shape, rng):
    """The kernel path (interpreted) against xla on the same inputs: the outputs bit for bit (its forward is
    xla's), every gradient against xla's autodiff in float32 on the upcast inputs; in bf16 also at least as close
    as xla's own bf16 autodiff on d_xbc and d_dt_raw (the kernel rounds once, autodiff three times)."""
    args, cts = _inputs(rng, LEAD, *SHAPES[shape], dtype)
    got = _fwd_bwd("pallas_triton_interpret", SHAPES[shape], SMALL)(args, cts)
    same = _fwd_bwd("xla", SHAPES[shape])(args, cts)
    for name, a, b in zip(OUTS, got[0], same[0], strict=True):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32), err_msg=name)
    assert [g.dtype for g in got[1]] == [dtype, dtype, jnp.float32, jnp.float32]
    want = _fwd_bwd("xla", SHAPES[shape])(_f32(args), _f32(cts))
    errs = _grad_errors(got, want)
    if dtype == jnp.float32:
        assert max(errs["dxbc"], errs["ddt_raw"]) < F32_TOL, errs
        assert max(errs["ddt_bias"], errs["da_log"]) < F32_SUM_TOL, errs
    else:
        assert all(errs[n] < BF16_TOL[n] for n in GRADS), errs
        autodiff = _grad_errors(same, want)
        assert errs["dxbc"] < autodiff["dxbc"] and errs["ddt_raw"] < autodiff["ddt_raw"], (errs, autodiff)


def test_launch_covers_every_path():
    """SMALL at the tests' shapes: several row blocks, the last partly past the 74 rows; x-part programs of two
    heads; B and C of two column blocks each, the second partly masked where G*N = 12."""
    assert 74 // SMALL.rows >= 2 and 74 % SMALL.rows
    for heads, head_dim, groups, d_state in SHAPES.values():
        assert ssd_inputs._heads_per_program(heads, SMALL.heads) == 2 < heads
    assert -(-12 // SMALL.bc_width) == 2 and 12 % SMALL.bc_width


def test_xla_path_is_the_models_former_code(rng):
    """impl "xla" is bit for bit the math models/mamba2.py's `_ssd_inputs` ran before this op (copied here as it
    was), in bf16 with float32 parameters, G = 2, outputs and gradients; "auto" on CPU is "xla"."""
    shape = SHAPES["g2"]
    heads, head_dim, groups, d_state = shape
    args, cts = _inputs(rng, (2, 8), *shape, jnp.bfloat16)

    def former(xbc, dt, dt_bias, a_log):
        inner, gn = heads * head_dim, groups * d_state
        xbc = jax.nn.silu(xbc)
        x = xbc[..., :inner].reshape(*xbc.shape[:-1], heads, head_dim)
        k = xbc[..., inner:inner + gn].reshape(*xbc.shape[:-1], groups, d_state)
        q = xbc[..., inner + gn:].reshape(*xbc.shape[:-1], groups, d_state)
        dt = jax.nn.softplus(dt.astype(jnp.float32) + dt_bias.astype(jnp.float32))
        rates = dt * jnp.exp(a_log.astype(jnp.float32))
        v = x * dt[..., None].astype(x.dtype)
        return q, k, v, x, rates

    @jax.jit
    def run_former(args, cts):
        outs, vjp = jax.vjp(former, *args)
        return outs, vjp(cts)

    want = run_former(args, cts)
    for impl in ("xla", "auto"):
        got = _fwd_bwd(impl, shape)(args, cts)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_shard_map_over_rows_equals_unsharded(rng):
    """The kernel path per shard inside a shard_map over 8 CPU devices (T = 40 split 5 rows per shard, dt_bias
    and A_log replicated) gives the unsharded result: the outputs and the row gradients bit for bit, the
    parameters' gradients (the shards' float32 sums, summed) to float32 rounding. check_vma=False: jax 0.11.2's
    Pallas interpreter pads its masked loads with an invariant value that check_vma rejects (the compiled kernel
    lowers with it on: test_lowers_to_triton)."""
    shape = SHAPES["g2"]
    args, cts = _inputs(rng, (2, 40), *shape, jnp.float32)
    whole = _fwd_bwd("pallas_triton_interpret", shape, SMALL)(args, cts)
    mesh = jax.make_mesh((8,), ("rows",))
    rows = P(None, "rows")
    specs = (rows, rows, P(), P())
    heads, head_dim, groups, d_state = shape
    op = functools.partial(ssd_inputs.ssd_inputs, heads=heads, head_dim=head_dim, groups=groups, d_state=d_state,
                           impl="pallas_triton_interpret", config=SMALL)
    sharded = jax.shard_map(op, mesh=mesh, in_specs=specs, out_specs=rows, check_vma=False)

    @jax.jit
    def run(args, cts):
        outs, vjp = jax.vjp(sharded, *args)
        return outs, vjp(cts)

    put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))  # noqa: E731
    got = run(tuple(map(put, args, specs)), tuple(put(c, rows) for c in cts))
    for name, a, b in zip(OUTS + GRADS, jax.tree.leaves(got), jax.tree.leaves(whole), strict=True):
        if name in ("ddt_bias", "da_log"):
            assert rel_err(a, b) < F32_SUM_TOL, name
        else:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


def _compiled_fwd_bwd(shape):
    """Forward and backward through the compiled kernel (`_kernel_path`: "pallas_triton" is refused off a GPU)."""
    dims = ssd_inputs._Dims(*shape, ssd_inputs.DEFAULT, False)

    def run(xbc, dt_raw, dt_bias, a_log, *cts):
        outs, vjp = jax.vjp(lambda *a: ssd_inputs._kernel_path(*a, dims), xbc, dt_raw, dt_bias, a_log)
        return outs, vjp(cts)

    return run


# Mamba-2 1.3B at T = 64K: H = 64 heads of P = 64, G = 1 group of N = 128 (C = 4352).
MAMBA2 = (64, 64, 1, 128)


def _abstract(mesh, lead, shape, spec_rows=P(), dtype=jnp.bfloat16):
    """Abstract inputs and cotangents at (H, P, G, N) with leading dims lead (rows on spec_rows)."""
    heads, head_dim, groups, d_state = shape

    def arr(*s, dt=dtype, spec=spec_rows):
        return jax.ShapeDtypeStruct(s, dt, sharding=NamedSharding(mesh, spec))

    return (arr(*lead, heads * head_dim + 2 * groups * d_state), arr(*lead, heads),
            arr(heads, dt=jnp.float32, spec=P()), arr(heads, dt=jnp.float32, spec=P()),
            arr(*lead, groups, d_state), arr(*lead, groups, d_state), arr(*lead, heads, head_dim),
            arr(*lead, heads, head_dim), arr(*lead, heads, dt=jnp.float32))


@pytest.mark.parametrize("device", [H200, A100], ids=["h200", "a100"])
def test_lowers_to_triton(device):
    """Without a GPU: forward and backward at Mamba-2 1.3B's shape (T = 64K, bf16) lower to one Triton kernel for
    an H200 and an A100 (sm_80); and per shard inside a shard_map over 8 abstract GPUs with check_vma on (the
    kernel's outputs vary with the rows, dt_bias's and A_log's gradients are the shards' sums)."""
    one = AbstractMesh((1,), ("x",), axis_types=(AxisType.Auto,), abstract_device=device)
    text = cuda_mlir(_compiled_fwd_bwd(MAMBA2), one, *_abstract(one, (1, 65536), MAMBA2))
    assert text.count(pl_triton.CUSTOM_CALL_TARGET_NAME) == 1
    mesh = AbstractMesh((8,), ("rows",), axis_types=(AxisType.Explicit,), abstract_device=device)
    rows = P(None, "rows")
    local = jax.shard_map(_compiled_fwd_bwd(SHAPES["g2"]), mesh=mesh,
                          in_specs=(rows, rows, P(), P(), *(rows,) * 5), out_specs=(rows, (rows, rows, P(), P())))
    text = cuda_mlir(local, mesh, *_abstract(mesh, (2, 64), SHAPES["g2"], rows))
    assert text.count(pl_triton.CUSTOM_CALL_TARGET_NAME) == 1


def _args(**changes):
    shapes = dict(xbc=(2, 3, 48), dt_raw=(2, 3, 4), dt_bias=(4,), a_log=(4,)) | changes
    return {name: jnp.zeros(shape, jnp.float32) for name, shape in shapes.items()}


SPLIT = dict(heads=4, head_dim=8, groups=2, d_state=4)  # C = 32 + 16 = 48


@pytest.mark.parametrize(("changes", "message"), [
    (dict(xbc=(2, 3, 40)), r"xbc must be \[..., H\*P \+ 2\*G\*N\] = \[..., 48\]"),
    (dict(dt_raw=(2, 3, 2)), r"dt_raw must be \[..., H\] = \(2, 3, 4\)"),
    (dict(dt_raw=(3, 4)), r"dt_raw must be \[..., H\]"),
    (dict(dt_bias=(8,)), r"dt_bias must be \[H\]"),
    (dict(a_log=(4, 1)), r"a_log must be \[H\]"),
], ids=["xbc", "dt_heads", "dt_rows", "dt_bias", "a_log"])
def test_bad_shapes_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        ssd_inputs.ssd_inputs(**_args(**changes), **SPLIT)


def test_bad_arguments_refused():
    """Non-float arrays, non-positive dims and launch sizes that are not Triton tiles name what is wrong."""
    with pytest.raises(ValueError, match="xbc must be a floating-point array, got int32"):
        ssd_inputs.ssd_inputs(**(_args() | {"xbc": jnp.zeros((2, 3, 48), jnp.int32)}), **SPLIT)
    with pytest.raises(ValueError, match="d_state must be a positive int; got 0"):
        ssd_inputs.ssd_inputs(**_args(), **(SPLIT | {"d_state": 0}))
    with pytest.raises(ValueError, match="Config.rows must be a positive power of two"):
        ssd_inputs.Config(rows=48)
    with pytest.raises(ValueError, match="Config.heads must be a positive int"):
        ssd_inputs.Config(heads=0)


def test_bad_impls_refused():
    """An unknown impl names the choices; the kernel refuses no rows, 2^31 elements or more and, compiled, a CPU;
    named, it is refused under a mesh XLA partitions, where "auto" takes xla."""
    call = functools.partial(ssd_inputs.ssd_inputs, **SPLIT)
    with pytest.raises(ValueError, match=r"unknown impl 'triton': expected one of \('auto', 'xla'"):
        call(**_args(), impl="triton")
    with pytest.raises(ValueError, match="no rows"):
        call(**_args(xbc=(2, 0, 48), dt_raw=(2, 0, 4)), impl="pallas_triton_interpret")
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        call(**_args(), impl="pallas_triton")
    assert "int32" in ssd_inputs.supported(jax.ShapeDtypeStruct((8, 65536, 4352), jnp.bfloat16), interpret=True)
    mesh = jax.make_mesh((8,), ("rows",), axis_types=(AxisType.Auto,))
    args = {n: jax.device_put(a, NamedSharding(mesh, P(None, "rows") if a.ndim > 1 else P()))
            for n, a in _args(xbc=(2, 8, 48), dt_raw=(2, 8, 4)).items()}
    with pytest.raises(ValueError, match="runs per device"):
        jax.jit(functools.partial(call, impl="pallas_triton_interpret"))(**args)
    assert jax.jit(call)(**args)[2].shape == (2, 8, 4, 8)


def test_auto_takes_the_kernel_only_where_qualified(monkeypatch):
    """"auto" consults QUALIFIED_GPUS by device kind: "xla" unless this device's kind is listed, and then still
    "xla" where the kernel cannot run the inputs (supported's reason) or the call is partitioned by XLA."""
    xbc = _args()["xbc"]
    monkeypatch.setattr(ssd_inputs, "supported", lambda *a, **k: None)
    assert ssd_inputs.resolve("auto", xbc) == "xla"
    monkeypatch.setattr(ssd_inputs, "QUALIFIED_GPUS", (jax.devices()[0].device_kind,))
    assert ssd_inputs.resolve("auto", xbc) == "pallas_triton"
    mesh = jax.make_mesh((8,), ("rows",), axis_types=(AxisType.Auto,))
    assert ssd_inputs.resolve("auto", jax.device_put(jnp.zeros((2, 8, 48)), NamedSharding(mesh, P(None, "rows")))) \
        == "xla"
    monkeypatch.setattr(ssd_inputs, "supported", lambda *a, **k: "a reason")
    assert ssd_inputs.resolve("auto", xbc) == "xla"


# At 64K rows da_log is a float32 sum of 65536 random-sign terms per head in another order than autodiff's (the
# CPU tests sum 74): a bound for that order's rounding, not measured on a GPU yet (the test prints the figure).
GPU_TOL = BF16_TOL | {"da_log": 1e-5}


@pytest.mark.gpu
def test_gpu_mamba2_shape_matches_xla(rng):
    """The compiled kernel (default launch sizes) in bf16 at Mamba-2 1.3B's shape (T = 64K, C = 4352, H = 64, P =
    64, G = 1, N = 128): the outputs as xla's bf16 path gives them, every gradient against xla in float32 on the
    same inputs within the CPU tests' bf16 bounds (da_log: GPU_TOL) and, for d_xbc and d_dt_raw, no worse than
    xla's own bf16 autodiff (within 25%: XLA:GPU may keep autodiff's intermediates in float32 inside a fusion,
    as the kernel does). Prints the errors."""
    args, cts = _inputs(rng, (1, 65536), *MAMBA2, jnp.bfloat16)
    want = _fwd_bwd("xla", MAMBA2)(_f32(args), _f32(cts))
    got = _fwd_bwd("pallas_triton", MAMBA2)(args, cts)
    same = _fwd_bwd("xla", MAMBA2)(args, cts)
    outs = {n: rel_err(a, b) for n, a, b in zip(OUTS, got[0], same[0], strict=True)}
    errs, autodiff = _grad_errors(got, want), _grad_errors(same, want)
    print(f"\noutputs against xla bf16: {outs}\nkernel against xla fp32: {errs}\nxla bf16 autodiff: {autodiff}")
    assert max(outs.values()) < 4e-3, outs  # the same ops; at most XLA's own fusion-dependent bf16 rounding
    assert all(errs[n] < GPU_TOL[n] for n in GRADS), errs
    assert all(errs[n] <= 1.25 * autodiff[n] for n in ("dxbc", "ddt_raw")), (errs, autodiff)
