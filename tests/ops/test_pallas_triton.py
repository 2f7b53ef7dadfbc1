"""The fused Pallas (Triton lowering) kernels against the reference.

CPU (CI): the kernels run in Pallas interpret mode on small shapes, with block sizes shrunk so that every code
path runs: several pieces, several head-dim tiles, a front-padded ragged T, GQA, the fused and the split dK/dV
kernels. GPU (`pytest -m gpu`, on the device machine): the compiled kernels at real block sizes against the
reference and against fla's chunk_simple_gla (g_gamma = -s, scale = d^-0.5) on fresh random inputs.
"""

import contextlib
import dataclasses
import functools
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lasp_jax
from jax.experimental.pallas import triton as pl_triton
from jax.sharding import AbstractMesh, AxisType, NamedSharding, PartitionSpec

from lasp_jax.ops import impls, pallas_mosaic, pallas_triton, reference, vjp
from tests.util import A100, BF16_TOL, F32_TOL, H200, cuda_mlir, decay, fake_gpu, qkv, rel_err

# jax 0.11 deprecates the Pallas Triton backend (it still runs); the module docstring says so once.
pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")

# Interpreted fp32 kernels against the dense reference: measured up to 2.5e-7 over CASES (dv under GQA).
INTERPRET_F32_TOL = 7e-7

# Small blocks so that tiny shapes still exercise pieces, tiles and padding (run interpreted: `_interpreted`).
SMALL = dataclasses.replace(pallas_triton.DEFAULT, chunk=16, block_k=16, block_v=16, state_block=16,
                            target_programs=64, min_piece_chunks=1)


def _interpreted(config=SMALL):
    return pallas_triton.Kernels(config, interpret=True)

# (B, T, H, Hkv, Dk, Dv, fuse_dkdv, target_programs): what the small blocks cut that the shared contract
# (tests/ops/test_linear_attention.py, default blocks: one piece at its sizes) does not: ragged T (front padding:
# the states enter through the separate products), whole pieces (the states enter the piece scans), several
# pieces, B=2, GQA with Dk tiles, MQA with Dv tiles, split dK and dV, batch-major launches.
CASES = {
    "mha_fused": (1, 75, 2, 2, 16, 16, True, 64),
    "mha_fused_b2_whole": (2, 64, 2, 2, 16, 16, True, 64),
    "gqa_tiles": (1, 64, 4, 2, 32, 16, True, 64),
    "mqa_split": (1, 40, 2, 1, 16, 32, False, 64),
    "gqa_batch_major": (1, 64, 4, 2, 32, 16, True, 64),
}


def _attend(impl, q, k, v, s, s0, do, ds_end, scale=1.0):
    """(o, S_end, dq, dk, dv[, dS_0]) through the custom_vjp with `impl`; s0 None: no incoming state and no
    end-state cotangent (ds_end is then ignored), the one-device training path."""
    if s0 is None:
        o, vjp_fn = jax.vjp(lambda q, k, v: vjp.attend(q, k, v, s, None, impl, None, False, scale), q, k, v)
        return (o, *vjp_fn(do))
    (o, s_end), vjp_fn = jax.vjp(lambda q, k, v, s0: vjp.attend(q, k, v, s, s0, impl, None, True, scale),
                                 q, k, v, s0)
    return (o, s_end, *vjp_fn((do, ds_end)))


def _states(rng, b, h, dk, dv, with_states):
    if not with_states:
        return None, None
    return tuple(jnp.asarray(rng.standard_normal((b, h, dk, dv)), jnp.float32) for _ in range(2))


def _names(with_states):
    return ["o", "state", "dq", "dk", "dv", "ds0"] if with_states else ["o", "dq", "dk", "dv"]




def _gpus(shape=(1,), names=("x",), device=H200):
    """An abstract mesh of GPUs (H200s unless told): the kernels lower to Triton IR for it without a GPU."""
    return AbstractMesh(shape, names, axis_types=(AxisType.Auto,) * len(shape), abstract_device=device)


@pytest.mark.parametrize(("with_states", "scaled"), [(False, False), (True, False), (True, True)],
                         ids=["from_zero", "with_states", "with_states_scaled"])
@pytest.mark.parametrize("case", CASES)
def test_contract_matches_reference(case, with_states, scaled, rng):
    """The small-block kernels' forward and backward against the dense reference; with_states: an incoming state and an end-state
    cotangent, which enter the piece scans (or, at ragged T, the separate state products); scaled: scale =
    Dk^-0.5 on unit-variance q (inside the kernels: their mask and q-side decays)."""
    b, t, h, hkv, dk, dv, fuse, programs = CASES[case]
    q, k, v = qkv(rng, b, t, h, hkv, dk, dv)
    scale = dk ** -0.5 if scaled else 1.0
    if scaled:
        q = q * np.sqrt(dk)
    s = decay("on", h, rng)
    do = jnp.asarray(rng.standard_normal((b, t, h, dv)), jnp.float32)
    s0, ds_end = _states(rng, b, h, dk, dv, with_states)
    config = dataclasses.replace(SMALL, fuse_dkdv=fuse, target_programs=programs,
                                 tiles_first=not case.endswith("batch_major"))
    assert pallas_triton.plan(q, v, config).pieces > 1, "the case must cut several pieces"
    got = jax.jit(functools.partial(_attend, _interpreted(config), scale=scale))(q, k, v, s, s0, do, ds_end)
    want = jax.jit(functools.partial(_attend, impls.IMPLS["reference"], scale=scale))(q, k, v, s, s0, do, ds_end)
    for name, x, ref in zip(_names(with_states), got, want, strict=True):
        assert x.shape == ref.shape and x.dtype == ref.dtype, name
        assert np.all(np.isfinite(np.asarray(x))), name
        assert rel_err(x, ref) < INTERPRET_F32_TOL, (name, rel_err(x, ref))


