"""Per-token decay and packed documents on one device: reference and xla against a float64 oracle.

The oracle is reference.dense_tokens evaluated in float64 (jax.enable_x64), its gradients by autodiff in float64;
the implementations run in float32 (rates, states and every sum float32)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import lasp_jax
from lasp_jax.ops import impls, reference, states, vjp
from tests.util import BF16_TOL, F32_TOL, qkv, rel_err

IMPLS = ["reference", "xla"]
# Bounds ~2-3x the worst measured over seeds 0-2 (CPU, 2026-11-29; o, final state, dq, dk, dv, d_rates,
# d_initial_state against float64): every case 4.4e-7 (F32_TOL) but steep_long, where an exponent near the end of
# a chunk is a difference of running sums of up to 64 x 6: xla 1.6e-6 (o, dq, dk, dv), 7.7e-6 (d_rates); the
# reference's sums run over the whole row (up to 1000 x 6, its docstring says so): 2.2e-5, 7.1e-5 (d_rates).
STEEP_TOL = {"xla": 2e-5, "reference": 2e-4}


def documents(rng, b, t, starts=(), p=0.0):
    """[B, T] int32 ids: a new document at each position in `starts` and, at random, with probability p."""
    new = rng.uniform(size=(b, t)) < p
    new[:, list(starts)] = True
    new[:, 0] = False
    return np.cumsum(new, axis=1).astype(np.int32) + 7  # ids need not start at 0


# name: ((B, T, H, Hkv, Dk, Dv), rates (low, high), document starts (fixed positions, random rate), scale).
# Chunk 64: T odd and not a multiple of it; documents at chunk boundaries (T=201 is front-padded by 55, so the
# chunks start at 9, 73 and 137) and one position long (138); slow decay (a leak across a document stays
# visible); steep decay over 1000 tokens in one document.
CASES = {
    "gqa_docs": ((2, 150, 4, 2, 16, 8), (0.0, 0.3), ((37, 38, 100), 0.02), 0.25),
    "mqa_slow_chunk_starts": ((1, 201, 4, 1, 8, 16), (0.005, 0.015), ((73, 137, 138), 0.0), 1.0),
    "steep_long": ((1, 1000, 2, 2, 8, 8), (0.0, 6.0), ((), 0.0), 1.0),
    "one_position_docs": ((2, 9, 2, 1, 8, 8), (0.0, 0.5), ((1, 2, 3, 5, 6, 8), 0.0), 0.5),
    "no_ids_mha": ((2, 70, 2, 2, 16, 16), (0.0, 0.3), None, 1.0),
}


def _inputs(case, rng):
    (b, t, h, hkv, dk, dv), (lo, hi), docs, scale = CASES[case]
    q, k, v = qkv(rng, b, t, h, hkv, dk, dv)
    rates = jnp.asarray(rng.uniform(lo, hi, size=(b, t, h)), jnp.float32)
    ids = None if docs is None else jnp.asarray(documents(rng, b, t, *docs))
    s0 = jnp.asarray(rng.standard_normal((b, h, dk, dv)), jnp.float32)
    return q, k, v, rates, ids, s0, scale


def _loss_and_grads(attend, q, k, v, rates, s0, w_o, w_s):
    def loss(q, k, v, rates, s0):
        o, final = attend(q, k, v, rates, s0)
        return jnp.sum(o * w_o) + jnp.sum(final * w_s), (o, final)

    (_, (o, final)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)(q, k, v, rates, s0)
    return {"o": o, "final_state": final, **dict(zip(["dq", "dk", "dv", "d_rates", "d_initial_state"], grads))}


def long_document_errors(impl, rng, t: int, d: int = 64) -> dict[str, float]:
    """rel_err of `impl` (a TokenImpl) against xla in float32 on the same bf16-rounded inputs, over one document
    of t positions (B = H = 1, S_in and G, rates in [0.001, 0.1]): o, the final state and every gradient. The
    rates' gradient there is a suffix sum of t terms k.dk - q.dq (the kernels' long-document tests)."""
    q, k, v = (x.astype(jnp.bfloat16) for x in qkv(rng, 1, t, 1, 1, d, d))
    q = (q.astype(jnp.float32) * np.sqrt(d)).astype(jnp.bfloat16)
    rates = jnp.asarray(rng.uniform(0.001, 0.1, size=(1, t, 1)), jnp.float32)
    ids = jnp.zeros((1, t), jnp.int32)
    s0, w_s = (jnp.asarray(rng.standard_normal((1, 1, d, d)), jnp.float32) for _ in range(2))
    w_o = jnp.asarray(rng.standard_normal((1, t, 1, d)), jnp.float32)

    def run(impl, q, k, v):
        attend = lambda q, k, v, rates, s0: vjp.attend_tokens(q, k, v, rates, ids, s0, impl, None, True, d ** -0.5)
        args = (q, k, v, rates, s0, w_o, w_s)
        # Without LLVM's expensive passes: the interpreted kernels' HLO compiles in about half the time.
        options = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
        return jax.jit(functools.partial(_loss_and_grads, attend)).lower(*args).compile(compiler_options=options)(
            *args)

    got, want = run(impl, q, k, v), run(impls.IMPLS["xla"], *(x.astype(jnp.float32) for x in (q, k, v)))
    return {name: rel_err(got[name], want[name]) for name in want}


def _oracle(q, k, v, rates, ids, s0, scale, w_o, w_s):
    with jax.enable_x64(True):
        f64 = [jnp.asarray(np.asarray(x), jnp.float64) for x in (q, k, v, rates, s0, w_o, w_s)]
        return {n: np.asarray(x) for n, x in _oracle_f64(*f64, ids, scale).items()}


@functools.partial(jax.jit, static_argnames="scale")
def _oracle_f64(q, k, v, rates, s0, w_o, w_s, ids, scale):
    """_loss_and_grads of reference.dense_tokens, float64 under jax.enable_x64. One jit at module level: one
    compile per case's shapes, shared by the impls tested on it (eager, the autodiff dispatched op by op)."""
    attend = lambda q, k, v, rates, s0: reference.dense_tokens(q, k, v, rates, ids, s0, scale)
    return _loss_and_grads(attend, q, k, v, rates, s0, w_o, w_s)


