"""LanguageModel: embedding, a stack of pre-norm blocks, final SRMSNorm, LM head; loss, decoding, counting.

    x = embed(tokens) * sqrt(D) (scale_embedding)
    per layer l:  x = x + mixer_l(SRMSNorm(x));  x = x + SGLU(SRMSNorm(x))   (no SGLU when its hidden size is 0)
    logits = SRMSNorm(x) E^T (tied) or SRMSNorm(x) W_head

mixer_l is linear attention (TNL or Linear Transformer, models.attention), Mamba-2 (models.mamba2) or, for the
layers in cfg.softmax_layers, softmax attention (models.softmax). Activations are kept on (batch axes, seq axis)
after every block; attention shards by itself. Remat wraps each block (cfg.remat); with cfg.remat_every = k > 1,
each run of k consecutive blocks is wrapped once more, so the backward keeps only every k-th block's input and
recomputes the run from it (one more forward). Decoding carries, per layer, the d x d state (linear), the SSD
state and the convolution's last inputs (Mamba-2) or a KV cache and its rows' document starts (softmax), so a
linear or Mamba-2 layer's step costs the same at any position; `end_documents` restarts those states where a
separator closed a document, and `prefill` takes a prompt's segment_ids (models.generate's `separator`: the
decoding twin of the forward's segment_ids).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lasp_jax.ops import gated_norm, vjp
from models import sharding
from models.attention import LinearMixer
from models.config import ModelConfig
from models.layers import SGLU, Dense, Embed, srms_norm, srms_norm_residual
from models.loss import cross_entropy_sums
from models.mamba2 import CONV_NAME, Mamba2Mixer
from models.softmax import SoftmaxMixer

def _dots_and(*names: str):
    """Keep the matmul outputs and the values of these checkpoint names. Every policy that keeps the matmuls also
    keeps the gated norm's per-row statistic (gated_norm.STATS_NAME, [B, T, G] float32): without it the backward
    reruns the norm's forward kernel to get it back."""
    return jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(gated_norm.STATS_NAME, *names))


_POLICIES = {
    "block": _dots_and(),
    "block_attention": _dots_and(*vjp.SAVEABLE_NAMES),
    "block_attention_conv": _dots_and(*vjp.SAVEABLE_NAMES, CONV_NAME),
    "full": jax.checkpoint_policies.nothing_saveable,
}


_MIXERS = {"softmax": SoftmaxMixer, "tnl": LinearMixer, "linear_transformer": LinearMixer, "mamba2": Mamba2Mixer}


class Block(nnx.Module):
    """One pre-norm residual block: token mixer then SGLU channel mixer (none when its hidden size is 0)."""

    def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.mixer = _MIXERS[cfg.layer_kind(layer)](cfg, layer, rngs=rngs)
        self.mlp = SGLU(cfg, rngs=rngs) if cfg.resolved_mlp_hidden else None

    def _mlp(self, x):
        if self.mlp is None:
            return x
        x, y = srms_norm_residual(x, self.cfg.norm_eps, self.cfg)
        return x + self.mlp(y).astype(x.dtype)

    def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        """x [B, T, D] -> [B, T, D] on the activation layout; segment_ids [B, T] or None (packed documents).
        The norms pass x through (srms_norm_residual): their backward kernels add the residual's cotangent."""
        x, y = srms_norm_residual(x, self.cfg.norm_eps, self.cfg)
        x = x + self.mixer(y, segment_ids=segment_ids).astype(x.dtype)
        return sharding.constrain_activation(self._mlp(x), self.cfg)

    def prefill(self, x, state, segment_ids=None):
        y, state = self.mixer.prefill(srms_norm(x, self.cfg.norm_eps, self.cfg), state, segment_ids)
        return self._mlp(x + y.astype(x.dtype)), state

    def step(self, x, state, pos):
        y, state = self.mixer.step(srms_norm(x, self.cfg.norm_eps, self.cfg), state, pos)
        return self._mlp(x + y.astype(x.dtype)), state


def _run_block(block: Block, x, segment_ids):
    return block(x, segment_ids)