# (T, H, Hkv, D, scale): each case crosses 2 pieces of 4 chunks with an incoming state and an end-state cotangent.
# The walks' own shapes (ring wraps, d64, GQA, MQA, scaled or not) are tests/ops/test_pallas_mosaic.py's, against
# these Triton kernels; here the Walks impl as wired into vjp.attend: whole T with GQA shares at d=64, scaled,
# and ragged T (front padding, the separate state products) at d=128, unscaled.
MOSAIC_CASES = {"whole_gqa_d64_scaled": (512, 4, 2, 64, 64 ** -0.5), "ragged_d128_unscaled": (488, 2, 2, 128, 1.0)}


@pytest.mark.parametrize("case", MOSAIC_CASES)
def test_mosaic_walks_match_reference(case, rng):
    """impl "pallas_mosaic" (Triton state passes, Mosaic walks), interpreted, bf16, against the fp32 dense
    reference: o, the final state and the gradients of q, k, v and the initial state; scale d^-0.5 on
    unit-variance q."""
    t, h, hkv, d, scale = MOSAIC_CASES[case]
    b = 1
    q, k, v = qkv(rng, b, t, h, hkv, d, d, jnp.bfloat16)
    if scale != 1.0:
        q = jnp.asarray(rng.standard_normal(q.shape), jnp.bfloat16)
    s = decay("slopes", h, rng)
    do = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.bfloat16)
    s0, ds_end = _states(rng, b, h, d, d, True)
    plan = pallas_mosaic.INTERPRET.plan(q, v)
    assert (plan.pieces, plan.pad > 0) == (2, case.startswith("ragged")), plan
    assert pallas_mosaic.INTERPRET.supported(q, k, v) is None
    got = jax.jit(functools.partial(_attend, impls.IMPLS["pallas_mosaic_interpret"], scale=scale))(
        q, k, v, s, s0, do, ds_end)
    want = jax.jit(functools.partial(_attend, impls.IMPLS["reference"], scale=scale))(
        *(x.astype(jnp.float32) for x in (q, k, v)), s, s0, do.astype(jnp.float32), ds_end)
    for name, x, ref in zip(_names(True), got, want, strict=True):
        assert x.shape == ref.shape, name
        # measured <= 3.2e-3 (dk, dv of the GQA case; 2.9e-3 ragged; seeds 0-1), as the Triton kernels
        assert rel_err(x, ref) < 6e-3, (name, rel_err(x, ref))


def test_later_nonfinite_inputs_never_reach_earlier_outputs(rng):
    """A NaN key and an inf query at the last position: every earlier output is finite and equals the output
    without them (the causal masks select; the kernels' piece scan selects too, over 4 pieces here). The
    reference and xla cases are tests/ops/test_linear_attention.py's."""
    b, t, h, d = 1, 64, 2, 16
    q, k, v = qkv(rng, b, t, h, h, d, d)
    s = decay("on", h, rng)
    s0 = jnp.asarray(rng.standard_normal((b, h, d, d)), jnp.float32)
    kernels = _interpreted()
    assert kernels.plan(q, v).pieces == 4
    attend = jax.jit(lambda q, k: vjp.attend(q, k, v, s, s0, kernels, None, False, d ** -0.5))
    clean = attend(q, k)
    o = np.asarray(attend(q.at[:, -1].set(jnp.inf), k.at[:, -1].set(jnp.nan)))
    assert np.all(np.isfinite(o[:, :-1]))
    assert rel_err(o[:, :-1], clean[:, :-1]) < INTERPRET_F32_TOL


def test_mosaic_config_checks():
    with pytest.raises(ValueError, match="config.chunk=64 must equal triton.chunk=32"):
        pallas_mosaic.Walks(triton=dataclasses.replace(pallas_triton.DEFAULT, chunk=32))
    q = jax.ShapeDtypeStruct((1, 64, 4, 128), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, 64, 2, 128), jnp.bfloat16)
    assert pallas_mosaic.INTERPRET.supported(q, k, k) is None
    v64, v32 = (jax.ShapeDtypeStruct((1, 64, 2, d), jnp.bfloat16) for d in (64, 32))
    assert pallas_mosaic.INTERPRET.supported(q, k, v64) is None  # Dk != Dv: Mamba-2's 128 / 64
    assert pallas_mosaic.INTERPRET.supported(q, k, v32).startswith("head dims Dk=128, Dv=32")


@dataclasses.dataclass(frozen=True)
class _ScaledExchange:
    """A one-device stand-in for lasp_attention's exchange (no shard_map, which interpret mode cannot run
    under): S_in = a m and G = b d, so the kernels must hand the right m and d to the exchange and take its
    results into their piece scans."""

    a: float
    b: float

    def prefix(self, m, rate):
        return self.a * m

    def suffix(self, d, rate):
        return self.b * d