# xla on every case; the reference's per-token path (dense) on the documents and the steep row.
ORACLE_PARAMS = [(case, "xla") for case in CASES] + [("gqa_docs", "reference"), ("steep_long", "reference")]


@pytest.mark.parametrize("case,impl", ORACLE_PARAMS)
def test_matches_float64_oracle(case, impl, rng):
    """o, the final state and the gradients of q, k, v, the per-token rates and the initial state."""
    q, k, v, rates, ids, s0, scale = _inputs(case, rng)
    w_o = jnp.asarray(rng.standard_normal(q.shape[:3] + v.shape[-1:]), jnp.float32)
    w_s = jnp.asarray(rng.standard_normal(s0.shape), jnp.float32)
    attend = lambda q, k, v, rates, s0: lasp_jax.linear_attention(
        q, k, v, rates, segment_ids=ids, scale=scale, initial_state=s0, return_final_state=True, impl=impl)
    got = jax.jit(functools.partial(_loss_and_grads, attend))(q, k, v, rates, s0, w_o, w_s)
    want = _oracle(q, k, v, rates, ids, s0, scale, w_o, w_s)
    for name in want:
        assert got[name].shape == want[name].shape, name
        assert np.all(np.isfinite(np.asarray(got[name]))), name
        tol = STEEP_TOL[impl] if case == "steep_long" else F32_TOL
        assert rel_err(got[name], want[name]) < tol, (name, rel_err(got[name], want[name]))


