"""causal_softmax_attention (one device, blockwise) against a float64 dense causal softmax."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from lasp_jax.ops import impls, softmax, softmax_kernel, states
from lasp_jax.ops.softmax import causal_softmax_attention
from tests.util import BF16_TOL, F32_TOL, dense_causal_softmax, fake_gpu, qkv, rel_err


@pytest.mark.parametrize("blocks", [(512, 512), (5, 3)], ids=["one-block", "blocks-5x3"])
def test_one_device_function_matchesdense_causal_softmax(blocks, rng):
    bq, bk = blocks
    q, k, v = qkv(rng, 2, 16, 4, 1, 8, 4)  # MQA, Dv != Dk
    assert rel_err(causal_softmax_attention(q, k, v, block_q=bq, block_k=bk), dense_causal_softmax(q, k, v)) < F32_TOL
    # q_offset: the last 6 rows at positions 10..15 over all 16 keys equal those rows of the full result.
    tail = causal_softmax_attention(q[:, 10:], k, v, q_offset=10, block_q=bq, block_k=bk)
    assert rel_err(tail, dense_causal_softmax(q, k, v)[:, 10:]) < F32_TOL


def test_bf16_inputs(rng):
    """bf16 q, k, v: bf16 products accumulated in fp32 stay within one bf16 rounding of the float64 result."""
    q, k, v = qkv(rng, 2, 24, 4, 2, 16, 16, dtype=jnp.bfloat16)
    o = causal_softmax_attention(q, k, v, block_q=8, block_k=8)
    assert o.dtype == jnp.bfloat16
    assert rel_err(o, dense_causal_softmax(*(x.astype(jnp.float32) for x in (q, k, v)))) < BF16_TOL


def test_blockwise_never_holds_the_whole_score_matrix(rng):
    """Neither the forward nor the backward has a value as large as the [H, T, T] scores: one block at most."""
    t, h = 64, 4
    q, k, v = qkv(rng, 1, t, h, h, 8, 8)

    def loss(q, k, v):
        return jnp.sum(causal_softmax_attention(q, k, v, block_q=8, block_k=16))

    def sizes(jaxpr):
        for eqn in jaxpr.eqns:
            for var in eqn.outvars:
                yield int(np.prod(getattr(var.aval, "shape", ())))
            for param in eqn.params.values():
                for p in (param if isinstance(param, (tuple, list)) else (param,)):
                    inner = p.jaxpr if hasattr(p, "jaxpr") and hasattr(p.jaxpr, "eqns") else p
                    if hasattr(inner, "eqns"):
                        yield from sizes(inner)

    biggest = max(sizes(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v).jaxpr))
    assert biggest < h * t * t / 4, biggest


def test_auto_takes_cudnn_only_for_shapes_it_trains(monkeypatch):
    """On a qualified GPU "auto" takes cuDNN without a mask, and with one (documents, a global q_offset) only while
    the dense mask is small and L, S are even (cuDNN refuses an odd length with a bias in training); head dims a
    multiple of 8 up to 256; a decoding step (L = 1) keeps the blockwise loop. Checked on shapes (no GPU here)."""
    fake_gpu(monkeypatch, softmax.CUDNN_QUALIFIED_GPUS[0])

    def applies(length, keys, d=128, docs=False, q_offset=0, dtype=jnp.bfloat16):
        q = jax.ShapeDtypeStruct((1, length, 4, d), dtype)
        k = jax.ShapeDtypeStruct((1, keys, 2, d), dtype)
        return softmax._cudnn_applies(q, k, k, jnp.zeros((1, keys), jnp.int32) if docs else None, q_offset,
                                       dense_mask=True)

    assert applies(1023, 1023)  # cuDNN's own causal mask: any length
    assert applies(1024, 1024, docs=True) and applies(512, 1024, q_offset=512)
    assert not applies(1023, 1023, docs=True) and not applies(1, 1024, q_offset=1023)
    assert not applies(32768, 65536, docs=True)  # B * L * S above DENSE_MASK_MAX
    assert not applies(1024, 1024, d=12) and not applies(1024, 1024, d=512)
    assert not applies(1024, 1024, dtype=jnp.float32)


@pytest.mark.parametrize("capability, packed", [("9.0", True), ("8.0", False)], ids=["hopper", "ampere"])
def test_auto_takes_cudnn_packed_layout_for_long_documents_on_hopper(monkeypatch, capability, packed):
    """Documents with queries from key 0 need no dense mask on Hopper (cuDNN's packed layout), so "auto" takes
    cuDNN at any length there; before Hopper only while the dense mask is small. A global q_offset still needs
    the mask, and so do element offsets past int32."""
    fake_gpu(monkeypatch, softmax.CUDNN_QUALIFIED_GPUS[0], capability)

    def applies(b, length, keys, q_offset=0, heads=4):
        q = jax.ShapeDtypeStruct((b, length, heads, 128), jnp.bfloat16)
        k = jax.ShapeDtypeStruct((b, keys, 2, 128), jnp.bfloat16)
        return softmax._cudnn_applies(q, k, k, jnp.zeros((b, keys), jnp.int32), q_offset, dense_mask=True)

    assert applies(1, 65536, 65536) == packed
    assert applies(1, 1023, 1023) == packed  # no bias, so odd lengths too (jax's check; not run on a GPU)
    assert not applies(1, 3 * 2**18, 3 * 2**18, heads=16)  # one table slot: jax would read it as padding lengths
    q = jax.ShapeDtypeStruct((1, 65536, 4, 128), jnp.bfloat16)
    k, v = (jax.ShapeDtypeStruct((1, 65536, 2, d), jnp.bfloat16) for d in (128, 64))
    assert not softmax._cudnn_applies(q, k, v, jnp.zeros((1, 65536), jnp.int32), 0, dense_mask=True)  # v: q's D
    assert not applies(1, 32768, 65536, q_offset=32768)
    assert not applies(2, 2**20, 2**20, heads=8)  # 2 * 2^20 * 8 * 128 = 2^31 elements


@pytest.mark.filterwarnings("ignore::lasp_jax.ops.impls.UnqualifiedWarning")  # its own test is below
@pytest.mark.parametrize("flash", [True, False], ids=["flash_qualified", "flash_unqualified"])
def test_auto_order(monkeypatch, flash):
    """"auto" on a GPU where cuDNN is qualified: cuDNN where it needs no mask (causal from key 0; packed documents
    on Hopper); where it would need a dense mask (a global q_offset as on LASP-2H's ranks, documents before
    Hopper), the flash kernels when qualified (softmax.FLASH_QUALIFIED's dtypes and head-dim tiles: their GPU
    test's), else cuDNN's dense mask while it is small, else the blockwise loop. Under a mesh that XLA
    partitions, neither kernel (no sharding rule measured); inside a shard_map over the data axis alone (a
    data-parallel hybrid's per-device layers, seq of size 1 left to XLA) cuDNN is not taken, the flash kernels are
    where qualified."""
    mesh = jax.make_mesh((2,), ("data",), axis_types=(AxisType.Auto,))
    data_mesh = jax.make_mesh((2, 1), ("data", "seq"), axis_types=(AxisType.Auto,) * 2)
    monkeypatch.setattr(impls, "warned", set())  # the process's once-only messages stay untouched
    for capability, hopper in (("9.0", True), ("8.0", False)):
        kind = softmax.CUDNN_QUALIFIED_GPUS[0]
        fake_gpu(monkeypatch, kind, capability)
        monkeypatch.setattr(softmax, "FLASH_QUALIFIED_GPUS", (kind,) if flash else ())
        fused = "pallas_triton" if flash else "cudnn"

        def auto(length, keys, docs=False, q_offset=0, dtype=jnp.bfloat16, d=64):
            q = jax.ShapeDtypeStruct((1, length, 4, d), dtype)
            k = jax.ShapeDtypeStruct((1, keys, 2, d), dtype)
            return softmax._auto(q, k, k, jnp.zeros((1, keys), jnp.int32) if docs else None, q_offset)

        assert auto(4096, 4096) == "cudnn"
        assert auto(4096, 8192, q_offset=jnp.int32(4096)) == fused
        assert auto(4096, 4096, docs=True) == ("cudnn" if hopper else fused)
        assert auto(32768, 65536, q_offset=jnp.int32(32768)) == ("pallas_triton" if flash else "blockwise")
        assert auto(4096, 8192, q_offset=jnp.int32(4096), d=128) == fused
        flash_or_loop = "pallas_triton" if flash else "blockwise"
        assert auto(4096, 8192, q_offset=jnp.int32(4096), dtype=jnp.float32) == flash_or_loop  # cuDNN takes no fp32
        assert auto(4096, 8192, q_offset=jnp.int32(4096), dtype=jnp.float32, d=128) == "blockwise"  # not in the test
        assert auto(4096, 8192, q_offset=jnp.int32(4096), d=16) == "cudnn"  # another tile than the flash test's
        assert auto(1, 4096, docs=True, q_offset=jnp.int32(99)) == flash_or_loop  # a decoding step: one row
        if flash:  # Dk and Dv of two tiles: each tile passed, that pair did not run
            q, v = (jax.ShapeDtypeStruct((1, t, h, d), jnp.bfloat16) for t, h, d in ((4096, 4, 64), (8192, 2, 128)))
            why = softmax.flash_unqualified(q, jax.ShapeDtypeStruct((1, 8192, 2, 64), jnp.bfloat16), v)
            assert "head-dim tile of Dk and Dv" in why and "Dk 64, Dv 128" in why
        picked = []

        def per_device(q):
            picked.append(softmax._auto(q, q, q, None, 0))
            return q

        with jax.set_mesh(data_mesh):
            jax.make_jaxpr(jax.shard_map(per_device, mesh=data_mesh, in_specs=P("data"), out_specs=P("data"),
                                         axis_names=frozenset({"data"})))(jnp.zeros((2, 4096, 4, 64), jnp.bfloat16))
        assert picked == ["pallas_triton" if flash else "blockwise"]
        with jax.set_mesh(mesh):
            assert auto(4096, 8192, q_offset=jnp.int32(4096)) == "blockwise"
            why = softmax.flash_unqualified(*(jax.ShapeDtypeStruct((1, 8, 1, 64), jnp.bfloat16),) * 3)
            assert why == ("the call is partitioned by XLA over several devices" if flash else
                           f"the flash kernels have passed their GPU test on () only, not on {kind!r}")


def test_auto_says_once_when_it_passes_the_flash_kernels_over(monkeypatch):
    """On a CUDA GPU where the flash kernels could run but are not qualified (another device kind, another dtype),
    "auto" falling to the blockwise loop warns once (impls.UnqualifiedWarning), naming why and how to opt in;
    quiet for one query row (a decoding step) and where the call is qualified."""
    mesh = jax.make_mesh((2,), ("data",), axis_types=(AxisType.Auto,))
    monkeypatch.setattr(impls, "warned", set())
    for kind, dtype, d, rows, warns in (("NVIDIA H100 80GB HBM3", jnp.bfloat16, 64, 4096, True),
                                        ("NVIDIA H200", jnp.float32, 128, 4096, True),  # fp32 passed at d 64 only
                                        ("NVIDIA H100 80GB HBM3", jnp.bfloat16, 64, 1, False),
                                        ("NVIDIA H200", jnp.bfloat16, 128, 4096, False)):
        fake_gpu(monkeypatch, kind, "9.0")
        q = jax.ShapeDtypeStruct((1, rows, 4, d), dtype)
        k = jax.ShapeDtypeStruct((1, 65536, 2, d), dtype)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            picked = softmax._auto(q, k, k, None, jnp.int32(32768))  # a dense mask too large for cuDNN
        assert picked == ("pallas_triton" if kind == "NVIDIA H200" and dtype == jnp.bfloat16 else "blockwise")
        messages = [str(w.message) for w in caught if issubclass(w.category, impls.UnqualifiedWarning)]
        assert len(messages) == warns, (kind, dtype, d, rows, messages)
        if warns:
            assert "runs the blockwise XLA loop here" in messages[0] and "impl='pallas_triton'" in messages[0]
            assert (kind in messages[0]) if kind != "NVIDIA H200" else ("float32" in messages[0])
            with warnings.catch_warnings(record=True) as again:
                warnings.simplefilter("always")
                softmax._auto(q, k, k, None, jnp.int32(32768))
            assert not again  # once per process
    with jax.set_mesh(mesh), warnings.catch_warnings(record=True) as caught:  # partitioned: by design, quiet
        warnings.simplefilter("always")
        monkeypatch.setattr(impls, "warned", set())
        q, k = (jax.ShapeDtypeStruct((2, t, h, 64), jnp.bfloat16) for t, h in ((4096, 4), (65536, 2)))
        assert softmax.flash_unqualified(q, k, k) == "the call is partitioned by XLA over several devices"
        assert softmax._auto(q, k, k, None, jnp.int32(32768)) == "blockwise"
    assert not caught


def test_packed_tables_list_each_rows_documents(rng):
    """packed_tables against a loop over each row's runs: starts and lengths of its documents, -1 past them (a
    row of one document, rows of several, one filling all M slots)."""
    m, s = 6, 40
    ids = np.zeros((4, s), np.int64)  # row 0: one document
    for row, count in ((1, 2), (2, 4)):
        ids[row, np.sort(rng.choice(np.arange(1, s), count, replace=False))] = 1
    ids = np.cumsum(ids, axis=1)
    ids[3] = np.minimum(np.arange(s) // 7, m - 1)  # exactly M documents
    docs = states.document_numbers(jnp.asarray(ids, jnp.int32))
    lengths, starts = softmax.packed_tables(docs, m)
    assert lengths.shape == (4, m) and starts.shape == (4, m + 1)
    for row in range(4):
        bounds = [0, *(np.flatnonzero(np.diff(ids[row])) + 1)]
        assert len(bounds) <= m
        want_starts = bounds + [-1] * (m + 1 - len(bounds))
        want_lengths = list(np.diff(bounds + [s])) + [-1] * (m - len(bounds))
        np.testing.assert_array_equal(starts[row], want_starts)
        np.testing.assert_array_equal(lengths[row], want_lengths)


def test_cudnn_documents_route_to_packed_layout_up_to_its_table_size(monkeypatch, rng):
    """impl="cudnn" with documents from key 0 on Hopper: rows of at most packed_slots(q) documents go to
    the packed layout, a batch with a row past it to the blockwise loop, or to the flash kernels where they are
    qualified (chosen on the device, under jit and grad). The packed call and the flash kernels are replaced here
    by markers (no GPU here; the GPU tests run the real ones)."""
    monkeypatch.setattr(softmax, "packed_slots", lambda q: 3)
    monkeypatch.setattr(softmax, "_packed_applies", lambda *_: True)
    monkeypatch.setattr(softmax, "_packed", lambda q, k, v, docs, scale: jnp.full(q.shape, 7.0, q.dtype))
    q, k, v = qkv(rng, 2, 12, 2, 1, 8, 8, dtype=jnp.bfloat16)
    run = jax.jit(lambda ids: jax.value_and_grad(
        lambda q: causal_softmax_attention(q, k, v, segment_ids=ids, impl="cudnn").astype(jnp.float32).sum())(q))
    three = jnp.asarray(np.repeat([[0, 1, 2]], 4, axis=1).repeat(2, axis=0), jnp.int32)  # 3 documents per row
    total, grad = run(three)
    assert float(total) == 7.0 * q.size and not np.any(np.asarray(grad, np.float32))
    four = three.at[1, -1].set(9)  # row 1: a 4th document
    total, grad = run(four)
    want, want_grad = jax.jit(jax.value_and_grad(lambda q: causal_softmax_attention(
        q, k, v, segment_ids=four, impl="blockwise").astype(jnp.float32).sum()))(q)
    np.testing.assert_allclose(float(total), float(want), rtol=1e-6)
    np.testing.assert_array_equal(grad, want_grad)
    monkeypatch.setattr(softmax, "flash_unqualified", lambda *_: None)  # where the flash kernels are qualified
    monkeypatch.setattr(softmax_kernel, "attention", lambda q, *_: jnp.full(q.shape, 5.0, q.dtype))
    run = jax.jit(lambda ids: jax.value_and_grad(  # a new trace: the patches apply
        lambda q: causal_softmax_attention(q, k, v, segment_ids=ids, impl="cudnn").astype(jnp.float32).sum())(q))
    assert float(run(four)[0]) == 5.0 * q.size  # past the slots: the flash kernels
    assert float(run(three)[0]) == 7.0 * q.size  # within them: still the packed layout


def test_packed_slots_bound_cudnns_workspace():
    """As many table slots as PACKED_WORKSPACE_MAX allows for the backward's per-slot fp32 accumulator (2 x slots x
    q's elements x 4 bytes), at most PACKED_MAX_DOCUMENTS (below 2 the packed layout is not taken:
    test_auto_takes_cudnn_packed_layout_for_long_documents_on_hopper)."""
    slots = lambda *shape: softmax.packed_slots(jax.ShapeDtypeStruct(shape, jnp.bfloat16))  # noqa: E731
    assert slots(1, 8192, 16, 128) == softmax.PACKED_MAX_DOCUMENTS
    assert slots(1, 65536, 32, 64) == 16 and slots(2, 65536, 32, 64) == 8
    assert slots(1, 2**19, 32, 64) == 2 and slots(1, 3 * 2**18, 32, 64) == 1
    assert 8 * slots(1, 65536, 32, 64) * 65536 * 2048 <= softmax.PACKED_WORKSPACE_MAX


def test_packed_tables_follow_jaxs_private_cudnn_convention():
    """_packed calls jax's private cuDNN attention module (pinned jax 0.11.2): its reading of packed_tables must
    stay what the packed layout needs, checked here without a GPU. With M >= 2 slots jax takes the call as
    packed and turns each row's starts into element offsets from the batch's start (row b's positions offset by
    b * T, times heads x head dim), dropping the -1 slots; with one slot it would not (why _packed_applies asks
    for two)."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention

    t, h, d = 10, 2, 8
    docs = states.document_numbers(jnp.asarray([[0] * 4 + [1] * 6, [5] * 10], jnp.int32))
    lengths, starts = softmax.packed_tables(docs, 3)
    assert cudnn_attention.get_max_seg_per_batch(starts) == 3
    assert cudnn_attention.get_max_seg_per_batch(softmax.packed_tables(docs[1:], 1)[1]) == 1
    q = jnp.zeros((2, t, h, d), jnp.bfloat16)
    q_len, _, q_off, _ = cudnn_attention._fix_seqlen_offsets(lengths, lengths, starts, starts, q, q)
    np.testing.assert_array_equal(q_len.reshape(-1)[:3], [4, 6, 10])  # the rows' segments, in order
    np.testing.assert_array_equal(q_off.reshape(-1)[:3], np.array([0, 4, t]) * h * d)