@pytest.mark.parametrize("case", ["mha_fused", "mha_fused_b2_whole"])
def test_exchange_matches_split_reference(case, rng):
    b, t, h, hkv, dk, dv, fuse, programs = CASES[case]
    q, k, v = qkv(rng, b, t, h, hkv, dk, dv)
    s = decay("on", h, rng)
    do = jnp.asarray(rng.standard_normal((b, t, h, dv)), jnp.float32)
    exchange = _ScaledExchange(0.5, 0.25)

    def run(impl, q, k, v, do):
        o, vjp_fn = jax.vjp(lambda q, k, v: vjp.attend(q, k, v, s, None, impl, exchange, False), q, k, v)
        return (o, *vjp_fn(do))

    kernels = _interpreted(dataclasses.replace(SMALL, fuse_dkdv=fuse, target_programs=programs))
    got = jax.jit(functools.partial(run, kernels))(q, k, v, do)
    want = jax.jit(functools.partial(run, impls.IMPLS["reference"]))(q, k, v, do)
    for name, x, ref in zip(["o", "dq", "dk", "dv"], got, want, strict=True):
        assert rel_err(x, ref) < F32_TOL, name


def test_supported_reasons(rng):
    """What the kernels take (any platform interpreted), and what their GPU tests qualified (compiled)."""
    q, k, v = qkv(rng, 1, 8, 2, 1, 48, 16)
    assert "Dk=48" in pallas_triton.supported(q, k, v, interpret=True)
    q, k, v = qkv(rng, 1, 8, 2, 1, 16, 16)
    assert pallas_triton.supported(q, k.astype(jnp.bfloat16), v, interpret=True).startswith("q, k, v must share")
    assert pallas_triton.supported(q, k, v, interpret=True) is None
    q, k, v = qkv(rng, 1, 8, 2, 1, 64, 64, jnp.float16)
    assert pallas_triton.supported(q, k, v, interpret=True) is None
    q, k, v = qkv(rng, 1, 8, 2, 1, 64, 64)
    if jax.default_backend() != "gpu":
        assert "CUDA GPU" in pallas_triton.supported(q, k, v)
        assert impls.resolve("auto", q, k, v) is impls.IMPLS["xla"], "auto must not pick an unusable kernel"
        with pytest.raises(ValueError, match="cannot run these inputs"):
            lasp_jax.linear_attention(q, k, v, impl="pallas_triton")