@pytest.mark.parametrize("impl", IMPLS)
def test_state_chaining_across_a_document(impl, rng):
    """Two calls passing the final state equal one call, with a document spanning the split point and one
    starting one position after it (the state carries into the second call's first document only). A document
    starting exactly at the split is the caller's to cut: initial_state belongs to position 0's document."""
    q, k, v = qkv(rng, 2, 130, 4, 2, 16, 8)
    rates = jnp.asarray(rng.uniform(0, 0.3, size=(2, 130, 4)), jnp.float32)
    ids = jnp.asarray(np.stack([documents(rng, 1, 130, (20, 90))[0], documents(rng, 1, 130, (20, 62))[0]]))
    split = 61
    call = functools.partial(lasp_jax.linear_attention, return_final_state=True, impl=impl)
    o1, st = call(q[:, :split], k[:, :split], v[:, :split], rates[:, :split], segment_ids=ids[:, :split])
    o2, st2 = call(q[:, split:], k[:, split:], v[:, split:], rates[:, split:], segment_ids=ids[:, split:],
                   initial_state=st)
    o, final = call(q, k, v, rates, segment_ids=ids)
    assert rel_err(jnp.concatenate([o1, o2], axis=1), o) < F32_TOL
    assert rel_err(st2, final) < F32_TOL


@pytest.mark.parametrize("impl", IMPLS)
def test_constant_decay_with_one_document_changes_nothing(impl, rng):
    """Constant [H] rates with segment_ids of one document equal the constant path: outputs, final state (its
    convention, S(T) = lambda H_(T-1)), gradients; the constant rates stay a constant for autodiff."""
    q, k, v = qkv(rng, 2, 100, 4, 2, 16, 8)
    s = jnp.asarray([0.0, 0.05, 0.3, 2.0], jnp.float32)
    s0 = jnp.asarray(rng.standard_normal((2, 4, 16, 8)), jnp.float32)
    ids = jnp.full((2, 100), 3, jnp.int32)

    def loss(q, s0, s, ids):
        o, final = lasp_jax.linear_attention(q, k, v, s, segment_ids=ids, initial_state=s0, return_final_state=True,
                                             impl=impl)
        return jnp.sum(o ** 2) + jnp.sum(final ** 2), (o, final)

    (_, (o, final)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, s0, s, ids)
    (_, (o_c, final_c)), grads_c = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(q, s0, s, None)
    assert rel_err(o, o_c) < F32_TOL and rel_err(final, final_c) < F32_TOL
    for g, g_c in zip(grads[:2], grads_c):
        assert rel_err(g, g_c) < F32_TOL
    assert np.all(np.asarray(grads[2]) == 0.0)


def test_documents_are_independent(rng):
    """Each document of a packed row equals its own call (no state leaks across a start), the initial state
    reaching the first document only; the decay gradient is exactly 0 at a document start (its rate decays
    nothing) and a document's rates get no gradient from the others' outputs."""
    q, k, v = qkv(rng, 1, 150, 2, 1, 8, 8)
    rates = jnp.asarray(rng.uniform(0.005, 0.015, size=(1, 150, 2)), jnp.float32)
    s0 = jnp.asarray(rng.standard_normal((1, 2, 8, 8)), jnp.float32)
    bounds = [0, 64, 65, 150]
    ids = jnp.asarray(documents(rng, 1, 150, bounds[1:-1]))
    o = lasp_jax.linear_attention(q, k, v, rates, segment_ids=ids, initial_state=s0)
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        alone = lasp_jax.linear_attention(q[:, a:b], k[:, a:b], v[:, a:b], rates[:, a:b],
                                          initial_state=s0 if i == 0 else None)
        assert rel_err(o[:, a:b], alone) < F32_TOL, i
    w = jnp.zeros(o.shape).at[:, 65:].set(1.0)  # the last document's outputs only
    ds = jax.jit(jax.grad(lambda r: jnp.sum(w * lasp_jax.linear_attention(q, k, v, r, segment_ids=ids,
                                                                          initial_state=s0))))(rates)
    assert np.all(np.asarray(ds[:, bounds[1:-1]]) == 0.0)
    assert np.all(np.asarray(ds[:, :65]) == 0.0)
    assert np.all(np.asarray(ds[:, 66:]) != 0.0)


