"""Flax NNX language models on lasp_jax: TNL, Linear Transformer, and hybrids with softmax layers.

    cfg = models.presets.get("tnl-tiny")                 # or models.ModelConfig(...)
    model = models.build_model(cfg, rngs=nnx.Rngs(0))
    logits = model(tokens)                               # [B, T, V]
    sum_loss, sum_w = model.loss(tokens, targets, w)     # chunked cross-entropy
    out = models.generate(model, prompt, 16, rng=key)    # decoding with per-layer d x d states

The same model code runs on one device and on a mesh with (data, seq) axes: under `jax.set_mesh(mesh)` the
activations shard over (batch axes, seq axis) and attention becomes lasp_attention.
"""

from models import presets
from models.config import ModelConfig
from models.generate import generate
from models.lm import Block, LanguageModel, build_model, count_params

__all__ = ["ModelConfig", "presets", "LanguageModel", "Block", "build_model", "count_params", "generate"]