def test_gpu_gates_are_fail_closed(monkeypatch):
    """On a GPU "auto" takes the kernels only on the exact device kinds (and head dims, dtypes, per-token decay)
    their GPU tests passed on: a sibling of a tested part (GH200), an untested generation (A100), fp32 at d=128,
    the Mosaic walks on the H100 (their tests have not completed there), GVA heads and the walks at Dk != Dv
    where their own tables do not name the GPU are passed over, and "auto" takes what is left, warning once where it passed over the Triton kernels.
    Named, the Triton kernels run on any CUDA GPU of compute capability >= 8.0 with a warning; the Mosaic walks
    are refused off their qualified kinds."""
    bf16, f32, f32_d256 = (jax.ShapeDtypeStruct((1, 64, 2, d), dtype)
                           for d, dtype in ((128, jnp.bfloat16), (128, jnp.float32), (256, jnp.float32)))
    f32_d64 = jax.ShapeDtypeStruct((1, 64, 2, 64), jnp.float32)
    bf16_d32, bf16_d64 = (jax.ShapeDtypeStruct((1, 64, 2, d), jnp.bfloat16) for d in (32, 64))
    monkeypatch.setattr(impls, "warned", set())
    on = functools.partial(fake_gpu, monkeypatch)

    def auto(x, y=None):
        return impls.resolve("auto", x, x, x if y is None else y)

    def named(name, x):
        return impls.resolve(name, x, x, x)

    on("NVIDIA H200", "9.0")
    for x in (bf16, f32, f32_d64, f32_d256):
        assert pallas_triton.supported(x, x, x) is None and impls.qualification("pallas_triton", x, x, x) is None
    assert impls.qualification("pallas_mosaic", bf16, bf16, bf16) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # qualified: no warning
        assert auto(bf16) is impls.IMPLS["pallas_mosaic"]
        assert auto(f32) is impls.IMPLS["pallas_triton"]
    assert "head dims (64, 128, 256), not Dk=32" in impls.qualification("pallas_triton", bf16_d32, bf16_d32, bf16_d32)
    # The walks' GPU cases at d=64 and with GQA passed on the H200: "auto" takes them there too.
    assert auto(bf16_d64) is impls.IMPLS["pallas_mosaic"]
    gqa_kv = jax.ShapeDtypeStruct((1, 64, 1, 128), jnp.bfloat16)
    assert impls.resolve("auto", bf16, gqa_kv, gqa_kv) is impls.IMPLS["pallas_mosaic"]
    with pytest.warns(impls.UnqualifiedWarning, match="passed over 'pallas_triton'.*Dk=32"):
        assert auto(bf16_d32) is impls.IMPLS["xla"]
    # Per-token decay: both families' token variants are qualified on the H200 ("auto" takes the walks in bf16,
    # the Triton kernels in fp32, which the walks do not take).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert impls.resolve("auto", bf16, bf16, bf16, per_token=True) is impls.IMPLS["pallas_mosaic"]
        assert impls.resolve("auto", f32, f32, f32, per_token=True) is impls.IMPLS["pallas_triton"]
    # GVA heads (Mamba-2's: q and k of 1 group, v of 4 heads, Dk 128, Dv 64) and the walks at Dk != Dv: their GPU
    # tests (tests/ops/test_gva.py) passed on the H200, so "auto" takes the walks; each table gates on its own.
    group, heads = jax.ShapeDtypeStruct((1, 64, 1, 128), jnp.bfloat16), jax.ShapeDtypeStruct((1, 64, 4, 64),
                                                                                            jnp.bfloat16)
    assert pallas_mosaic.supported(group, group, heads) is None and pallas_triton.supported(group, group, heads) is None
    for per_token in (False, True):
        assert impls.resolve("auto", group, group, heads, per_token=per_token) is impls.IMPLS["pallas_mosaic"]
        assert impls.qualification("pallas_triton", group, group, heads, per_token=per_token) is None
    mha_dv64 = jax.ShapeDtypeStruct((1, 64, 2, 64), jnp.bfloat16)
    monkeypatch.setitem(impls.QUALIFIED_UNEQUAL_DIMS_GPUS, "pallas_mosaic", ())
    assert "Dk != Dv (Dk 128, Dv 64)" in impls.qualification("pallas_mosaic", bf16, bf16, mha_dv64)
    assert impls.qualification("pallas_triton", bf16, bf16, mha_dv64) is None
    monkeypatch.setitem(impls.QUALIFIED_GVA_GPUS, "pallas_mosaic", ())
    for per_token in (False, True):
        assert "heads beyond MHA/GQA/MQA (q 1, k 1, v 4 heads)" in impls.qualification(
            "pallas_mosaic", group, group, heads, per_token=per_token)
        with pytest.raises(ValueError, match="'pallas_mosaic' is not qualified here.*heads beyond"):
            impls.resolve("pallas_mosaic", group, group, heads, per_token=per_token)
    monkeypatch.setitem(impls.QUALIFIED_GVA_GPUS, "pallas_triton", ())
    with pytest.warns(impls.UnqualifiedWarning, match="passed over 'pallas_triton'.*heads beyond"):
        assert impls.resolve("auto", group, group, heads) is impls.IMPLS["xla"]
    with pytest.warns(impls.UnqualifiedWarning, match="'pallas_triton' runs unqualified.*heads beyond"):
        assert impls.resolve("pallas_triton", group, group, heads) is impls.IMPLS["pallas_triton"]

    on("NVIDIA H100 80GB HBM3", "9.0")
    assert impls.qualification("pallas_triton", bf16, bf16, bf16) is None
    assert "per-token decay or documents has passed its GPU tests on ('NVIDIA H200',), not on 'NVIDIA H100" in (
        impls.qualification("pallas_triton", bf16, bf16, bf16, per_token=True))
    assert impls.qualification("pallas_triton", f32_d64, f32_d64, f32_d64) is None
    for q, v in ((f32, f32), (f32_d256, f32_d256), (f32_d64, f32)):  # Dk = 64, Dv = 128 too
        assert "fp32 at head dims above 64" in impls.qualification("pallas_triton", q, q, v)
    assert pallas_mosaic.supported(bf16, bf16, bf16) is None, "the kernel itself runs on any Hopper"
    assert "not on 'NVIDIA H100 80GB HBM3'" in impls.qualification("pallas_mosaic", bf16, bf16, bf16)
    assert auto(bf16) is impls.IMPLS["pallas_triton"]
    with pytest.warns(impls.UnqualifiedWarning, match="fp32 at head dims above 64"):
        assert auto(f32) is impls.IMPLS["xla"]
    with pytest.raises(ValueError, match="'pallas_mosaic' is not qualified here"):
        named("pallas_mosaic", bf16)

    on("NVIDIA GH200 480GB", "9.0")
    assert "not on 'NVIDIA GH200 480GB'" in impls.qualification("pallas_triton", bf16, bf16, bf16)
    with pytest.warns(impls.UnqualifiedWarning, match="passed over 'pallas_triton'"):
        assert auto(bf16) is impls.IMPLS["xla"]

    on("NVIDIA A100-SXM4-80GB", "8.0")
    assert pallas_triton.supported(bf16, bf16, bf16) is None, "the Triton lowering takes any sm_80+"
    assert "needs a Hopper GPU" in pallas_mosaic.supported(bf16, bf16, bf16)
    with pytest.warns(impls.UnqualifiedWarning, match="passed over 'pallas_triton'.*A100.*impl='pallas_triton'"):
        assert auto(bf16) is impls.IMPLS["xla"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert auto(bf16) is impls.IMPLS["xla"], "warned once"
    with pytest.warns(impls.UnqualifiedWarning, match="'pallas_triton' runs unqualified.*A100"):
        assert named("pallas_triton", bf16) is impls.IMPLS["pallas_triton"]

    on("Tesla T4", "7.5")
    assert "compute capability >= 8.0" in pallas_triton.supported(bf16, bf16, bf16)
    with pytest.raises(ValueError, match="compute capability >= 8.0"):
        named("pallas_triton", bf16)
    # Interpreted, the kernels stay usable (and qualified) wherever they run.
    for name in ("pallas_triton_interpret", "pallas_mosaic_interpret"):
        assert named(name, bf16) is impls.IMPLS[name]


def test_auto_prefers_the_kernels_where_supported(monkeypatch, rng):
    """"auto" takes the Mosaic walks, else the Triton kernels, wherever they report themselves usable and
    qualified, and XLA otherwise."""
    q, k, v = qkv(rng, 1, 8, 2, 1, 64, 64)
    reasons = {"mosaic": None, "triton": None}
    monkeypatch.setattr(pallas_mosaic, "supported", lambda q, k, v, interpret=False: reasons["mosaic"])
    monkeypatch.setattr(pallas_triton, "supported", lambda q, k, v, interpret=False: reasons["triton"])
    monkeypatch.setattr(impls, "qualification", lambda name, q, k, v, **_: None)
    assert impls.resolve("auto", q, k, v) is impls.IMPLS["pallas_mosaic"]
    reasons["mosaic"] = "not here"
    assert impls.resolve("auto", q, k, v) is impls.IMPLS["pallas_triton"]
    reasons["triton"] = "not here"
    assert impls.resolve("auto", q, k, v) is impls.IMPLS["xla"]


@pytest.mark.parametrize("axis_type", ["explicit", "auto"])
def test_kernels_only_run_per_device(axis_type, monkeypatch, rng):
    """pallas_call has no sharding rule: on inputs XLA splits over devices (a batch-sharded Explicit array, or
    an ambient Auto mesh) "auto" takes XLA, and naming the kernels is an error, not a silent gather."""
    monkeypatch.setattr(pallas_triton, "supported", lambda q, k, v, interpret=False: None)  # as on a GPU
    kind = AxisType.Explicit if axis_type == "explicit" else AxisType.Auto
    mesh = jax.make_mesh((2,), ("data",), axis_types=(kind,), devices=jax.devices()[:2])
    q, k, v = qkv(rng, 2, 32, 2, 1, 16, 16)
    s = decay("on", 2, rng)
    sharded = [jax.device_put(x, NamedSharding(mesh, PartitionSpec("data"))) for x in (q, k, v)]
    attend = lambda impl: jax.jit(lambda q, k, v: lasp_jax.linear_attention(q, k, v, s, impl=impl))
    context = jax.set_mesh(mesh) if axis_type == "auto" else contextlib.nullcontext()
    with context:
        with pytest.raises(ValueError, match="runs per device"):
            attend("pallas_triton_interpret")(*sharded)
        o = attend("auto")(*sharded)
    assert rel_err(o, reference.dense(q, k, v, s)[0]) < F32_TOL


@pytest.mark.parametrize("device", [H200, A100], ids=["h200", "a100"])
@pytest.mark.parametrize("overrides", [{}, {"block_k": 128, "block_v": 128}, {"tiles_first": False, "state_block": 64}],
                         ids=["default", "fused_dkdv", "batch_major"])
def test_lowers_to_triton(overrides, device):
    """Without a GPU: the real (not interpreted) kernels lower to Triton IR for an abstract H200 and an abstract
    A100 (sm_80, where naming impl="pallas_triton" runs unqualified), forward and backward, at real block sizes
    (d=128, GQA, ragged T, scale d^-0.5). PTX compilation and the run need the GPU tests."""
    kernels = pallas_triton.Kernels(dataclasses.replace(pallas_triton.DEFAULT, **overrides))
    s = jnp.full((4,), 0.1, jnp.float32)

    def fwd_bwd(q, k, v, do):
        o, vjp_fn = jax.vjp(lambda q, k, v: vjp.attend(q, k, v, s, None, kernels, None, False, 128 ** -0.5),
                            q, k, v)
        return o, vjp_fn(do)

    q = jax.ShapeDtypeStruct((1, 1000, 4, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 1000, 2, 128), jnp.bfloat16)
    text = cuda_mlir(fwd_bwd, _gpus(device=device), q, kv, kv, q)
    # forward: state pass, piece scan, output pass; backward: the Q, dO state pass (the piece states entering dQ
    # are the forward's residual), reverse piece scan, dQ, and dK and dV (one kernel with whole-state tiles, else
    # two).
    fused = overrides.get("block_k") == 128
    assert text.count(pl_triton.CUSTOM_CALL_TARGET_NAME) == (7 if fused else 8)


@pytest.mark.parametrize(("shape", "stages"), [((8, 1024, 32, 128), 2), ((1, 8192, 32, 128), 3)],
                         ids=["crowded", "pieces"])
def test_pipeline_depth_follows_the_launch_size(shape, stages):
    """One-piece launches of more programs than target_programs (B=8, H=32: 512 programs) pipeline 2 deep,
    launches over several pieces 3 (the H200 sweeps in benchmarks/results/KERNEL_NOTES.md)."""
    s = jnp.full((shape[2],), 0.1, jnp.float32)
    q = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    text = cuda_mlir(lambda q, k, v: vjp.attend(q, k, v, s, None, pallas_triton.KERNELS, None, False), _gpus(),
                      q, q, q)
    assert set(re.findall(r"num_stages = (\d+)", text)) == {str(stages)}


def test_whole_states_take_wide_warps():
    """Programs holding a 128 x 128 state (the state passes at the default state_block) take wide_warps; the
    64-wide tiles of the output, dQ, dK and dV passes keep num_warps."""
    config = dataclasses.replace(pallas_triton.DEFAULT, wide_warps=8)
    s = jnp.full((4,), 0.1, jnp.float32)
    q = jax.ShapeDtypeStruct((1, 8192, 4, 128), jnp.bfloat16)
    attend = lambda q, k, v: vjp.attend(q, k, v, s, None, pallas_triton.Kernels(config), None, False)

    def fwd_bwd(q, k, v):
        o, vjp_fn = jax.vjp(attend, q, k, v)
        return o, vjp_fn(o)

    kernels = re.findall(r'name = "(_\w+_kernel)".*?num_warps = (\d+)', cuda_mlir(fwd_bwd, _gpus(), q, q, q))
    assert sorted(kernels) == [("_dkdv_kernel", "4"), ("_dkdv_kernel", "4"), ("_dq_kernel", "4"),
                               ("_output_kernel", "4"), ("_scan_kernel", "4"), ("_scan_kernel", "4"),
                               ("_state_kernel", "8"), ("_state_kernel", "8")]


def test_mosaic_walks_lower_under_shard_map():
    """impl "pallas_mosaic" inside lasp_attention's shard_map over 2 ranks (check_vma, the ring exchange)
    lowers for CUDA without a GPU: the 2 state passes in Triton, the 4 walks in Mosaic GPU."""
    from lasp_jax.parallel.api import SeqExchange

    mesh = _gpus((2,), ("seq",))
    exchange, spec = SeqExchange("ring", "seq", 2), PartitionSpec(None, "seq")
    s = jnp.full((4,), 0.1, jnp.float32)

    def local(q, k, v, do):
        o, vjp_fn = jax.vjp(lambda q, k, v: vjp.attend(q, k, v, s, None, pallas_mosaic.WALKS, exchange, False),
                            q, k, v)
        return o, *vjp_fn(do)

    fwd_bwd = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 4, out_specs=(spec,) * 4))
    x = jax.ShapeDtypeStruct((1, 8192, 4, 128), jnp.bfloat16)
    with jax.sharding.use_abstract_mesh(mesh):
        text = fwd_bwd.trace(x, x, x, x).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count(pl_triton.CUSTOM_CALL_TARGET_NAME) == 4  # the state passes and the piece scans
    assert text.count("custom_call @mosaic_gpu") == 4


