"""Causal softmax attention on one device, for the softmax layers of hybrid models: blockwise (flash-style) in
XLA everywhere, or on a GPU cuDNN's fused flash attention (`jax.nn.dot_product_attention`) or lasp_jax's own
flash kernels (lasp_jax.ops.softmax_kernel).

Numerics (blockwise): the two matmuls take q, k, v (and the probabilities) in the input dtype and accumulate in
fp32, as flash attention does (fp32 inputs use full-precision matmuls); the softmax statistics are fp32 and the
output returns in q's dtype. The attention is blockwise with an online softmax (rematerialised in the backward),
so the memory is that of K/V plus one block of scores, never [L, S]. `q_offset` places the queries at global
positions, which is how the sequence-parallel LASP-2H strategy (lasp_jax.parallel.softmax_allgather) and a KV
cache use it. `segment_ids` (packed documents) mask every pair of positions in different documents.

The flash kernels (Pallas Triton: queries at any offset, GQA, documents skipping whole key blocks). "auto" on a
qualified GPU takes cuDNN where it needs no mask (causal from key 0, or packed documents from key 0) and the flash
kernels elsewhere where they are qualified (FLASH_QUALIFIED: bf16 at head dims 33 to 128, fp32 at 33 to 64, any
number of query rows: a global q_offset as on LASP-2H's ranks or a decoding step (whose speed against the blockwise
loop is not measured), documents before Hopper, rows with more documents than cuDNN's packed slots). On an H200
(bf16, 32 query / 8 K/V heads of 64, benchmarks/results/softmax_gpu_h200_s12.md) forward+backward took: causal at
64K cuDNN 144 ms, the flash kernels 236; 16 documents at 64K cuDNN packed 19.9 ms (17.25 GiB of temporaries), the
flash kernels 26.9 ms (0.64 GiB); 16 documents at 8K cuDNN packed 1.9 ms (8.25 GiB), the flash kernels 1.0 ms (0.08
GiB). "auto" keeps cuDNN's packed layout for documents from key 0 (faster at the hybrids' 64K; the flash kernels
would save its memory and win at 8K: a length threshold is not measured yet).
Where "auto" runs the blockwise loop on a CUDA GPU the flash kernels could run on but are not qualified for, it
says so once (an impls.UnqualifiedWarning) and how to opt in (`warn_passed_over`).

cuDNN (impl="cudnn"): its own causal mask where queries sit at positions 0..L-1 of L keys. Documents with those
queries take cuDNN's packed layout on Hopper and later: each row's documents as a [B, M] table of starts and
lengths, causal inside each (jax's cuDNN attention, which jax.nn.dot_product_attention does not expose: `_packed`),
no dense mask and no work across documents; where a row holds more than M (packed_slots: 16 at B = 1, T = 64K, H x D
= 2048) documents the whole batch takes the flash kernels instead where they are qualified, else the blockwise loop
(about 35x slower), chosen on the device (the same attention, to rounding; size M for the data with
PACKED_WORKSPACE_MAX). Its memory follows M, not the documents: the backward keeps an fp32 accumulator per slot
(17.25 GiB of temporaries at that shape against 1.02 GiB causal, benchmarks/results/softmax_gpu_h200_s11.md).
lax.cond compiles both branches.
A global q_offset, or documents before Hopper, take a dense [B, 1, L, S] boolean mask, which
cuDNN reads as an additive bias of L * S elements per row, so "auto" takes that form only where the flash
kernels are not qualified and B * L * S <= DENSE_MASK_MAX. On an H200 (bf16,
B = 1, 16 query / 4 K/V heads of 128, benchmarks/results/softmax_gpu_h200_s9.md) forward+backward took: causal
8K 2.0 ms cuDNN against 69.4 ms blockwise, 32K 28.4 against 1056; 8 documents with the dense mask 8K 6.4 against
49.6, 32K 100.5 against 703 (XLA temporaries 2.5 GiB against 0.75 GiB).
`implementation=None` is not used: in jax 0.11.2 it is the XLA reference, which holds the whole [B, H, L, S]
scores.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp

from lasp_jax.ops import checks, kernel_support, softmax_kernel, states
from lasp_jax.ops.impls import warn_once
from lasp_jax.ops.kernel_support import partitioned

_HIGHEST = jax.lax.Precision.HIGHEST

SoftmaxImpl = Literal["auto", "blockwise", "cudnn", "pallas_triton", "pallas_triton_interpret"]
SOFTMAX_IMPLS = ("auto", "blockwise", "cudnn", "pallas_triton", "pallas_triton_interpret")
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
# Device kinds where "auto" takes cuDNN: those where tests/models/test_documents.py::test_cudnn_matches_blockwise
# passed (fail-closed, as lasp_jax.ops.impls for the linear kernels): on an H200, 2026-11-30. Named, impl="cudnn"
# runs anywhere jax.nn.dot_product_attention does.
CUDNN_QUALIFIED_GPUS: tuple[str, ...] = ("NVIDIA H200",)
# Device kinds, and (dtype, head-dim tile) pairs for Dk and Dv of one tile, where "auto" takes the flash kernels
# (lasp_jax.ops.softmax_kernel): those of tests/ops/test_softmax_kernel.py's GPU_CASES, which passed on an H200
# (2026-11-30: bf16 at head dims 64 and 128, fp32 at 64, with 1024 query rows; a decoding step's one row in bf16 at
# 64). The query-row count is not an axis of this table: rows are blocked the same way for any count and dtype.
# Fail-closed: other kinds, dtypes, tiles, and Dk and Dv of different tiles wait for their own GPU run. Head dims up
# to a tile are zero-padded to it (tile 64: dims 33 to 64; 128: 65 to 128). Named, impl="pallas_triton" runs on any
# CUDA GPU of compute capability 8.0 or newer, any dtype and head dim the kernels take.
FLASH_QUALIFIED_GPUS: tuple[str, ...] = ("NVIDIA H200",)
FLASH_QUALIFIED: frozenset[tuple[str, int]] = frozenset({("bfloat16", 64), ("bfloat16", 128), ("float32", 64)})
# Largest B * L * S for which "auto" takes cuDNN with a dense mask (documents, a global q_offset): the mask and
# cuDNN's bias grow with L * S (2.5 GiB of temporaries at B = 1, L = S = 32K on an H200, where it still beat the
# blockwise loop 7x); beyond it the blockwise loop's memory stays linear in S.
DENSE_MASK_MAX = 2**30
# Documents per row in the packed layout's static tables (packed_slots): each slot is a batch entry of cuDNN's
# grid whose backward keeps an fp32 dQ accumulator of the full length, measured as 2 x slots x B x T x H x D x 4
# bytes of XLA temporaries (benchmarks/results/softmax_gpu_h200_s9.md: 1.01 GiB at T = 8K, 4.03 GiB at 32K, 8
# slots, H x D = 2048), so the slots are as many as PACKED_WORKSPACE_MAX allows, at most PACKED_MAX_DOCUMENTS.
# A batch with a row of more documents takes the blockwise loop (slower, never a wrong mask).
PACKED_MAX_DOCUMENTS = 64
PACKED_WORKSPACE_MAX = 16 * 2**30


def check_segment_ids(segment_ids, q, k, q_offset):
    """None, or segment_ids as a [B, S] integer array of k's positions; a ValueError naming what is wrong.

    The queries' ids are read at their global positions, so a concrete q_offset must keep them among the keys.
    """
    ids = checks.segment_ids(segment_ids, k.shape[0], k.shape[1])
    if ids is not None and isinstance(q_offset, int) and not 0 <= q_offset <= k.shape[1] - q.shape[1]:
        raise ValueError(f"with segment_ids the queries must be key positions: q_offset {q_offset} + L "
                         f"{q.shape[1]} exceeds S {k.shape[1]}")
    return ids


def causal_softmax_attention(q, k, v, *, segment_ids=None, q_offset=0, scale=None, block_q=512, block_k=512,
                             impl: SoftmaxImpl = "auto"):
    """Softmax attention of queries at global positions q_offset + i over keys at positions 0..S-1, causal,
    within documents when segment_ids are given.

    Args:
      q: [B, L, H, D]; k: [B, S, Hkv, D]; v: [B, S, Hkv, Dv]; H a multiple of Hkv (GQA: K/V heads indexed,
        never repeated). q_offset: global position of q's first row (an int or a traced scalar); rows with
        q_offset + i >= S see all S keys (only without segment_ids). scale: default 1/sqrt(D).
      segment_ids: None, or [B, S] integers of the key positions: packed documents, a document starting
        wherever the id changes from one position to the next (as in linear_attention: an id met again later
        is a new document). Query row i belongs to the document of position q_offset + i and sees only keys
        of its own document.
      block_q, block_k: blockwise block sizes (lengths that do not divide are padded with masked positions).
      impl: "blockwise" (XLA, any platform), "cudnn" (cuDNN flash attention through
        jax.nn.dot_product_attention: a GPU, bf16/fp16 q, k, v of one dtype, else a ValueError; documents and a
        global q_offset as a dense [B, 1, L, S] mask, except documents from key 0 on Hopper or later: the packed
        layout), "pallas_triton": the fused flash kernels of lasp_jax.ops.softmax_kernel (queries at any offset,
        GQA, documents skipping whole key blocks; a CUDA GPU of compute capability >= 8.0; one device's call),
        "pallas_triton_interpret" the same interpreted anywhere, or "auto", in this order: cudnn where it needs
        no mask (q_offset the int 0 and L = S, without segment_ids or with them on Hopper or later; a GPU in
        CUDNN_QUALIFIED_GPUS, bf16/fp16 inputs, head dims a multiple of 8 up to 256, one device's call: no
        ambient mesh of several devices unless inside a shard_map over all its axes); pallas_triton where
        flash_unqualified is None; cudnn with a dense mask while B * L * S <= DENSE_MASK_MAX (L and S even);
        blockwise.
    Returns:
      o [B, L, H, Dv] in q's dtype.
    """
    checks.softmax_inputs(q, k, v)
    ids = check_segment_ids(segment_ids, q, k, q_offset)
    if impl not in SOFTMAX_IMPLS:
        raise ValueError(f"unknown softmax impl {impl!r}: expected one of {SOFTMAX_IMPLS}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    docs = None if ids is None else states.document_numbers(ids)
    if impl == "auto":
        impl = _auto(q, k, v, docs, q_offset)
    blockwise = functools.partial(_blockwise, block_q=block_q, block_k=block_k)
    if impl == "cudnn":
        return _cudnn(q, k, v, docs, q_offset, scale,
                      softmax_kernel.attention if flash_unqualified(q, k, v) is None else blockwise)
    if impl.startswith("pallas_triton"):
        interpret = impl == "pallas_triton_interpret"
        why = None if interpret else kernel_support.triton_unavailable()
        if why:
            raise ValueError(f"impl='pallas_triton' cannot run here: {why}")
        if partitioned(q):
            raise ValueError(f"impl={impl!r} has no sharding rule: call it per device (inside a shard_map over "
                             "the batch, as LASP-2H's ranks and the hybrid models do)")
        return softmax_kernel.attention(q, k, v, docs, q_offset, scale, interpret=interpret)
    return blockwise(q, k, v, docs, q_offset, scale)


def _auto(q, k, v, docs, q_offset) -> str:
    """causal_softmax_attention's impl="auto": the order its docstring gives, from the H200 timings in this
    module's docstring."""
    if _cudnn_applies(q, k, v, docs, q_offset, dense_mask=False):
        return "cudnn"
    why = flash_unqualified(q, k, v)
    if why is None:
        return "pallas_triton"
    if _cudnn_applies(q, k, v, docs, q_offset, dense_mask=True):
        return "cudnn"
    warn_passed_over(q, k, v, why)
    return "blockwise"


def warn_passed_over(q, k, v, why: str) -> None:
    """Says once (an impls.UnqualifiedWarning) that "auto" runs the blockwise loop on a CUDA GPU where the flash
    kernels could run but are not qualified for these inputs (`why`), and how to opt in. Quiet for one query row
    (a decoding step, where the loop costs little) and where the kernels cannot run or XLA partitions the call."""
    if q.shape[1] < 2 or kernel_support.triton_unavailable() or softmax_kernel.supported(q, k, v) or partitioned(q):
        return
    warn_once(f"softmax impl='auto' runs the blockwise XLA loop here (on an H200 at 8K: 21x the flash kernels' "
              f"time causal, 59x with 16 documents): {why}. Name impl='pallas_triton' (ModelConfig.softmax_impl) "
              "to run the flash kernels unqualified, or qualify this GPU with "
              "`pytest -m gpu tests/ops/test_softmax_kernel.py`")


def flash_unqualified(q, k, v) -> str | None:
    """None where "auto" may take the flash kernels (lasp_jax.ops.softmax_kernel) for these inputs, else why not:
    a GPU of FLASH_QUALIFIED_GPUS with Pallas's Triton lowering, a dtype and head-dim tile their GPU test covered
    (FLASH_QUALIFIED), and one device's call (the kernels have no sharding rule)."""
    why = kernel_support.triton_unavailable()
    if why:
        return why
    kind = jax.devices()[0].device_kind
    if kind not in FLASH_QUALIFIED_GPUS:
        return f"the flash kernels have passed their GPU test on {FLASH_QUALIFIED_GPUS} only, not on {kind!r}"
    why = softmax_kernel.supported(q, k, v)
    if why:
        return why
    tiles = {softmax_kernel.tile(d) for d in (q.shape[-1], v.shape[-1])}
    if len(tiles) != 1 or (jnp.dtype(q.dtype).name, *tiles) not in FLASH_QUALIFIED:
        return (f"the flash kernels' GPU test covers (dtype, head-dim tile of Dk and Dv) {sorted(FLASH_QUALIFIED)}, "
                f"not {jnp.dtype(q.dtype).name} at Dk {q.shape[-1]}, Dv {v.shape[-1]}")
    return "the call is partitioned by XLA over several devices" if partitioned(q) else None


def _cudnn_applies(q, k, v, docs, q_offset, dense_mask: bool) -> bool:
    """Whether "auto" takes cuDNN without a mask (dense_mask False) or also with a dense mask: see
    causal_softmax_attention's impl. Only where the call is per device (no ambient mesh of several devices, or
    every axis manual): inside a shard_map that leaves an axis to XLA, even one of size 1, cuDNN's call failed to
    lower or crashed on two H200s (benchmarks/cudnn_shardmap_probe.py's seq1 cases, session 14). Only
    shapes cuDNN's flash attention takes in training (jax's check_is_flash_attention): head dims a multiple of 8
    up to 256, and with a mask (a bias) even lengths, so a decoding step (L = 1) does not take it."""
    if jax.default_backend() != "gpu" or jax.devices()[0].device_kind not in CUDNN_QUALIFIED_GPUS:
        return False
    mesh = jax.sharding.get_abstract_mesh()
    per_device = mesh.empty or mesh.size == 1 or set(mesh.manual_axes) == set(mesh.axis_names)
    aligned = _aligned(q, k, q_offset) and (docs is None or _packed_applies(q, k, v))
    small_even_mask = (dense_mask and q.shape[0] * q.shape[1] * k.shape[1] <= DENSE_MASK_MAX
                       and q.shape[1] % 2 == 0 and k.shape[1] % 2 == 0)
    dims_ok = all(d % 8 == 0 and d <= 256 for d in (q.shape[-1], v.shape[-1]))
    return (per_device and dims_ok and (aligned or small_even_mask)
            and q.dtype in _CUDNN_DTYPES and k.dtype == q.dtype == v.dtype)


def _aligned(q, k, q_offset) -> bool:
    """Queries at key positions 0..L-1 of L keys: cuDNN's own causal mask (top-left) is the right one."""
    return isinstance(q_offset, int) and q_offset == 0 and q.shape[1] == k.shape[1]


def _packed_applies(q, k, v) -> bool:
    """cuDNN's packed layout: on a CUDA GPU of Hopper or later (jax's check_is_flash_attention); element offsets
    (position x heads x head dim) that fit int32, computed by jax from q's head dim for k and v too, so Dv = D;
    at least two table slots (with one, jax reads the tables as plain padding lengths, not packed)."""
    try:
        capability = tuple(int(x) for x in getattr(jax.devices()[0], "compute_capability", "").split("."))
    except ValueError:  # no CUDA compute capability (CPU, ROCm)
        return False
    return (capability >= (9, 0) and v.shape[-1] == q.shape[-1] and packed_slots(q) >= 2
            and all(math.prod(x.shape) < 2**31 for x in (q, k, v)))


def _cudnn(q, k, v, docs, q_offset, scale, overflow):
    """jax.nn.dot_product_attention(implementation="cudnn"): its causal mask where queries start at key 0, the
    packed layout for documents there (Hopper or later; `overflow(q, k, v, docs, 0, scale)` where a row has more
    documents than the tables' slots), a dense [B, 1, L, S] mask (global causal positions, documents) otherwise."""
    if q.dtype not in _CUDNN_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"impl='cudnn' takes bfloat16 or float16 q, k, v of one dtype, got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")
    length, s_len = q.shape[1], k.shape[1]
    aligned = _aligned(q, k, q_offset)
    if docs is not None and aligned and _packed_applies(q, k, v):
        return jax.lax.cond(jnp.max(docs[:, -1]) < packed_slots(q),
                            lambda q, k, v, docs: _packed(q, k, v, docs, scale),
                            lambda q, k, v, docs: overflow(q, k, v, docs, 0, scale), q, k, v, docs)
    mask = None
    if docs is not None or not aligned:
        rows = q_offset + jnp.arange(length)
        mask = (jnp.arange(s_len)[None, :] <= rows[:, None])[None, None]  # [1, 1, L, S]
        if docs is not None:
            q_docs = jax.lax.dynamic_slice_in_dim(docs, q_offset, length, axis=1)
            mask = mask & (q_docs[:, None, :, None] == docs[:, None, None, :])
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale,
                                        is_causal=mask is None, implementation="cudnn")


