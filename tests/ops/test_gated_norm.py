"""lasp_jax.ops.gated_norm: the fused Pallas kernels (interpreted on CPU) against the xla path.

CPU (CI): small launch sizes so that every code path runs (several row blocks, backward programs looping over
several blocks, a last block and a last program past the rows' end, G = 1 and 2); the forward and every gradient
in float32 and bf16; under jit, inside a shard_map over 8 CPU devices, and lowered to Triton for abstract GPUs.
GPU (`pytest -m gpu`): the compiled kernels at Mamba-2 1.3B's shape against xla in float32.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import triton as pl_triton
from jax.sharding import AbstractMesh, AxisType, NamedSharding, PartitionSpec as P

from lasp_jax.ops import gated_norm, kernel_support
from tests.util import A100, H200, cuda_mlir, rel_err

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")

EPS = 1e-5
NAMES = ("out", "do", "dx", "dD", "dz", "dweight")
# Relative errors against xla in float32 on the same inputs, ~2-3x the worst measured over seeds 0-2 and G = 1, 2
# (XLA:CPU, interpreted kernels, 2026-11-30). Output and input gradients: fp32 1.4e-7; bf16 1.8e-3 (one bf16
# rounding, the same as xla's own bf16 path shows). dD and dweight, float32 sums in another order: 5.9e-7 (fp32
# inputs), 8.5e-7 (bf16; dD has only H = 4 sums, some with cancellation).
F32_TOL = 4e-7
BF16_TOL = 4e-3
SUM_TOL = 2e-6


def _small(width: int) -> gated_norm.Config:
    """Launch sizes for the CPU shapes: 4-row forward blocks, 2-row backward blocks, 8 of them per program."""
    return gated_norm.Config(fwd_block=4 * width, bwd_block=2 * width, target_programs=6)


def _inputs(rng, lead, heads, head_dim, dtype):
    """o, x [*lead, H, P], D [H], z [*lead, H*P], weight [H*P] and the output's cotangent [*lead, H*P]; the
    activations and the cotangent in dtype, D and weight float32 as in the model."""
    keys = iter(jax.random.split(jax.random.key(int(rng.integers(2**31))), 6))  # on device: quick at 64K rows

    def normal(*shape, scale=1.0, dtype=dtype):
        return (scale * jax.random.normal(next(keys), shape, jnp.float32)).astype(dtype)

    channels = heads * head_dim
    return ((normal(*lead, heads, head_dim), normal(*lead, heads, head_dim), normal(heads, dtype=jnp.float32),
             normal(*lead, channels, scale=2.0), 1.0 + normal(channels, scale=0.1, dtype=jnp.float32)),
            normal(*lead, channels))


def _fwd_bwd(impl, groups, out_dtype, config=gated_norm.DEFAULT, op=gated_norm.gated_rms_norm):
    """jit(inputs, cotangent -> (out, (do, dx, dD, dz, dweight))) of op (gated_rms_norm; gated_rms_norm_project:
    the inputs end with w_proj, and its gradient ends the tuple)."""
    def run(args, g):
        out, vjp = jax.vjp(functools.partial(op, groups=groups, eps=EPS, out_dtype=out_dtype, impl=impl,
                                             config=config), *args)
        return out, vjp(g)

    return jax.jit(run)


def _f32(tree):
    return jax.tree.map(lambda a: a.astype(jnp.float32), tree)


def _errors(got, want) -> dict[str, float]:
    return {n: rel_err(a, b) for n, a, b in zip(NAMES, jax.tree.leaves(got), jax.tree.leaves(want), strict=True)}


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_kernels_match_xla(dtype, groups, rng):
    """The interpreted kernels' output and every gradient against xla in float32 on the same inputs; leading dims
    [2, 37] (74 rows: the last forward block and the last backward program run past the end). bf16: the output
    and the input gradients are rounded to bf16, the kernels' dtypes follow the inputs'."""
    args, g = _inputs(rng, (2, 37), 4, 16, dtype)
    got = _fwd_bwd("pallas_triton_interpret", groups, dtype, _small(64 // groups))(args, g)
    want = _fwd_bwd("xla", groups, jnp.float32)(_f32(args), _f32(g))
    assert [a.dtype for a in jax.tree.leaves(got)] == [dtype] * 3 + [jnp.float32, dtype, jnp.float32]
    errs = _errors(got, want)
    assert max(errs["dD"], errs["dweight"]) < SUM_TOL, errs
    assert max(errs[n] for n in ("out", "do", "dx", "dz")) < (F32_TOL if dtype == jnp.float32 else BF16_TOL), errs


def test_launch_covers_every_path():
    """_small's launches at the tests' 74 rows: several forward blocks with the last one partly past the end,
    several backward programs of several blocks each, the last with blocks wholly past the end (masked: they
    must add nothing to the sums)."""
    for groups in (1, 2):
        width = 64 // groups
        config = _small(width)
        assert kernel_support.block_rows(config.fwd_block, width) == 4 and 74 % 4
        rows = kernel_support.block_rows(config.bwd_block, width)
        blocks = gated_norm._run_blocks(74, rows, groups, config.target_programs)
        run = rows * blocks
        assert rows == 2 and blocks >= 4 and 74 // run >= 2 and 0 < 74 % run < run - rows, (groups, blocks)


def test_prefetch_changes_nothing(rng):
    """The backward's prefetch (Config.prefetch) moves its loads, not its math: with and without it the interpreted
    kernels give the same output and gradients bit for bit, the norm in bf16 (the prefetched blocks carried in
    bf16) and the norm with its projection in float32 (G = 2, _small's launches at 74 rows: programs of several
    blocks, the last with blocks past the rows' end)."""
    args, g = _inputs(rng, (2, 37), 4, 16, jnp.bfloat16)
    f32_args, _ = _inputs(rng, (2, 37), 4, 16, jnp.float32)
    w_proj, g_proj = _projection(rng, (2, 37), 64, 24, jnp.float32)
    results = []
    for prefetch in (False, True):
        config = dataclasses.replace(_small(32), prefetch=prefetch)
        results.append((_fwd_bwd("pallas_triton_interpret", 2, jnp.bfloat16, config)(args, g),
                        _project_fwd_bwd("pallas_triton_interpret", 2, jnp.float32, config)(f32_args, w_proj, g_proj)))
    for a, b in zip(*map(jax.tree.leaves, results), strict=True):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_xla_path_is_the_models_former_code(rng):
    """impl "xla" is bit for bit the math models/mamba2.py's `_out` ran before the out-projection (copied here as
    it was), in bf16 with float32 D and weight, G = 2; "auto" on CPU is "xla"."""
    (o, x, d, z, w), _ = _inputs(rng, (2, 8), 4, 16, jnp.bfloat16)

    def former(o, x, z):
        y = o.astype(jnp.float32) + d.astype(jnp.float32)[:, None] * x.astype(jnp.float32)
        y = y.reshape(*y.shape[:-2], -1) * jax.nn.silu(z.astype(jnp.float32))
        grouped = y.reshape(*y.shape[:-1], 2, -1)
        grouped = grouped * jax.lax.rsqrt(jnp.mean(grouped * grouped, axis=-1, keepdims=True) + EPS)
        y = grouped.reshape(y.shape) * w.astype(jnp.float32)
        return y.astype(jnp.bfloat16)

    want = jax.jit(former)(o, x, z)
    for impl in ("xla", "auto"):
        got = jax.jit(functools.partial(gated_norm.gated_rms_norm, groups=2, eps=EPS, out_dtype=jnp.bfloat16,
                                        impl=impl))(o, x, d, z, w)
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_shard_map_over_rows_equals_unsharded(rng):
    """The interpreted kernels per shard inside a shard_map over 8 CPU devices (T = 40 split 5 rows per shard, D and
    weight replicated) give the unsharded result: the output and the row gradients bit for bit, dD and dweight
    (the shards' float32 sums, summed) to float32 rounding. check_vma=False: jax 0.11.2's Pallas interpreter pads
    its masked loads with an invariant value that check_vma rejects (the compiled kernels lower with it on:
    test_lowers_to_triton_under_shard_map)."""
    args, g = _inputs(rng, (2, 40), 4, 16, jnp.float32)
    config = _small(32)
    whole = _fwd_bwd("pallas_triton_interpret", 2, jnp.float32, config)(args, g)
    mesh = jax.make_mesh((8,), ("rows",))
    rows = P(None, "rows")
    specs = (rows, rows, P(), rows, P())
    norm = functools.partial(gated_norm.gated_rms_norm, groups=2, eps=EPS, out_dtype=jnp.float32,
                             impl="pallas_triton_interpret", config=config)
    sharded = jax.shard_map(norm, mesh=mesh, in_specs=specs, out_specs=rows, check_vma=False)

    @jax.jit
    def run(args, g):
        out, vjp = jax.vjp(sharded, *args)
        return out, vjp(g)

    put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
    got = run(tuple(map(put, args, specs)), put(g, rows))
    for name, a, b in zip(NAMES, jax.tree.leaves(got), jax.tree.leaves(whole), strict=True):
        if name in ("dD", "dweight"):
            assert rel_err(a, b) < SUM_TOL, name
        else:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)