@pytest.mark.parametrize(("h", "hkv", "d"), [(8, 2, 128), (4, 4, 64), (8, 1, 64)], ids=["gqa", "d64", "mqa_d64"])
def test_mosaic_impl_lowers_for_cuda(h, hkv, d):
    """impl "pallas_mosaic" forward and backward at GQA and head dim 64 lowers for CUDA without a GPU (Mosaic
    GPU's layout and shared-memory checks): the 2 Triton state passes and the 4 walks."""
    def fwd_bwd(q, k, v, do):
        s = jnp.full((h,), 0.1, jnp.float32)
        o, vjp_fn = jax.vjp(lambda q, k, v: vjp.attend(q, k, v, s, None, pallas_mosaic.WALKS, None, False, d ** -0.5),
                            q, k, v)
        return o, vjp_fn(do)

    q = jax.ShapeDtypeStruct((1, 8192, h, d), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 8192, hkv, d), jnp.bfloat16)
    with jax.sharding.use_abstract_mesh(_gpus()):
        text = jax.jit(fwd_bwd).trace(q, kv, kv, q).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count(pl_triton.CUSTOM_CALL_TARGET_NAME) == 4  # the state passes and the piece scans
    assert text.count("custom_call @mosaic_gpu") == 4


@pytest.mark.parametrize("t", [8192, 512], ids=["pieces", "one_piece"])
def test_lowers_to_triton_under_shard_map(t):
    """Without a GPU: the kernels inside lasp_attention's machinery (shard_map over 2 ranks, check_vma, the
    ring exchange) lower to Triton IR for abstract H200s. Per rank: the state pass (whose end state the
    exchange takes) and the output pass forward; the Q, dO state pass (whose d the exchange takes), dQ, dK, dV
    backward. The incoming states enter the piece scans: no other pass over the tokens."""
    from lasp_jax.parallel.api import SeqExchange

    mesh = _gpus((2,), ("seq",))
    kernels, exchange, spec = pallas_triton.KERNELS, SeqExchange("ring", "seq", 2), PartitionSpec(None, "seq")
    s = jnp.full((4,), 0.1, jnp.float32)

    def local(q, k, v, do):
        o, vjp_fn = jax.vjp(lambda q, k, v: vjp.attend(q, k, v, s, None, kernels, exchange, False), q, k, v)
        return o, *vjp_fn(do)

    def fwd_bwd(q, k, v, do):
        return jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 4, out_specs=(spec,) * 4)(q, k, v, do)

    x = jax.ShapeDtypeStruct((1, t, 4, 128), jnp.bfloat16)
    # one piece (t = 512) carries nothing between pieces: no piece scans
    scans = 2 if t == 8192 else 0
    assert cuda_mlir(fwd_bwd, mesh, x, x, x, x).count(pl_triton.CUSTOM_CALL_TARGET_NAME) == 6 + scans


