"""Causal softmax attention as fused Pallas Triton kernels (flash attention) with queries at a global offset,
GQA heads and packed documents: the one path that fuses LASP-2H's ranks (lasp_jax.parallel.softmax_allgather).

Why: the blockwise XLA loop (lasp_jax.ops.softmax) writes every block of scores to memory, 14-22 TFLOP/s on an
H200 (benchmarks/results/softmax_gpu_h200_s9.md), and cuDNN's attention crashed inside LASP-2H's shard_map on two
H200s (benchmarks/cudnn_shardmap_probe.py), so a rank had no fused path; a 2-GPU hybrid step took 44.5 s.

What it computes: o[b, i, h] = softmax over keys c of scale q[b, i, h] . k[b, c, h // G] restricted to
c <= q_offset + i and, with documents, to c in the document of position q_offset + i, times v (q [B, L, H, D],
k [B, S, Hkv, D], v [B, S, Hkv, Dv], G = H / Hkv). q_offset may be traced (axis_index * L on a LASP-2H rank).

Work skipped: each query block walks only the key blocks from the start of its first row's document to its last
row's position; each key block's dK/dV walk only the query blocks that can see one of its keys (rows at or after
its first key, in documents up to its last key's). The block ranges come from a binary search in XLA, so packed
documents cost about the sum of their squared lengths, not the rows'.

Numerics: q, k, v and the probabilities enter the tensor cores in the input dtype with fp32 accumulation
(FlashAttention's; fp32 inputs as full-precision products, not TF32); scores, the running max m, normaliser l and
lse = m + log2 l are fp32 in base 2 (scores times scale log2 e, exp2), and every exponent is s - m <= 0.
Backward (FlashAttention-2): delta = rowsum(o * dO) in XLA, a dQ kernel per query block, and a dK/dV kernel per
key block and K/V head summing its G query heads in fp32 registers (no per-query-head copies), on [keys, rows]
tiles so that no computed tile is transposed.

Layout: the kernels take head-major [B, H, T, D] copies (one transpose each way in XLA), lengths padded to the
blocks (padded keys sit past S and are never visible; padded rows are dropped, their dO zero) and head dims
padded with zeros to a power of two of at least 16.
Platforms: CUDA GPUs of compute capability 8.0 or newer through Pallas's Triton lowering; interpret=True runs
the same kernels anywhere (the CPU tests). Their GPU test passed on an H200 (2026-11-30; bf16 at head dims 64
and 128, fp32 at 64), so lasp_jax.ops.softmax's "auto" takes them there at those dtypes and head-dim tiles
(softmax.FLASH_QUALIFIED).
In the timing sweep (benchmarks/results/softmax_gpu_h200_s12.md) their bf16 errors against the fp32 blockwise
loop were 2.5e-3 at most (cuDNN's 2.9e-3), and the default launch sizes were the fastest of those swept.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from lasp_jax.ops import checks, kernel_support

_F32 = jnp.float32
_LOG2E = 1.4426950408889634  # log2(e)


@dataclasses.dataclass(frozen=True)
class Config:
    """Launch sizes: query rows and keys per block (powers of two, at least 16 for the tensor cores), warps and
    software-pipeline stages per program."""

    block_q: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_q", "block_k"):
            size = getattr(self, name)
            if size < 16 or size & (size - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {size}")


def supported(q, k, v) -> str | None:
    """None if the kernels take these inputs' dtypes, else why not (shapes: checks.softmax_inputs)."""
    if q.dtype != k.dtype or q.dtype != v.dtype or q.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
        return f"q, k, v must share one of bfloat16, float16, float32, got {q.dtype}, {k.dtype}, {v.dtype}"
    return None


def tile(d: int) -> int:
    """A head dim padded to a Triton tile: the next power of two, at least 16."""
    return max(16, 1 << (d - 1).bit_length())


def attention(q, k, v, docs, q_offset, scale: float, config: Config = Config(), interpret: bool = False):
    """q [B, L, H, D], k [B, S, Hkv, D], v [B, S, Hkv, Dv]; docs None or [B, S] int32 document numbers of the key
    positions (nondecreasing from 0: lasp_jax.ops.states.document_numbers); q_offset an int or int32 scalar with
    q_offset + L <= S. Returns o [B, L, H, Dv] in q's dtype. Differentiable in q, k, v."""
    checks.softmax_inputs(q, k, v)
    why = supported(q, k, v)
    if why:
        raise ValueError(why)
    b, s_len = k.shape[:2]
    if docs is None:
        docs = jnp.zeros((b, s_len), jnp.int32)
    # Inside shard_map the kernels' operands vary as q does (a rank's gathered K/V are replicated): cast before the
    # custom_vjp, so a replicated input's gradient returns summed over the ranks.
    k, v, docs, q_offset = (kernel_support.vary_like(x, q) for x in
                            (k, v, docs.astype(jnp.int32), jnp.asarray(q_offset, jnp.int32)))
    dv = v.shape[-1]  # head dims off the tiles: zero columns change no score and add output columns dropped here
    q, k = (_padded(x, 3, tile(x.shape[-1])) for x in (q, k))
    return _attention(q, k, _padded(v, 3, tile(dv)), docs, q_offset, scale, config, interpret)[..., :dv]


