"""Packed documents (segment_ids) through the models: a document's outputs do not depend on what precedes it in
its row, on one device and on data x seq meshes where it crosses rank boundaries; the LASP-2H softmax op masks
across documents; bad ids are refused. On a GPU (pytest -m gpu) the cuDNN path is checked against the blockwise
one.

A row is [prefix, D, suffix] with D the same 9 tokens in both rows of a batch at different offsets (row 0:
positions 7..15, row 1: 2..10); the ids number the three pieces. D's logits must agree between the rows: the
linear layers reset their state at D's start, the softmax layers see nothing before it and RoPE depends on
position differences only. Without ids they differ (the test can fail). On the meshes (T = 24: 6 positions per
rank on seq 4, 8 on seq 3) D starts inside a rank and crosses a rank boundary in both rows; on seq 3 the
document after it in row 0 starts exactly at a boundary (position 16).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from lasp_jax.ops import softmax
from lasp_jax.ops.softmax import causal_softmax_attention
from lasp_jax.parallel.softmax_allgather import softmax_allgather_attention
from tests.models import helpers
from tests.util import BF16_TOL, F32_TOL, dense_causal_softmax, qkv, rel_err

T, DOC = 24, 9
DOC_TOL = 2e-7  # D's logits between its two offsets: 7.3e-8 worst measured (seeds 0-2; RoPE's angles differ)
STARTS = (7, 2)  # D's first position in rows 0 and 1


def _batch(rng):
    """tokens, targets [2, T] with D at STARTS, and the segment ids [2, T] (0 before D, 1 on D, 2 after)."""
    tok = np.array(helpers.tokens(rng, b=2, t=T))
    doc = np.asarray(helpers.tokens(rng, b=1, t=DOC))[0]
    ids = np.zeros((2, T), np.int32)
    for row, start in enumerate(STARTS):
        tok[row, start:start + DOC] = doc
        ids[row, start:start + DOC] = 1
        ids[row, start + DOC:] = 2
    return jnp.asarray(tok), jnp.asarray(np.roll(tok, -1, axis=1)), jnp.asarray(ids)


def _doc_gap(logits) -> float:
    """Relative difference of D's logits between the two rows."""
    logits = np.asarray(logits)
    return rel_err(*(logits[row, start:start + DOC] for row, start in enumerate(STARTS)))


@functools.cache
def _setup(name):
    cfg = helpers.tiny(name)
    graphdef, state = nnx.split(models.build_model(cfg, rngs=nnx.Rngs(0)))
    tok, tgt, ids = _batch(np.random.default_rng(2))
    run = _loss_grads_logits(graphdef)
    return cfg, graphdef, state, (tok, tgt, ids), run(state, tok, tgt, ids)


def _loss_grads_logits(graphdef):
    @helpers.jit
    def run(state, tok, tgt, ids):
        def mean_loss(s):
            model = nnx.merge(graphdef, s)
            total, count = model.loss(tok, tgt, segment_ids=ids)
            return total / count, model(tok, segment_ids=ids)

        return jax.value_and_grad(mean_loss, has_aux=True)(state)

    return run


MODELS = ["tnl-tiny", "lt-tiny", "tnl-tiny-hybrid"]


@pytest.mark.parametrize("name", MODELS)
def test_a_document_does_not_see_what_precedes_it(name):
    _, graphdef, state, (tok, _, ids), ((_, logits), _) = _setup(name)
    assert _doc_gap(logits) < DOC_TOL
    plain = helpers.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, tok)
    assert _doc_gap(plain) > 1e-2  # without the ids D sees its prefix


MESH_CASES = [  # model, mesh (data, seq), Explicit axes, LASP strategy, the softmax layers' impl
    ("tnl-tiny", (1, 3), True, "ring", "auto"),
    ("tnl-tiny-hybrid", (2, 4), False, "allgather", "auto"),
    ("tnl-tiny-hybrid", (2, 3), True, "ring", "pallas_triton_interpret"),  # LASP-2H ranks on the flash kernels
    ("tnl-tiny-hybrid", (2, 1), False, "ring", "pallas_triton_interpret"),  # the kernels per data shard
]


@pytest.mark.parametrize("name,shape,explicit,strategy,softmax_impl", MESH_CASES)
def test_mesh_equals_one_device_with_documents(name, shape, explicit, strategy, softmax_impl):
    """Loss, logits and every parameter gradient with packed documents equal the one-device model's, and D's
    logits do not depend on its offset on the mesh either."""
    cfg, _, state, (tok, tgt, ids), ((ref_loss, ref_logits), ref_grads) = _setup(name)
    mesh_cfg = cfg.replace(strategy=strategy, softmax_impl=softmax_impl)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: models.build_model(mesh_cfg, rngs=nnx.Rngs(0))))
    mesh = helpers.make_mesh(shape, explicit)
    with jax.set_mesh(mesh):
        sstate = helpers.shard_state(state, mesh, cfg)
        args = [helpers.shard_batch(x, mesh) for x in (tok, tgt, ids)]
        (loss, logits), grads = _loss_grads_logits(graphdef)(sstate, *args)
    assert abs(float(loss) - float(ref_loss)) <= 2e-5 * abs(float(ref_loss))
    assert helpers.max_rel(logits, ref_logits) < 2e-5
    assert helpers.max_rel(grads, ref_grads) < 1e-4
    assert _doc_gap(logits) < DOC_TOL