def test_kernels_refused_where_a_callers_shard_map_leaves_axes_to_xla(monkeypatch, rng):
    """lasp_attention inside a caller's shard_map over seq alone: XLA still partitions the data axis, so the
    kernels are refused there too (naming them is an error; "auto" would take XLA)."""
    monkeypatch.setattr(pallas_triton, "supported", lambda q, k, v, interpret=False: None)
    mesh = jax.make_mesh((2, 2), ("data", "seq"), axis_types=(AxisType.Auto,) * 2, devices=jax.devices()[:4])
    q, k, v = qkv(rng, 2, 32, 2, 1, 16, 16)
    s = decay("on", 2, rng)
    spec = PartitionSpec(None, "seq")

    def local(q, k, v):
        return lasp_jax.lasp_attention(q, k, v, s, impl="pallas_triton_interpret")

    with jax.set_mesh(mesh), pytest.raises(ValueError, match="runs per device"):
        jax.jit(jax.shard_map(local, in_specs=(spec,) * 3, out_specs=spec, axis_names={"seq"}))(q, k, v)


def test_lowers_to_triton_data_parallel(monkeypatch):
    """Without a GPU: under pure data parallelism (a seq axis of size 1, as the models meet it) lasp_attention
    runs the kernels per device inside its shard_map, with no exchange (the allgather strategy would otherwise
    emit an all_gather even over one rank): they lower to Triton IR for abstract H200s, 3 kernels forward
    and 5 backward (each with its piece scan)."""
    monkeypatch.setattr(pallas_triton, "supported", lambda q, k, v, interpret=False: None)  # as on an H200
    monkeypatch.setattr(impls, "qualification", lambda name, q, k, v, **_: None)
    mesh = _gpus((2, 1), ("data", "seq"))
    s = jnp.full((4,), 0.1, jnp.float32)

    def fwd_bwd(q, k, v, do):
        attend = lambda q, k, v: lasp_jax.lasp_attention(q, k, v, s, mesh=mesh, strategy="allgather",
                                                          impl="pallas_triton")
        o, vjp_fn = jax.vjp(attend, q, k, v)
        return o, vjp_fn(do)

    x = jax.ShapeDtypeStruct((2, 8192, 4, 128), jnp.bfloat16)
    text = cuda_mlir(fwd_bwd, mesh, x, x, x, x)
    assert text.count(pl_triton.CUSTOM_CALL_TARGET_NAME) == 8
    assert "all_gather" not in text and "collective_permute" not in text


