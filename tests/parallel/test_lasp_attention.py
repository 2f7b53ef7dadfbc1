"""lasp_attention on forced CPU meshes equals the single-device reference: outputs and dq, dk, dv."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import lasp_jax
from lasp_jax.ops import reference
from tests.util import BF16_TOL, F32_TOL, decay, qkv, rel_err

STRATEGIES = ["ring", "allgather", "scan"]
MESHES = [(1, 8), (2, 4), (4, 2), (8, 1)]


def _mesh(shape, axis_types=AxisType.Explicit):
    return jax.make_mesh(shape, ("data", "seq"), axis_types=(axis_types,) * 2)


def _check(mesh, strategy, q, k, v, s, tol, impl="auto"):
    """Runs lasp_attention forward and backward under `mesh` and compares with the dense reference."""
    w = jnp.asarray(np.random.default_rng(0).standard_normal(q.shape[:3] + v.shape[-1:]), jnp.float32)

    def loss(q, k, v):
        o = lasp_jax.lasp_attention(q, k, v, s, strategy=strategy, impl=impl)
        return jnp.sum(o.astype(jnp.float32) * w), o

    def loss_ref(q, k, v):
        return jnp.sum(reference.dense(q, k, v, jnp.zeros(q.shape[2]) if s is None else s)[0] * w)

    with jax.set_mesh(mesh):
        spec = NamedSharding(mesh, P("data", "seq"))
        qs, ks, vs = (jax.device_put(x, spec) for x in (q, k, v))
        (_, o), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(qs, ks, vs)
    assert o.dtype == q.dtype and o.shape == q.shape[:3] + v.shape[-1:]
    assert o.sharding.spec[:2] == ("data", "seq"), o.sharding
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    assert rel_err(o, reference.dense(*f32, jnp.zeros(q.shape[2]) if s is None else s)[0]) < tol
    for name, g, g_ref in zip("qkv", grads, jax.grad(loss_ref, argnums=(0, 1, 2))(*f32)):
        assert g.dtype == q.dtype, name
        assert rel_err(g, g_ref) < tol, f"d{name}"


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("mesh_shape", MESHES, ids=lambda m: f"data{m[0]}xseq{m[1]}")
def test_strategies_on_meshes(strategy, mesh_shape, rng):
    # GQA, Dk != Dv, local T = 88/seq: not a multiple of the 64-position chunk on any mesh; a zero and a fast rate.
    q, k, v = qkv(rng, 8, 8 * 11 * 2, 4, 2, 16, 8)
    _check(_mesh(mesh_shape), strategy, q, k, v, decay("on", 4, rng), F32_TOL)


VARIANTS = {
    "mha-decay-off": ((2, 64, 4, 4, 8, 8), "off"),
    "mqa-decay-zero": ((2, 64, 4, 1, 8, 16), "zero"),
    "gqa-slopes-T-short": ((2, 24, 4, 2, 8, 8), "slopes"),  # 6 positions per rank
}


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_head_and_decay_variants(strategy, variant, rng):
    shape, decay_kind = VARIANTS[variant]
    q, k, v = qkv(rng, *shape)
    _check(_mesh((2, 4)), strategy, q, k, v, decay(decay_kind, shape[2], rng), F32_TOL)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_bf16(strategy, rng):
    q, k, v = qkv(rng, 2, 128, 4, 2, 16, 16, jnp.bfloat16)
    _check(_mesh((2, 4)), strategy, q, k, v, decay("on", 4, rng), BF16_TOL)


def test_auto_axes_and_reference_impl(rng):
    q, k, v = qkv(rng, 2, 64, 2, 2, 8, 8)
    _check(_mesh((2, 4), AxisType.Auto), "scan", q, k, v, decay("on", 2, rng), F32_TOL, impl="reference")


def test_explicit_mesh_argument_without_ambient_mesh(rng):
    q, k, v = qkv(rng, 2, 32, 2, 1, 8, 8)
    s = decay("on", 2, rng)
    o = lasp_jax.lasp_attention(q, k, v, s, mesh=_mesh((2, 4), AxisType.Auto), strategy="allgather")
    assert rel_err(o, reference.dense(q, k, v, s)[0]) < F32_TOL


@pytest.mark.parametrize("axis_types", [AxisType.Explicit, AxisType.Auto], ids=["explicit", "auto"])
def test_inside_larger_jitted_function_under_grad(axis_types, rng):
    """A scalar loss of lasp_attention inside a jitted model-like function: projections, residual, two layers."""
    b, t, d, h = 4, 64, 16, 2
    x = jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32)
    params = {n: jnp.asarray(rng.standard_normal((d, d)) / np.sqrt(d), jnp.float32) for n in ("wq", "wk", "wv")}
    w_out = jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32)
    s = decay("slopes", h, rng)

    def model(params, x, attn):
        for _ in range(2):
            q, k, v = (jnp.einsum("btd,de->bte", x, params[n]).reshape(b, t, h, d // h) for n in ("wq", "wk", "wv"))
            x = x + attn(q, k, v).reshape(b, t, d)
        return jnp.sum(x * w_out), x

    mesh = _mesh((2, 4), axis_types)
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, NamedSharding(mesh, P("data", "seq")))
        (value, out), grads = jax.jit(jax.value_and_grad(
            lambda p, x: model(p, x, lambda q, k, v: lasp_jax.lasp_attention(q, k, v, s, strategy="ring")),
            has_aux=True))(params, xs)
    (ref_value, ref_out), ref_grads = jax.value_and_grad(
        lambda p: model(p, x, lambda q, k, v: reference.dense(q, k, v, s)[0]), has_aux=True)(params)
    assert rel_err(out, ref_out) < F32_TOL
    # The readout's terms cancel (|value| can be far below sum |terms|), so its rounding is measured against the terms:
    # over 100 seeds the error was at most 6e-8 of sum |terms| but up to 5e-5 of |value|.
    assert abs(float(value) - float(ref_value)) < 1e-6 * float(jnp.sum(jnp.abs(ref_out * w_out)))
    for n in params:
        assert rel_err(grads[n], ref_grads[n]) < F32_TOL, n


def test_inside_user_shard_map(rng):
    """Where the seq axis is already manual, lasp_attention works on the local pieces directly."""
    q, k, v = qkv(rng, 2, 64, 2, 2, 8, 8)
    s = decay("on", 2, rng)
    mesh = _mesh((2, 4), AxisType.Auto)
    spec = P("data", "seq")
    f = jax.shard_map(lambda q, k, v: lasp_jax.lasp_attention(q, k, v, s, strategy="scan"), mesh=mesh,
                      in_specs=(spec, spec, spec), out_specs=spec)
    with jax.set_mesh(mesh):
        o = jax.jit(f)(q, k, v)
    assert rel_err(o, reference.dense(q, k, v, s)[0]) < F32_TOL


BAD = {
    "T % W": (dict(t=30), "T=30 must be divisible by the 'seq' axis size 4"),
    "no seq axis": (dict(seq_axis="sequence"), "no axis 'sequence'"),
    "strategy": (dict(strategy="tree"), "unknown strategy 'tree'"),
    "impl": (dict(impl="cuda"), "unknown impl"),
    "batch": (dict(b=3), "batch B=3 must be divisible"),
    "decay": (dict(decay=np.array([-1.0, 0.0])), ">= 0"),
    "heads": (dict(hkv=3), "multiple of key/value heads"),
}


@pytest.mark.parametrize("case", BAD, ids=str)
def test_bad_input_names_the_problem(case):
    over, message = BAD[case]
    b, t, hkv = over.get("b", 2), over.get("t", 32), over.get("hkv", 1)
    q, k, v = jnp.zeros((b, t, 2, 4)), jnp.zeros((b, t, hkv, 4)), jnp.zeros((b, t, hkv, 4))
    kwargs = {key: over[key] for key in ("seq_axis", "strategy", "impl", "decay") if key in over}
    with pytest.raises(ValueError, match=message):
        lasp_jax.lasp_attention(q, k, v, mesh=_mesh((2, 4), AxisType.Auto), **kwargs)


def test_no_mesh_is_an_error():
    q = jnp.zeros((1, 8, 2, 4))
    with pytest.raises(ValueError, match="needs a mesh"):
        lasp_jax.lasp_attention(q, q, q)
