"""Building blocks shared by every model: sharded dense and embedding, SRMSNorm, the SGLU channel mixer.

Numerics: weights are stored in `param_dtype` (fp32 master weights) and cast to the compute `dtype` at use;
normalisation statistics are taken in fp32. Every matrix is initialised N(0, init_std^2), as TNL does.
Each parameter carries its ZeRO-3 PartitionSpec as nnx metadata (`out_sharding`), so
`nnx.get_partition_spec(nnx.state(model))` gives the layout over `cfg.param_axis`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from lasp_jax.ops import kernel_support, rms_norm
from models import sharding
from models.config import ModelConfig


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], cfg: ModelConfig) -> nnx.Param:
    init = jax.nn.initializers.normal(stddev=cfg.init_std)
    value = init(rngs.params(), shape, jnp.dtype(cfg.param_dtype))
    # Placed on its sharding at once when built under a mesh; without one the spec is only recorded.
    return nnx.Param(value, out_sharding=sharding.param_sharding(shape, cfg),
                     eager_sharding=sharding.ambient_mesh() is not None)


class Dense(nnx.Module):
    """y = x W, no bias (TNL and LT use none). W [d_in, d_out]."""

    def __init__(self, d_in: int, d_out: int, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.kernel = _param(rngs, (d_in, d_out), cfg)
        self.dtype = jnp.dtype(cfg.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., d_in] -> [..., d_out] in the compute dtype."""
        w = sharding.gather_param(self.kernel[...]).astype(self.dtype)
        return jnp.dot(x.astype(self.dtype), w)


class Embed(nnx.Module):
    """Token embedding [V, D]; `attend` is the tied LM head."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.table = _param(rngs, (cfg.vocab_size, cfg.d_model), cfg)
        self.cfg = cfg

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens [B, T] int -> [B, T, D] in the compute dtype, on the activation layout."""
        table = sharding.gather_param(self.table[...]).astype(jnp.dtype(self.cfg.dtype))
        spec = sharding.activation_spec(self.cfg, 3)
        mesh = sharding.ambient_mesh()
        if mesh is not None and tokens.ndim == 2 and any(entry is not None for entry in spec) and any(
                t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
            return table.at[tokens].get(out_sharding=spec)
        return jnp.take(table, tokens, axis=0)

    def attend(self, h: jax.Array) -> jax.Array:
        """h [..., D] -> logits [..., V] against the embedding (tied head), compute dtype."""
        table = sharding.gather_param(self.table[...]).astype(h.dtype)
        return jnp.dot(h, table.T)


def srms_norm(x: jax.Array, eps: float, cfg: ModelConfig | None = None) -> jax.Array:
    """SRMSNorm (TransNormerLLM, lasp_jax.ops.rms_norm): x / rms(x) over the last axis, no learned scale;
    statistics in fp32, result in x's dtype.

    cfg: the model's config, whose `norm_impl` picks XLA's fusions or the fused Pallas kernels, run per device
    (in a shard_map over the batch and seq axes, models.sharding.per_device) for x [B, T, D] under a mesh; other
    shapes (decoding's [B, D], on one device) call it as is. None: impl "xla" (models.attention's output norm).
    """
    if cfg is None:
        return rms_norm.srms_norm(x, eps=eps, impl="xla")
    return _per_device_norm(rms_norm.srms_norm, x, eps, cfg)


def srms_norm_residual(x: jax.Array, eps: float, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """(x, srms_norm(x, eps, cfg)) for a pre-norm residual block, `x, y = srms_norm_residual(x); x + mixer(y)`:
    x passes through unchanged, and the kernels' backward adds its cotangent to the norm's in float32, one
    rounding (lasp_jax.ops.rms_norm.srms_norm_residual; saves XLA's separate add, 8.8 ms of a Mamba-2 1.3B H200
    step). Placement as srms_norm's."""
    return _per_device_norm(rms_norm.srms_norm_residual, x, eps, cfg)


def _per_device_norm(op, x: jax.Array, eps: float, cfg: ModelConfig):
    """op(x, eps=eps, impl=cfg.norm_impl resolved), per device for x [B, T, D] when the kernels run it."""
    impl = rms_norm.resolve(cfg.norm_impl, x, per_device=True)
    norm = functools.partial(op, eps=eps, impl=impl)
    if impl == "xla" or x.ndim != 3:  # XLA partitions its own fusions
        return norm(x)
    return sharding.per_device(norm, cfg, (x,), check_vma=kernel_support.checks_vma(impl))


class SGLU(nnx.Module):
    """Simple GLU channel mixer (TransNormerLLM): out = W_o [(x W_u) * (x W_v)], no activation."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        hidden = cfg.resolved_mlp_hidden
        self.up = Dense(cfg.d_model, hidden, cfg, rngs=rngs)
        self.gate = Dense(cfg.d_model, hidden, cfg, rngs=rngs)
        self.down = Dense(hidden, cfg.d_model, cfg, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., D] -> [..., D]."""
        return self.down(self.up(x) * self.gate(x))