def packed_tables(docs: jax.Array, max_documents: int) -> tuple[jax.Array, jax.Array]:
    """Document numbers [B, S] (0, 1, ... nondecreasing, states.document_numbers) -> (lengths [B, M], starts [B, M + 1])
    int32, M = max_documents: document m of row b covers positions starts[b, m] .. + lengths[b, m] - 1; slots
    past a row's documents hold -1 (jax's cuDNN attention's packed-layout convention). Rows with more than M
    documents are the caller's to refuse."""
    slots = jnp.arange(max_documents + 1, dtype=jnp.int32)
    first = softmax_kernel.count_sorted(docs, jnp.broadcast_to(slots, (docs.shape[0], slots.size)))
    used = slots[None, :] <= docs[:, -1:]  # [B, M + 1]: slot m holds a document of the row
    lengths = jnp.where(used[:, :-1], first[:, 1:] - first[:, :-1], -1)
    return lengths, jnp.where(used, first, -1)


def packed_slots(q) -> int:
    """Documents per row the packed layout takes for q [B, T, H, D]: see PACKED_WORKSPACE_MAX (below 2 the packed
    layout is not taken)."""
    return min(PACKED_MAX_DOCUMENTS, PACKED_WORKSPACE_MAX // (8 * math.prod(q.shape)))


def _packed(q, k, v, docs, scale):
    """cuDNN flash attention over each row's documents, causal inside each (the packed layout's
    PADDING_CAUSAL), at most packed_slots(q) per row. jax.nn.dot_product_attention takes no document
    tables, so this calls the jax module behind it (pinned jax 0.11.2; tests/models/test_documents.py's GPU
    test checks it against the blockwise loop)."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention

    lengths, starts = packed_tables(docs, packed_slots(q))
    return cudnn_attention.dot_product_attention(
        q, k, v, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=starts, kv_offsets=starts, scale=scale,
        mask_type=cudnn_attention.MaskType.PADDING_CAUSAL, qkv_layout="BTNH")


def _blockwise(q, k, v, docs, q_offset, scale, block_q, block_k):
    """Flash-style in XLA: queries in blocks of block_q, each walking the keys in blocks of block_k with an
    online softmax (running max m, normaliser l, accumulator), so no [L, S] score matrix exists. Each query
    block is rematerialised in the backward and so is each key step, keeping the backward's memory to one
    query block's running statistics. Key blocks wholly after a query block's last row, or (documents [B, S],
    nondecreasing) wholly before the first document of its rows in every batch row, are skipped."""
    b, length, h, d = q.shape
    s_len, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
    g = h // hkv
    bq, bk = min(block_q, length), min(block_k, s_len)
    nq, nk = -(-length // bq), -(-s_len // bk)

    def blocks(x, n, size, mode="constant"):  # [B, N, ...] -> [n, B, size, ...], padded
        x = jnp.pad(x, [(0, 0), (0, n * size - x.shape[1])] + [(0, 0)] * (x.ndim - 2), mode=mode)
        return jnp.moveaxis(x.reshape(b, n, size, *x.shape[2:]), 1, 0)

    dtype = jnp.promote_types(q.dtype, k.dtype)
    precision = _HIGHEST if dtype == jnp.float32 else None  # bf16: the tensor cores' native product
    matmul = functools.partial(jnp.einsum, precision=precision, preferred_element_type=jnp.float32)
    qb = blocks((q * jnp.asarray(scale, q.dtype)).astype(dtype).reshape(b, length, hkv, g, d), nq, bq)
    kb, vb = blocks(k.astype(dtype), nk, bk), blocks(v, nk, bk)
    # qb [nq, B, bq, Hkv, G, D]; kb, vb [nk, B, bk, Hkv, D]. Padded keys are never visible: every row is < S,
    # and a padded key's position is >= S.
    q_docb = k_docb = None  # one document
    if docs is not None:
        # Padding repeats the last document (nondecreasing still): a padded row sees the last row's keys (a
        # finite, discarded result).
        q_docb = blocks(jax.lax.dynamic_slice_in_dim(docs, q_offset, length, axis=1), nq, bq, mode="edge")
        k_docb = blocks(docs, nk, bk, mode="edge")

    @jax.checkpoint
    def query_block(qi, q_docs, i):
        rows = q_offset + i * bq + jnp.arange(bq)  # global positions of this block's rows
        zero = jnp.zeros_like(qi[..., 0], jnp.float32).transpose(0, 2, 3, 1)  # [B, Hkv, G, bq], typed like q

        @jax.checkpoint
        def key_step(carry, xs):
            kj, vj, k_docs, j = xs

            def update(carry):
                m, l, acc = carry
                cols = j * bk + jnp.arange(bk)
                s = matmul("bqkgd,bskd->bkgqs", qi, kj)
                visible = (cols[None, :] <= rows[:, None])[None]  # [1 or B, bq, bk]
                if k_docs is not None:
                    visible = visible & (q_docs[:, :, None] == k_docs[:, None, :])
                s = jnp.where(visible[:, None, None], s, -jnp.inf)
                m_new = jnp.maximum(m, s.max(axis=-1))
                m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # rows that have seen nothing yet
                p = jnp.exp(s - m_safe[..., None])
                correction = jnp.exp(m - m_safe)
                acc = acc * correction[..., None] + matmul("bkgqs,bske->bkgqe", p.astype(vj.dtype), vj)
                return m_new, l * correction + p.sum(axis=-1), acc

            any_visible = j * bk <= rows[-1]  # any column of this key block at or before the block's last row
            if k_docs is not None:  # and, in some batch row, in a document of this block's rows
                any_visible &= jnp.any(k_docs[:, -1] >= q_docs[:, 0])
            return jax.lax.cond(any_visible, update, lambda c: c, carry), None

        init = (zero - jnp.inf, zero, jnp.zeros((*zero.shape, dv), jnp.float32) + zero[..., None])
        (_, l, acc), _ = jax.lax.scan(key_step, init, (kb, vb, k_docb, jnp.arange(nk)))
        return acc / l[..., None]  # [B, Hkv, G, bq, Dv]; every row sees its own key (or key 0), so l > 0

    o = jax.lax.map(lambda xs: query_block(*xs), (qb, q_docb, jnp.arange(nq)))  # [nq, B, Hkv, G, bq, Dv]
    o = jnp.moveaxis(o, 0, 3).reshape(b, hkv, g, nq * bq, dv)[:, :, :, :length]
    return jnp.moveaxis(o, 3, 1).reshape(b, length, h, dv).astype(q.dtype)
