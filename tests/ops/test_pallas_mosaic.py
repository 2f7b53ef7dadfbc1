"""The Mosaic GPU walks (`lasp_jax.ops.pallas_mosaic.walk`) against `pallas_triton`'s kernels.

The four walks of attention are checked through the identities `pallas_mosaic.Walks` relies on: o = walk(Q, K,
V, S), dQ = walk(dO, V, K, S^T), dV = walk(K, Q, dO, dS, reverse) and dK = walk(V, dO, Q, dS^T, reverse), with S
the state entering each piece (the forward's `pieces.Saved.pieces_in`) and dS the cotangent of the state leaving
it (rebuilt here with `pieces.leaving`, equal to what `pieces.backward` builds from its scan), against o, dQ, dK and dV of the Triton
kernels' forward and backward, from a nonzero incoming state and end-state cotangent.

CPU: the walks run in Mosaic GPU's CPU interpreter (its three warpgroups, TMA copies, barriers and wgmma
simulated) against `pallas_triton.INTERPRET`, on small shapes at the real head dims and chunk (wgmma needs
M = 64 and the kernel 128 head dims), and are lowered for CUDA at the benchmark shape (Mosaic GPU's layout and
shared-memory checks run in the lowering; PTX compilation needs the GPU). GPU (`pytest -m gpu`): the compiled
walks against the compiled Triton kernels.
"""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lasp_jax.ops import pallas_mosaic, pieces
from lasp_jax.ops import pallas_triton as pt
from tests.util import decay, qkv, rel_err

D = 128
# Interpreted runs measured o and dV up to 1.5e-3 on the 4-chunk pieces and 3.03e-3 to 3.12e-3 on three_chunks
# (38 seeds; the state update's decay rounds on the other factor than in the Triton kernels), dQ and dK below
# 1e-4 (they round alike); with scale d^-0.5 3.06e-3 to 3.13e-3 (two_batches, three_chunks, d=64: one seed
# each); at the shapes of CASES (seeds 0-1) 3.23e-3 (two_batches_ring_wraps), 2.9e-3 (mqa_d64), 2.8e-3 (o of
# gqa_three_chunks); tight enough that a wrong decay on the carried state shows.
INTERPRET_TOL = 4e-3
# Under GQA the dK, dV walks write bf16 shares per query head (the Triton kernels float32 ones): one more bf16
# rounding per share; measured 2.8e-3 (dK) and 3.6e-3 (dV) on gqa_three_chunks_scaled (seeds 0-1).
INTERPRET_GQA_TOL = 8e-3
# Compiled walks against compiled Triton kernels: the same rounding differences as interpreted (above), with
# margin; passed on an H200 (2026-11-29; the values themselves were not logged).
GPU_TOL = 6e-3


def _transposed(x):
    return jnp.swapaxes(x, -1, -2)


def _inputs(rng, b, t, h, rates, scale=1.0, d=D, hkv=None):
    """bf16 q, k, v, dO, rates, an incoming state and an end-state cotangent; q of unit variance when scaled."""
    q, k, v = qkv(rng, b, t, h, hkv or h, d, d, jnp.bfloat16)
    if scale != 1.0:
        q = jnp.asarray(rng.standard_normal(q.shape), jnp.bfloat16)
    do = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.bfloat16)
    s = decay(rates, h, rng)
    s_in, g = (jnp.asarray(rng.standard_normal((b, h, d, d)) * 0.1, jnp.float32) for _ in range(2))
    return q, k, v, do, s, s_in, g


