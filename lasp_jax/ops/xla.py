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

Per-token decay and documents (`*_tokens`): each chunk takes its own float32 running sum of the rates, so every
exponent is minus a sum over at most C positions (never a difference of sums over the whole piece, which would
lose about ulp(s_0 + ... + s_T) per factor), and every factor is exp of something <= 0; pairs in two documents
are selected out of the intra-chunk scores, and states past a document start get zero weights (products, not
selects: a non-finite value in one document still reaches the later ones). Measured against float64 at T = 1000 with rates up to 6:
1.6e-6 (outputs, dq, dk, dv) and 7.7e-6 (the rates' gradient), from the differences bc_i - bc_j of the chunk's
running sums (up to 64 x 6); rates below ~0.3: 4e-7.

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


def _decays(rates, hkv, c, scale):
    """Per-chunk decay tables for rates [H] viewed as [Hkv, G]; the q side's carry the scale."""
    rates_g = rates.astype(jnp.float32).reshape(hkv, -1)
    i = jnp.arange(c, dtype=jnp.float32)
    gap = i[:, None] - i[None, :]
    mask = scale * jnp.exp(-rates_g[..., None, None] * jnp.maximum(gap, 0.0))  # [Hkv, G, C, C], used where gap >= 0
    q_decay = scale * jnp.exp(-rates_g[None] * i[:, None, None])  # [C, Hkv, G]: scale lambda^i
    k_decay = jnp.exp(-rates_g[None] * (c - i)[:, None, None])  # [C, Hkv, G]: lambda^(C - j)
    chunk_decay = jnp.exp(-rates_g * c)  # [Hkv, G]: lambda^C
    return _Causal(gap >= 0, mask), q_decay, k_decay, chunk_decay


@dataclasses.dataclass(frozen=True)
class _Causal:
    """The decayed causal mask: `apply` keeps the scores at or before the diagonal, times their weights, and
    selects zero elsewhere (a non-finite later score is dropped, not multiplied by zero)."""

    keep: jax.Array  # [C, C] bool
    weights: jax.Array  # [Hkv, G, C, C] float32

    def apply(self, scores):
        return jnp.where(self.keep, scores * self.weights, 0.0)


def _scan_states(x, chunk_decay, reverse):
    """Exclusive decayed scan over chunks (axis 1).

    Forward: out[n] = sum_{m < n} (prod_{m < i < n} a_i) x[m]; reverse: out[n] = sum_{m > n} (prod_{n < i < m} a_i)
    x[m]; a = lambda^C for every chunk, or each chunk's own decay (per-token rates; 0 where a document starts).
    x: [B, N, Hkv, G, Dk, Dv]; chunk_decay: [1 or B, 1 or N, Hkv, G].
    """
    n = x.shape[1]
    a = jnp.broadcast_to(chunk_decay[..., None, None], (chunk_decay.shape[0], n, *chunk_decay.shape[2:], 1, 1))

    def combine(left, right):
        (a1, s1), (a2, s2) = left, right
        return a1 * a2, a2 * s1 + s2

    if reverse:
        _, incl = jax.lax.associative_scan(combine, (a, x), axis=1, reverse=True)
        return jnp.pad(incl[:, 1:], ((0, 0), (0, 1), (0, 0), (0, 0), (0, 0), (0, 0)))
    _, incl = jax.lax.associative_scan(combine, (a, x), axis=1)
    return jnp.pad(incl[:, :-1], ((0, 0), (1, 0), (0, 0), (0, 0), (0, 0), (0, 0)))


def _chunk_states_in(kc, vc, k_decay, chunk_decay, hkv):
    """State entering each chunk, from zero. kc [B,N,C,Hkv,Dk], vc [B,N,C,Hkv,Dv] -> [B,N,Hkv,G,Dk,Dv]."""
    kv = jnp.einsum("jkg,bnjkd,bnjke->bnkgde", k_decay, kc, vc, precision=_HIGHEST)
    return _scan_states(kv, chunk_decay[None, None], reverse=False)


def local_output(q, k, v, rates, scale=1.0, config: ChunkConfig = DEFAULT):
    """Output of the piece with S_in = 0. q [B,T,H,Dk], k [B,T,Hkv,Dk], v [B,T,Hkv,Dv], rates [H] -> [B,T,H,Dv]."""
    b, t, h, dim_k = q.shape
    hkv = k.shape[2]
    c = config.chunk_size
    qc, kc, vc = _chunked(q, c), _chunked(k, c), _chunked(v, c)
    qc = qc.reshape(*qc.shape[:3], hkv, h // hkv, dim_k)
    mask, q_decay, k_decay, chunk_decay = _decays(rates, hkv, c, scale)
    scores = mask.apply(jnp.einsum("bnikgd,bnjkd->bnkgij", qc, kc, precision=_HIGHEST))
    o = jnp.einsum("bnkgij,bnjke->bnikge", scores, vc, precision=_HIGHEST)
    s_in = _chunk_states_in(kc, vc, k_decay, chunk_decay, hkv)
    o = o + jnp.einsum("ikg,bnikgd,bnkgde->bnikge", q_decay, qc, s_in, precision=_HIGHEST)
    return _unchunked(o.reshape(*o.shape[:3], h, -1), t, q.dtype)


local_state = states.local_state


def local_backward(q, k, v, rates, do, scale=1.0, config: ChunkConfig = DEFAULT):
    """Cotangents of `local_output` (S_in = 0, dS_end = 0). do [B,T,H,Dv] -> (dq, dk, dv) in input dtypes."""
    b, t, h, dim_k = q.shape
    hkv = k.shape[2]
    c = config.chunk_size
    qc, kc, vc, doc = _chunked(q, c), _chunked(k, c), _chunked(v, c), _chunked(do, c)
    qc = qc.reshape(*qc.shape[:3], hkv, h // hkv, dim_k)
    doc = doc.reshape(*doc.shape[:3], hkv, h // hkv, -1)
    mask, q_decay, k_decay, chunk_decay = _decays(rates, hkv, c, scale)

    scores = mask.apply(jnp.einsum("bnikgd,bnjkd->bnkgij", qc, kc, precision=_HIGHEST))
    a = mask.apply(jnp.einsum("bnikge,bnjke->bnkgij", doc, vc, precision=_HIGHEST))
    dq = jnp.einsum("bnkgij,bnjkd->bnikgd", a, kc, precision=_HIGHEST)
    dk = jnp.einsum("bnkgij,bnikgd->bnjkd", a, qc, precision=_HIGHEST)
    dv = jnp.einsum("bnkgij,bnikge->bnjke", scores, doc, precision=_HIGHEST)

    s_in = _chunk_states_in(kc, vc, k_decay, chunk_decay, hkv)
    dq = dq + jnp.einsum("ikg,bnikge,bnkgde->bnikgd", q_decay, doc, s_in, precision=_HIGHEST)
    d_chunk = jnp.einsum("ikg,bnikgd,bnikge->bnkgde", q_decay, qc, doc, precision=_HIGHEST)
    ds_out = _scan_states(d_chunk, chunk_decay[None, None], reverse=True)
    dk = dk + jnp.einsum("jkg,bnjke,bnkgde->bnjkd", k_decay, vc, ds_out, precision=_HIGHEST)
    dv = dv + jnp.einsum("jkg,bnjkd,bnkgde->bnjke", k_decay, kc, ds_out, precision=_HIGHEST)

    dq = _unchunked(dq.reshape(*dq.shape[:3], h, dim_k), t, q.dtype)
    return dq, _unchunked(dk, t, k.dtype), _unchunked(dv, t, v.dtype)


# Per-token decay and documents (the piece's states.TokenDecay). The same chunk formulas with the decay of each
# chunk from its own running sum bc_i = s_0 + ... + s_i (chunk-local, float32): pair (i, j <= i) weighs
# exp(-(bc_i - bc_j)), the chunk's incoming state reaches i as exp(-bc_i), j's share of the chunk's outgoing state
# is exp(-ec_j) (ec_j = s_(j+1) + ... + s_(C-1), its own sum), and the chunk decays a state by exp(-bc_(C-1)).
# Documents: a pair (i, j) in two documents is selected out, a chunk holding a start passes no state on (a = 0),
# positions from a start on do not see the incoming state, and those before the chunk's last start are not in
# its outgoing state.

def _token_tables(tok, hkv, c, scale):
    """(causal mask [B,N,Hkv,G,C,C], q-side [B,N,C,Hkv,G] with the scale, k-side [B,N,C,Hkv,G], chunk decay
    [B,N,Hkv,G]) from the piece's TokenDecay, front-padded like the tokens (zero rates, no starts)."""
    rates = _chunked(tok.rates[..., None], c)[..., 0]  # [B, N, C, H]
    b, n = rates.shape[:2]
    rates = rates.reshape(b, n, c, hkv, -1)
    counts = _chunked(tok.counts[..., None, None], c)[..., 0, 0]  # [B, N, C]; the padding counts 0 starts
    before = jnp.pad(counts[:, :-1, -1:], ((0, 0), (1, 0), (0, 0)))  # [B, N, 1]: the count before each chunk
    bc = jnp.cumsum(rates, axis=2)
    later = jnp.pad(rates[:, :, 1:], ((0, 0), (0, 0), (0, 1), (0, 0), (0, 0)))
    ec = jnp.flip(jnp.cumsum(jnp.flip(later, 2), axis=2), 2)
    keep = (jnp.arange(c)[:, None] >= jnp.arange(c)[None, :]) & (counts[:, :, :, None] == counts[:, :, None, :])
    keep = keep[:, :, None, None]  # [B, N, 1, 1, C, C]
    gap = jnp.moveaxis(bc[:, :, :, None] - bc[:, :, None, :], (2, 3), (4, 5))  # [B, N, Hkv, G, C, C]
    weights = scale * jnp.exp(-jnp.where(keep, gap, 0.0))
    q_side = scale * jnp.where((counts == before)[..., None, None], jnp.exp(-bc), 0.0)
    k_side = jnp.where((counts == counts[:, :, -1:])[..., None, None], jnp.exp(-ec), 0.0)
    chunk_decay = jnp.where((counts[:, :, -1] == before[:, :, 0])[..., None, None], jnp.exp(-bc[:, :, -1]), 0.0)
    return _Causal(keep, weights), q_side, k_side, chunk_decay


def local_output_tokens(q, k, v, tok, scale=1.0, config: ChunkConfig = DEFAULT):
    """Output of the piece with S_in = 0 under per-token decay and documents: q [B,T,H,Dk], k [B,T,Hkv,Dk],
    v [B,T,Hkv,Dv], tok a states.TokenDecay -> [B,T,H,Dv] in q's dtype."""
    b, t, h, dim_k = q.shape
    hkv = k.shape[2]
    c = config.chunk_size
    qc, kc, vc = _chunked(q, c), _chunked(k, c), _chunked(v, c)
    qc = qc.reshape(*qc.shape[:3], hkv, h // hkv, dim_k)
    mask, q_side, k_side, chunk_decay = _token_tables(tok, hkv, c, scale)
    scores = mask.apply(jnp.einsum("bnikgd,bnjkd->bnkgij", qc, kc, precision=_HIGHEST))
    o = jnp.einsum("bnkgij,bnjke->bnikge", scores, vc, precision=_HIGHEST)
    kv = jnp.einsum("bnjkg,bnjkd,bnjke->bnkgde", k_side, kc, vc, precision=_HIGHEST)
    s_in = _scan_states(kv, chunk_decay, reverse=False)
    o = o + jnp.einsum("bnikg,bnikgd,bnkgde->bnikge", q_side, qc, s_in, precision=_HIGHEST)
    return _unchunked(o.reshape(*o.shape[:3], h, -1), t, q.dtype)


def local_backward_tokens(q, k, v, tok, do, scale=1.0, config: ChunkConfig = DEFAULT):
    """Cotangents of `local_output_tokens` (S_in = 0, dS_end = 0): (dq, dk, dv) in input dtypes and x [B,T,H]
    float32, x_t = k_t . dk_t - q_t . dq_t per query head (the piece's pairs only), the terms whose per-document
    suffix sums are the decay gradient (vjp.attend_tokens)."""
    b, t, h, dim_k = q.shape
    hkv = k.shape[2]
    c = config.chunk_size
    qc, kc, vc, doc = _chunked(q, c), _chunked(k, c), _chunked(v, c), _chunked(do, c)
    qc = qc.reshape(*qc.shape[:3], hkv, h // hkv, dim_k)
    doc = doc.reshape(*doc.shape[:3], hkv, h // hkv, -1)
    mask, q_side, k_side, chunk_decay = _token_tables(tok, hkv, c, scale)

    qk = jnp.einsum("bnikgd,bnjkd->bnkgij", qc, kc, precision=_HIGHEST)
    dov = jnp.einsum("bnikge,bnjke->bnkgij", doc, vc, precision=_HIGHEST)
    scores, a, pairs = mask.apply(qk), mask.apply(dov), mask.apply(qk * dov)
    dq = jnp.einsum("bnkgij,bnjkd->bnikgd", a, kc, precision=_HIGHEST)
    dk = jnp.einsum("bnkgij,bnikgd->bnjkd", a, qc, precision=_HIGHEST)
    dv = jnp.einsum("bnkgij,bnikge->bnjke", scores, doc, precision=_HIGHEST)
    x = jnp.moveaxis(jnp.sum(pairs, axis=-2) - jnp.sum(pairs, axis=-1), -1, 2)  # [B, N, C, Hkv, G]

    kv = jnp.einsum("bnjkg,bnjkd,bnjke->bnkgde", k_side, kc, vc, precision=_HIGHEST)
    s_in = _scan_states(kv, chunk_decay, reverse=False)
    o_in = q_side[..., None] * jnp.einsum("bnikgd,bnkgde->bnikge", qc, s_in, precision=_HIGHEST)
    dq = dq + jnp.einsum("bnikg,bnikge,bnkgde->bnikgd", q_side, doc, s_in, precision=_HIGHEST)
    d_chunk = jnp.einsum("bnikg,bnikgd,bnikge->bnkgde", q_side, qc, doc, precision=_HIGHEST)
    ds_out = _scan_states(d_chunk, chunk_decay, reverse=True)
    kg = jnp.einsum("bnjkd,bnkgde->bnjkge", kc, ds_out, precision=_HIGHEST)
    dk = dk + jnp.einsum("bnjkg,bnjke,bnkgde->bnjkd", k_side, vc, ds_out, precision=_HIGHEST)
    dv = dv + jnp.einsum("bnjkg,bnjkd,bnkgde->bnjke", k_side, kc, ds_out, precision=_HIGHEST)
    x = x + k_side * jnp.sum(kg * vc[:, :, :, :, None], axis=-1) - jnp.sum(o_in * doc, axis=-1)

    dq = _unchunked(dq.reshape(*dq.shape[:3], h, dim_k), t, q.dtype)
    x = _unchunked(x.reshape(*x.shape[:3], h), t, jnp.float32)
    return dq, _unchunked(dk, t, k.dtype), _unchunked(dv, t, v.dtype), x


def supported(q, k, v) -> str | None:
    return None
