"""Heads that broadcast both ways (issue 15): GVA (Mamba-2's groups: q and k with fewer heads than v) beside GQA,
on one device and under lasp_attention with heads sharded.

The oracle repeats each input to the H = max(Hq, Hv) output heads (jnp.repeat: head h reads head h // (H / Hx))
and runs the float64 reference over MHA inputs; autodiff through the repeat sums each input head's gradient over
the output heads that read it, so the implementations' head grouping is checked against code that has none.
Measured (CPU, seeds 0-2, every output and gradient, per rank under lasp_attention): worst 3.7e-7 (F32_TOL 1e-6);
a head read by the wrong output head is an O(1) error."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import lasp_jax
from lasp_jax.ops import api, impls, reference
from tests.util import F32_TOL, per_rank_errors, qkv, rel_err


def _repeated(x, h):
    return jnp.repeat(x, h // x.shape[2], axis=2)


def _inputs(rng, b, t, heads, dk=8, dv=6, per_token=True):
    """q, k, v with heads = (Hq, Hk, Hv), rates ([B, T, H] with two documents per row, or [H]), ids, s0."""
    hq, hk, hv = heads
    h = max(hq, hv)
    q, _, _ = qkv(rng, b, t, hq, hk, dk, dv)
    _, k, _ = qkv(rng, b, t, hk, hk, dk, dv)
    _, _, v = qkv(rng, b, t, hv, hv, dk, dv)
    if per_token:
        rates = jnp.asarray(rng.uniform(0.0, 0.3, size=(b, t, h)), jnp.float32)
        starts = np.zeros((b, t), bool)
        starts[:, [t // 3, t // 3 + 11]] = True
        ids = jnp.asarray(np.cumsum(starts, axis=1), jnp.int32)
    else:
        rates, ids = jnp.asarray(rng.uniform(0.0, 0.5, size=h), jnp.float32), None
    s0 = jnp.asarray(rng.standard_normal((b, h, dk, dv)), jnp.float32)
    return q, k, v, rates, ids, s0


def _oracle(q, k, v, rates, ids, s0, scale, w_o, w_s):
    """float64 o, final state and gradients of q, k, v (per input head), the rates and s0 over repeated heads."""
    h = max(q.shape[2], v.shape[2])
    with jax.enable_x64(True):
        f64 = [jnp.asarray(np.asarray(x), jnp.float64) for x in (q, k, v, rates, s0)]

        def loss(q, k, v, rates, s0):
            q, k, v = (_repeated(x, h) for x in (q, k, v))
            if rates.ndim == 3:
                o, final = reference.dense_tokens(q, k, v, rates, ids, s0, scale)
            else:
                o, final = reference.dense(q, k, v, rates, s0, scale)
            return jnp.sum(o * np.asarray(w_o)) + jnp.sum(final * np.asarray(w_s)), (o, final)

        (_, (o, final)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)(*f64)
        names = ["dq", "dk", "dv", "d_rates", "d_initial_state"]
        return {"o": np.asarray(o), "final_state": np.asarray(final), **{n: np.asarray(g) for n, g in
                                                                         zip(names, grads)}}


# name: ((Hq, Hk, Hv), per-token rates and documents (else constant [H] rates), impl).
CASES = {
    "gva_tokens_xla": ((2, 2, 4), True, "xla"),
    "gva_one_group_xla": ((1, 1, 4), False, "xla"),
    "gva_tokens_reference": ((2, 2, 4), True, "reference"),
    "gva_reference": ((2, 2, 4), False, "reference"),
    "k_like_q_v_fewer_xla": ((4, 4, 2), True, "xla"),
    "q_fewer_kv_xla": ((2, 4, 4), False, "xla"),
}


@pytest.mark.parametrize("case", CASES)
def test_matches_repeated_heads_in_float64(case, rng):
    """o, the final state and the gradients of q, k, v (each per input head), the rates and the initial state;
    T = 100 with chunk 64: a front-padded chunk and the chunk scan."""
    heads, per_token, impl = CASES[case]
    q, k, v, rates, ids, s0 = _inputs(rng, 2, 100, heads, per_token=per_token)
    w_o = jnp.asarray(rng.standard_normal((2, 100, max(heads), 6)), jnp.float32)
    w_s = jnp.asarray(rng.standard_normal(s0.shape), jnp.float32)

    def loss(q, k, v, rates, s0):
        o, final = lasp_jax.linear_attention(q, k, v, rates, segment_ids=ids, scale=0.5, initial_state=s0,
                                             return_final_state=True, impl=impl)
        return jnp.sum(o * w_o) + jnp.sum(final * w_s), (o, final)

    (_, (o, final)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))(
        q, k, v, rates, s0)
    got = {"o": o, "final_state": final, **dict(zip(["dq", "dk", "dv", "d_rates", "d_initial_state"], grads))}
    want = _oracle(q, k, v, rates, ids, s0, 0.5, w_o, w_s)
    for name in want:
        if name == "d_rates" and not per_token:
            assert np.all(np.asarray(got[name]) == 0.0)  # constant rates: a constant for autodiff
            continue
        assert got[name].shape == want[name].shape, name
        assert rel_err(got[name], want[name]) < F32_TOL, (name, rel_err(got[name], want[name]))


@pytest.mark.parametrize("per_token", [True, False], ids=["per_token", "constant"])
def test_decoding_steps_equal_the_call(per_token, rng):
    """linear_attention_step with GVA heads (per-token rates and a reset, or constant rates) from a prefix call's
    final state equals one call: outputs and final state."""
    q, k, v, rates, ids, _ = _inputs(rng, 2, 30, (1, 1, 4), per_token=per_token)
    o, final = lasp_jax.linear_attention(q, k, v, rates, segment_ids=ids, scale=0.5, return_final_state=True)
    prefix = 8
    _, state = lasp_jax.linear_attention(q[:, :prefix], k[:, :prefix], v[:, :prefix],
                                         rates[:, :prefix] if per_token else rates,
                                         segment_ids=ids[:, :prefix] if per_token else None, return_final_state=True)
    outs = []
    for t in range(prefix, 30):
        if per_token:
            o_t, state = lasp_jax.linear_attention_step(q[:, t], k[:, t], v[:, t], state, rates[:, t], scale=0.5,
                                                        reset=ids[:, t] != ids[:, t - 1])
        else:
            o_t, state = lasp_jax.linear_attention_step(q[:, t], k[:, t], v[:, t], state, rates, scale=0.5)
        outs.append(o_t)
    assert rel_err(jnp.stack(outs, axis=1), o[:, prefix:]) < F32_TOL
    assert rel_err(state, final) < F32_TOL


def test_kernels_refuse_gva_and_auto_takes_xla(monkeypatch):
    """The kernels read K/V head h // (H / Hk) of query head h: GVA, k and v of different counts, and q with
    fewer heads than k and v are refused by name; "auto" resolves them to xla even where a kernel comes first in
    AUTO_ORDER (here the interpreted Triton kernels, which "auto" then takes for MHA), with or without per-token
    decay."""
    monkeypatch.setattr(impls, "AUTO_ORDER", ("pallas_triton_interpret",) + impls.AUTO_ORDER)
    mha = jnp.ones((1, 64, 2, 64))
    assert api.resolve("auto", mha, mha, mha, per_token=False, partitioned=False) is impls.IMPLS[
        "pallas_triton_interpret"]
    for hq, hk, hv in ((2, 2, 4), (4, 4, 2), (2, 4, 4)):
        q, k, v = (jnp.ones((1, 64, n, 64)) for n in (hq, hk, hv))
        for impl in ("pallas_triton", "pallas_triton_interpret", "pallas_mosaic_interpret"):
            with pytest.raises(ValueError, match="other than MHA/GQA/MQA"):
                lasp_jax.linear_attention(q, k, v, impl=impl)
        for per_token in (False, True):
            assert api.resolve("auto", q, k, v, per_token=per_token, partitioned=False) is impls.IMPLS["xla"]


BAD = {
    "k heads match neither": (((4, 2, 1)), "same number of heads as q"),
    "counts do not divide": (((4, 4, 6)), "must be a multiple"),
    "decay per q head under GVA": (((2, 2, 4), dict(decay=np.ones(2))), r"decay must have shape \[H\] = \[4\]"),
    "state per q head under GVA": (((2, 2, 4), dict(initial_state=np.zeros((1, 2, 4, 4)))), "initial_state"),
}


@pytest.mark.parametrize("case", BAD, ids=str)
def test_bad_heads_name_the_problem(case):
    spec, message = BAD[case]
    (hq, hk, hv), kwargs = (spec, {}) if isinstance(spec[0], int) else spec
    q, k, v = (jnp.zeros((1, 8, n, 4)) for n in (hq, hk, hv))
    kwargs = {n: jnp.asarray(x) for n, x in kwargs.items()}
    with pytest.raises(ValueError, match=message):
        lasp_jax.linear_attention(q, k, v, **kwargs)


MESH_SHAPE = (1, 3, 2)  # data x seq x heads


@pytest.mark.parametrize("strategy", list(lasp_jax.parallel.STRATEGIES))
def test_lasp_attention_with_sharded_heads(strategy, rng):
    """GVA, per-token rates and documents (one starting at a rank boundary, one inside a rank) on an Explicit
    data x seq x heads mesh: each device holds one of q's and k's heads and two of v's, every rank's outputs and
    gradients of q, k, v, the rates against float64."""
    mesh = jax.make_mesh(MESH_SHAPE, ("data", "seq", "heads"), axis_types=(AxisType.Explicit,) * 3,
                         devices=jax.devices()[:6])
    t = 48
    q, k, v, rates, _, _ = _inputs(rng, 2, t, (2, 2, 4))
    starts = np.zeros((2, t), bool)
    starts[0, [16, 21]] = True  # a rank boundary (seq 3: ranks of 16) and inside rank 1
    starts[1, 40] = True
    ids = jnp.asarray(np.cumsum(starts, axis=1), jnp.int32)
    w_o = jnp.asarray(rng.standard_normal((2, t, 4, 6)), jnp.float32)

    def loss(q, k, v, rates, ids, w_o):
        o = lasp_jax.lasp_attention(q, k, v, rates, segment_ids=ids, strategy=strategy, scale=0.5)
        return jnp.sum(o * w_o), o

    with jax.set_mesh(mesh):
        spec = NamedSharding(mesh, P("data", "seq", "heads"))
        args = [jax.device_put(x, spec) for x in (q, k, v, rates)]
        ids_s, w_s = jax.device_put(ids, NamedSharding(mesh, P("data", "seq"))), jax.device_put(w_o, spec)
        (_, o), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(*args, ids_s, w_s)
    assert o.sharding.spec[:3] == ("data", "seq", "heads"), o.sharding
    want = _oracle(q, k, v, rates, ids, jnp.zeros((2, 4, 8, 6)), 0.5, w_o, jnp.zeros((2, 4, 8, 6)))
    errors = {"o": per_rank_errors(o, want["o"], MESH_SHAPE[1])}
    errors.update({n: per_rank_errors(g, want[n], MESH_SHAPE[1]) for n, g in zip(("dq", "dk", "dv", "d_rates"),
                                                                                  grads)})
    for name, per_rank in errors.items():
        assert max(per_rank) < F32_TOL, (name, per_rank)


def test_linear_attention_with_sharded_heads(rng):
    """GVA on an Explicit data x model mesh with q's heads sharded: every head count splits over the model axis,
    so each device attends over its own heads (one of q's and k's, two of v's); equal to the unsharded call,
    outputs and the gradients of q and v (per input head)."""
    q, k, v, rates, ids, _ = _inputs(rng, 2, 40, (2, 2, 4))
    f = lambda q, v: jnp.sum(lasp_jax.linear_attention(q, k, v, rates, segment_ids=ids) ** 2)
    want = jax.grad(f, argnums=(0, 1))(q, v)
    o_want = lasp_jax.linear_attention(q, k, v, rates, segment_ids=ids)
    mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2, devices=jax.devices()[:4])
    with jax.set_mesh(mesh):
        spec = NamedSharding(mesh, P("data", None, "model"))
        qs, vs = jax.device_put(q, spec), jax.device_put(v, spec)
        o = jax.jit(lambda q, v: lasp_jax.linear_attention(q, k, v, rates, segment_ids=ids))(qs, vs)
        got = jax.jit(jax.grad(f, argnums=(0, 1)))(qs, vs)
    assert o.sharding.spec[:3] == ("data", None, "model"), o.sharding
    assert rel_err(o, o_want) < F32_TOL
    for g, g_want in zip(got, want):
        assert g.shape == g_want.shape and rel_err(g, g_want) < F32_TOL
