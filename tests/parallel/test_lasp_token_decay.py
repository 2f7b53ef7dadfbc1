"""lasp_attention with per-token decay and packed documents on forced CPU meshes: outputs and the gradients of q, k,
v and the per-token rates on every rank, against the float64 oracle (reference.dense_tokens under enable_x64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import lasp_jax
from lasp_jax.ops import reference
from tests.util import F32_TOL, per_rank_errors, qkv, rel_err

STRATEGIES = list(lasp_jax.parallel.STRATEGIES)
# data x seq meshes (seq 3 and 6: scan's non-power-of-two rounds). T = 48: ranks of 6 (seq 8), 12 (seq 4),
# 16 (seq 3), 8 (seq 6) positions.
T = 48
# Row 0: documents starting at 16 (a rank boundary for seq 3 and 6), 24 (seq 4, 6, 8), 30 (seq 8), 33 (inside
# a rank everywhere), 40 (seq 6) and 47 (the last position alone); the first spans several ranks. Row 1: one
# document over every rank (slow decay: a missed reset or a leak would show). Rows 2, 3 (data 2): starts at 12
# and 36 (boundaries for seq 4), 13 (a one-position document), 5 and 20.
STARTS = [(16, 24, 30, 33, 40, 47), (), (12, 13, 36), (5, 20)]


def _inputs(rng, b):
    q, k, v = qkv(rng, b, T, 4, 2, 8, 8)
    rates = rng.uniform(0.0, 0.3, size=(b, T, 4))
    rates[1] = rng.uniform(0.005, 0.015, size=(T, 4))
    new = np.zeros((b, T), bool)
    for row in range(b):
        new[row, list(STARTS[row])] = True
    ids = jnp.asarray(np.cumsum(new, axis=1), jnp.int32)
    return q, k, v, jnp.asarray(rates, jnp.float32), ids


# Every strategy on seq 6 (scan's rounds past the first rank; boundaries at 16, 24, 40), each on two of the
# others (CPU time: 9 compiled forward+backward calls instead of 12).
CONFIGS = [((1, 6), s) for s in STRATEGIES] + [((1, 8), "ring"), ((1, 8), "scan"), ((2, 4), "allgather"),
                                               ((2, 4), "ring"), ((1, 3), "scan"), ((1, 3), "allgather")]


@pytest.mark.parametrize("shape,strategy", CONFIGS, ids=lambda c: f"{c[0]}x{c[1]}" if isinstance(c, tuple) else c)
def test_matches_float64_oracle_on_every_rank(shape, strategy, rng):
    mesh = jax.make_mesh(shape, ("data", "seq"), axis_types=(AxisType.Explicit,) * 2,
                         devices=jax.devices()[:shape[0] * shape[1]])
    q, k, v, rates, ids = _inputs(rng, 2 * shape[0])
    w_o = jnp.asarray(rng.standard_normal(q.shape[:3] + v.shape[-1:]), jnp.float32)

    def loss(q, k, v, rates):
        o = lasp_jax.lasp_attention(q, k, v, rates, segment_ids=ids, strategy=strategy, scale=0.5)
        return jnp.sum(o * w_o), o

    with jax.set_mesh(mesh):
        spec = NamedSharding(mesh, P("data", "seq"))
        args = [jax.device_put(x, spec) for x in (q, k, v, rates)]
        (_, o), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(*args)
    assert o.sharding.spec[:2] == ("data", "seq"), o.sharding
    with jax.enable_x64(True):
        f64 = [jnp.asarray(np.asarray(x), jnp.float64) for x in (q, k, v, rates)]
        dense = lambda q, k, v, rates: reference.dense_tokens(q, k, v, rates, ids, scale=0.5)[0]
        o_ref = np.asarray(dense(*f64))
        grads_ref = [np.asarray(g) for g in jax.grad(lambda *a: jnp.sum(dense(*a) * np.asarray(w_o)),
                                                     argnums=(0, 1, 2, 3))(*f64)]
    w = shape[1]
    errors = {"o": per_rank_errors(o, o_ref, w)}
    errors.update({f"d{n}": per_rank_errors(g, g_ref, w) for n, g, g_ref in zip(("q", "k", "v", "rates"), grads,
                                                                                  grads_ref)})
    for name, per_rank in errors.items():
        assert max(per_rank) < F32_TOL, (name, per_rank)


def test_kernels_refuse_per_token_decay(rng):
    mesh = jax.make_mesh((1, 2), ("data", "seq"), devices=jax.devices()[:2])
    q, k, v = qkv(rng, 1, 64, 2, 2, 64, 64)
    with pytest.raises(ValueError, match="not in the kernels yet"):
        lasp_jax.lasp_attention(q, k, v, jnp.full((1, 64, 2), 0.1), mesh=mesh, impl="pallas_triton_interpret")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_inside_a_callers_shard_map_on_an_auto_mesh(strategy, rng):
    """Where the seq axis is already manual the rates and ids are the local pieces (and no shard_map is added);
    on an Auto mesh: equal to one device's call."""
    mesh = jax.make_mesh((2, 3), ("data", "seq"), axis_types=(AxisType.Auto,) * 2, devices=jax.devices()[:6])
    q, k, v, rates, ids = _inputs(rng, 4)
    spec = P("data", "seq")
    f = jax.shard_map(lambda q, k, v, r, i: lasp_jax.lasp_attention(q, k, v, r, segment_ids=i, strategy=strategy),
                      mesh=mesh, in_specs=(spec,) * 5, out_specs=spec)
    with jax.set_mesh(mesh):
        o = jax.jit(f)(q, k, v, rates, ids)
        ds = jax.jit(jax.grad(lambda r: jnp.sum(f(q, k, v, r, ids) ** 2)))(rates)
    want = lasp_jax.linear_attention(q, k, v, rates, segment_ids=ids)
    ds_want = jax.grad(lambda r: jnp.sum(lasp_jax.linear_attention(q, k, v, r, segment_ids=ids) ** 2))(rates)
    assert rel_err(o, want) < F32_TOL
    assert rel_err(ds, ds_want) < F32_TOL


def test_constant_decay_with_documents(rng):
    """Constant [H] rates with segment_ids: equal to one device's call, gradients of q too; the rates stay a
    constant for autodiff."""
    mesh = jax.make_mesh((1, 4), ("data", "seq"), devices=jax.devices()[:4])
    q, k, v, _, ids = _inputs(rng, 2)
    s = jnp.asarray([0.0, 0.05, 0.3, 2.0], jnp.float32)
    loss = lambda attend, q, s: jnp.sum(attend(q, k, v, s, segment_ids=ids) ** 2)
    with jax.set_mesh(mesh):
        qs = jax.device_put(q, NamedSharding(mesh, P("data", "seq")))
        dq, ds = jax.jit(jax.grad(lambda q, s: loss(lasp_jax.lasp_attention, q, s), argnums=(0, 1)))(qs, s)
    dq_want = jax.grad(lambda q: loss(lasp_jax.linear_attention, q, s))(q)
    assert rel_err(dq, dq_want) < F32_TOL
    assert np.all(np.asarray(ds) == 0.0)