def test_document_starts_and_numbers():
    """A document starts wherever the id changes (an id that recurs after another is a new document), never at
    position 0 (the piece's first position is the caller's: states.cut_at_first)."""
    ids = jnp.asarray([[5, 5, 3, 3, 5, 5], [0, 0, 0, 0, 0, 0]], jnp.int32)
    np.testing.assert_array_equal(states.document_starts(ids), [[0, 0, 1, 0, 1, 0], [0] * 6])
    np.testing.assert_array_equal(states.document_numbers(ids), [[0, 0, 1, 1, 2, 2], [0] * 6])


def test_decoding_steps_equal_the_call(rng):
    """linear_attention_step with per-token rates and a reset at each document start, from the final state of a
    prefix call, equals one call over the whole row: outputs and final state."""
    q, k, v = qkv(rng, 2, 40, 4, 2, 8, 8)
    rates = jnp.asarray(rng.uniform(0, 0.5, size=(2, 40, 4)), jnp.float32)
    ids = jnp.asarray(documents(rng, 2, 40, (20, 31, 32)))
    o, final = lasp_jax.linear_attention(q, k, v, rates, segment_ids=ids, scale=0.5, return_final_state=True)
    prefix = 17
    _, state = lasp_jax.linear_attention(q[:, :prefix], k[:, :prefix], v[:, :prefix], rates[:, :prefix],
                                         segment_ids=ids[:, :prefix], return_final_state=True)
    outs = []
    for t in range(prefix, 40):
        o_t, state = lasp_jax.linear_attention_step(q[:, t], k[:, t], v[:, t], state, rates[:, t], scale=0.5,
                                                    reset=ids[:, t] != ids[:, t - 1])
        outs.append(o_t)
    assert rel_err(jnp.stack(outs, axis=1), o[:, prefix:]) < F32_TOL
    assert rel_err(state, final) < F32_TOL


def test_bfloat16_inputs_and_rates(rng):
    """bf16 q, k, v and rates: outputs and gradients (in the inputs' dtypes) against the float32 math on the same
    rounded inputs, within one bf16 rounding (measured 1.7e-3 to 2.0e-3, seeds 0-2; BF16_TOL 7e-3)."""
    q, k, v = qkv(rng, 2, 150, 4, 2, 16, 16, jnp.bfloat16)
    rates = jnp.asarray(rng.uniform(0, 0.3, size=(2, 150, 4)), jnp.bfloat16)
    ids = jnp.asarray(documents(rng, 2, 150, (64,), 0.02))
    loss = lambda attend, *a: jnp.sum(attend(*a, ids)[0].astype(jnp.float32) ** 2)
    ours = lambda q, k, v, r, i: (lasp_jax.linear_attention(q, k, v, r, segment_ids=i),)
    got = jax.jit(jax.grad(functools.partial(loss, ours), argnums=(0, 1, 2, 3)))(q, k, v, rates)
    f32 = [x.astype(jnp.float32) for x in (q, k, v, rates)]
    want = jax.jit(jax.grad(functools.partial(loss, reference.dense_tokens), argnums=(0, 1, 2, 3)))(*f32)
    for name, g, g_want in zip(("dq", "dk", "dv", "d_rates"), got, want):
        assert g.dtype == jnp.bfloat16, name
        assert rel_err(g, g_want) < BF16_TOL, (name, rel_err(g, g_want))


