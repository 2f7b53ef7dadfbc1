"""LASP-2H softmax attention on forced CPU meshes equals a dense causal softmax over the whole sequence.

The reference is tests.util.dense_causal_softmax, float64 NumPy (gradients from a dense jnp version here). It
checks the outputs and dq, dk, dv on meshes data x seq = 1x8 and 2x4 (Explicit and Auto), inside a caller's
shard_map, and that the causal mask is global: a rank-local mask (row i sees columns <= i of the gathered K) is
shown to differ on this data. The one-device blockwise function is tested in tests/ops/test_softmax.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from lasp_jax.parallel.softmax_allgather import softmax_allgather_attention
from tests.util import F32_TOL, dense_causal_softmax, qkv, rel_err

_FAST = {"xla_backend_optimization_level": 0}  # numbers, not speed: a quicker XLA:CPU compile


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
    want = dense_causal_softmax(q, k, v)
    assert rel_err(o, want) < F32_TOL
    # The data tells a global mask from a rank-local one, so the comparison above would catch a local mask.
    assert rel_err(dense_causal_softmax(q, k, v, local_rows=32 // shape[1]), want) > 0.1
    for name, g, g_ref in zip("qkv", grads, _dense_grads(q, k, v, w)):
        assert rel_err(g, g_ref) < F32_TOL, f"d{name}"


def test_inside_a_callers_shard_map(rng):
    """With seq already manual, the local pieces are attended directly (gathered K/V, global mask)."""
    q, k, v = qkv(rng, 1, 16, 2, 2, 8, 8)
    mesh = jax.make_mesh((1, 8), ("data", "seq"), axis_types=(AxisType.Explicit,) * 2)
    spec = P(None, "seq")
    with jax.set_mesh(mesh):
        f = jax.shard_map(lambda q, k, v: softmax_allgather_attention(q, k, v), mesh=mesh,
                          in_specs=(spec, spec, spec), out_specs=spec)
        o = jax.jit(f, compiler_options=_FAST)(*(jax.device_put(x, NamedSharding(mesh, spec)) for x in (q, k, v)))
    assert rel_err(o, dense_causal_softmax(q, k, v)) < F32_TOL


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
    with pytest.raises(ValueError, match="impl='cudnn' is refused for LASP-2H"):
        softmax_allgather_attention(q, k, v, mesh=mesh, impl="cudnn")


def test_auto_never_takes_cudnn_on_a_rank(monkeypatch, rng):
    """"auto" runs each rank's blockwise loop even where causal_softmax_attention's own "auto" would take cuDNN
    (it crashed inside this shard_map on two H200s): cuDNN is made to apply and to fail here if called."""
    from lasp_jax.ops import softmax

    monkeypatch.setattr(softmax, "_cudnn_applies", lambda *_: True)
    monkeypatch.setattr(softmax, "_cudnn", lambda *_: pytest.fail("LASP-2H took cuDNN"))
    q, k, v = qkv(rng, 1, 16, 2, 2, 8, 8)
    mesh = jax.make_mesh((1, 2), ("data", "seq"), axis_types=(AxisType.Auto,) * 2)
    with jax.set_mesh(mesh):
        o = jax.jit(softmax_allgather_attention, compiler_options=_FAST)(q, k, v)
    assert rel_err(o, dense_causal_softmax(q, k, v)) < F32_TOL
