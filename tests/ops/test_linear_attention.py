"""linear_attention against the reference: every implementation runs the same parameterized contract; the
op-level guarantees (causality with non-finite input, traced bad decay, sharding like q, bad input) follow."""

import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import lasp_jax
from lasp_jax.ops import impls, reference
from tests.util import BF16_TOL, F32_TOL, decay, qkv, rel_err

# Every implementation of impls.IMPLS that runs on CPU; the compiled kernels' GPU tests live in their own files.
IMPLS = ["reference", "xla", "pallas_triton_interpret", "pallas_mosaic_interpret"]

# name: ((B, T, H, Hkv, Dk, Dv), decay kind, scale d^-0.5?). MHA, GQA, MQA; Dk != Dv; T not a multiple of the
# chunk (64) and T < chunk; head dims the kernels do not take (8, 24: reference and xla only); d = 128 MHA (the
# only shape the Mosaic walks take, bf16).
CASES = {
    "mha_decay_on": ((2, 100, 4, 4, 16, 16), "on", False),
    "gqa_slopes_scaled": ((1, 130, 4, 2, 32, 16), "slopes", True),
    "mqa_decay_off": ((2, 64, 4, 1, 16, 32), "off", False),
    "short_zero_scaled": ((1, 5, 2, 1, 16, 16), "zero", True),
    "odd_head_dims": ((1, 40, 2, 1, 8, 24), "on", False),
    "d128_scaled": ((1, 64, 2, 2, 128, 128), "slopes", True),
}
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}
# Bounds against the fp32 dense reference on the same (bf16-rounded) inputs: tests.util's, measured on this
# contract (worst over seeds 0-2 of o, final state, dq, dk, dv, d_initial_state: fp32 3.0e-7, xla and the
# interpreted kernels at d=128; bf16 3.43e-3, dq of the interpreted Triton kernels; xla 3.2e-3, Mosaic 2.9e-3).
TOL = {jnp.float32: F32_TOL, jnp.bfloat16: BF16_TOL}


# The dense reference's output, jitted: one compile per shape instead of the eager op-by-op dispatch of each call.
_dense_o = jax.jit(lambda q, k, v, rates, s0=None: reference.dense(q, k, v, rates, s0)[0])


@functools.partial(jax.jit, static_argnames="scale")
def _dense_loss_grads(q, k, v, s0, rates, w_o, w_s, scale):
    """The contract's loss sum(o w_o) + sum(final w_s) under reference.dense: ((o, final), (dq, dk, dv, ds0)),
    float32. Module-level, so one compile per case's shapes serves every impl and dtype."""
    def loss(q, k, v, s0):
        o, final = reference.dense(q * scale, k, v, rates, s0)
        return jnp.sum(o * w_o) + jnp.sum(final * w_s), (o, final)

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, s0)
    return out, grads


def _contract_params():
    """(impl, case, dtype) wherever the impl's supported() takes the case: no skipped tests, no silent gaps."""
    for impl in IMPLS:
        for case, ((b, t, h, hkv, dk, dv), _, _) in CASES.items():
            for dname, dtype in DTYPES.items():
                q = jax.ShapeDtypeStruct((b, t, h, dk), dtype)
                k = jax.ShapeDtypeStruct((b, t, hkv, dk), dtype)
                v = jax.ShapeDtypeStruct((b, t, hkv, dv), dtype)
                if impls.IMPLS[impl].supported(q, k, v) is None:
                    yield pytest.param(impl, case, dtype, id=f"{impl}-{case}-{dname}")


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")
@pytest.mark.parametrize("impl,case,dtype", list(_contract_params()))
def test_contract_matches_reference(impl, case, dtype, rng):
    """The one contract every implementation meets (tokamax-style shared test): o, the final state and the
    gradients of q, k, v and the initial state against reference.dense, with scale, decay and an initial state."""
    (b, t, h, hkv, dk, dv), decay_kind, scaled = CASES[case]
    q, k, v = qkv(rng, b, t, h, hkv, dk, dv, dtype)
    s = decay(decay_kind, h, rng)
    scale = dk ** -0.5 if scaled else 1.0
    s0 = jnp.asarray(rng.standard_normal((b, h, dk, dv)), jnp.float32)
    w_o = jnp.asarray(rng.standard_normal((b, t, h, dv)), jnp.float32)
    w_s = jnp.asarray(rng.standard_normal((b, h, dk, dv)), jnp.float32)

    def loss(attend, q, k, v, s0):
        o, final = attend(q, k, v, s0)
        return jnp.sum(o.astype(jnp.float32) * w_o) + jnp.sum(final * w_s), (o, final)

    ours = lambda q, k, v, s0: lasp_jax.linear_attention(q, k, v, s, scale=scale, initial_state=s0,
                                                         return_final_state=True, impl=impl)
    (_, (o, final)), grads = jax.jit(jax.value_and_grad(
        functools.partial(loss, ours), argnums=(0, 1, 2, 3), has_aux=True))(q, k, v, s0)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    s_ref = jnp.zeros((h,)) if s is None else s
    (o_ref, final_ref), grads_ref = _dense_loss_grads(*f32, s0, s_ref, w_o, w_s, scale)
    assert o.dtype == q.dtype and o.shape == (b, t, h, dv)
    assert final.dtype == jnp.float32
    got = {"o": o, "final_state": final, **dict(zip(["dq", "dk", "dv", "d_initial_state"], grads))}
    want = {"o": o_ref, "final_state": final_ref, **dict(zip(["dq", "dk", "dv", "d_initial_state"], grads_ref))}
    for name in got:
        assert got[name].shape == want[name].shape, name
        assert rel_err(got[name], want[name]) < TOL[dtype], (name, rel_err(got[name], want[name]))


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_without_state_arguments(impl, rng):
    """The common call (no initial or final state) takes the path that skips the state terms."""
    q, k, v = qkv(rng, 2, 77, 4, 2, 16, 16)
    s = decay("slopes", 4, rng)
    o = lasp_jax.linear_attention(q, k, v, s, impl=impl)
    dq, dk, dv = jax.jit(jax.grad(lambda q, k, v: jnp.sum(lasp_jax.linear_attention(q, k, v, s, impl=impl) ** 2),
                                  argnums=(0, 1, 2)))(q, k, v)
    o_ref = _dense_o(q, k, v, s)
    g_ref = jax.jit(jax.grad(lambda q, k, v: jnp.sum(_dense_o(q, k, v, s) ** 2), argnums=(0, 1, 2)))(q, k, v)
    assert rel_err(o, o_ref) < F32_TOL
    for g, gr in zip((dq, dk, dv), g_ref):
        assert rel_err(g, gr) < F32_TOL