def test_softmax_ops_mask_across_documents(rng):
    """Blockwise (one device, several padded blocks, and with q_offset) and LASP-2H on a 1x3 mesh against a
    float64 dense softmax run on each document alone. Row 1's ids 3, 0, 3 are three documents: a document
    starts where the id changes (as for the linear layers), an id met again is not the earlier document."""
    q, k, v = qkv(rng, 2, 24, 4, 2, 8, 8)
    ids = np.array([[0] * 5 + [1] * 11 + [2] * 8, [3] * 3 + [0] * 13 + [3] * 8], np.int32)
    want = np.zeros(v.shape[:2] + (4, 8))
    for row in range(2):
        bounds = np.flatnonzero(np.diff(ids[row])) + 1
        for lo, hi in zip([0, *bounds], [*bounds, 24]):
            want[row:row + 1, lo:hi] = dense_causal_softmax(*(x[row:row + 1, lo:hi] for x in (q, k, v)))
    ids = jnp.asarray(ids)
    assert rel_err(causal_softmax_attention(q, k, v, segment_ids=ids, block_q=5, block_k=3), want) < F32_TOL
    tail = causal_softmax_attention(q[:, 10:], k, v, segment_ids=ids, q_offset=10, block_q=4, block_k=5)
    assert rel_err(tail, want[:, 10:]) < F32_TOL
    mesh = helpers.make_mesh((1, 3), True)
    with jax.set_mesh(mesh):
        o = jax.jit(functools.partial(softmax_allgather_attention, block_q=3, block_k=4))(
            *(helpers.shard_batch(x, mesh) for x in (q, k, v)), segment_ids=helpers.shard_batch(ids, mesh))
    assert rel_err(o, want) < F32_TOL


def test_bad_segment_ids_are_refused(rng):
    q, k, v = qkv(rng, 2, 8, 2, 2, 4, 4)
    with pytest.raises(ValueError, match=r"segment_ids must have shape \[B, T\] = \[2, 8\], got \[2, 7\]"):
        causal_softmax_attention(q, k, v, segment_ids=jnp.zeros((2, 7), jnp.int32))
    with pytest.raises(ValueError, match="segment_ids must be an integer array, got dtype float32"):
        causal_softmax_attention(q, k, v, segment_ids=jnp.zeros((2, 8), jnp.float32))
    with pytest.raises(ValueError, match="q_offset 4 \\+ L 8 exceeds S 8"):
        causal_softmax_attention(q, k, v, segment_ids=jnp.zeros((2, 8), jnp.int32), q_offset=4)
    with pytest.raises(ValueError, match="unknown softmax impl 'flash'"):
        causal_softmax_attention(q, k, v, impl="flash")
    with pytest.raises(ValueError, match="impl='cudnn' takes bfloat16 or float16"):
        causal_softmax_attention(q, k, v, impl="cudnn")
    cfg = helpers.tiny("tnl-tiny-hybrid")
    model = models.build_model(cfg, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="segment_ids must be None or an integer array"):
        model(helpers.tokens(rng, t=8), segment_ids=jnp.zeros((2, 8), jnp.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("docs", [0, 0.02, 0.5], ids=["causal", "documents", "more_than_packed_max"])
def test_cudnn_matches_blockwise(docs, rng):
    """impl="cudnn" (bf16) against the blockwise path on the fp32-upcast inputs: the output and dq, dk, dv, for
    queries from position 0 (documents: the packed layout on Hopper, and past softmax.packed_slots(q) per row
    the blockwise branch it falls back to) and from a global offset (LASP-2H's case, a dense mask); "auto"
    takes cudnn where this GPU is in CUDNN_QUALIFIED_GPUS (these shapes' dense mask is under
    softmax.DENSE_MASK_MAX), else blockwise. docs: the chance that a position starts a document."""
    q, k, v = qkv(rng, 2, 256, 8, 2, 64, 64, dtype=jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    ids = jnp.asarray(np.cumsum(rng.uniform(size=(2, 256)) < docs, axis=1), jnp.int32) if docs else None
    if docs == 0.5:
        assert int(ids[:, -1].max()) >= softmax.packed_slots(q)

    def grads(impl, q, k, v, offset=0):
        def loss(q, k, v):
            o = causal_softmax_attention(q[:, offset:], k, v, segment_ids=ids, q_offset=offset, impl=impl)
            return jnp.sum(o.astype(jnp.float32) * w[:, offset:]), o
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)

    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    for offset in (0, 96):
        (_, o), g = grads("cudnn", q, k, v, offset)
        (_, o_ref), g_ref = grads("blockwise", *f32, offset)
        assert rel_err(o, o_ref) < BF16_TOL
        for name, a, b in zip("qkv", g, g_ref):
            assert rel_err(a, b) < BF16_TOL, f"d{name} at offset {offset}"
    qualified = jax.devices()[0].device_kind in softmax.CUDNN_QUALIFIED_GPUS
    np.testing.assert_array_equal(causal_softmax_attention(q, k, v, segment_ids=ids, impl="auto"),
                                  causal_softmax_attention(q, k, v, segment_ids=ids,
                                                           impl="cudnn" if qualified else "blockwise"))
