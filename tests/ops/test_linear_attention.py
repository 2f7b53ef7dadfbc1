"""linear_attention against the reference: every implementation runs the same parameterized contract."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lasp_jax
from lasp_jax.ops import reference
from tests.util import BF16_TOL, F32_TOL, decay, qkv, rel_err

IMPLS = ["reference", "xla"]

# (B, T, H, Hkv, Dk, Dv): MHA, GQA, MQA; Dk != Dv; T not a multiple of the chunk (64) and T < chunk.
SHAPES = {
    "mha": (2, 100, 4, 4, 16, 16),
    "gqa": (1, 130, 4, 2, 16, 8),
    "mqa": (2, 64, 4, 1, 8, 24),
    "short": (1, 5, 2, 1, 8, 8),
}


def _loss_ref(q, k, v, s, s0, w_o, w_s):
    o, final = reference.dense(q, k, v, s, s0)
    return jnp.sum(o * w_o) + jnp.sum(final * w_s)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("decay_kind", ["on", "off", "zero"])
def test_matches_reference(impl, shape, decay_kind, rng):
    b, t, h, hkv, dk, dv = SHAPES[shape]
    q, k, v = qkv(rng, b, t, h, hkv, dk, dv)
    s = decay(decay_kind, h, rng)
    s0 = jnp.asarray(rng.standard_normal((b, h, dk, dv)), jnp.float32)
    w_o = jnp.asarray(rng.standard_normal((b, t, h, dv)), jnp.float32)
    w_s = jnp.asarray(rng.standard_normal((b, h, dk, dv)), jnp.float32)

    def loss(q, k, v, s0):
        o, final = lasp_jax.linear_attention(q, k, v, s, initial_state=s0, return_final_state=True, impl=impl)
        return jnp.sum(o * w_o) + jnp.sum(final * w_s), (o, final)

    (_, (o, final)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(q, k, v, s0)
    s_ref = jnp.zeros((h,)) if s is None else s
    o_ref, final_ref = reference.dense(q, k, v, s_ref, s0)
    grads_ref = jax.grad(_loss_ref, argnums=(0, 1, 2, 4))(q, k, v, s_ref, s0, w_o, w_s)
    assert o.dtype == q.dtype and o.shape == (b, t, h, dv)
    assert rel_err(o, o_ref) < F32_TOL
    assert rel_err(final, final_ref) < F32_TOL
    for name, g, g_ref in zip(["dq", "dk", "dv", "d_initial_state"], grads, grads_ref):
        assert g.shape == g_ref.shape, name
        assert rel_err(g, g_ref) < F32_TOL, name


@pytest.mark.parametrize("impl", IMPLS)
def test_without_state_arguments(impl, rng):
    """The common call (no initial or final state) takes the path that skips the state terms."""
    q, k, v = qkv(rng, 2, 77, 4, 2, 16, 16)
    s = decay("slopes", 4, rng)
    o = lasp_jax.linear_attention(q, k, v, s, impl=impl)
    dq, dk, dv = jax.grad(lambda q, k, v: jnp.sum(lasp_jax.linear_attention(q, k, v, s, impl=impl) ** 2),
                          argnums=(0, 1, 2))(q, k, v)
    o_ref = reference.dense(q, k, v, s)[0]
    g_ref = jax.grad(lambda q, k, v: jnp.sum(reference.dense(q, k, v, s)[0] ** 2), argnums=(0, 1, 2))(q, k, v)
    assert rel_err(o, o_ref) < F32_TOL
    for g, gr in zip((dq, dk, dv), g_ref):
        assert rel_err(g, gr) < F32_TOL


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_inputs(impl, rng):
    q, k, v = qkv(rng, 1, 96, 4, 2, 32, 32, jnp.bfloat16)
    s = decay("on", 4, rng)
    o = lasp_jax.linear_attention(q, k, v, s, impl=impl)
    grads = jax.grad(lambda *x: jnp.sum(lasp_jax.linear_attention(*x, s, impl=impl).astype(jnp.float32) ** 2),
                     argnums=(0, 1, 2))(q, k, v)
    o_ref = reference.dense(q, k, v, s)[0]
    grads_ref = jax.grad(lambda *x: jnp.sum(reference.dense(*x, s)[0] ** 2), argnums=(0, 1, 2))(
        *(x.astype(jnp.float32) for x in (q, k, v)))
    assert o.dtype == jnp.bfloat16
    assert rel_err(o, o_ref) < BF16_TOL
    for g, gr, x in zip(grads, grads_ref, (q, k, v)):
        assert g.dtype == x.dtype
        assert rel_err(g, gr) < BF16_TOL


@pytest.mark.parametrize("impl", IMPLS)
def test_state_chaining(impl, rng):
    """Two calls passing the final state equal one call over the whole sequence."""
    q, k, v = qkv(rng, 2, 150, 4, 2, 16, 8)
    s = decay("on", 4, rng)
    split = 61
    o1, st = lasp_jax.linear_attention(q[:, :split], k[:, :split], v[:, :split], s, return_final_state=True,
                                       impl=impl)
    o2, st2 = lasp_jax.linear_attention(q[:, split:], k[:, split:], v[:, split:], s, initial_state=st,
                                        return_final_state=True, impl=impl)
    o, final = lasp_jax.linear_attention(q, k, v, s, return_final_state=True, impl=impl)
    assert rel_err(jnp.concatenate([o1, o2], axis=1), o) < F32_TOL
    assert rel_err(st2, final) < F32_TOL


def test_step_matches_full_sequence(rng):
    q, k, v = qkv(rng, 2, 12, 4, 2, 8, 8)
    s = decay("on", 4, rng)
    state = jnp.zeros((2, 4, 8, 8))
    outs = []
    for t in range(12):
        o, state = lasp_jax.linear_attention_step(q[:, t], k[:, t], v[:, t], state, s, scale=0.5)
        outs.append(o)
    o_full, final = lasp_jax.linear_attention(q, k, v, s, scale=0.5, return_final_state=True)
    assert rel_err(jnp.stack(outs, axis=1), o_full) < F32_TOL
    assert rel_err(state, final) < F32_TOL


def test_dense_and_recurrent_references_agree(rng):
    """The two oracles are independent formulations; each guards the other."""
    q, k, v = qkv(rng, 2, 40, 4, 1, 8, 12)
    s = decay("on", 4, rng)
    s0 = jnp.asarray(rng.standard_normal((2, 4, 8, 12)), jnp.float32)
    o_d, f_d = reference.dense(q, k, v, s, s0)
    o_r, f_r = reference.recurrent(q, k, v, s, s0)
    assert rel_err(o_d, o_r) < F32_TOL and rel_err(f_d, f_r) < F32_TOL
    # And against a direct float64 loop over the definition.
    qn, kn, vn, sn = (np.asarray(x, np.float64) for x in (q, k, v, s))
    p = 17
    want = np.zeros((2, 4, 12))
    for r in range(p + 1):
        want += np.exp(-sn * (p - r))[None, :, None] * np.einsum("bhd,bd,be->bhe", qn[:, p], kn[:, r, 0], vn[:, r, 0])
    want += np.exp(-sn * p)[None, :, None] * np.einsum("bhd,bhde->bhe", qn[:, p], np.asarray(s0, np.float64))
    assert rel_err(o_d[:, p], want) < F32_TOL


def test_scale_and_decay_gradient(rng):
    q, k, v = qkv(rng, 1, 20, 2, 2, 8, 8)
    s = decay("on", 2, rng)
    o = lasp_jax.linear_attention(q, k, v, s, scale=0.25)
    assert rel_err(o, reference.dense(q * 0.25, k, v, s)[0]) < F32_TOL
    ds = jax.grad(lambda s: jnp.sum(lasp_jax.linear_attention(q, k, v, s)))(s)
    assert np.all(np.asarray(ds) == 0.0)  # decay is a constant for autodiff, as documented


BAD = {
    "rank": (dict(q=(2, 8, 4)), "rank 4"),
    "batch mismatch": (dict(k=(3, 8, 2, 4)), "batch and sequence"),
    "head dim mismatch": (dict(k=(2, 8, 2, 5)), "head dim"),
    "kv heads differ": (dict(v=(2, 8, 1, 4)), "same number of heads"),
    "H % Hkv": (dict(k=(2, 8, 3, 4), v=(2, 8, 3, 4)), "multiple of key/value heads"),
    "decay length": (dict(decay=np.ones(3)), "decay must have shape"),
    "negative decay": (dict(decay=np.array([0.1, -0.1, 0, 0])), ">= 0"),
    "nan decay": (dict(decay=np.array([0.1, np.nan, 0, 0])), "finite"),
    "inf decay": (dict(decay=np.array([0.1, np.inf, 0, 0])), "finite"),
    "impl": (dict(impl="cuda"), "unknown impl"),
    "state shape": (dict(initial_state=(2, 4, 4, 5)), "initial_state must have shape"),
}


@pytest.mark.parametrize("case", BAD, ids=str)
def test_bad_input_names_the_problem(case):
    over, message = BAD[case]
    shapes = dict(q=(2, 8, 4, 4), k=(2, 8, 2, 4), v=(2, 8, 2, 4))
    args = {n: jnp.zeros(over.get(n, sh)) for n, sh in shapes.items()}
    kwargs = {}
    if "decay" in over:
        kwargs["decay"] = over["decay"]
    if "impl" in over:
        kwargs["impl"] = over["impl"]
    if "initial_state" in over:
        kwargs["initial_state"] = jnp.zeros(over["initial_state"])
    with pytest.raises(ValueError, match=message):
        lasp_jax.linear_attention(args["q"], args["k"], args["v"], **kwargs)


def test_explicitly_sharded_inputs(rng):
    """Batch sharded (and T over a one-device axis): runs in place, output sharded like q, state aligned."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    q, k, v = qkv(rng, 8, 40, 2, 1, 8, 8)
    s = decay("on", 2, rng)
    s0 = jnp.asarray(rng.standard_normal((8, 2, 8, 8)), jnp.float32)
    o_ref = reference.dense(q, k, v, s, s0)[0]
    g_ref = jax.grad(lambda q, s0: jnp.sum(reference.dense(q, k, v, s, s0)[0] ** 2), argnums=(0, 1))(q, s0)
    for shape, spec in (((8, 1), P("data", "seq")), ((2, 4), P("data", None))):
        mesh = jax.make_mesh(shape, ("data", "seq"))
        with jax.set_mesh(mesh):
            qs, ks, vs = (jax.device_put(x, NamedSharding(mesh, spec)) for x in (q, k, v))
            o = jax.jit(lambda q, k, v: lasp_jax.linear_attention(q, k, v, s, initial_state=s0))(qs, ks, vs)
            grads = jax.jit(jax.grad(lambda q, s0: jnp.sum(
                lasp_jax.linear_attention(q, ks, vs, s, initial_state=s0) ** 2), argnums=(0, 1)))(qs, s0)
        assert o.sharding.spec[:2] == spec[:2]
        assert rel_err(o, o_ref) < F32_TOL
        for g, gr in zip(grads, g_ref):
            assert rel_err(g, gr) < F32_TOL


def test_sequence_sharded_inputs_point_to_lasp_attention():
    from jax.sharding import NamedSharding, PartitionSpec as P

    mesh = jax.make_mesh((2, 4), ("data", "seq"))
    with jax.set_mesh(mesh):
        q = jax.device_put(jnp.zeros((2, 32, 2, 8)), NamedSharding(mesh, P("data", "seq")))
        with pytest.raises(ValueError, match="use lasp_attention"):
            lasp_jax.linear_attention(q, q, q)
