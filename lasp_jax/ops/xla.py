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

    Forward: out[n] = sum_{m < n} a^(n-1-m) x[m]; reverse: out[n] = sum_{m > n} a^(m-n-1) x[m]; a = lambda^C.
    x: [B, N, Hkv, G, Dk, Dv].
    """
    n = x.shape[1]
    a = jnp.broadcast_to(chunk_decay[None, None, :, :, None, None], (1, n, *chunk_decay.shape, 1, 1))

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
    return _scan_states(kv, chunk_decay, reverse=False)


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
    ds_out = _scan_states(d_chunk, chunk_decay, reverse=True)
    dk = dk + jnp.einsum("jkg,bnjke,bnkgde->bnjkd", k_decay, vc, ds_out, precision=_HIGHEST)
    dv = dv + jnp.einsum("jkg,bnjkd,bnkgde->bnjke", k_decay, kc, ds_out, precision=_HIGHEST)

    dq = _unchunked(dq.reshape(*dq.shape[:3], h, dim_k), t, q.dtype)
    return dq, _unchunked(dk, t, k.dtype), _unchunked(dv, t, v.dtype)


def supported(q, k, v) -> str | None:
    return None