# ---------------------------------------------------------------------------------------------------------
# GPU: compiled kernels at their real block sizes.

# (B, T, H, Hkv, Dk, Dv, dtype, Config overrides): ragged T, GQA/MQA, fp32, d = 64, 128, 256, Dk != Dv; dK and
# dV in one kernel (whole-state tiles) and in two (the default 64-wide tiles at d=128); a crowded launch; the
# Mosaic walks ("walks": pallas_mosaic.Walks over the Triton Config).
GPU_CASES = {
    "d128_bf16_fused": (2, 3000, 4, 4, 128, 128, jnp.bfloat16, {"block_k": 128, "block_v": 128}),
    "d128_bf16_split": (2, 3000, 4, 4, 128, 128, jnp.bfloat16, {}),
    "d64_gqa_f32": (1, 2048, 8, 2, 64, 64, jnp.float32, {}),
    "d256_bf16": (1, 1024, 2, 2, 256, 256, jnp.bfloat16, {}),
    "dk128_dv64_mqa_bf16": (1, 4096, 4, 1, 128, 64, jnp.bfloat16, {}),
    "d128_bf16_batch_major": (1, 2048, 4, 2, 128, 128, jnp.bfloat16, {"tiles_first": False, "state_block": 64}),
    "d128_bf16_crowded": (8, 512, 32, 32, 128, 128, jnp.bfloat16, {}),  # one piece, 512 programs: 2 stages
    "d128_bf16_whole_8_warps": (2, 3000, 4, 2, 128, 128, jnp.bfloat16,
                                {"block_k": 128, "block_v": 128, "wide_warps": 8}),
    "d256_bf16_8_warps": (1, 1024, 2, 2, 256, 256, jnp.bfloat16, {"wide_warps": 8}),
    "d128_f32": (1, 2048, 4, 2, 128, 128, jnp.float32, {}),
    "d256_f32": (1, 1024, 2, 2, 256, 256, jnp.float32, {}),
    "d128_bf16_mosaic": (2, 3000, 4, 4, 128, 128, jnp.bfloat16, {"walks": pallas_mosaic.DEFAULT}),
    "d128_bf16_mosaic_whole": (1, 8192, 4, 4, 128, 128, jnp.bfloat16, {"walks": pallas_mosaic.DEFAULT}),
    "d128_bf16_mosaic_crowded": (8, 512, 32, 32, 128, 128, jnp.bfloat16, {"walks": pallas_mosaic.DEFAULT}),
    "d64_bf16_mosaic": (2, 3000, 4, 4, 64, 64, jnp.bfloat16, {"walks": pallas_mosaic.DEFAULT}),
    "d128_bf16_mosaic_gqa": (1, 4096, 8, 2, 128, 128, jnp.bfloat16, {"walks": pallas_mosaic.DEFAULT}),
}


