"""Softmax-attention token mixer for the softmax layers of hybrid models (LASP-2H).

    q = RoPE(x W_q), k = RoPE(x W_k), v = x W_v       (GQA: softmax_kv_heads K/V heads)
    o = W_o causal_softmax(q k^T / sqrt(hd)) v

Rotary positions are global (computed on the global [B, T] layout, so a sequence-sharded rank sees its own
positions). With the sequence sharded, K and V are all-gathered over the seq axis and the causal mask is taken
in global positions (lasp_jax.parallel.softmax_allgather, which gathers the segment ids too); otherwise
lasp_jax.ops.softmax runs with offset 0 on each device's rows (cuDNN's fused attention or the flash kernels on a
GPU where they apply, else blockwise).
With packed documents (segment_ids) a position attends only within its document; RoPE scores depend on position
differences alone, so a document's outputs do not depend on where in the row it sits.
Decoding keeps a KV cache [B, max_len, Hkv, hd] per softmax layer and each row's document start `start` [B]: a
step attends only to the cached keys at positions >= start (the decoding twin of segment_ids), and
end_documents moves start to the next position, so a new document never sees the earlier ones' keys (they stay
in the cache, masked).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lasp_jax.ops import kernel_support, states
from lasp_jax.ops.softmax import causal_softmax_attention
from lasp_jax.parallel.softmax_allgather import softmax_allgather_attention
from models import sharding
from models.config import ModelConfig
from models.layers import Dense


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding, rotate-half form. x [..., T, heads, hd]; positions [T] int -> same shape and dtype."""
    hd = x.shape[-1]
    freq = theta ** (-jnp.arange(0, hd // 2, dtype=jnp.float32) * 2.0 / hd)
    angle = positions.astype(jnp.float32)[:, None] * freq[None, :]  # [T, hd/2]
    cos, sin = jnp.cos(angle)[:, None, :], jnp.sin(angle)[:, None, :]
    xf = x.astype(jnp.float32)
    a, b = xf[..., : hd // 2], xf[..., hd // 2:]
    return jnp.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1).astype(x.dtype)


class SoftmaxMixer(nnx.Module):
    """Causal softmax attention with GQA and RoPE; sequence-parallel through an all-gather of K and V."""

    def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        self.cfg = cfg
        h, hkv, hd = cfg.n_heads, cfg.resolved_softmax_kv_heads, cfg.resolved_head_dim
        self.q = Dense(cfg.d_model, h * hd, cfg, rngs=rngs)
        self.k = Dense(cfg.d_model, hkv * hd, cfg, rngs=rngs)
        self.v = Dense(cfg.d_model, hkv * hd, cfg, rngs=rngs)
        self.o = Dense(h * hd, cfg.d_model, cfg, rngs=rngs)

    def _qkv(self, x, positions):
        """x [B, T, D], positions [T] -> q [B, T, H, hd], k, v [B, T, Hkv, hd] (q, k rotated)."""
        hd, theta = self.cfg.resolved_head_dim, self.cfg.rope_theta
        split = lambda y: y.reshape(*y.shape[:-1], -1, hd)
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        return rope(q, positions, theta), rope(k, positions, theta), v

    def _out(self, o):
        return self.o(o.reshape(*o.shape[:-2], -1))

    def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        """x [B, T, D] -> [B, T, D]. segment_ids: None or [B, T] ints (packed documents: a position attends only
        to earlier positions of its own id)."""
        cfg = self.cfg
        q, k, v = self._qkv(x, jnp.arange(x.shape[1]))
        if sharding.seq_size(cfg) > 1:
            o = softmax_allgather_attention(q, k, v, segment_ids=segment_ids, seq_axis=cfg.seq_axis,
                                            batch_axes=sharding.batch_axes(cfg), impl=cfg.softmax_impl)
        elif cfg.softmax_impl == "auto" or cfg.softmax_impl.startswith("pallas_triton"):
            # Per device: the fused kernels have no sharding rule, so under a data-parallel mesh "auto" can take
            # them only on each device's own rows. The flash kernels, where qualified: cuDNN's check wants every
            # mesh axis manual, and this shard_map leaves the seq axis (of size 1) to XLA.
            attend = lambda q, k, v, *ids: causal_softmax_attention(  # noqa: E731
                q, k, v, segment_ids=ids[0] if ids else None, impl=cfg.softmax_impl)
            o = sharding.per_device(attend, cfg, (q, k, v) + (() if segment_ids is None else (segment_ids,)),
                                    out_ndim=4, check_vma=kernel_support.checks_vma(cfg.softmax_impl))
        else:
            o = causal_softmax_attention(q, k, v, segment_ids=segment_ids, impl=cfg.softmax_impl)
        return self._out(o)

    def init_state(self, batch: int, max_len: int) -> dict[str, jax.Array]:
        """An empty KV cache: k, v [B, max_len, Hkv, hd] in the compute dtype; start [B] int32 zeros (each row's
        current document starts at position 0)."""
        cfg = self.cfg
        shape = (batch, max_len, cfg.resolved_softmax_kv_heads, cfg.resolved_head_dim)
        zeros = jnp.zeros(shape, jnp.dtype(cfg.dtype))
        return {"k": zeros, "v": zeros, "start": jnp.zeros((batch,), jnp.int32)}

    def prefill(self, x: jax.Array, cache: dict, segment_ids: jax.Array | None = None) -> tuple[jax.Array, dict]:
        """Whole prompt from an empty cache. x [B, T, D] -> (y [B, T, D], cache holding positions [0, T)).

        segment_ids: None or [B, T] ints (documents in the prompt, as for __call__); start becomes the position
        where each row's last document begins (its last id change).
        """
        t = x.shape[1]
        if t > cache["k"].shape[1]:
            raise ValueError(f"prompt of {t} positions does not fit a KV cache of {cache['k'].shape[1]}")
        q, k, v = self._qkv(x, jnp.arange(t))
        new = {name: jax.lax.dynamic_update_slice_in_dim(cache[name], val.astype(cache[name].dtype), 0, axis=1)
               for name, val in (("k", k), ("v", v))}
        start = cache["start"]
        if segment_ids is not None:
            starts = states.document_starts(segment_ids)
            start = jnp.max(jnp.where(starts, jnp.arange(t, dtype=jnp.int32), 0), axis=1, initial=0)
        y = self._out(causal_softmax_attention(q, k, v, segment_ids=segment_ids))
        return y, {**new, "start": start}

    def step(self, x: jax.Array, cache: dict, pos: jax.Array) -> tuple[jax.Array, dict]:
        """One token at position `pos`: x [B, D] -> (y [B, D], cache with position pos written). It attends to the
        cached positions in [start, pos] (the keys before start, earlier documents', carry segment id 0)."""
        q, k, v = self._qkv(x[:, None], pos[None])
        cache = {**cache, **{name: jax.lax.dynamic_update_slice_in_dim(cache[name], val.astype(cache[name].dtype),
                                                                       pos, axis=1)
                             for name, val in (("k", k), ("v", v))}}
        in_document = jnp.arange(cache["k"].shape[1])[None, :] >= cache["start"][:, None]  # [B, max_len]
        o = causal_softmax_attention(q, cache["k"], cache["v"], segment_ids=in_document.astype(jnp.int32),
                                     q_offset=pos)  # rows see columns <= pos only
        return self._out(o)[:, 0], cache

    def end_documents(self, cache: dict, ended: jax.Array, pos: jax.Array) -> dict:
        """Rows where ended [B] start a new document at position `pos` (the next one): start moves there."""
        return {**cache, "start": jnp.where(ended, pos, cache["start"]).astype(jnp.int32)}
