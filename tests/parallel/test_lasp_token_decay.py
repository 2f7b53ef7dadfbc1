"""lasp_attention with per-token decay and packed documents on forced CPU meshes: outputs and the gradients of q, k,
v and the per-token rates on every rank, against the float64 oracle (reference.dense_tokens under enable_x64)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import lasp_jax
from lasp_jax.ops import reference
from tests.util import F32_TOL, document_ids, per_rank_errors, qkv, rel_err

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


@functools.lru_cache(maxsize=None)
def _seq_value_and_grads(w: int, strategy: str):
    """(mesh, compiled value_and_grad) on a 1 x w data x seq mesh: lasp_attention(q, k, v, rates, ids) with
    loss sum(o * w_o), gradients of q, k, v and the rates. Shared by the tests below (one compile per mesh and
    strategy)."""
    mesh = jax.make_mesh((1, w), ("data", "seq"), axis_types=(AxisType.Explicit,) * 2, devices=jax.devices()[:w])

    def loss(q, k, v, rates, ids, w_o):
        o = lasp_jax.lasp_attention(q, k, v, rates, segment_ids=ids, strategy=strategy, scale=0.5)
        return jnp.sum(o * w_o), o

    return mesh, jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))


def _on_seq_mesh(w, strategy, q, k, v, rates, ids, w_o):
    """{"o", "dq", "dk", "dv", "drates"} as NumPy arrays, from `_seq_value_and_grads` with everything split over
    data x seq."""
    mesh, run = _seq_value_and_grads(w, strategy)
    with jax.set_mesh(mesh):
        spec = NamedSharding(mesh, P("data", "seq"))
        (_, o), grads = run(*(jax.device_put(x, spec) for x in (q, k, v, rates, ids, w_o)))
    return {n: np.asarray(x) for n, x in zip(("o", "dq", "dk", "dv", "drates"), (o, *grads))}


# Documents: row 0 starts at 30 and 40, row 1 at 24 (a rank boundary for seq 2) and 40. With seq 2 document 0 fills
# rank 0 and runs into rank 1 in row 0; with seq 3 it fills rank 0 and runs into rank 1 (rows 0 and 1), and rank 2
# receives rank 0's state through rank 1, which holds a start (a = 0).
NAN_STARTS = [(30, 40), (24, 40)]


@pytest.mark.parametrize("w", [2, 3])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_non_finite_values_stay_in_their_document(strategy, w, rng):
    """A NaN in document 0's values (position 3) and an inf in its keys (10), both on rank 0, leave the later
    documents' outputs and gradients of q, k, v and the rates finite and equal to the clean run's, bit for bit, on
    every rank: the ranks' end states, the strategies' combines (ring and scan's hops, allgather's weighted sum)
    and the states' products select across document starts."""
    q, k, v = qkv(rng, 2, T, 4, 2, 8, 8)
    rates = jnp.asarray(rng.uniform(0.0, 0.3, size=(2, T, 4)), jnp.float32)
    ids = jnp.asarray(document_ids(NAN_STARTS, T))
    w_o = jnp.asarray(rng.standard_normal((2, T, 4, 8)), jnp.float32)
    clean = _on_seq_mesh(w, strategy, q, k, v, rates, ids, w_o)
    poisoned = _on_seq_mesh(w, strategy, q, k.at[:, 10, 0].set(np.inf), v.at[:, 3].set(np.nan), rates, ids, w_o)
    assert np.all(np.isnan(poisoned["o"][:, 3:24]))  # document 0 is poisoned: the check below can fail
    for name in clean:
        for row, (first, _) in enumerate(NAN_STARTS):
            later = poisoned[name][row, first:]
            assert np.all(np.isfinite(later)), (name, row)
            np.testing.assert_array_equal(later, clean[name][row, first:], err_msg=f"{name}, row {row}")


@pytest.mark.parametrize("w", [2, 3])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_traced_bad_rate_poisons_later_ranks(strategy, w, rng):
    """A NaN per-token rate (traced: not checkable before it runs) at position 16 of a one-document row turns
    NaN every output of its (row, head) from 16 on, on every later rank (seq 3: it opens rank 1, whose NaN
    decay alone carries it to rank 2); the outputs before it, the other head and the other row stay equal to the
    clean run's. The combines select only zero decays: a NaN one still multiplies (never a silently finite
    state)."""
    q, k, v = qkv(rng, 2, T, 4, 2, 8, 8)
    rates = jnp.asarray(rng.uniform(0.0, 0.3, size=(2, T, 4)), jnp.float32)
    ids = jnp.zeros((2, T), jnp.int32).at[1, 30:].set(1)  # row 0: one document; row 1: a start at 30
    w_o = jnp.asarray(rng.standard_normal((2, T, 4, 8)), jnp.float32)
    clean = _on_seq_mesh(w, strategy, q, k, v, rates, ids, w_o)["o"]
    o = _on_seq_mesh(w, strategy, q, k, v, rates.at[0, 16, 1].set(np.nan), ids, w_o)["o"]
    assert np.all(np.isnan(o[0, 16:, 1]))
    untouched = np.ones(o.shape[:3], bool)
    untouched[0, 16:, 1] = False
    np.testing.assert_array_equal(o[untouched], clean[untouched])


# Rates up to 6 per position: a rank's decay is about exp(-50) to exp(-70) and the decays between positions reach
# float32's denormals. Measured (CPU, seeds 0-2, every strategy, seq 2 and 3, per rank): worst 3.8e-6 (the decay
# gradient; o, dq, dk, dv below it), from the chunk's running sums of up to 24 x 6 (one device: xla's 7.7e-6).
STEEP_TOL = 1e-5


@pytest.mark.parametrize("w", [2, 3])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_steep_decay_on_every_rank(strategy, w, rng):
    """Per-token rates in [0, 6] with documents (NAN_STARTS' rows): outputs and gradients of q, k, v and the rates
    on every rank against float64."""
    q, k, v = qkv(rng, 2, T, 4, 2, 8, 8)
    rates = jnp.asarray(rng.uniform(0.0, 6.0, size=(2, T, 4)), jnp.float32)
    ids = jnp.asarray(document_ids(NAN_STARTS, T))
    w_o = jnp.asarray(rng.standard_normal((2, T, 4, 8)), jnp.float32)
    got = _on_seq_mesh(w, strategy, q, k, v, rates, ids, w_o)
    with jax.enable_x64(True):
        f64 = [jnp.asarray(np.asarray(x), jnp.float64) for x in (q, k, v, rates)]
        dense = lambda q, k, v, rates: reference.dense_tokens(q, k, v, rates, ids, scale=0.5)[0]
        want = {"o": np.asarray(dense(*f64))}
        grads = jax.grad(lambda *a: jnp.sum(dense(*a) * np.asarray(w_o)), argnums=(0, 1, 2, 3))(*f64)
        want.update({n: np.asarray(g) for n, g in zip(("dq", "dk", "dv", "drates"), grads)})
    for name in want:
        per_rank = per_rank_errors(got[name], want[name], w)
        assert max(per_rank) < STEEP_TOL, (name, per_rank)
