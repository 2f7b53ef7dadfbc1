"""The fused flash-attention kernels (lasp_jax.ops.softmax_kernel, Pallas interpret mode on CPU) against the
blockwise loop, which tests/ops/test_softmax.py checks against a float64 dense softmax: outputs and dq, dk, dv for
queries from key 0 and at a global offset (traced), GQA, Dv != D, lengths that do not divide the blocks, head dims
off the tiles and packed documents, also over random layouts; the block ranges that skip other documents' keys;
bad input. LASP-2H's ranks
on the kernels are checked end to end in tests/models/test_documents.py (a seq-3 mesh, documents crossing rank
boundaries, against one device). Without a GPU the compiled kernels lower to Triton IR on LASP-2H's ranks; on a
GPU (pytest -m gpu) they run in bf16.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax.experimental.pallas import triton as pl_triton
from jax.sharding import AbstractMesh, AxisType, NamedSharding, PartitionSpec as P

from lasp_jax.ops import kernel_support, softmax, softmax_kernel, states
from lasp_jax.ops.softmax import causal_softmax_attention
from lasp_jax.parallel.softmax_allgather import softmax_allgather_attention
from tests.util import A100, BF16_TOL, H200, cuda_mlir, qkv, rel_err

SMALL = softmax_kernel.Config(block_q=16, block_k=16)
# float32 kernels against the float32 blockwise loop: only the summation order differs (measured <= 3.9e-7 over
# the cases below, outputs and gradients).
KERNEL_TOL = 1e-6
SCALE = 8.0  # logits of spread ~2 on qkv's q, k (std 1/sqrt(d) each), so the running max and lse matter


def _grads(impl, q, k, v, ids, offset, w, scale=SCALE, config=SMALL):
    def loss(q, k, v):
        if impl == "kernel":
            docs = None if ids is None else states.document_numbers(ids)
            o = softmax_kernel.attention(q, k, v, docs, offset, scale, config, interpret=True)
        else:
            o = causal_softmax_attention(q, k, v, segment_ids=ids, q_offset=offset, scale=scale, impl="blockwise")
        return jnp.sum(o.astype(jnp.float32) * w), o
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)


@pytest.mark.parametrize("b, s, length, h, hkv, d, dv, offset, docs", [
    (1, 48, 48, 2, 1, 16, 16, 0, 0.0),      # from key 0, MQA, no documents
    (2, 40, 24, 4, 2, 12, 8, 16, 0.1),      # at an offset, GQA, lengths off the blocks, head dims off the tiles
    (2, 64, 32, 4, 1, 32, 16, 32, 0.08),    # the last rank's rows, documents, Dv != D
], ids=["key0", "offset_docs_gqa_small_dims", "last_rank_docs"])
def test_kernels_match_the_blockwise_loop(rng, b, s, length, h, hkv, d, dv, offset, docs):
    q, k, v = qkv(rng, b, s, h, hkv, d, dv)
    q = q[:, offset:offset + length]
    ids = jnp.asarray(np.cumsum(rng.uniform(size=(b, s)) < docs, axis=1), jnp.int32) if docs else None
    w = jnp.asarray(rng.standard_normal((b, length, h, dv)), jnp.float32)
    (_, o), g = _grads("kernel", q, k, v, ids, jnp.int32(offset), w)  # traced offset
    (_, o_ref), g_ref = _grads("blockwise", q, k, v, ids, offset, w)
    assert rel_err(o, o_ref) < KERNEL_TOL
    for name, a, r in zip("qkv", g, g_ref):
        assert rel_err(a, r) < KERNEL_TOL, f"d{name}"


@pytest.mark.parametrize("b, s, length", [(3, 53, 21), (1, 70, 33)])
def test_random_layouts_match_the_blockwise_loop(rng, b, s, length):
    """Random document layouts (none to one start in two positions) and offsets, traced through one compiled program
    per shape, query and key blocks of different sizes, rows with different documents: no visible key is
    skipped by the block ranges."""
    config = softmax_kernel.Config(block_q=16, block_k=32)
    h, hkv, d, dv = 4, 2, 12, 8

    @jax.jit
    def both(q, k, v, ids, offset, w):
        return (_grads("kernel", q, k, v, ids, offset, w, config=config),
                _grads("blockwise", q, k, v, ids, offset, w))

    for p in (0.0, 0.05, 0.2, 0.5):  # not 1.0: one key per row makes dq exactly 0, a relative error of rounding
        q, k, v = qkv(rng, b, s, h, hkv, d, dv)
        ids = jnp.asarray(np.cumsum(rng.uniform(size=(b, s)) < p, axis=1), jnp.int32)
        offset = int(rng.integers(0, s - length + 1))
        w = jnp.asarray(rng.standard_normal((b, length, h, dv)), jnp.float32)
        ((_, o), g), ((_, o_ref), g_ref) = both(q[:, offset:offset + length], k, v, ids, jnp.int32(offset), w)
        for name, a, r in zip(("o", "dq", "dk", "dv"), (o, *g), (o_ref, *g_ref)):
            assert rel_err(a, r) < KERNEL_TOL, f"{name} at p={p}, offset {offset}"


def test_block_ranges_skip_other_documents():
    """Rows 32..63 of 64 keys in 16-blocks: query block 0 (rows 32-47, first in the document starting at key 31)
    walks key blocks 1-2, block 1 (rows 48-63, document from 44) blocks 2-3; no local row sees key block 0, rows
    32-42 (the document through key 42) see block 1, rows up to 51 block 2, rows 48-63 block 3."""
    starts = [0, 2, 5, 11, 14, 26, 31, 43, 44, 52, 60]
    ids = np.zeros((1, 64), np.int32)
    ids[0, starts[1:]] = 1
    docs = states.document_numbers(jnp.asarray(np.cumsum(ids, axis=1), jnp.int32))
    q = jnp.zeros((1, 32, 1, 16))
    _, _, _, q_ranges, k_ranges = softmax_kernel._plan(q, jnp.zeros((1, 64, 1, 16)), docs, jnp.int32(32), SMALL)
    assert q_ranges[0].tolist() == [[1, 3], [2, 4]]
    assert k_ranges[0].tolist() == [[0, 0], [0, 1], [0, 2], [1, 2]]


def test_bad_input_is_a_clear_error(rng):
    q, k, v = qkv(rng, 1, 32, 2, 1, 16, 16)
    with pytest.raises(ValueError, match="must share one of"):
        softmax_kernel.attention(q.astype(jnp.bfloat16), k, v, None, 0, 1.0, interpret=True)
    with pytest.raises(ValueError, match="block_q must be a power of two >= 16, got 24"):
        softmax_kernel.Config(block_q=24)
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="impl='pallas_triton' cannot run here: .*pallas_triton_interpret"):
            causal_softmax_attention(q, k, v, impl="pallas_triton")
    with pytest.raises(ValueError, match=r"do not fit MHA/GQA: q \(1, 32, 2, 16\), k \(1, 32, 3, 16\)"):
        softmax_kernel.attention(q, *(jnp.repeat(x, 3, axis=2) for x in (k, v)), None, 0, 1.0, interpret=True)
    mesh = jax.make_mesh((2,), ("data",), axis_types=(AxisType.Auto,))
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="has no sharding rule: call it per device"):
        q2, k2, v2 = (jax.device_put(jnp.concatenate([x, x]), NamedSharding(mesh, P("data"))) for x in (q, k, v))
        causal_softmax_attention(q2, k2, v2, impl="pallas_triton_interpret")


@pytest.mark.parametrize("device", [H200, A100], ids=["h200", "a100"])
def test_lowers_to_triton_on_lasp2h_ranks(monkeypatch, device):
    """Without a GPU: LASP-2H with impl="pallas_triton" inside its shard_map over 2 abstract GPUs (check_vma on),
    at the Mamba-2 1.3B hybrid's softmax heads (32 of 64 on 8 K/V heads, bf16) with documents, forward and
    backward, lowers to the three Triton kernels (forward, dQ, dK/dV) for an H200 and an A100 (sm_80)."""
    monkeypatch.setattr(kernel_support, "triton_unavailable", lambda: None)  # as on a GPU
    mesh = AbstractMesh((1, 2), ("data", "seq"), axis_types=(AxisType.Explicit,) * 2, abstract_device=device)
    spec = NamedSharding(mesh, P(None, "seq"))
    shape = lambda *s, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(s, dtype, sharding=spec)  # noqa: E731

    def fwd_bwd(q, k, v, ids, do):
        o, vjp_fn = jax.vjp(lambda q, k, v: softmax_allgather_attention(q, k, v, segment_ids=ids,
                                                                        impl="pallas_triton"), q, k, v)
        return o, vjp_fn(do)

    text = cuda_mlir(fwd_bwd, mesh, shape(1, 8192, 32, 64), shape(1, 8192, 8, 64), shape(1, 8192, 8, 64),
                     shape(1, 8192, dtype=jnp.int32), shape(1, 8192, 32, 64))
    assert text.count(pl_triton.CUSTOM_CALL_TARGET_NAME) == 3


# (dtype, head dim, query rows, bound): what lasp_jax.ops.softmax.FLASH_QUALIFIED lets "auto" take. All passed on an
# H200 (2026-11-30), largest errors: bf16 d 64 3.3e-3, d 128 3.2e-3, one row 3.7e-3 (dq); fp32 d 64 1.0e-6 (dk).
GPU_CASES = {
    "bf16_d64": (jnp.bfloat16, 64, 1024, BF16_TOL),
    "bf16_d128": (jnp.bfloat16, 128, 1024, BF16_TOL),
    "fp32_d64": (jnp.float32, 64, 1024, 3e-6),
    "bf16_d64_one_row": (jnp.bfloat16, 64, 1, BF16_TOL),
}


def test_auto_qualifies_what_the_gpu_cases_cover():
    """softmax.FLASH_QUALIFIED (what "auto" takes) is the (dtype, tile) set of GPU_CASES: widening it needs a case."""
    assert softmax.FLASH_QUALIFIED == {(jnp.dtype(dtype).name, softmax_kernel.tile(d))
                                       for dtype, d, _, _ in GPU_CASES.values()}


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES)
def test_gpu_kernels_match_the_blockwise_loop(case, rng):
    """The compiled kernels (default blocks) against the blockwise loop on fp32-upcast inputs: a LASP-2H rank's
    rows (from key 1024 of 2048, or one row there as a decoding step) with 8 documents, 8 query heads on 2 K/V
    heads."""
    dtype, d, rows, bound = GPU_CASES[case]
    q, k, v = qkv(rng, 1, 2048, 8, 2, d, d, dtype=dtype)
    ids = jnp.asarray(np.cumsum(rng.uniform(size=(1, 2048)) < 8 / 2048, axis=1), jnp.int32)
    w = jnp.asarray(rng.standard_normal((1, rows, 8, d)), jnp.float32)

    def grads(impl, q, k, v):
        def loss(q, k, v):
            o = causal_softmax_attention(q[:, 1024:1024 + rows], k, v, segment_ids=ids, q_offset=jnp.int32(1024),
                                         scale=16.0 * (d / 64) ** 0.5, impl=impl)  # logits of spread ~2
            return jnp.sum(o.astype(jnp.float32) * w), o
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)

    (_, o), g = grads("pallas_triton", q, k, v)
    (_, o_ref), g_ref = grads("blockwise", *(x.astype(jnp.float32) for x in (q, k, v)))
    errors = {name: rel_err(a, r) for name, a, r in zip(("o", "dq", "dk", "dv"), (o, *g), (o_ref, *g_ref))}
    print(case, errors)  # the measured errors, for the bounds
    assert max(errors.values()) < bound, errors


def test_count_sorted_is_searchsorted(rng):
    """count_sorted against np.searchsorted, both sides, on rows with repeats (document numbers) and values below,
    inside and above each row's range; lengths that are and are not powers of two."""
    for s in (1, 7, 64, 1000):
        rows = np.sort(rng.integers(0, 9, size=(3, s)), axis=1).astype(np.int32)
        values = rng.integers(-2, 12, size=(3, 20)).astype(np.int32)
        for inclusive, side in ((False, "left"), (True, "right")):
            got = softmax_kernel.count_sorted(jnp.asarray(rows), jnp.asarray(values), inclusive=inclusive)
            want = np.stack([np.searchsorted(r, v, side=side) for r, v in zip(rows, values)])
            np.testing.assert_array_equal(got, want)