class LanguageModel(nnx.Module):
    """Decoder-only LM over cfg; see the module docstring for the computation."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = Embed(cfg, rngs=rngs)
        self.blocks = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.n_layers)])
        self.head = None if cfg.tie_embeddings else Dense(cfg.d_model, cfg.vocab_size, cfg, rngs=rngs)

    # --- forward ---
    def _embed(self, tokens):
        x = self.embed(tokens)
        if self.cfg.scale_embedding:
            x = x * jnp.asarray(self.cfg.d_model ** 0.5, x.dtype)
        return x

    def _check_tokens(self, tokens, name="tokens"):
        if getattr(tokens, "ndim", None) != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"{name} must be an integer array [B, T], got {getattr(tokens, 'dtype', None)} "
                             f"{getattr(tokens, 'shape', tokens)}")

    def _check_segment_ids(self, segment_ids, tokens):
        if segment_ids is None:
            return
        if (getattr(segment_ids, "shape", None) != tokens.shape
                or not jnp.issubdtype(getattr(segment_ids, "dtype", None), jnp.integer)):
            raise ValueError(f"segment_ids must be None or an integer array [B, T] = {list(tokens.shape)} (tokens' "
                             f"shape), got {getattr(segment_ids, 'dtype', type(segment_ids).__name__)} "
                             f"{getattr(segment_ids, 'shape', '')}")

    def hidden(self, tokens: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        """tokens [B, T] int -> final normalised hidden states [B, T, D] (compute dtype).

        segment_ids: None, or [B, T] integers: packed documents (a document starts where the id changes from
        t-1 to t); every mixer keeps each document from seeing the ones before it in its row.
        """
        self._check_tokens(tokens)
        self._check_segment_ids(segment_ids, tokens)
        t = tokens.shape[1]
        w = sharding.seq_size(self.cfg)
        if _seq_free(self.cfg, sharding.ambient_mesh()) and t % w:  # (a manual seq axis: T is already local)
            raise ValueError(f"sequence length T={t} must be divisible by the {self.cfg.seq_axis!r} axis size {w}")
        x = sharding.constrain_activation(self._embed(tokens), self.cfg)
        remat, every = self.cfg.remat, self.cfg.remat_every
        run_block = _run_block if remat == "none" else nnx.remat(_run_block, policy=_POLICIES[remat])

        def run_blocks(blocks: list[Block], x, segment_ids):
            for block in blocks:
                x = run_block(block, x, segment_ids)
            return x

        if every > 1:  # the backward keeps only each run's input and recomputes the run (inner remat as above)
            run_blocks = nnx.remat(run_blocks, policy=jax.checkpoint_policies.nothing_saveable)
        if segment_ids is not None:
            segment_ids = sharding.constrain_activation(jnp.asarray(segment_ids), self.cfg)
        for start in range(0, len(self.blocks), every):  # the last run may be shorter
            x = run_blocks(list(self.blocks[start:start + every]), x, segment_ids)
        return srms_norm(x, self.cfg.norm_eps, self.cfg)

    def _logits(self, h):
        logits = self.embed.attend(h) if self.head is None else self.head(h)
        return logits.astype(jnp.float32)

    def __call__(self, tokens: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        """tokens [B, T] int32 (segment_ids as for `hidden`) -> logits [B, T, V] fp32 (whole; use `loss` for
        training at scale)."""
        return self._logits(self.hidden(tokens, segment_ids))

    def loss(self, tokens: jax.Array, targets: jax.Array, weights: jax.Array | None = None,
             segment_ids: jax.Array | None = None):
        """(sum of weighted token cross-entropies, sum of weights), fp32 scalars; mean = first / second.

        tokens, targets: [B, T] int32 (targets in [0, V)); weights: [B, T] (0 masks a position) or None (all 1);
        segment_ids: [B, T] integers (packed documents, as for `hidden`) or None.
        Computed in chunks of cfg.ce_chunk positions per shard, never holding the [B, T, V] logits.
        """
        self._check_tokens(tokens)
        self._check_tokens(targets, "targets")
        if targets.shape != tokens.shape or (weights is not None and weights.shape != tokens.shape):
            raise ValueError(f"tokens {tokens.shape}, targets {targets.shape} and weights "
                             f"{None if weights is None else weights.shape} must have the same shape [B, T]")
        h = self.hidden(tokens, segment_ids)
        weights = jnp.ones(tokens.shape, jnp.float32) if weights is None else weights
        mesh = sharding.ambient_mesh()
        seq_axis = self.cfg.seq_axis if _seq_free(self.cfg, mesh) else None
        w, vocab_major = (self.embed.table[...], True) if self.head is None else (self.head.kernel[...], False)
        return cross_entropy_sums(h, w, targets, weights, chunk=self.cfg.ce_chunk, vocab_major=vocab_major,
                                  axes=sharding.batch_axes(self.cfg), seq_axis=seq_axis)

    # --- decoding ---
    def init_decode_state(self, batch_size: int, max_len: int) -> dict:
        """Per-layer decoding state (d x d states, KV caches for softmax layers) and the next position."""
        return {"pos": jnp.zeros((), jnp.int32),
                "layers": tuple(b.mixer.init_state(batch_size, max_len) for b in self.blocks)}

    def prefill(self, tokens: jax.Array, state: dict, segment_ids: jax.Array | None = None) -> tuple[jax.Array, dict]:
        """Runs a prompt [B, T0] through the full (one-device) forward from a fresh state.

        segment_ids: None or [B, T0] integers (documents in the prompt, as for `hidden`; models.documents builds
        them from a separator): the state returned is that of each row's last document. Where the prompt's last
        token is a separator, the caller still ends that document (end_documents), as after a decode step.
        Returns (logits of the last position [B, V] fp32, the state after T0 positions).
        """
        self._check_tokens(tokens)
        self._check_segment_ids(segment_ids, tokens)
        x = self._embed(tokens)
        layers = []
        for block, s in zip(self.blocks, state["layers"]):
            x, s = block.prefill(x, s, segment_ids)
            layers.append(s)
        h = srms_norm(x[:, -1], self.cfg.norm_eps, self.cfg)
        return self._logits(h), {"pos": state["pos"] + tokens.shape[1], "layers": tuple(layers)}

    def end_documents(self, state: dict, ended: jax.Array) -> dict:
        """Where ended [B] (bool) holds, the sequence's last decoded token closed its document (a separator, which
        belongs to the document it ends, as in packed training rows), so the next position starts a new one,
        exactly as the forward's segment_ids reset: linear and Mamba-2 layers return to their state before
        position 0 (zeros), softmax layers move the row's document start to the next position (their step masks
        the cached keys before it). The position keeps counting, as the forward's does.
        """
        b = jax.tree.leaves(state["layers"])[0].shape[0]  # every leaf is [B, ...]
        if getattr(ended, "shape", None) != (b,) or ended.dtype != jnp.bool_:
            raise ValueError(f"ended must be a [B] = [{b}] bool array, got {getattr(ended, 'dtype', None)} "
                             f"{getattr(ended, 'shape', ended)}")
        layers = tuple(block.mixer.end_documents(s, ended, state["pos"])
                       for block, s in zip(self.blocks, state["layers"]))
        return {"pos": state["pos"], "layers": layers}

    def decode_step(self, tokens: jax.Array, state: dict) -> tuple[jax.Array, dict]:
        """One token per sequence: tokens [B] int32 -> (logits [B, V] fp32, the state one position later)."""
        if getattr(tokens, "ndim", None) != 1:
            raise ValueError(f"decode_step takes tokens [B], got shape {getattr(tokens, 'shape', tokens)}")
        x = self._embed(tokens[:, None])[:, 0]
        pos = state["pos"]
        layers = []
        for block, s in zip(self.blocks, state["layers"]):
            x, s = block.step(x, s, pos)
            layers.append(s)
        return self._logits(srms_norm(x, self.cfg.norm_eps, self.cfg)), {"pos": pos + 1, "layers": tuple(layers)}


def _seq_free(cfg: ModelConfig, mesh) -> bool:
    """Whether the seq axis is still to be split by us (present and not already manual)."""
    return mesh is not None and cfg.seq_axis in mesh.axis_names and cfg.seq_axis not in mesh.manual_axes


def build_model(cfg: ModelConfig, *, rngs: nnx.Rngs) -> LanguageModel:
    """A freshly initialised LanguageModel (parameters sharded at once when built under a mesh)."""
    return LanguageModel(cfg, rngs=rngs)


def count_params(cfg: ModelConfig) -> int:
    """Number of parameters of cfg's model, from shapes only (nothing is allocated)."""
    model = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
