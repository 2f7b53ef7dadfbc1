"""LASP-2H softmax attention on forced CPU meshes equals a dense causal softmax over the whole sequence.

The reference is written here in float64 NumPy (K/V heads repeated for GQA). It checks outputs and dq, dk, dv
on meshes data x seq = 1x8 and 2x4 (Explicit and Auto), inside a caller's shard_map, and that the causal mask
is global: a rank-local mask (row i sees columns <= i of the gathered K) is shown to differ on this data.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from lasp_jax.parallel.softmax_allgather import causal_softmax_attention, softmax_allgather_attention
from tests.util import F32_TOL, qkv, rel_err

_FAST = {"xla_backend_optimization_level": 0}  # numbers, not speed: a quicker XLA:CPU compile


def _dense(q, k, v, local_rows=None):
    """float64 causal softmax; with local_rows=L the (wrong) rank-local mask i % L >= j is used instead."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    t = q.shape[1]
    s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    rows = np.arange(t)[:, None] if local_rows is None else np.arange(t)[:, None] % local_rows
    s = np.where(np.arange(t)[None, :] <= rows, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhts,bshe->bthe", p / p.sum(-1, keepdims=True), v)


def _one_device_grads(q, k, v, w):
    def loss(q, k, v):
        return jnp.sum(causal_softmax_attention(q, k, v) * w)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)), compiler_options=_FAST)(q, k, v)


@pytest.mark.parametrize("shape,explicit", [((1, 8), True), ((2, 4), False)], ids=["1x8-explicit", "2x4-auto"])
def test_matches_dense_causal_softmax(shape, explicit, rng):
    q, k, v = qkv(rng, 2, 32, 4, 2, 8, 8)  # GQA: 2 K/V heads for 4 query heads; 4 or 8 positions per rank
    w = jnp.asarray(rng.standard_normal((2, 32, 4, 8)), jnp.float32)
    kind = AxisType.Explicit if explicit else AxisType.Auto
    mesh = jax.make_mesh(shape, ("data", "seq"), axis_types=(kind, kind))

    def loss(q, k, v):
        o = softmax_allgather_attention(q, k, v)
        return jnp.sum(o * w), o

    with jax.set_mesh(mesh):
        qs, ks, vs = (jax.device_put(x, NamedSharding(mesh, P("data", "seq"))) for x in (q, k, v))
        (_, o), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True), compiler_options=_FAST)(
            qs, ks, vs)
    assert o.shape == q.shape and o.dtype == q.dtype and o.sharding.spec[1] == "seq"
    want = _dense(q, k, v)
    assert rel_err(o, want) < F32_TOL
    # The data tells a global mask from a rank-local one, so the comparison above would catch a local mask.
    assert rel_err(_dense(q, k, v, local_rows=32 // shape[1]), want) > 0.1
    # Gradients: against autodiff of the one-device function (itself checked against `_dense` above at W=1).
    for name, g, g_ref in zip("qkv", grads, _one_device_grads(q, k, v, w)):
        assert rel_err(g, g_ref) < F32_TOL, f"d{name}"


def test_one_device_function_matches_dense(rng):
    q, k, v = qkv(rng, 2, 16, 4, 1, 8, 4)  # MQA, Dv != Dk
    assert rel_err(causal_softmax_attention(q, k, v), _dense(q, k, v)) < F32_TOL
    # q_offset: the last 6 rows at positions 10..15 over all 16 keys equal those rows of the full result.
    tail = causal_softmax_attention(q[:, 10:], k, v, q_offset=10)
    assert rel_err(tail, _dense(q, k, v)[:, 10:]) < F32_TOL


def test_inside_a_callers_shard_map(rng):
    """With seq already manual, the local pieces are attended directly (gathered K/V, global mask)."""
    q, k, v = qkv(rng, 1, 16, 2, 2, 8, 8)
    mesh = jax.make_mesh((1, 8), ("data", "seq"), axis_types=(AxisType.Explicit,) * 2)
    spec = P(None, "seq")
    with jax.set_mesh(mesh):
        f = jax.shard_map(lambda q, k, v: softmax_allgather_attention(q, k, v), mesh=mesh,
                          in_specs=(spec, spec, spec), out_specs=spec)
        o = jax.jit(f, compiler_options=_FAST)(*(jax.device_put(x, NamedSharding(mesh, spec)) for x in (q, k, v)))
    assert rel_err(o, _dense(q, k, v)) < F32_TOL


def test_bad_input_is_a_clear_error(rng):
    q, k, v = qkv(rng, 2, 12, 4, 2, 8, 8)
    mesh = jax.make_mesh((1, 8), ("data", "seq"))
    with pytest.raises(ValueError, match="divisible"):
        softmax_allgather_attention(q, k, v, mesh=mesh)
    with pytest.raises(ValueError, match="no axis"):
        softmax_allgather_attention(q, k, v, mesh=mesh, seq_axis="sp")
    with pytest.raises(ValueError, match="GQA"):
        softmax_allgather_attention(q, k[:, :, :1].repeat(3, axis=2), v[:, :, :1].repeat(3, axis=2), mesh=mesh)
    with pytest.raises(ValueError, match="needs a mesh"):
        softmax_allgather_attention(q, k, v)