def _triton_and_walks(q, k, v, do, s, s_in, g, kernels, mosaic_config, scale=1.0):
    """{name: (Triton's, the walk's)} for o, dq, dk, dv: the Triton `kernels` (a pallas_triton.Kernels) forward
    and backward (with S_in entering and G the end state's cotangent), and the four walks on the same pieces
    (interpreted when the kernels are)."""
    o, _, _, saved = kernels.forward(q, k, v, s, lambda m: s_in, scale)
    dq, dk, dv, _ = kernels.backward(q, k, v, s, saved, do, lambda d: g, scale)
    plan = kernels.plan(q, v)
    assert plan.pad == 0, plan
    # The cotangent leaving each piece, as `pieces.backward` builds it for the dK, dV walks.
    sums = kernels.state_sums(q, do, s, plan, reverse=True, scale=scale)
    pieces_in, pieces_out = saved.pieces_in, pieces.leaving(sums, g, s, plan)
    walk = functools.partial(pallas_mosaic.walk, rates=s, piece_len=plan.piece_len, scale=scale,
                             config=mosaic_config, interpret=kernels.interpret)

    def per_kv_head(x):  # GQA: the walks' per-query-head shares summed as `pieces.backward` does
        b, t, h, d = x.shape
        return x.astype(jnp.float32).reshape(b, t, k.shape[2], h // k.shape[2], d).sum(3).astype(x.dtype)

    return {
        "o": (o, walk(q, k, v, states_in=pieces_in, reverse=False)),
        "dq": (dq, walk(do, v, k, states_in=_transposed(pieces_in), reverse=False)),
        "dv": (dv, per_kv_head(walk(k, q, do, states_in=pieces_out, reverse=True, scale_update=True))),
        "dk": (dk, per_kv_head(walk(v, do, q, states_in=_transposed(pieces_out), reverse=True, scale_update=True))),
    }


# (B, T, H, Hkv, D, rates, stages, scale, (pieces, chunks per piece) of pallas_triton's plan): 2 batches of one
# piece of 4 chunks with a ring of 2 stages (it wraps; TNL slope 2^-8: lambda^64 = 0.78, so the carried state
# matters); one chunk at the default 3 stages (the ring capped at the chunk count); MQA at head dim 64 across 2
# pieces ("on" rates: a zero rate and one whose lambda^64 underflows); GQA (4 query heads on 2 K/V heads) on a
# piece of 3 chunks (the ring of 3 just full). Scale d^-0.5 (on unit-variance q) where the carried state
# matters, 1 elsewhere. Each case costs mostly its own compiles (the heads and chunks add little), so each case
# carries several of these features.
CASES = {
    "two_batches_ring_wraps_scaled": (2, 256, 1, 1, D, "slopes", 2, D ** -0.5, (1, 4)),
    "one_chunk": (1, 64, 1, 1, D, "slopes", 3, 1.0, (1, 1)),
    "mqa_d64_two_pieces_scaled": (1, 512, 2, 1, 64, "on", 3, 64 ** -0.5, (2, 4)),
    "gqa_three_chunks_scaled": (1, 192, 4, 2, D, "slopes", 3, D ** -0.5, (1, 3)),
}


@pytest.mark.parametrize("case", CASES)
def test_interpreted_walks_match_triton(case, rng):
    b, t, h, hkv, d, rates, stages, scale, (n_pieces, chunks) = CASES[case]
    q, k, v, do, s, s_in, g = _inputs(rng, b, t, h, rates, scale, d, hkv)
    plan = pt.INTERPRET.plan(q, v)
    assert (plan.pieces, plan.piece_len // plan.chunk) == (n_pieces, chunks), plan
    config = dataclasses.replace(pallas_mosaic.DEFAULT, stages=stages)
    assert pallas_mosaic.supported(q, k, v, interpret=True) is None
    results = _triton_and_walks(q, k, v, do, s, s_in, g, pt.INTERPRET, config, scale)
    for name, (want, got) in results.items():
        assert got.shape == want.shape and got.dtype == jnp.bfloat16, name
        assert np.all(np.isfinite(np.asarray(got, np.float32))), name
        tol = INTERPRET_GQA_TOL if hkv < h and name in ("dk", "dv") else INTERPRET_TOL
        assert rel_err(got, want) < tol, (name, rel_err(got, want))


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_later_nonfinite_rows_never_reach_earlier_outputs(reverse, rng):
    """A NaN row of Y and an inf row of X at the end of the walk (its last position forward, its first in
    reverse): every other output row is finite and equals the walk without them (the mask selects)."""
    b, t, h = 1, 128, 1
    x, y, z, _, s, s_in, _ = _inputs(rng, b, t, h, "slopes", D ** -0.5)
    states_in = s_in[:, :, None]
    last = 0 if reverse else t - 1
    walk = functools.partial(pallas_mosaic.walk, rates=s, states_in=states_in, piece_len=t, reverse=reverse,
                             scale=D ** -0.5, interpret=True)
    clean = np.asarray(walk(x, y, z), np.float32)
    out = np.asarray(walk(x.at[:, last].set(jnp.inf), y.at[:, last].set(jnp.nan), z), np.float32)
    rest = np.arange(t) != last
    assert np.all(np.isfinite(out[:, rest]))
    assert rel_err(out[:, rest], clean[:, rest]) == 0.0


def _abstract(b, t, h, pieces, d=D, dz=None, hx=None):
    """Abstract x, y [B, T, Hx, d], z [B, T, H, Dz] (Dz = d unless given), rates, states_in [B, H, P, d, Dz]."""
    dz = dz or d
    x = jax.ShapeDtypeStruct((b, t, hx or h, d), jnp.bfloat16)
    z = jax.ShapeDtypeStruct((b, t, h, dz), jnp.bfloat16)
    return x, x, z, jax.ShapeDtypeStruct((h,), jnp.float32), jax.ShapeDtypeStruct((b, h, pieces, d, dz), jnp.float32)


@pytest.mark.parametrize(("d", "dz", "hx"), [(D, D, 16), (64, 64, 16), (D, 64, 2), (64, D, 2)],
                         ids=["d128", "d64", "dx128_dz64_gva", "dx64_dz128_gva"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_lowers_for_cuda_at_the_benchmark_shape(reverse, d, dz, hx):
    """B=1, H=16, T=64K, 8 pieces of 8K: Mosaic GPU's lowering (layouts, transforms, shared memory under the
    227 KB of a Hopper CTA) runs on CPU when lowering for CUDA; only PTX compilation needs the GPU. Also X, Y
    and Z of different head dims (Mamba-2's Dk 128, Dv 64: the output and dV walks have Dx = 128, Dz = 64, the dQ
    and dK walks the reverse) with X, Y of 2 heads (GVA groups)."""
    b, t, h, pieces = 1, 65536, 16, 8
    fn = jax.jit(functools.partial(pallas_mosaic.walk, piece_len=t // pieces, reverse=reverse, scale=d ** -0.5))
    text = fn.trace(*_abstract(b, t, h, pieces, d, dz, hx)).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def test_shared_memory_budget(monkeypatch):
    """4 stages (192 KB of chunk loads) exceed a Hopper CTA: `_launch` cuts the ring to the deepest that fits its
    count of the shared memory, and without that cut Mosaic GPU's lowering refuses the kernel (the budget check
    the test above relies on, so `_bytes` does not count less than Mosaic allocates)."""
    b, t, h = 1, 2048, 2
    config = dataclasses.replace(pallas_mosaic.DEFAULT, stages=4)
    lower = lambda: jax.jit(functools.partial(pallas_mosaic.walk, piece_len=t, reverse=False, config=config)).trace(
        *_abstract(b, t, h, 1)).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in lower()
    monkeypatch.setattr(pallas_mosaic, "_SMEM_BYTES", 1 << 30)
    jax.clear_caches()  # the budget is read when the kernel is traced
    with pytest.raises(ValueError, match="shared memory"):
        lower()


def test_bad_inputs_are_refused(rng):
    q, k, v, _, s, _, _ = _inputs(rng, 1, 256, 2, "on")
    states_in = jnp.zeros((1, 2, 2, D, D), jnp.float32)
    cases = [
        ((q, jnp.concatenate([k] * 3, 2)[:, :, :3], v, s, states_in, 128), "each head count dividing"),
        ((q, k[..., :64], v, s, states_in, 128), "need x, y [B, T, Hx, Dx]"),
        ((q[..., :32], k[..., :32], v[..., :32], s, states_in, 128), "head dims of (64, 128)"),
        ((q.astype(jnp.float32), k, v, s, states_in, 128), "bfloat16"),
        ((q, k, v, s, states_in, 96), "piece_len % chunk"),
        ((q, k, v, s, states_in[:, :, :1], 128), "states_in"),
    ]
    for args, message in cases:
        for reverse in (False, True):
            with pytest.raises(ValueError, match=re.escape(message)):
                pallas_mosaic.walk(*args, reverse=reverse, interpret=True)


def test_supported_says_why(rng):
    q, k, v, _, _, _, _ = _inputs(rng, 1, 64, 2, "on")
    assert pallas_mosaic.supported(q[..., :64], k[..., :64], v, interpret=True) is None  # Dk != Dv
    assert "head dims" in pallas_mosaic.supported(q[..., :32], k[..., :32], v[..., :32])
    assert "head dims" in pallas_mosaic.supported(q, k, v[..., :32])
    assert "bfloat16" in pallas_mosaic.supported(*(x.astype(jnp.float16) for x in (q, k, v)))
    if jax.default_backend() != "gpu":
        assert "CUDA GPU" in pallas_mosaic.supported(q, k, v)
    assert pallas_mosaic.supported(q, k, v, interpret=True) is None


# (B, T, H, Hkv, D) -> pallas_triton's default plan (pieces, piece length).
GPU_SHAPES = {"32_pieces_of_512": ((1, 16384, 4, 4, D), (32, 512)),
              "2_batches_16_pieces": ((2, 4096, 2, 2, D), (16, 256)),
              "d64_64_pieces": ((1, 16384, 4, 4, 64), (64, 256)),
              "gqa_8_on_2": ((1, 16384, 8, 2, D), (16, 1024))}


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_SHAPES)
def test_gpu_walks_match_triton(case, rng):
    """The compiled walks at their default blocks (3 stages, C = 64) on the pieces of pallas_triton's plan,
    both directions, against the compiled Triton kernels; TNL slopes, scale d^-0.5."""
    shape, (n_pieces, piece_len) = GPU_SHAPES[case]
    b, t, h, hkv, d = shape
    q, k, v, do, s, s_in, g = _inputs(rng, b, t, h, "slopes", d ** -0.5, d, hkv)
    if (reason := pallas_mosaic.supported(q, k, v)) is not None:
        pytest.skip(reason)
    plan = pt.KERNELS.plan(q, v)
    assert (plan.pieces, plan.piece_len) == (n_pieces, piece_len), plan
    run = functools.partial(_triton_and_walks, kernels=pt.KERNELS, mosaic_config=pallas_mosaic.DEFAULT,
                            scale=d ** -0.5)
    results = jax.jit(run)(q, k, v, do, s, s_in, g)
    for name, (want, got) in results.items():
        assert np.all(np.isfinite(np.asarray(got, np.float32))), name
        tol = max(GPU_TOL, INTERPRET_GQA_TOL) if hkv < h and name in ("dk", "dv") else GPU_TOL
        assert rel_err(got, want) < tol, (name, rel_err(got, want))