def _gpu_tol(dtype):
    # fp32: IEEE matmuls, measured ~1e-6 on the H200 (2026-11-22); bf16: 7e-3, 2.6x the 2.67e-3 the H200
    # benchmark measured at scale d^-0.5 (benchmarks/results/ops_gpu_h200_s7_scale.md).
    return 1e-5 if dtype == jnp.float32 else BF16_TOL


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES)
def test_gpu_matches_reference(case, rng):
    """Unit-variance q with scale = Dk^-0.5 (the usual attention scale, inside the kernels)."""
    b, t, h, hkv, dk, dv, dtype, overrides = GPU_CASES[case]
    q, k, v = qkv(rng, b, t, h, hkv, dk, dv, dtype)
    q = jnp.asarray(rng.standard_normal(q.shape), dtype)
    scale = dk ** -0.5
    s = decay("slopes", h, rng)
    do = jnp.asarray(rng.standard_normal((b, t, h, dv)), dtype)
    s0, ds_end = _states(rng, b, h, dk, dv, True)
    overrides = dict(overrides)
    walks = overrides.pop("walks", None)
    config = dataclasses.replace(pallas_triton.DEFAULT, **overrides)
    impl = pallas_triton.Kernels(config) if walks is None else pallas_mosaic.Walks(walks, config)
    assert impl.supported(q, k, v) is None
    got = jax.jit(functools.partial(_attend, impl, scale=scale))(q, k, v, s, s0, do, ds_end)
    want = jax.jit(functools.partial(_attend, impls.IMPLS["reference"], scale=scale))(
        *(x.astype(jnp.float32) for x in (q, k, v)), s, s0, do.astype(jnp.float32), ds_end)
    for name, x, ref in zip(_names(True), got, want, strict=True):
        assert x.shape == ref.shape, name
        assert np.all(np.isfinite(np.asarray(x, np.float32))), name
        assert rel_err(x, ref) < _gpu_tol(dtype), (name, rel_err(x, ref))


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["pallas_triton", "pallas_mosaic"])
@pytest.mark.parametrize("strategy", ["ring", "allgather", "scan"])
def test_gpu_lasp_attention(strategy, impl, rng):
    """The same kernels under lasp_attention's shard_map, over every GPU here (one or more ranks); the Triton
    kernels with GQA at d=64 in fp32, the Mosaic walks at d=128 in bf16 (what they take).

    Not on CPU: Pallas interpret mode cannot evaluate a kernel under shard_map's check_vma (jax 0.11.2)."""
    n = len(jax.devices())
    mosaic = impl == "pallas_mosaic"
    b, t, h, hkv, dk, dv = (1, 1024 * n, 4, 4, 128, 128) if mosaic else (1, 1024 * n, 4, 2, 64, 64)
    q, k, v = qkv(rng, b, t, h, hkv, dk, dv, jnp.bfloat16 if mosaic else jnp.float32)
    s = decay("on", h, rng)
    w_o = jnp.asarray(rng.standard_normal((b, t, h, dv)), jnp.float32)
    mesh = jax.make_mesh((n,), ("seq",))

    def loss(attend, q, k, v):
        return jnp.sum(attend(q, k, v) * w_o)

    ours = lambda q, k, v: lasp_jax.lasp_attention(
        q, k, v, s, mesh=mesh, strategy=strategy, impl=impl)
    got = jax.jit(jax.grad(lambda *x: loss(ours, *x), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(lambda *x: loss(lambda *y: reference.dense(*y, s)[0], *x), argnums=(0, 1, 2))(
        *(x.astype(jnp.float32) for x in (q, k, v)))
    for name, g, ref in zip(["dq", "dk", "dv"], got, want):
        assert rel_err(g, ref) < _gpu_tol(q.dtype), (name, rel_err(g, ref))


def _eager_against_reference(impl, rng):
    """bf16 inputs at B=1, T=4096, H=4, d=128, TNL slopes, unit-variance q with scale d^-0.5; (inputs (q, k,
    v, s, do), ours (o, dq, dk, dv) from linear_attention and its vjp called eagerly, the fp32 reference's),
    checking ours against the reference."""
    b, t, h, d, dtype = 1, 4096, 4, 128, jnp.bfloat16
    q, k, v = qkv(rng, b, t, h, h, d, d, dtype)
    q = jnp.asarray(rng.standard_normal(q.shape), dtype)
    s = decay("slopes", h, rng)
    do = jnp.asarray(rng.standard_normal((b, t, h, d)), dtype)
    o, vjp_fn = jax.vjp(lambda q, k, v: lasp_jax.linear_attention(q, k, v, s, scale=d ** -0.5, impl=impl), q, k, v)
    ours = (o, *vjp_fn(do))
    ref = jax.jit(functools.partial(_attend, impls.IMPLS["reference"], scale=d ** -0.5))(
        *(x.astype(jnp.float32) for x in (q, k, v)), s, None, do.astype(jnp.float32), None)
    for name, x, r in zip(["o", "dq", "dk", "dv"], ours, ref, strict=True):
        assert rel_err(x, r) < _gpu_tol(dtype), (name, "ours", rel_err(x, r))
    return (q, k, v, s, do), ours, ref


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["pallas_triton", "pallas_mosaic"])
def test_gpu_eager_matches_reference(impl, rng):
    """The eager path (no jit: the custom_vjp's kernels dispatch one by one) at the fla test's shape, without
    torch: tells a failure of that test's own setup from one of our kernels. (In file order it also runs before
    the fla test imports torch.)"""
    _eager_against_reference(impl, rng)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["pallas_triton", "pallas_mosaic"])
def test_gpu_matches_fla(impl, rng):
    """Against fla's chunk_simple_gla (g_gamma = -s, scale = d^-0.5), outputs and gradients, same bf16 inputs."""
    torch = pytest.importorskip("torch", reason="the fla peer needs torch")
    fla_ops = pytest.importorskip("fla.ops.simple_gla", reason="the peer fla-core==0.6.0 is not installed (carry "
                                  "its wheel: benchmarks/results/KERNEL_NOTES.md)")
    (q, k, v, s, do), ours, ref = _eager_against_reference(impl, rng)
    tq, tk, tv, tdo = (torch.tensor(np.asarray(x, np.float32), device="cuda", dtype=torch.bfloat16)
                       for x in (q, k, v, do))
    for x in (tq, tk, tv):
        x.requires_grad_(True)
    g_gamma = -torch.tensor(np.asarray(s), device="cuda", dtype=torch.float32)
    to, _ = fla_ops.chunk_simple_gla(tq, tk, tv, g_gamma=g_gamma, scale=q.shape[-1] ** -0.5)
    to.backward(tdo)
    theirs = [x.detach().float().cpu().numpy() for x in (to, tq.grad, tk.grad, tv.grad)]
    for name, x, y, r in zip(["o", "dq", "dk", "dv"], ours, theirs, ref, strict=True):
        # fla against the fp32 reference too, and the two against each other.
        assert rel_err(y, r) < BF16_TOL, (name, "fla", rel_err(y, r))
        assert rel_err(x, y) < 2 * BF16_TOL, (name, "ours vs fla", rel_err(x, y))
