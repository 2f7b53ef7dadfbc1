"""LASP-2H softmax attention on forced CPU meshes equals a dense causal softmax over the whole sequence.

The reference is written here in float64 NumPy (K/V heads repeated for GQA; gradients from a dense jnp
version). It checks the blockwise kernel's outputs and dq, dk, dv on meshes data x seq = 1x8 and 2x4 (Explicit
and Auto), inside a caller's shard_map, and that the causal mask is global: a rank-local mask (row i sees
columns <= i of the gathered K) is shown to differ on this data.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from lasp_jax.parallel.softmax_allgather import causal_softmax_attention, softmax_allgather_attention
from tests.util import BF16_TOL, F32_TOL, qkv, rel_err

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


def _dense_grads(q, k, v, w):
    """dq, dk, dv of sum(w * o) for a dense jnp causal softmax (the whole [T, T] scores; fp32, highest)."""
    def loss(q, k, v):
        g = q.shape[2] // k.shape[2]
        k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
        s = jnp.einsum("bthd,bshd->bhts", q, k, precision="highest") / np.sqrt(q.shape[-1])
        s = jnp.where(jnp.tril(jnp.ones((q.shape[1],) * 2, bool)), s, -jnp.inf)
        return jnp.sum(jnp.einsum("bhts,bshe->bthe", jax.nn.softmax(s, axis=-1), v, precision="highest") * w)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)), compiler_options=_FAST)(q, k, v)


@pytest.mark.parametrize("shape,explicit", [((1, 8), True), ((2, 4), False)], ids=["1x8-explicit", "2x4-auto"])
def test_matches_dense_causal_softmax(shape, explicit, rng):
    q, k, v = qkv(rng, 2, 32, 4, 2, 8, 8)  # GQA: 2 K/V heads for 4 query heads; 4 or 8 positions per rank
    w = jnp.asarray(rng.standard_normal((2, 32, 4, 8)), jnp.float32)
    kind = AxisType.Explicit if explicit else AxisType.Auto
    mesh = jax.make_mesh(shape, ("data", "seq"), axis_types=(kind, kind))

    def loss(q, k, v):
        o = softmax_allgather_attention(q, k, v, block_q=3, block_k=8)  # several blocks, padded, some skipped
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
    for name, g, g_ref in zip("qkv", grads, _dense_grads(q, k, v, w)):
        assert rel_err(g, g_ref) < F32_TOL, f"d{name}"


@pytest.mark.parametrize("blocks", [(512, 512), (5, 3)], ids=["one-block", "blocks-5x3"])
def test_one_device_function_matches_dense(blocks, rng):
    bq, bk = blocks
    q, k, v = qkv(rng, 2, 16, 4, 1, 8, 4)  # MQA, Dv != Dk
    assert rel_err(causal_softmax_attention(q, k, v, block_q=bq, block_k=bk), _dense(q, k, v)) < F32_TOL
    # q_offset: the last 6 rows at positions 10..15 over all 16 keys equal those rows of the full result.
    tail = causal_softmax_attention(q[:, 10:], k, v, q_offset=10, block_q=bq, block_k=bk)
    assert rel_err(tail, _dense(q, k, v)[:, 10:]) < F32_TOL


def test_bf16_inputs(rng):
    """bf16 q, k, v: bf16 products accumulated in fp32 stay within one bf16 rounding of the float64 result."""
    q, k, v = qkv(rng, 2, 24, 4, 2, 16, 16, dtype=jnp.bfloat16)
    o = causal_softmax_attention(q, k, v, block_q=8, block_k=8)
    assert o.dtype == jnp.bfloat16
    assert rel_err(o, _dense(*(x.astype(jnp.float32) for x in (q, k, v)))) < BF16_TOL


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


def test_blockwise_never_holds_the_whole_score_matrix(rng):
    """Neither the forward nor the backward has a value as large as the [H, T, T] scores: one block at most."""
    t, h = 64, 4
    q, k, v = qkv(rng, 1, t, h, h, 8, 8)

    def loss(q, k, v):
        return jnp.sum(causal_softmax_attention(q, k, v, block_q=8, block_k=16))

    def sizes(jaxpr):
        for eqn in jaxpr.eqns:
            for var in eqn.outvars:
                yield int(np.prod(getattr(var.aval, "shape", ())))
            for param in eqn.params.values():
                for p in (param if isinstance(param, (tuple, list)) else (param,)):
                    inner = p.jaxpr if hasattr(p, "jaxpr") and hasattr(p.jaxpr, "eqns") else p
                    if hasattr(inner, "eqns"):
                        yield from sizes(inner)

    biggest = max(sizes(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v).jaxpr))
    assert biggest < h * t * t / 4, biggest