# gated_rms_norm_project, measured as above (seeds 0-2, G = 1, 2, D_out = 24): fp32 at most 1.3e-7 (dD 5.5e-7); bf16
# 2.7e-3, and dD 5.2e-3 / dweight 1.9e-3: in bf16 the norm's cotangent is the projection's, rounded to bf16 (as
# autodiff of the norm and a bf16 matmul rounds it).
PROJECT_BF16_TOL = 6e-3
PROJECT_BF16_SUM_TOL = 1.2e-2


def _project_fwd_bwd(impl, groups, out_dtype, config=gated_norm.DEFAULT):
    """_fwd_bwd of gated_rms_norm_project, taking (inputs, w_proj, cotangent)."""
    run = _fwd_bwd(impl, groups, out_dtype, config, op=gated_norm.gated_rms_norm_project)
    return lambda args, w_proj, g: run((*args, w_proj), g)


def _projection(rng, lead, channels, d_out, dtype):
    """w_proj [channels, d_out] (scale channels^-0.5) and the output's cotangent [*lead, d_out], in dtype."""
    k1, k2 = jax.random.split(jax.random.key(int(rng.integers(2**31))))
    return ((jax.random.normal(k1, (channels, d_out)) * channels ** -0.5).astype(dtype),
            jax.random.normal(k2, (*lead, d_out)).astype(dtype))


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_project_matches_xla(dtype, groups, rng):
    """The norm and its projection as one op (the kernels interpreted, the backward kernel writing the norm's
    output for w_proj's gradient) against xla's norm and matmul in float32, as test_kernels_match_xla."""
    args, _ = _inputs(rng, (2, 37), 4, 16, dtype)
    w_proj, g = _projection(rng, (2, 37), 64, 24, dtype)
    got = _project_fwd_bwd("pallas_triton_interpret", groups, dtype, _small(64 // groups))(args, w_proj, g)
    want = _project_fwd_bwd("xla", groups, jnp.float32)(_f32(args), _f32(w_proj), _f32(g))
    assert [a.dtype for a in jax.tree.leaves(got)] == [dtype] * 3 + [jnp.float32, dtype, jnp.float32, dtype]
    errs = {n: rel_err(a, b) for n, a, b in zip((*NAMES, "dw_proj"), jax.tree.leaves(got), jax.tree.leaves(want),
                                                 strict=True)}
    rows = ("out", "do", "dx", "dz", "dw_proj")
    if dtype == jnp.float32:
        assert max(errs["dD"], errs["dweight"]) < SUM_TOL and max(errs[n] for n in rows) < F32_TOL, errs
    else:
        assert max(errs["dD"], errs["dweight"]) < PROJECT_BF16_SUM_TOL, errs
        assert max(errs[n] for n in rows) < PROJECT_BF16_TOL, errs


def test_project_runs_no_forward_kernel_in_the_backward_under_remat(rng):
    """Under remat keeping the dots and the kernels' statistic r (STATS_NAME; the rest recomputed) the compiled
    gradient of gated_rms_norm_project computes as many transcendentals (sigmoid, rsqrt) as without remat: the
    forward kernel is not rerun, neither for r nor for w_proj's gradient, and the gradients are those without
    remat bit for bit. The count can tell: it rises where r is not kept (the forward kernel reruns for r; measured
    388 -> 648), and for the norm followed by a separate matmul (reruns for its output)."""
    args, _ = _inputs(rng, (2, 37), 4, 16, jnp.float32)
    w_proj, _ = _projection(rng, (2, 37), 64, 24, jnp.float32)
    options = dict(groups=1, eps=EPS, out_dtype=jnp.float32, impl="pallas_triton_interpret", config=_small(64))
    project = functools.partial(gated_norm.gated_rms_norm_project, **options)
    policies = jax.checkpoint_policies
    dots = policies.dots_saveable
    dots_and_stats = policies.save_from_both_policies(dots, policies.save_only_these_names(gated_norm.STATS_NAME))

    def norm_then_dot(o, x, d, z, w, w_proj):
        return jnp.dot(gated_norm.gated_rms_norm(o, x, d, z, w, **options), w_proj)

    def grad(fn, policy=None):
        loss = lambda *a: jnp.sum(fn(*a) ** 2)  # noqa: E731
        if policy is not None:
            loss = jax.checkpoint(loss, policy=policy)
        return jax.jit(jax.grad(loss, argnums=tuple(range(6)))).lower(*args, w_proj).compile()

    count = lambda compiled: compiled.cost_analysis()["transcendentals"]  # noqa: E731
    plain, remat = grad(project), grad(project, dots_and_stats)
    assert count(remat) == count(plain)
    for a, b in zip(remat(*args, w_proj), plain(*args, w_proj), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert count(grad(project, dots)) > count(plain)
    assert count(grad(norm_then_dot, dots_and_stats)) > count(grad(norm_then_dot))


def _compiled_fwd_bwd(groups, project=False, config=gated_norm.DEFAULT):
    """Forward and backward through the compiled kernels (`_kernels`: "pallas_triton" is refused off a GPU); with
    project, of the norm and a projection (the last argument before the cotangent)."""
    launch = gated_norm._Launch(groups, EPS, jnp.dtype(jnp.bfloat16), config, False)

    def run(*args):
        *inputs, g = args
        out, vjp = jax.vjp(lambda *a: gated_norm._kernels(*a[:5], launch, *a[5:]), *inputs)
        return out, vjp(g)

    return run


@pytest.mark.parametrize("prefetch", [False, True], ids=["plain", "prefetch"])
@pytest.mark.parametrize("project", [False, True], ids=["norm", "project"])
@pytest.mark.parametrize("device", [H200, A100], ids=["h200", "a100"])
def test_lowers_to_triton_at_mamba2_shape(device, project, prefetch):
    """Without a GPU: forward and backward at Mamba-2 1.3B's shape (T = 64K, H = 64, P = 64, G = 1, bf16) lower
    to two Triton kernels for an H200 and an A100 (sm_80, the oldest the lowering targets), with or without the
    out-projection (d_model 2048), with or without the backward's prefetch."""
    config = dataclasses.replace(gated_norm.DEFAULT, prefetch=prefetch)
    bf16 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    mesh = AbstractMesh((1,), ("x",), axis_types=(AxisType.Auto,), abstract_device=device)
    tail = (bf16(4096, 2048), bf16(1, 65536, 2048)) if project else (bf16(1, 65536, 4096),)
    text = cuda_mlir(_compiled_fwd_bwd(1, project, config), mesh, bf16(1, 65536, 64, 64), bf16(1, 65536, 64, 64),
                     f32(64), bf16(1, 65536, 4096), f32(4096), *tail)
    assert text.count(pl_triton.CUSTOM_CALL_TARGET_NAME) == 2


@pytest.mark.parametrize("project", [False, True], ids=["norm", "project"])
def test_lowers_to_triton_under_shard_map(project):
    """Without a GPU: the compiled kernels per shard inside a shard_map over 8 abstract H200s with check_vma on
    (the rows sharded, D, weight and the projection replicated): the kernels' outputs vary with the rows, the
    replicated inputs' gradients are the shards' sums."""
    mesh = AbstractMesh((8,), ("rows",), axis_types=(AxisType.Explicit,), abstract_device=H200)
    rows = P(None, "rows")
    shape = lambda *s, dtype=jnp.bfloat16, spec=rows: jax.ShapeDtypeStruct(
        s, dtype, sharding=NamedSharding(mesh, spec))
    args = [shape(2, 64, 4, 64), shape(2, 64, 4, 64), shape(4, dtype=jnp.float32, spec=P()), shape(2, 64, 256),
            shape(256, dtype=jnp.float32, spec=P())]
    specs = [rows, rows, P(), rows, P()]
    grads = [rows, rows, P(), rows, P()]
    if project:
        args.append(shape(256, 32, spec=P()))
        specs.append(P())
        grads.append(P())
    local = jax.shard_map(_compiled_fwd_bwd(2, project), mesh=mesh, in_specs=(*specs, rows),
                          out_specs=(rows, tuple(grads)))
    text = cuda_mlir(local, mesh, *args, shape(2, 64, 32 if project else 256))
    assert text.count(pl_triton.CUSTOM_CALL_TARGET_NAME) == 2


def _args(**changes):
    shapes = dict(o=(2, 3, 4, 8), x=(2, 3, 4, 8), d_skip=(4,), z=(2, 3, 32), weight=(32,)) | changes
    return {name: jnp.zeros(shape, jnp.float32) for name, shape in shapes.items()}


@pytest.mark.parametrize(("changes", "groups", "message"), [
    (dict(x=(2, 3, 4, 4)), 1, "x must have o's shape"),
    (dict(z=(2, 3, 16)), 1, r"z must be \[..., H\*P\]"),
    (dict(d_skip=(8,)), 1, r"d_skip must be \[H\]"),
    (dict(weight=(16,)), 1, r"weight must be \[H\*P\]"),
    (dict(o=(32,), x=(32,)), 1, r"o must be \[..., H, P\]"),
    ({}, 3, "groups must be a positive int dividing H\\*P = 32"),
    ({}, 0, "groups must be a positive int"),
], ids=["x", "z", "d_skip", "weight", "rank", "groups_3", "groups_0"])
def test_bad_shapes_refused(changes, groups, message):
    with pytest.raises(ValueError, match=message):
        gated_norm.gated_rms_norm(**_args(**changes), groups=groups, eps=EPS, out_dtype=jnp.float32)


@pytest.mark.parametrize("w_proj", [jnp.zeros((16, 8)), jnp.zeros((32,)), jnp.zeros((32, 8), jnp.int32), None],
                         ids=["rows", "rank", "int", "none"])
def test_bad_projection_refused(w_proj):
    with pytest.raises(ValueError, match=r"w_proj must be a floating-point \[H\*P, D_out\] = \[32, D_out\]"):
        gated_norm.gated_rms_norm_project(**_args(), w_proj=w_proj, groups=1, eps=EPS, out_dtype=jnp.float32)


def test_bad_impls_refused():
    """An unknown impl names the choices; the kernels refuse a group width that is not a power of two (with the
    reason) and, compiled, a CPU; named, they are refused under a mesh XLA partitions."""
    call = functools.partial(gated_norm.gated_rms_norm, groups=1, eps=EPS, out_dtype=jnp.float32)
    with pytest.raises(ValueError, match=r"unknown impl 'triton': expected one of \('auto', 'xla'"):
        call(**_args(), impl="triton")
    with pytest.raises(ValueError, match="group width H\\*P / groups = 24 is not a power of two"):
        call(**_args(o=(2, 3, 4, 6), x=(2, 3, 4, 6), z=(2, 3, 24), weight=(24,)), impl="pallas_triton_interpret")
    with pytest.raises(ValueError, match="no rows"):
        call(**_args(o=(2, 0, 4, 8), x=(2, 0, 4, 8), z=(2, 0, 32)), impl="pallas_triton_interpret")
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        call(**_args(), impl="pallas_triton")
    mesh = jax.make_mesh((8,), ("rows",), axis_types=(AxisType.Auto,))
    args = {n: jax.device_put(a, NamedSharding(mesh, P(None, "rows") if a.ndim > 1 else P()))
            for n, a in _args(o=(2, 8, 4, 8), x=(2, 8, 4, 8), z=(2, 8, 32)).items()}
    with pytest.raises(ValueError, match="runs per device"):
        jax.jit(functools.partial(call, impl="pallas_triton_interpret"))(**args)
    assert jax.jit(call)(**args).shape == (2, 8, 32)  # "auto" takes xla there


def test_auto_takes_the_kernels_only_where_qualified(monkeypatch):
    """"auto" consults QUALIFIED_GPUS by device kind: "xla" unless this device's kind is listed, and then still
    "xla" where the kernels cannot run the inputs (supported's reason) or the call is partitioned by XLA."""
    args = _args()
    resolve = lambda **a: gated_norm.resolve("auto", a["o"], a["x"], a["z"], 1)
    monkeypatch.setattr(gated_norm, "supported", lambda *a, **k: None)
    assert resolve(**args) == "xla"
    monkeypatch.setattr(gated_norm, "QUALIFIED_GPUS", (jax.devices()[0].device_kind,))
    assert resolve(**args) == "pallas_triton"
    mesh = jax.make_mesh((8,), ("rows",), axis_types=(AxisType.Auto,))
    sharded = {n: jax.device_put(a, NamedSharding(mesh, P(None, "rows") if a.ndim > 1 else P()))
               for n, a in _args(o=(2, 8, 4, 8), x=(2, 8, 4, 8), z=(2, 8, 32)).items()}
    assert resolve(**sharded) == "xla"
    monkeypatch.setattr(gated_norm, "supported", lambda *a, **k: "a reason")
    assert resolve(**args) == "xla"


# Mamba-2 1.3B's SSD output at T = 64K: H = 64 heads of P = 64, one group of 4096 channels.
MAMBA2 = dict(lead=(1, 65536), heads=64, head_dim=64)
# dD and dweight at 64K rows: the kernels' order (runs of 32 rows, then a sum over 2048 programs) emulated in
# numpy on products of two normals, float32 against float64, measured 7.8e-7 (a plain running sum: 4.6e-6).
GPU_SUM_TOL = 3e-6


@pytest.mark.gpu
@pytest.mark.parametrize("prefetch", [False, True], ids=["plain", "prefetch"])
def test_gpu_mamba2_shape_matches_xla(prefetch, rng):
    """The compiled kernels (default launch sizes, the backward's prefetch off and on) in bf16 at Mamba-2 1.3B's
    shape: the output and every gradient against xla in float32 on the same inputs, to the CPU tests' bf16 bounds;
    and xla's own bf16 path as a check that those bounds are what bf16 costs here."""
    args, g = _inputs(rng, dtype=jnp.bfloat16, **MAMBA2)
    want = _fwd_bwd("xla", 1, jnp.float32)(_f32(args), _f32(g))
    config = dataclasses.replace(gated_norm.DEFAULT, prefetch=prefetch)
    for impl in ("pallas_triton", "xla"):
        errs = _errors(_fwd_bwd(impl, 1, jnp.bfloat16, config)(args, g), want)
        assert max(errs[n] for n in ("out", "do", "dx", "dz")) < BF16_TOL, (impl, errs)
        if impl == "pallas_triton":
            assert max(errs["dD"], errs["dweight"]) < GPU_SUM_TOL, errs


@pytest.mark.gpu
def test_gpu_mamba2_project_matches_xla(rng):
    """gated_rms_norm_project compiled at Mamba-2 1.3B's shape (d_model 2048) in bf16 against xla in float32:
    every error within twice xla's own bf16 path's on the same inputs (a bound measured in the run; both round
    the norm's cotangent, the projection's, to bf16), and the row tensors within the CPU tests' bf16 bound."""
    args, _ = _inputs(rng, dtype=jnp.bfloat16, **MAMBA2)
    w_proj, g = _projection(rng, MAMBA2["lead"], 4096, 2048, jnp.bfloat16)
    want = _project_fwd_bwd("xla", 1, jnp.float32)(_f32(args), _f32(w_proj), _f32(g))
    names = (*NAMES, "dw_proj")
    errs = {impl: {n: rel_err(a, b) for n, a, b in zip(names, jax.tree.leaves(
        _project_fwd_bwd(impl, 1, jnp.bfloat16)(args, w_proj, g)), jax.tree.leaves(want), strict=True)}
        for impl in ("pallas_triton", "xla")}
    assert all(errs["pallas_triton"][n] <= 2 * errs["xla"][n] for n in names), errs
    assert max(errs["pallas_triton"][n] for n in ("out", "do", "dx", "dz", "dw_proj")) < PROJECT_BF16_TOL, errs