@pytest.mark.parametrize("impl", ["reference", "xla"])
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
    o_d, f_d = jax.jit(reference.dense)(q, k, v, s, s0)
    o_r, f_r = jax.jit(reference.recurrent)(q, k, v, s, s0)
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
    assert rel_err(o, _dense_o(q * 0.25, k, v, s)) < F32_TOL
    ds = jax.jit(jax.grad(lambda s: jnp.sum(lasp_jax.linear_attention(q, k, v, s))))(s)
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
    "empty batch": (dict(q=(0, 8, 4, 4), k=(0, 8, 2, 4), v=(0, 8, 2, 4)), "batch B must be >= 1"),
    "zero head dim": (dict(q=(2, 8, 4, 0), k=(2, 8, 2, 0)), "head dim Dk must be >= 1"),
    "zero value dim": (dict(v=(2, 8, 2, 0)), "head dim Dv must be >= 1"),
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


# q's layouts on a data x model mesh: batch sharded, heads sharded (per head shard: heads are independent),
# both, T over a one-device axis.
LAYOUTS = {
    "batch": P("data", None),
    "heads": P(None, None, "model"),
    "batch_heads": P("data", None, "model"),
    "batch_seq1": P("data", "one"),
}


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto], ids=["explicit", "auto"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_sharded_inputs_come_back_sharded_like_q(layout, axis_type, rng):
    """Output and gradients equal the reference, o is sharded like q (jitted on Explicit, eager on both), and the
    user's next ops that need q's type work: concatenating with q, and o as a scan carry in q's place."""
    q, k, v = qkv(rng, 4, 40, 4, 2, 8, 8)
    s = decay("on", 4, rng)
    s0 = jnp.asarray(rng.standard_normal((4, 4, 8, 8)), jnp.float32)
    o_ref = _dense_o(q, k, v, s, s0)
    g_ref = jax.jit(jax.grad(lambda q, s0: jnp.sum(_dense_o(q, k, v, s, s0) ** 2), argnums=(0, 1)))(q, s0)
    mesh = jax.make_mesh((2, 2, 1), ("data", "model", "one"), axis_types=(axis_type,) * 3,
                         devices=jax.devices()[:4])
    spec = LAYOUTS[layout]
    attend = lambda q, s0: lasp_jax.linear_attention(q, ks, vs, s, initial_state=s0)
    with jax.set_mesh(mesh):
        qs, ks, vs = (jax.device_put(x, NamedSharding(mesh, spec)) for x in (q, k, v))
        eager = attend(qs, s0)
        o = jax.jit(attend)(qs, s0)
        grads = jax.jit(jax.grad(lambda q, s0: jnp.sum(attend(q, s0) ** 2), argnums=(0, 1)))(qs, s0)
        both = jax.jit(lambda q: jnp.concatenate([q, attend(q, s0)], axis=-1))(qs)
        carried, _ = jax.jit(lambda q: jax.lax.scan(lambda c, _: (attend(c, s0) / 4, None), q, length=2))(qs)
    assert eager.sharding.is_equivalent_to(qs.sharding, 4), (eager.sharding, qs.sharding)
    if axis_type == AxisType.Explicit:
        assert o.sharding.is_equivalent_to(qs.sharding, 4), (o.sharding, qs.sharding)
    assert rel_err(o, o_ref) < F32_TOL and rel_err(eager, o_ref) < F32_TOL
    for g, gr in zip(grads, g_ref):
        assert rel_err(g, gr) < F32_TOL
    assert rel_err(both[..., 8:], o_ref) < F32_TOL
    assert rel_err(carried, _dense_o(o_ref / 4, k, v, s, s0) / 4) < F32_TOL


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_nan_at_the_last_position_stays_there(impl, rng):
    """Causal: outputs before position T-1 do not depend on its query and key, even when they hold NaN (a causal
    mask applied by multiplication, 0 * NaN, would spread it). A NaN value v_(T-1) is not covered: it enters the
    (masked scores) @ V product of its own chunk, where 0 * NaN is NaN inside the matmul; across chunks and ranks
    the states keep it out (tests/parallel)."""
    q, k, v = qkv(rng, 1, 130, 2, 2, 8, 8)
    s = decay("on", 2, rng)
    clean = lasp_jax.linear_attention(q, k, v, s, impl=impl)
    o = lasp_jax.linear_attention(q.at[:, -1].set(jnp.nan), k.at[:, -1].set(jnp.nan), v, s, impl=impl)
    assert np.all(np.isfinite(np.asarray(o[:, :-1])))
    assert rel_err(o[:, :-1], clean[:, :-1]) < F32_TOL


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_traced_bad_decay_poisons_its_heads(impl, rng):
    """A traced decay cannot be checked at trace time: a negative or non-finite rate turns its head NaN (every
    position, the final state too) instead of a silently wrong result; the other heads are exact."""
    q, k, v = qkv(rng, 1, 100, 4, 4, 8, 8)
    rates = jnp.asarray([0.1, -0.05, np.nan, 0.2], jnp.float32)
    o, final = jax.jit(lambda s: lasp_jax.linear_attention(q, k, v, s, return_final_state=True, impl=impl))(rates)
    bad = np.array([False, True, True, False])
    assert np.all(np.isnan(np.asarray(o)[:, :, bad])) and np.all(np.isnan(np.asarray(final)[:, bad]))
    o_ref, final_ref = reference.dense(q, k, v, jnp.where(bad, 0.0, rates))
    assert rel_err(o[:, :, ~bad], o_ref[:, :, ~bad]) < F32_TOL
    assert rel_err(final[:, ~bad], final_ref[:, ~bad]) < F32_TOL
    with pytest.raises(ValueError, match=">= 0"):  # concrete: a clear error, as before
        lasp_jax.linear_attention(q, k, v, rates.at[2].set(0.0))


EAGER_SHARD_MAP = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    import lasp_jax
    mesh = jax.make_mesh((2, 4), ("data", "seq"), axis_types=(AxisType.{axis_type},) * 2)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 64, 2, 8)) / 3, jnp.float32)
    s = jnp.asarray([0.1, 0.3])
    spec = P("data", None)
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, NamedSharding(mesh, spec))
        f = jax.shard_map(lambda q: lasp_jax.linear_attention(q, q, q, s), mesh=mesh, in_specs=spec, out_specs=spec)
        o = f(xs)
        g = jax.grad(lambda q: jnp.sum(f(q) ** 2))(xs)
    want = lasp_jax.linear_attention(x, x, x, s, impl="reference")
    print("max error", float(jnp.max(jnp.abs(o - want))), "grad finite", bool(jnp.all(jnp.isfinite(g))))
""")


@pytest.mark.parametrize("axis_type", ["Explicit", "Auto"])
def test_inside_an_eager_shard_map(axis_type):
    """In the user's own shard_map without jit (jax 0.11.2's CPU runtime segfaults on lax.associative_scan in an
    eager shard_map): a subprocess, so that a crash fails this test instead of killing pytest."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-c", EAGER_SHARD_MAP.format(axis_type=axis_type)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, (run.returncode, run.stderr[-3000:])
    error = float(run.stdout.split("max error")[1].split()[0])
    assert error < 1e-5 and "grad finite True" in run.stdout, run.stdout


def test_sequence_sharded_inputs_point_to_lasp_attention():
    mesh = jax.make_mesh((2, 4), ("data", "seq"))
    with jax.set_mesh(mesh):
        q = jax.device_put(jnp.zeros((2, 32, 2, 8)), NamedSharding(mesh, P("data", "seq")))
        with pytest.raises(ValueError, match="use lasp_attention"):
            lasp_jax.linear_attention(q, q, q)