def test_document_tables_inside_a_data_parallel_shard_map():
    """The flash kernels' block ranges and cuDNN's packed tables inside a shard_map over the data axis of an Auto
    mesh with another axis (a data-parallel hybrid's per-device softmax layers; check_vma on): jnp.searchsorted
    failed an assertion there on two H200s (jax 0.11.2), count_sorted does not, and the tables equal one
    device's."""
    mesh = jax.make_mesh((2, 2), ("data", "seq"), axis_types=(AxisType.Auto,) * 2)
    ids = jnp.asarray(np.repeat(np.arange(4) % 2, 64)[None].repeat(4, 0), jnp.int32)  # 4 documents per row
    q = jnp.zeros((4, 256, 2, 16), jnp.bfloat16)

    def tables(q, ids):
        docs = states.document_numbers(ids)
        k, docs, offset = (kernel_support.vary_like(x, q) for x in (q, docs, jnp.int32(0)))
        ranges = softmax_kernel._plan(q, k, docs, offset, softmax_kernel.Config())[3:]
        return (*ranges, *softmax.packed_tables(docs, 6))

    spec = P("data")
    with jax.set_mesh(mesh):
        got = jax.jit(jax.shard_map(tables, mesh=mesh, in_specs=(spec, spec), out_specs=spec,
                                    axis_names=frozenset({"data"})))(q, ids)
    for a, b in zip(got, jax.jit(tables)(q, ids), strict=True):
        np.testing.assert_array_equal(a, b)