def _padded(x, axis, size, mode="constant"):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, mode=mode)


def _plan(q, k, docs, q_offset, config):
    """Padded lengths, the queries' global positions [Lp] and documents [B, Lp], the keys' documents [B, Sp], and
    the block ranges: per (row, query block) the key blocks [lo, hi), per (row, key block) the query blocks."""
    b, length = q.shape[:2]
    s_len = k.shape[1]
    bq, bk = config.block_q, config.block_k
    nq, nk = -(-length // bq), -(-s_len // bk)
    q_pos = q_offset + jnp.arange(nq * bq, dtype=jnp.int32)
    q_docs = _padded(lax.dynamic_slice_in_dim(docs, q_offset, length, axis=1), 1, nq * bq, mode="edge")
    k_docs = _padded(docs, 1, nk * bk, mode="edge")

    # Query block i: keys from its first row's document start to its last real row's position.
    first_row = jnp.arange(nq) * bq
    last_row = jnp.minimum(first_row + bq, length) - 1
    k_lo = count_sorted(docs, q_docs[:, first_row])
    k_hi = jnp.minimum(q_offset + last_row + 1, s_len)
    q_ranges = jnp.stack([k_lo // bk, jnp.broadcast_to(-(-k_hi // bk), k_lo.shape)], axis=-1)
    # Key block j: rows at or after its first key, in documents up to its last key's.
    first_key = jnp.arange(nk) * bk
    last_key = jnp.minimum(first_key + bk, s_len) - 1
    row_lo = jnp.clip(first_key - q_offset, 0, length)
    row_hi = jnp.minimum(count_sorted(q_docs[:, :length], docs[:, last_key], inclusive=True), length)
    i_lo = jnp.broadcast_to(row_lo // bq, row_hi.shape)
    k_ranges = jnp.stack([i_lo, jnp.maximum(-(-row_hi // bq), i_lo)], axis=-1)
    return q_pos, q_docs, k_docs, q_ranges.astype(jnp.int32), k_ranges.astype(jnp.int32)


def count_sorted(rows, values, *, inclusive: bool = False):
    """jnp.searchsorted per batch row: rows [B, S] nondecreasing ints, values [B, N] -> [B, N] int32, the number
    of a row's entries below each value (at or below with inclusive: side "right").

    A binary search of bit_length(S) unrolled steps of gathers, because jnp.searchsorted's primitive (jax
    0.11.2) fails an assertion inside a shard_map over some axes of an Auto mesh (the data-parallel hybrid's
    per-device softmax layers)."""
    s = rows.shape[1]
    lo, hi = values * 0, values * 0 + s  # varying as values are, inside shard_map
    for _ in range(s.bit_length()):
        mid = (lo + hi) // 2
        at = jnp.take_along_axis(rows, jnp.minimum(mid, s - 1), axis=1)
        right = ((at <= values) if inclusive else (at < values)) & (lo < hi)
        lo, hi = jnp.where(right, mid + 1, lo), jnp.where(right | (lo >= hi), hi, mid)
    return lo.astype(jnp.int32)


def _heads_major(x, size):
    """[B, T, H, D] -> [B, H, size, D], zero-padded along T."""
    return _padded(jnp.swapaxes(x, 1, 2), 2, size)


def _visible(q_pos, q_docs, k_pos, k_docs, s_len):
    """[rows, keys]: the key at or before the row, a real key, one document."""
    return (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] < s_len) & (k_docs[None, :] == q_docs[:, None])


def _visible_t(q_pos, q_docs, k_pos, k_docs, s_len):
    """_visible as [keys, rows] (the dK/dV kernel's tiles)."""
    return (k_pos[:, None] <= q_pos[None, :]) & (k_pos[:, None] < s_len) & (k_docs[:, None] == q_docs[None, :])


def _dot(a, b):
    # fp32 operands in full precision (Triton's default for them is TF32), as the blockwise loop's HIGHEST
    precision = lax.Precision.HIGHEST if a.dtype == _F32 else None
    return jnp.dot(a, b, preferred_element_type=_F32, precision=precision)


def _forward_kernel(q_ref, k_ref, v_ref, qpos_ref, qdoc_ref, kdoc_ref, range_ref, o_ref, lse_ref, *, scale, bk,
                    s_len):
    scale2 = scale * _LOG2E  # scores in base 2: exp2 is one instruction, exp a library call
    q = q_ref[...]
    q_pos, q_docs = qpos_ref[...], qdoc_ref[...]

    def step(j, carry):
        m, l, acc = carry
        keys = pl.ds(j * bk, bk)
        s = _dot(q, k_ref[keys, :].T) * scale2
        visible = _visible(q_pos, q_docs, j * bk + jnp.arange(bk), kdoc_ref[keys], s_len)
        s = jnp.where(visible, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows that have seen nothing yet
        p = jnp.exp2(s - m_safe[:, None])
        correction = jnp.exp2(m - m_safe)
        v = v_ref[keys, :]
        return m_new, l * correction + jnp.sum(p, axis=1), acc * correction[:, None] + _dot(p.astype(v.dtype), v)

    rows = q.shape[0]
    init = (jnp.full((rows,), -jnp.inf, _F32), jnp.zeros((rows,), _F32), jnp.zeros((rows, v_ref.shape[-1]), _F32))
    m, l, acc = lax.fori_loop(range_ref[0], range_ref[1], step, init)
    seen = l > 0  # every real row sees its own key; padded rows may see none
    l_safe = jnp.where(seen, l, 1.0)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log2(l_safe), 0.0)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qpos_ref, qdoc_ref, kdoc_ref, range_ref, dq_ref, *,
               scale, bk, s_len):
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    q_pos, q_docs = qpos_ref[...], qdoc_ref[...]

    def step(j, dq):
        keys = pl.ds(j * bk, bk)
        k, v = k_ref[keys, :], v_ref[keys, :]
        visible = _visible(q_pos, q_docs, j * bk + jnp.arange(bk), kdoc_ref[keys], s_len)
        p = jnp.where(visible, jnp.exp2(jnp.minimum(_dot(q, k.T) * (scale * _LOG2E) - lse[:, None], 0.0)), 0.0)
        ds = p * (_dot(do, v.T) - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k)

    dq = lax.fori_loop(range_ref[0], range_ref[1], step, jnp.zeros(q.shape, _F32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qpos_ref, qdoc_ref, kdoc_ref, range_ref, dk_ref,
                 dv_ref, *, scale, bq, length, s_len, group):
    k, v = k_ref[...], v_ref[...]
    bk = k.shape[0]
    k_pos = pl.program_id(0) * bk + jnp.arange(bk)
    k_docs = kdoc_ref[...]

    def head(g, carry):
        def step(i, carry):  # [keys, rows] tiles: no transpose of a computed tile
            dk, dv = carry
            rows = pl.ds(i * bq, bq)
            q, do = q_ref[g, rows, :], do_ref[g, rows, :]
            lse, delta = lse_ref[g, rows], delta_ref[g, rows]
            visible = (_visible_t(qpos_ref[rows], qdoc_ref[rows], k_pos, k_docs, s_len)
                       & (i * bq + jnp.arange(bq) < length)[None, :])
            p = jnp.where(visible, jnp.exp2(jnp.minimum(_dot(k, q.T) * (scale * _LOG2E) - lse[None, :], 0.0)), 0.0)
            ds = p * (_dot(v, do.T) - delta[None, :])
            return dk + _dot(ds.astype(q.dtype), q), dv + _dot(p.astype(do.dtype), do)

        return lax.fori_loop(range_ref[0], range_ref[1], step, carry)

    dk, dv = lax.fori_loop(0, group, head, (jnp.zeros(k.shape, _F32), jnp.zeros(v.shape, _F32)))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _call(kernel, grid, in_specs, out_specs, out_shape, config, interpret, *args):
    return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                          compiler_params=pl_triton.CompilerParams(num_warps=config.num_warps,
                                                                   num_stages=config.num_stages),
                          interpret=interpret)(*args)


def _query_block_specs(bq: int, sp: int, group: int):
    """BlockSpecs of the (query block i, row b, head h) grid the forward and dQ kernels share: rows(width) a
    head's [bq, width] query-block tile, keys(width) its K/V head's whole [sp, width], stat the block's [bq]
    row statistics (lse, delta), and the four `_plan` operands (the block's positions and documents, the row's key
    documents, the block's key range)."""
    rows = lambda width: pl.BlockSpec((None, None, bq, width), lambda i, b, h: (b, h, i, 0))  # noqa: E731
    keys = lambda width: pl.BlockSpec((None, None, sp, width), lambda i, b, h: (b, h // group, 0, 0))  # noqa: E731
    plan = [pl.BlockSpec((bq,), lambda i, b, h: (i,)), pl.BlockSpec((None, bq), lambda i, b, h: (b, i)),
            pl.BlockSpec((None, sp), lambda i, b, h: (b, 0)), pl.BlockSpec((None, None, 2), lambda i, b, h: (b, i, 0))]
    return rows, keys, pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i)), plan


def _forward(q, k, v, docs, q_offset, scale, config, interpret):
    b, length, h, d = q.shape
    s_len, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
    group, bq, bk = h // hkv, config.block_q, config.block_k
    q_pos, q_docs, k_docs, q_ranges, _ = _plan(q, k, docs, q_offset, config)
    lp, sp = q_docs.shape[1], k_docs.shape[1]
    qh, kh, vh = _heads_major(q, lp), _heads_major(k, sp), _heads_major(v, sp)
    kernel = functools.partial(_forward_kernel, scale=scale, bk=bk, s_len=s_len)
    rows, keys, stat, plan = _query_block_specs(bq, sp, group)
    o, lse = _call(kernel, (lp // bq, b, h), [rows(d), keys(d), keys(dv), *plan], [rows(dv), stat],
                   [kernel_support.typed_like((b, h, lp, dv), q.dtype, q),
                    kernel_support.typed_like((b, h, lp), _F32, q)],
                   config, interpret, qh, kh, vh, q_pos, q_docs, k_docs, q_ranges)
    return jnp.swapaxes(o[:, :, :length], 1, 2), (o, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _attention(q, k, v, docs, q_offset, scale, config, interpret):
    return _forward(q, k, v, docs, q_offset, scale, config, interpret)[0]


def _attention_fwd(q, k, v, docs, q_offset, scale, config, interpret):
    out, (o, lse) = _forward(q, k, v, docs, q_offset, scale, config, interpret)
    return out, (q, k, v, docs, q_offset, o, lse)


def _attention_bwd(scale, config, interpret, res, do):
    q, k, v, docs, q_offset, o, lse = res
    b, length, h, d = q.shape
    s_len, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
    group, bq, bk = h // hkv, config.block_q, config.block_k
    q_pos, q_docs, k_docs, q_ranges, k_ranges = _plan(q, k, docs, q_offset, config)
    lp, sp = q_docs.shape[1], k_docs.shape[1]
    qh, kh, vh, doh = _heads_major(q, lp), _heads_major(k, sp), _heads_major(v, sp), _heads_major(do, lp)
    delta = jnp.sum(o.astype(_F32) * doh.astype(_F32), axis=-1)  # [B, H, Lp]; zero on padded rows (dO zero)
    common = dict(scale=scale, s_len=s_len)
    rows, keys, stat, plan = _query_block_specs(bq, sp, group)
    dq = _call(functools.partial(_dq_kernel, bk=bk, **common), (lp // bq, b, h),
               [rows(d), keys(d), keys(dv), rows(dv), stat, stat, *plan], rows(d),
               kernel_support.typed_like((b, h, lp, d), q.dtype, q), config, interpret,
               qh, kh, vh, doh, lse, delta, q_pos, q_docs, k_docs, q_ranges)
    # dK/dV: a program per (key block, row, K/V head) walking the G query heads of that K/V head.
    heads = lambda width: pl.BlockSpec((None, group, lp, width), lambda j, b, g: (b, g, 0, 0))  # noqa: E731
    block = lambda width: pl.BlockSpec((None, None, bk, width), lambda j, b, g: (b, g, j, 0))  # noqa: E731
    stats = pl.BlockSpec((None, group, lp), lambda j, b, g: (b, g, 0))
    dk, dvv = _call(functools.partial(_dkdv_kernel, bq=bq, length=length, group=group, **common), (sp // bk, b, hkv),
                    [heads(d), block(d), block(dv), heads(dv), stats, stats, pl.BlockSpec((lp,), lambda j, b, g: (0,)),
                     pl.BlockSpec((None, lp), lambda j, b, g: (b, 0)), pl.BlockSpec((None, bk), lambda j, b, g: (b, j)),
                     pl.BlockSpec((None, None, 2), lambda j, b, g: (b, j, 0))],
                    [block(d), block(dv)],
                    [kernel_support.typed_like((b, hkv, sp, d), k.dtype, q),
                     kernel_support.typed_like((b, hkv, sp, dv), v.dtype, q)],
                    config, interpret, qh, kh, vh, doh, lse, delta, q_pos, q_docs, k_docs, k_ranges)
    back = lambda x, n: jnp.swapaxes(x[:, :, :n], 1, 2)  # noqa: E731
    return back(dq, length), back(dk, s_len), back(dvv, s_len), None, None


_attention.defvjp(_attention_fwd, _attention_bwd)
