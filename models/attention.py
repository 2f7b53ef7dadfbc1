"""Linear-attention token mixers: TNL's gated linear attention and the Linear Transformer's.

Both are exactly lasp_jax's op, o_p = sum_{r<=p} lambda^(p-r) (q_p . k_r) v_r with no softmax and no
normaliser; they differ in the feature map, the decay and what wraps the op:

TNL (TransNormerLLM, Qin et al. 2023; its public Hugging Face code), written in our words:
    q = silu(x W_q), k = silu(x W_k), v = x W_v, u = x W_u           (no scale on q)
    o = W_o [ SRMSNorm(attn(q, k, v; decay s_l)) * u ]                 (norm over all heads, linear gate u)
    s_l,h = slope_h * (1 - l / (n_layers - 1) + 1e-5)                  slope_h = 2^(-8 (h+1) / H) (ALiBi)
so the first layer decays fastest and the last barely at all. TNL's optional LRPE (rotary-like positions on
q and k, `linear_use_lrpe_list` in its configuration, empty by default) is not implemented.

Linear Transformer (Katharopoulos et al. 2020), without its normaliser as LASP runs it: q = elu(x W_q) + 1,
k = elu(x W_k) + 1, v = x W_v, no decay; o = W_o attn, or o = W_o SRMSNorm(attn) when `lt_output_norm`
(default on, our choice: the norm TransNormer puts in place of the removed denominator, which keeps outputs
O(1) at any length; switch it off for the bare op).

Attention dispatch: lasp_attention whenever the ambient mesh has the seq axis, of any size (it runs the
per-device implementation inside shard_map, which the Pallas kernels need under data parallelism too), unless
a size-1 seq axis meets a batch the batch axes do not divide; linear_attention without a mesh (or then). The
model code is the same on one device and on a mesh.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

import lasp_jax
from lasp_jax.ops import tnl_slopes
from models import sharding
from models.config import ModelConfig
from models.layers import Dense, srms_norm


def alibi_slopes(n_heads: int) -> list[float]:
    """ALiBi head slopes: lasp_jax's `tnl_slopes` 2^(-8 (h+1) / H) for H a power of two; otherwise those of the
    nearest power of two below, completed by every other slope of the next power of two (as ALiBi and TNL do)."""
    if math.log2(n_heads).is_integer():
        return [float(s) for s in tnl_slopes(n_heads)]
    low = 2 ** math.floor(math.log2(n_heads))
    return alibi_slopes(low) + alibi_slopes(2 * low)[0::2][: n_heads - low]


def tnl_decay(n_heads: int, layer: int, n_layers: int) -> tuple[float, ...]:
    """TNL's decay rates [H] for `layer` (0-based) of `n_layers`: ALiBi slopes scaled by (1 - l/(L-1) + 1e-5).

    Host floats: the rates are constants of the model, not parameters.
    """
    depth = 1.0 - layer / (n_layers - 1) if n_layers > 1 else 1.0
    return tuple(s * (depth + 1e-5) for s in alibi_slopes(n_heads))


def linear_attend(q, k, v, decay, cfg: ModelConfig, segment_ids=None):
    """lasp_attention on a mesh with the seq axis (of size 1 too, when the batch axes divide B: the per-device
    kernels need its shard_map), linear_attention otherwise.

    q [B, T, H, Dk], k [B, T, Hkv, Dk], v [B, T, Hkv, Dv], segment_ids None or [B, T] ints (the state resets
    where the id changes) -> o [B, T, H, Dv].
    """
    if sharding.in_seq_shard_map(cfg, q.shape[0]):
        return lasp_jax.lasp_attention(q, k, v, decay, segment_ids=segment_ids, seq_axis=cfg.seq_axis,
                                       strategy=cfg.strategy, impl=cfg.attn_impl, batch_axes=sharding.batch_axes(cfg))
    return lasp_jax.linear_attention(q, k, v, decay, segment_ids=segment_ids, impl=cfg.attn_impl)


class LinearMixer(nnx.Module):
    """Token mixer of a linear layer: TNL's gated linear attention or the Linear Transformer's (cfg.kind)."""

    def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        self.cfg = cfg
        h, hkv, hd = cfg.n_heads, cfg.resolved_kv_heads, cfg.resolved_head_dim
        self.q = Dense(cfg.d_model, h * hd, cfg, rngs=rngs)
        self.k = Dense(cfg.d_model, hkv * hd, cfg, rngs=rngs)
        self.v = Dense(cfg.d_model, hkv * hd, cfg, rngs=rngs)
        if cfg.kind == "tnl":
            self.u = Dense(cfg.d_model, h * hd, cfg, rngs=rngs)
            self.decay = tnl_decay(h, layer, cfg.n_layers)  # static per layer
        else:
            self.decay = None
        self.o = Dense(h * hd, cfg.d_model, cfg, rngs=rngs)

    def _qkv(self, x):
        """x [..., D] -> q [..., H, hd], k, v [..., Hkv, hd] after the feature map."""
        cfg = self.cfg
        hd = cfg.resolved_head_dim
        q, k, v = self.q(x), self.k(x), self.v(x)
        if cfg.kind == "tnl":
            q, k = jax.nn.silu(q), jax.nn.silu(k)
        else:
            q, k = jax.nn.elu(q) + 1, jax.nn.elu(k) + 1
        split = lambda y: y.reshape(*y.shape[:-1], -1, hd)
        return split(q), split(k), split(v)

    def _out(self, x, o):
        """Norm, gate and output projection of the attention result o [..., H, hd] -> [..., D]."""
        o = o.reshape(*o.shape[:-2], -1)
        if self.cfg.kind == "tnl":
            o = srms_norm(o, self.cfg.norm_eps) * self.u(x)
        elif self.cfg.lt_output_norm:
            o = srms_norm(o, self.cfg.norm_eps)
        return self.o(o)

    def _decay(self):
        return None if self.decay is None else jnp.asarray(self.decay, jnp.float32)

    def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        """x [B, T, D] -> [B, T, D]. segment_ids: None or [B, T] ints (packed documents: the state resets where
        the id changes; lasp_jax then runs its per-token path, which takes the constant decay per position: on an
        H200 about 2.0x the constant path's attention time at 64K, benchmarks/results/ops_gpu_h200_s9_tokens.md
        and profile_pieces_h200_s9_scan.md)."""
        q, k, v = self._qkv(x)
        return self._out(x, linear_attend(q, k, v, self._decay(), self.cfg, segment_ids))

    def init_state(self, batch: int, max_len: int) -> jax.Array:
        """The d x d state before position 0: zeros [B, H, hd, hd] fp32 (max_len is not needed)."""
        hd = self.cfg.resolved_head_dim
        return jnp.zeros((batch, self.cfg.n_heads, hd, hd), jnp.float32)

    def prefill(self, x: jax.Array, state: jax.Array, segment_ids: jax.Array | None = None
                ) -> tuple[jax.Array, jax.Array]:
        """Whole-prompt forward from `state` (one device). x [B, T, D] -> (y [B, T, D], state after T).

        segment_ids: None or [B, T] ints (documents in the prompt): `state` belongs to position 0's document, the
        returned one to the last position's (linear_attention's convention).
        """
        q, k, v = self._qkv(x)
        o, state = lasp_jax.linear_attention(q, k, v, self._decay(), segment_ids=segment_ids, initial_state=state,
                                             return_final_state=True, impl=self.cfg.attn_impl)
        return self._out(x, o), state

    def step(self, x: jax.Array, state: jax.Array, pos: jax.Array) -> tuple[jax.Array, jax.Array]:
        """One token: x [B, D] -> (y [B, D], next state); constant memory whatever `pos`."""
        q, k, v = self._qkv(x)
        o, state = lasp_jax.linear_attention_step(q, k, v, state, self._decay())
        return self._out(x, o), state

    def end_documents(self, state: jax.Array, ended: jax.Array, pos: jax.Array) -> jax.Array:
        """Rows where ended [B] start a new document at `pos`: their state returns to init_state's zeros."""
        del pos  # the state holds no position
        return jnp.where(ended[:, None, None, None], jnp.zeros_like(state), state)