def test_per_token_calls_route_to_token_variants(rng):
    """Per-token decay and documents: "auto" takes xla off a GPU; a named kernel runs its token variant (the
    interpreted Triton kernels here, against xla), GVA heads (q, k of 2 heads, v of 4) included."""
    q, k, v = qkv(rng, 1, 64, 2, 2, 64, 64)
    rates = jnp.full((1, 64, 2), 0.1)
    ids = jnp.zeros((1, 64), jnp.int32).at[:, 40:].set(1)
    assert impls.resolve("auto", q, k, v, per_token=True, partitioned=False) is impls.IMPLS["xla"]
    want = lasp_jax.linear_attention(q, k, v, rates, segment_ids=ids, impl="xla")
    got = lasp_jax.linear_attention(q, k, v, rates, segment_ids=ids, impl="pallas_triton_interpret")
    assert rel_err(got, want) < F32_TOL
    v_gva = jnp.concatenate([v, 2 * v], axis=2)
    rates4 = jnp.asarray(rng.uniform(0.01, 0.2, (1, 64, 4)), jnp.float32)
    want = lasp_jax.linear_attention(q, k, v_gva, rates4, segment_ids=ids, impl="xla")
    got = lasp_jax.linear_attention(q, k, v_gva, rates4, segment_ids=ids, impl="pallas_triton_interpret")
    assert rel_err(got, want) < F32_TOL


BAD = {
    "rates shape": (dict(decay=np.ones((2, 7, 4))), "decay must have shape"),
    "negative rate": (dict(decay=-np.eye(8)[None, :, :4].repeat(2, 0)), ">= 0"),
    "nan rate": (dict(decay=np.where(np.arange(8)[None, :, None] == 5, np.nan, np.ones((2, 8, 4)))), "finite"),
    "inf rate": (dict(decay=np.full((2, 8, 4), np.inf)), "finite"),
    "integer rates": (dict(decay=np.ones((2, 8, 4), np.int32)), "floating-point"),
    "ids shape": (dict(segment_ids=np.zeros((2, 7), np.int32)), "segment_ids must have shape"),
    "ids float": (dict(segment_ids=np.zeros((2, 8), np.float32)), "integer array"),
}


@pytest.mark.parametrize("case", BAD, ids=str)
def test_bad_input_names_the_problem(case):
    kwargs, message = BAD[case]
    q = jnp.zeros((2, 8, 4, 4))
    with pytest.raises(ValueError, match=message):
        lasp_jax.linear_attention(q, q[:, :, :2], q[:, :, :2], **kwargs)


@pytest.mark.parametrize("impl", IMPLS)
def test_traced_bad_rate_poisons_what_depends_on_it(impl, rng):
    """Traced per-token rates cannot be checked at trace time: a negative or non-finite rate turns NaN the
    outputs of its (batch row, head) from its position on and the final state, instead of a silently wrong
    result; the outputs before it and the other (row, head)s are exact. T = 192, chunk 64: the bad rate opens
    chunk 1, so only chunk 1's decay (a NaN factor in the chunk scan) carries it into chunk 2."""
    q, k, v = qkv(rng, 2, 192, 2, 2, 8, 8)
    rates = jnp.asarray(rng.uniform(0, 0.3, size=(2, 192, 2)), jnp.float32)
    for bad in (-0.1, np.nan, np.inf):
        o, final = jax.jit(lambda r: lasp_jax.linear_attention(q, k, v, r, return_final_state=True, impl=impl))(
            rates.at[1, 64, 0].set(bad))
        assert np.all(np.isnan(np.asarray(o[1, 64:, 0]))) and np.all(np.isnan(np.asarray(final[1, 0])))
        o_ref, final_ref = lasp_jax.linear_attention(q, k, v, rates, return_final_state=True, impl=impl)
        assert rel_err(o[1, :64, 0], o_ref[1, :64, 0]) < F32_TOL
        good = np.ones((2, 2), bool)
        good[1, 0] = False
        o, o_ref = (np.asarray(x).transpose(0, 2, 1, 3)[good] for x in (o, o_ref))
        assert rel_err(o, o_ref) < F32_TOL
        assert rel_err(np.asarray(final)[good], np.asarray(final_ref)[good]) < F32_TOL


