"""Chunked linear attention in plain jnp: the LASP chunk formulas, for every platform.

The piece of T positions is cut into chunks of C. Inside a chunk the work is dense ((Q K^T) * M) V; between
chunks only the fp32 d_k x d_v state travels, through a log-depth associative scan over chunks. This is the
portable implementation (CPU, GPU, TPU) and the fallback of `impl="auto"`; the Pallas kernels fuse the same math.

Numerics: inputs are upcast to float32 and every product runs at full fp32 precision, so bf16 inputs lose
nothing beyond their own rounding; outputs are cast back to the input dtypes. `scale` multiplies the float32
decay tables of the q side (the intra-chunk mask and lambda^i), never q itself. The causal mask selects, so a
non-finite q or k at a later position never reaches an earlier output. T that is not a multiple of C is
zero-padded at the *front*: zero keys and values before the sequence add nothing to any state or output, and
position differences, hence every decay power, are unchanged (tail padding would decay the final state).

Heads: every input is viewed as head groups (states.grouped); scores of a q and a k with one head per group
are formed once per group and broadcast over its output heads by the decayed mask, and an input's cotangent
sums its group inside the contraction (states.einsum_to).

Per-token decay and documents (`*_tokens`): each chunk takes its own float32 running sum of the rates, so every
exponent is minus a sum over at most C positions (never a difference of sums over the whole piece, which would
lose about ulp(s_0 + ... + s_T) per factor), and every factor is exp of something <= 0; pairs in two documents
are selected out of the intra-chunk scores, and states stop at a document start by selects (the chunk scan's
combine, the chunk-state products' rows and tokens), so a non-finite value in one document reaches no other
beyond its own chunk (inside it, the intra-chunk matmuls multiply it by the zero scores of other documents'
rows, as they do for the earlier rows under the causal mask). Measured against float64 at T = 1000 with rates
up to 6: 1.6e-6 (outputs, dq, dk, dv) and 7.7e-6 (the rates' gradient), from the differences bc_i - bc_j of the
chunk's running sums (up to 64 x 6); rates below ~0.3: 4e-7.

Memory: the chunk states are recomputed in the backward rather than saved; the LASP custom_vjp saves only
q, k, v and the incoming state.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lasp_jax.ops import states

_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class ChunkConfig:
    """chunk_size: positions per chunk. Larger chunks trade O(C) more intra-chunk flops per position for a
    shorter scan; 64 suits CPUs and the XLA GPU path alike."""

    chunk_size: int = 64


DEFAULT = ChunkConfig()


def _chunked(x, c):
    """[B, T, Hx, D] -> front-padded [B, N, C, Hx, D] float32."""
    b, t, h, d = x.shape
    pad = -t % c
    x = jnp.pad(x.astype(jnp.float32), ((0, 0), (pad, 0), (0, 0), (0, 0)))
    return x.reshape(b, -1, c, h, d)


def _unchunked(x, t, dtype):
    """[B, N, C, ...] -> [B, T, ...] with the front padding removed."""
    b, n, c = x.shape[:3]
    return x.reshape(b, n * c, *x.shape[3:])[:, n * c - t:].astype(dtype)


def _chunked_groups(groups, c, *xs):
    """Each x [B, T, Hx, D] chunked and viewed as head groups: [B, N, C, Hs, Hx / Hs, D] float32."""
    return tuple(states.grouped(_chunked(x, c), groups) for x in xs)


def _heads_back(x, heads, t, dtype):
    """[B, N, C, Hs, 1 or G, D] (one input's cotangent) -> [B, T, heads, D] in dtype."""
    return _unchunked(x.reshape(*x.shape[:3], heads, x.shape[-1]), t, dtype)


def _decays(rates, groups, c, scale):
    """Per-chunk decay tables for rates [H] viewed as [Hs, G]; the q side's carry the scale."""
    rates_g = rates.astype(jnp.float32).reshape(groups, -1)
    i = jnp.arange(c, dtype=jnp.float32)
    gap = i[:, None] - i[None, :]
    mask = scale * jnp.exp(-rates_g[..., None, None] * jnp.maximum(gap, 0.0))  # [Hs, G, C, C], used where gap >= 0
    q_decay = scale * jnp.exp(-rates_g[None] * i[:, None, None])  # [C, Hs, G]: scale lambda^i
    k_decay = jnp.exp(-rates_g[None] * (c - i)[:, None, None])  # [C, Hs, G]: lambda^(C - j)
    chunk_decay = jnp.exp(-rates_g * c)  # [Hs, G]: lambda^C
    return _Causal(gap >= 0, mask), q_decay, k_decay, chunk_decay


@dataclasses.dataclass(frozen=True)
class _Causal:
    """The decayed causal mask: `apply` keeps the scores at or before the diagonal, times their weights, and
    selects zero elsewhere (a non-finite later score is dropped, not multiplied by zero). Scores of one head per
    group (q and k both grouped) broadcast over the group's output heads here."""

    keep: jax.Array  # [C, C] bool (or [B, N, 1, 1, C, C] with documents)
    weights: jax.Array  # [Hs, G, C, C] float32 (or [B, N, Hs, G, C, C])

    def apply(self, scores):
        return jnp.where(self.keep, scores * self.weights, 0.0)


def _scan_states(x, chunk_decay, reverse):
    """Exclusive decayed scan over chunks (axis 1).

    Forward: out[n] = sum_{m < n} (prod_{m < i < n} a_i) x[m]; reverse: out[n] = sum_{m > n} (prod_{n < i < m} a_i)
    x[m]; a = lambda^C for every chunk, or each chunk's own decay (per-token rates; 0 where a document starts).
    A state crosses a = 0 by a select (states.decayed), so a non-finite state stops at a document start.
    x: [B, N, Hs, G, Dk, Dv]; chunk_decay: [1 or B, 1 or N, Hs, G].
    """
    n = x.shape[1]
    a = jnp.broadcast_to(chunk_decay[..., None, None], (chunk_decay.shape[0], n, *chunk_decay.shape[2:], 1, 1))

    def combine(left, right):
        (a1, s1), (a2, s2) = left, right
        return a1 * a2, states.decayed(a2, s1) + s2

    if reverse:
        _, incl = jax.lax.associative_scan(combine, (a, x), axis=1, reverse=True)
        return jnp.pad(incl[:, 1:], ((0, 0), (0, 1), (0, 0), (0, 0), (0, 0), (0, 0)))
    _, incl = jax.lax.associative_scan(combine, (a, x), axis=1)
    return jnp.pad(incl[:, :-1], ((0, 0), (1, 0), (0, 0), (0, 0), (0, 0), (0, 0)))


def local_output(q, k, v, rates, scale=1.0, config: ChunkConfig = DEFAULT):
    """Output of the piece with S_in = 0. q [B,T,Hq,Dk], k [B,T,Hk,Dk], v [B,T,Hv,Dv], rates [H] -> [B,T,H,Dv]."""
    t, n_heads, c = q.shape[1], rates.shape[0], config.chunk_size
    qc, kc, vc = _chunked_groups(states.head_groups(q, k, v), c, q, k, v)
    mask, q_decay, k_decay, chunk_decay = _decays(rates, qc.shape[3], c, scale)
    scores = mask.apply(jnp.einsum("bnikgd,bnjkgd->bnkgij", qc, kc, precision=_HIGHEST))
    o = jnp.einsum("bnkgij,bnjkge->bnikge", scores, vc, precision=_HIGHEST)
    kv = jnp.einsum("jkg,bnjkgd,bnjkge->bnkgde", k_decay, kc, vc, precision=_HIGHEST)
    s_in = _scan_states(kv, chunk_decay[None, None], reverse=False)
    o = o + jnp.einsum("ikg,bnikgd,bnkgde->bnikge", q_decay, qc, s_in, precision=_HIGHEST)
    return _heads_back(o, n_heads, t, q.dtype)


local_state = states.local_state


def local_backward(q, k, v, rates, do, scale=1.0, config: ChunkConfig = DEFAULT):
    """Cotangents of `local_output` (S_in = 0, dS_end = 0). do [B,T,H,Dv] -> (dq, dk, dv) in input dtypes, each
    per input head (summed over the output heads that read it, in float32)."""
    t, c = q.shape[1], config.chunk_size
    groups = states.head_groups(q, k, v)
    qc, kc, vc, doc = _chunked_groups(groups, c, q, k, v, do)
    gq, gk, gv = (x.shape[2] // groups for x in (q, k, v))
    mask, q_decay, k_decay, chunk_decay = _decays(rates, groups, c, scale)

    scores = mask.apply(jnp.einsum("bnikgd,bnjkgd->bnkgij", qc, kc, precision=_HIGHEST))
    a = mask.apply(jnp.einsum("bnikge,bnjkge->bnkgij", doc, vc, precision=_HIGHEST))
    dq = states.einsum_to("bnkgij,bnjkgd->bnikgd", a, kc, group=gq, precision=_HIGHEST)
    dk = states.einsum_to("bnkgij,bnikgd->bnjkgd", a, qc, group=gk, precision=_HIGHEST)
    dv = states.einsum_to("bnkgij,bnikge->bnjkge", scores, doc, group=gv, precision=_HIGHEST)

    kv = jnp.einsum("jkg,bnjkgd,bnjkge->bnkgde", k_decay, kc, vc, precision=_HIGHEST)
    s_in = _scan_states(kv, chunk_decay[None, None], reverse=False)
    dq = dq + states.einsum_to("ikg,bnikge,bnkgde->bnikgd", q_decay, doc, s_in, group=gq, precision=_HIGHEST)
    d_chunk = jnp.einsum("ikg,bnikgd,bnikge->bnkgde", q_decay, qc, doc, precision=_HIGHEST)
    ds_out = _scan_states(d_chunk, chunk_decay[None, None], reverse=True)
    dk = dk + states.einsum_to("jkg,bnjkge,bnkgde->bnjkgd", k_decay, vc, ds_out, group=gk, precision=_HIGHEST)
    dv = dv + states.einsum_to("jkg,bnjkgd,bnkgde->bnjkge", k_decay, kc, ds_out, group=gv, precision=_HIGHEST)
    return tuple(_heads_back(dx, x.shape[2], t, x.dtype) for dx, x in ((dq, q), (dk, k), (dv, v)))


# Per-token decay and documents (the piece's states.TokenDecay). The same chunk formulas with the decay of each
# chunk from its own running sum bc_i = s_0 + ... + s_i (chunk-local, float32): pair (i, j <= i) weighs
# exp(-(bc_i - bc_j)), the chunk's incoming state reaches i as exp(-bc_i), j's share of the chunk's outgoing state
# is exp(-ec_j) (ec_j = s_(j+1) + ... + s_(C-1), its own sum), and the chunk decays a state by exp(-bc_(C-1)).
# Documents: a pair (i, j) in two documents is selected out, a chunk holding a start passes no state on (a = 0,
# selected in the scan), positions from a start on do not see the incoming state, and those before the chunk's
# last start are not in its outgoing state: both by selects on the tokens or products (`_Sides.select`), never a
# zero weight times a value, so a non-finite value leaves its chunk only within its document.

@dataclasses.dataclass(frozen=True)
class _Sides:
    """The chunk-state tables of per-token decay: weights [B, N, C, Hs, G] (q side with the scale) and the
    positions [B, N, C] bool where they may be nonzero (the incoming state reaches i; j is in the outgoing one)."""

    q_weight: jax.Array
    k_weight: jax.Array
    q_keep: jax.Array
    k_keep: jax.Array

    @staticmethod
    def select(x, keep):
        """x [B, N, C, ...] with the positions outside keep selected to 0."""
        return jnp.where(keep.reshape(keep.shape + (1,) * (x.ndim - 3)), x, 0.0)


def _token_tables(tok, groups, c, scale):
    """(causal mask [B,N,Hs,G,C,C], the chunk-state `_Sides`, chunk decay [B,N,Hs,G]) from the piece's
    TokenDecay, front-padded like the tokens (zero rates, no starts)."""
    rates = _chunked(tok.rates[..., None], c)[..., 0]  # [B, N, C, H]
    b, n = rates.shape[:2]
    rates = rates.reshape(b, n, c, groups, -1)
    counts = _chunked(tok.counts[..., None, None], c)[..., 0, 0]  # [B, N, C]; the padding counts 0 starts
    before = jnp.pad(counts[:, :-1, -1:], ((0, 0), (1, 0), (0, 0)))  # [B, N, 1]: the count before each chunk
    bc = jnp.cumsum(rates, axis=2)
    later = jnp.pad(rates[:, :, 1:], ((0, 0), (0, 0), (0, 1), (0, 0), (0, 0)))
    ec = jnp.flip(jnp.cumsum(jnp.flip(later, 2), axis=2), 2)
    keep = (jnp.arange(c)[:, None] >= jnp.arange(c)[None, :]) & (counts[:, :, :, None] == counts[:, :, None, :])
    keep = keep[:, :, None, None]  # [B, N, 1, 1, C, C]
    gap = jnp.moveaxis(bc[:, :, :, None] - bc[:, :, None, :], (2, 3), (4, 5))  # [B, N, Hs, G, C, C]
    weights = scale * jnp.exp(-jnp.where(keep, gap, 0.0))
    q_keep, k_keep = counts == before, counts == counts[:, :, -1:]
    sides = _Sides(q_weight=scale * jnp.where(q_keep[..., None, None], jnp.exp(-bc), 0.0),
                   k_weight=jnp.where(k_keep[..., None, None], jnp.exp(-ec), 0.0), q_keep=q_keep, k_keep=k_keep)
    chunk_decay = jnp.where((counts[:, :, -1] == before[:, :, 0])[..., None, None], jnp.exp(-bc[:, :, -1]), 0.0)
    return _Causal(keep, weights), sides, chunk_decay


def _chunk_sums(sides, kc, vc):
    """Each chunk's own end state sum_j k_weight_j k_j^T v_j over its last document [B, N, Hs, G, Dk, Dv]."""
    kc, vc = sides.select(kc, sides.k_keep), sides.select(vc, sides.k_keep)
    return jnp.einsum("bnjkg,bnjkgd,bnjkge->bnkgde", sides.k_weight, kc, vc, precision=_HIGHEST)


def _incoming(sides, qc, s_in):
    """q_weight_i q_i S_in per output head, selected to 0 where S_in does not reach i -> [B, N, C, Hs, G, Dv]."""
    o_in = jnp.einsum("bnikgd,bnkgde->bnikge", qc, s_in, precision=_HIGHEST) * sides.q_weight[..., None]
    return sides.select(o_in, sides.q_keep)


def local_output_tokens(q, k, v, tok, scale=1.0, config: ChunkConfig = DEFAULT):
    """Output of the piece with S_in = 0 under per-token decay and documents: q [B,T,Hq,Dk], k [B,T,Hk,Dk],
    v [B,T,Hv,Dv], tok a states.TokenDecay -> [B,T,H,Dv] in q's dtype."""
    t, n_heads, c = q.shape[1], tok.rates.shape[2], config.chunk_size
    groups = states.head_groups(q, k, v)
    qc, kc, vc = _chunked_groups(groups, c, q, k, v)
    mask, sides, chunk_decay = _token_tables(tok, groups, c, scale)
    scores = mask.apply(jnp.einsum("bnikgd,bnjkgd->bnkgij", qc, kc, precision=_HIGHEST))
    o = jnp.einsum("bnkgij,bnjkge->bnikge", scores, vc, precision=_HIGHEST)
    s_in = _scan_states(_chunk_sums(sides, kc, vc), chunk_decay, reverse=False)
    return _heads_back(o + _incoming(sides, qc, s_in), n_heads, t, q.dtype)


def local_backward_tokens(q, k, v, tok, do, scale=1.0, config: ChunkConfig = DEFAULT):
    """Cotangents of `local_output_tokens` (S_in = 0, dS_end = 0): (dq, dk, dv) in input dtypes, per input head,
    and x [B,T,H] float32, x_t = k_t . dk_t - q_t . dq_t per output head (the piece's pairs only), the terms whose
    per-document suffix sums are the decay gradient (vjp.attend_tokens)."""
    t, n_heads, c = q.shape[1], tok.rates.shape[2], config.chunk_size
    groups = states.head_groups(q, k, v)
    qc, kc, vc, doc = _chunked_groups(groups, c, q, k, v, do)
    gq, gk, gv = (x.shape[2] // groups for x in (q, k, v))
    mask, sides, chunk_decay = _token_tables(tok, groups, c, scale)

    qk = jnp.einsum("bnikgd,bnjkgd->bnkgij", qc, kc, precision=_HIGHEST)
    dov = jnp.einsum("bnikge,bnjkge->bnkgij", doc, vc, precision=_HIGHEST)
    scores, a, pairs = mask.apply(qk), mask.apply(dov), mask.apply(qk * dov)
    dq = states.einsum_to("bnkgij,bnjkgd->bnikgd", a, kc, group=gq, precision=_HIGHEST)
    dk = states.einsum_to("bnkgij,bnikgd->bnjkgd", a, qc, group=gk, precision=_HIGHEST)
    dv = states.einsum_to("bnkgij,bnikge->bnjkge", scores, doc, group=gv, precision=_HIGHEST)
    x = jnp.moveaxis(jnp.sum(pairs, axis=-2) - jnp.sum(pairs, axis=-1), -1, 2)  # [B, N, C, Hs, G]

    s_in = _scan_states(_chunk_sums(sides, kc, vc), chunk_decay, reverse=False)
    dq_in = states.einsum_to("bnikg,bnikge,bnkgde->bnikgd", sides.q_weight, doc, s_in, group=gq, precision=_HIGHEST)
    dq = dq + sides.select(dq_in, sides.q_keep)
    qs, dos = sides.select(qc, sides.q_keep), sides.select(doc, sides.q_keep)
    d_chunk = jnp.einsum("bnikg,bnikgd,bnikge->bnkgde", sides.q_weight, qs, dos, precision=_HIGHEST)
    ds_out = _scan_states(d_chunk, chunk_decay, reverse=True)
    dk_out = states.einsum_to("bnjkg,bnjkge,bnkgde->bnjkgd", sides.k_weight, vc, ds_out, group=gk, precision=_HIGHEST)
    dv_out = states.einsum_to("bnjkg,bnjkgd,bnkgde->bnjkge", sides.k_weight, kc, ds_out, group=gv, precision=_HIGHEST)
    dk, dv = dk + sides.select(dk_out, sides.k_keep), dv + sides.select(dv_out, sides.k_keep)
    kg = jnp.einsum("bnjkgd,bnkgde->bnjkge", kc, ds_out, precision=_HIGHEST)  # k_j G per output head
    x = x + sides.select(sides.k_weight * jnp.sum(kg * vc, axis=-1), sides.k_keep)
    x = x - jnp.sum(_incoming(sides, qc, s_in) * doc, axis=-1)

    x = _unchunked(x.reshape(*x.shape[:3], n_heads), t, jnp.float32)
    return (*(_heads_back(dx, y.shape[2], t, y.dtype) for dx, y in ((dq, q), (dk, k), (dv, v))), x)


def supported(q, k, v) -> str | None:
    return None
