"""Sampling: the prompt through the full forward, then one token at a time with the per-layer states.

Linear layers carry their d x d state (constant memory and time per token); softmax layers of hybrids carry a
KV cache sized for prompt + new tokens. The whole loop is one jitted lax.scan.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from models.lm import LanguageModel


def _pick(logits, key, temperature):
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)


@functools.partial(nnx.jit, static_argnames=("max_new_tokens", "temperature"))
def _generate(model, prompt, rng, *, max_new_tokens, temperature):
    b, t0 = prompt.shape
    logits, state = model.prefill(prompt, model.init_decode_state(b, t0 + max_new_tokens))
    keys = jax.random.split(rng, max_new_tokens)
    first = _pick(logits, keys[0], temperature)

    def body(carry, key):
        token, state = carry
        logits, state = model.decode_step(token, state)
        nxt = _pick(logits, key, temperature)
        return (nxt, state), token

    (last, _), tokens = jax.lax.scan(body, (first, state), keys[1:])
    new = jnp.concatenate([tokens.T, last[:, None]], axis=1)  # [B, max_new_tokens]
    return jnp.concatenate([prompt.astype(jnp.int32), new], axis=1)


def generate(model: LanguageModel, prompt: jax.Array, max_new_tokens: int, *, rng: jax.Array,
             temperature: float = 1.0) -> jax.Array:
    """Samples max_new_tokens after prompt [B, T0] (int32); temperature 0 is greedy.

    Returns tokens [B, T0 + max_new_tokens] int32 (the prompt first). One device: call it outside a mesh.
    """
    if getattr(prompt, "ndim", None) != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be [B, T0] with T0 >= 1, got shape {getattr(prompt, 'shape', prompt)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    return _generate(model, jnp.asarray(prompt), rng, max_new_tokens=int(max_new_tokens),
                     temperature=float(temperature))