def test_sharded_batch_and_heads(rng):
    """On an Explicit data x model mesh the per-token rates and ids are split like q (each (batch, head) shard on
    its own device): equal to the unsharded call, outputs and gradients of q and the rates."""
    q, k, v = qkv(rng, 4, 70, 4, 2, 8, 8)
    rates = jnp.asarray(rng.uniform(0, 0.3, size=(4, 70, 4)), jnp.float32)
    ids = jnp.asarray(documents(rng, 4, 70, (30,), 0.03))
    f = lambda q, r: jnp.sum(lasp_jax.linear_attention(q, k, v, r, segment_ids=ids) ** 2)
    want = jax.jit(jax.grad(f, argnums=(0, 1)))(q, rates)
    o_want = jax.jit(lambda q, r: lasp_jax.linear_attention(q, k, v, r, segment_ids=ids))(q, rates)
    mesh = jax.make_mesh((2, 2), ("data", "model"), devices=jax.devices()[:4])
    with jax.set_mesh(mesh):
        spec = NamedSharding(mesh, P("data", None, "model"))
        qs, rs = jax.device_put(q, spec), jax.device_put(rates, spec)
        o = jax.jit(lambda q, r: lasp_jax.linear_attention(q, k, v, r, segment_ids=ids))(qs, rs)
        got = jax.jit(jax.grad(f, argnums=(0, 1)))(qs, rs)
    assert o.sharding.is_equivalent_to(qs.sharding, 4)
    assert rel_err(o, o_want) < F32_TOL
    for g, g_want in zip(got, want):
        assert rel_err(g, g_want) < F32_TOL


def test_non_finite_values_stay_in_their_document(rng):
    """xla: a NaN in document 0's values and an inf in its keys leave every later document's outputs, the
    gradients of q, k, v and the rates there, and the final state equal to the clean row's (bit for bit) and
    finite: chunk states, their products and the chunk scan select across document starts (0 * NaN would be NaN).
    T = 150 with chunk 64 (front padding 42): document 0 fills chunk 0 and runs into chunk 1, where document 1
    starts at 40 (a chunk whose incoming state is NaN). Within one chunk the intra-chunk matmuls still multiply a
    non-finite value by the zero scores of other documents' rows, so the poison sits in a chunk of document 0
    alone (as the reference's dense row would be one chunk: it isolates nothing here)."""
    q, k, v = qkv(rng, 2, 150, 4, 2, 8, 8)
    rates = jnp.asarray(rng.uniform(0, 0.3, size=(2, 150, 4)), jnp.float32)
    ids = jnp.asarray(documents(rng, 2, 150, (40, 100)))
    w_o = jnp.asarray(rng.standard_normal((2, 150, 4, 8)), jnp.float32)

    def loss(q, k, v, rates):
        o, final = lasp_jax.linear_attention(q, k, v, rates, segment_ids=ids, return_final_state=True, impl="xla")
        return jnp.sum(o * w_o) + jnp.sum(final), (o, final)

    run = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))
    (_, clean), clean_grads = run(q, k, v, rates)
    (_, poisoned), grads = run(q, k.at[:, 15, 1].set(np.inf), v.at[:, 5].set(np.nan), rates)
    assert np.all(np.isnan(np.asarray(poisoned[0][:, 5:40])))  # document 0 is poisoned: the check can fail
    for name, got, want in zip(("o", "dq", "dk", "dv", "d_rates"), (poisoned[0], *grads),
                               (clean[0], *clean_grads)):
        later, want_later = np.asarray(got)[:, 40:], np.asarray(want)[:, 40:]
        assert np.all(np.isfinite(later)), name
        np.testing.assert_array_equal(later, want_later, err_msg=name)
    np.testing.assert_array_equal(np.asarray(poisoned[1]), np.asarray(clean[1]), err_msg="final state")
