"""The optimiser: optax AdamW with the LASP paper's settings, linear warmup then cosine decay, and clipping.

Updates are computed in float32 on float32 master parameters (the model computes in bf16 but keeps its
parameters in float32), so the optimiser state is float32 too. Weight decay applies to matrices (ndim >= 2)
only: norms' scales, biases and per-head decay rates are not pulled towards zero.
"""

from __future__ import annotations

import jax
import optax

from train.config import TrainConfig


def learning_rate(cfg: TrainConfig) -> optax.Schedule:
    """0 -> lr linearly over warmup_steps, then cosine to lr * min_lr_ratio at decay_steps, constant after."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.warmup_steps,
        decay_steps=max(cfg.decay_steps, cfg.warmup_steps + 1), end_value=cfg.lr * cfg.min_lr_ratio)


def _decay_mask(params):
    return jax.tree.map(lambda p: getattr(p, "ndim", 0) >= 2, params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """clip_by_global_norm(clip_norm) then AdamW(schedule, b1, b2, weight_decay on matrices)."""
    adamw = optax.adamw(learning_rate(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=_decay_mask)
    if cfg.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
    return adamw
