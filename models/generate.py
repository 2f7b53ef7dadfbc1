"""Sampling: the prompt through the full forward, then one token at a time with the per-layer states.

Linear layers carry their d x d state (constant memory and time per token); softmax layers of hybrids carry a
KV cache sized for prompt + new tokens. The whole loop is one jitted lax.scan.

Documents (`separator`, the token the training packer puts after each document: the tokenizer's eos_id): as in
packed training rows with documents="reset", a separator ends its document (it belongs to the document it ends,
so the logits after it still read that document) and the next position starts a new one (LanguageModel.
end_documents: linear and Mamba-2 states restart from zeros, softmax layers mask the cached keys before the new
document), both where the prompt holds separators and where a sampled token is one. A prompt with separators is
prefilled in one call with the packer's segment ids (models.documents.document_ids). Positions keep counting
across documents, as in the forward with segment_ids.
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.documents import document_ids
from models.lm import LanguageModel


def _pick(logits, key, temperature):
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)


def _step(model, token, state, separator):
    """decode_step, then the document's end where the token was the separator."""
    logits, state = model.decode_step(token, state)
    if separator is not None:
        state = model.end_documents(state, token == separator)
    return logits, state


@functools.partial(nnx.jit, static_argnames=("max_new_tokens", "temperature", "separator"))
def _generate(model, prompt, segment_ids, rng, *, max_new_tokens, temperature, separator):
    b, t0 = prompt.shape
    state = model.init_decode_state(b, t0 + max_new_tokens)
    logits, state = model.prefill(prompt, state, segment_ids)
    if separator is not None:  # a prompt that ends with a separator: the first new token starts a document
        state = model.end_documents(state, prompt[:, -1] == separator)
    keys = jax.random.split(rng, max_new_tokens)
    first = _pick(logits, keys[0], temperature)

    def body(carry, key):
        token, state = carry
        logits, state = _step(model, token, state, separator)
        nxt = _pick(logits, key, temperature)
        return (nxt, state), token

    (last, _), tokens = jax.lax.scan(body, (first, state), keys[1:])
    new = jnp.concatenate([tokens.T, last[:, None]], axis=1)  # [B, max_new_tokens]
    return jnp.concatenate([prompt.astype(jnp.int32), new], axis=1)


def generate(model: LanguageModel, prompt: jax.Array, max_new_tokens: int, *, rng: jax.Array,
             temperature: float = 1.0, separator: int | None = None) -> jax.Array:
    """Samples max_new_tokens after prompt [B, T0] (int32); temperature 0 is greedy.

    separator: None (a row is one sequence whatever it holds, as documents="continuous" trains), or the token id
    that ends a document (the tokenizer's eos_id, as documents="reset" trains): the state restarts after each
    one, in the prompt and in what is sampled (module docstring); every model kind, hybrids included.

    Returns tokens [B, T0 + max_new_tokens] int32 (the prompt first). One device: call it outside a mesh.
    """
    if getattr(prompt, "ndim", None) != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be [B, T0] with T0 >= 1, got shape {getattr(prompt, 'shape', prompt)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    vocab = model.cfg.vocab_size
    if separator is not None and (isinstance(separator, bool) or not isinstance(separator, numbers.Integral)
                                  or not 0 <= separator < vocab):
        raise ValueError(f"separator must be None or a token id in [0, {vocab}), got {separator!r}")
    separator = None if separator is None else int(separator)
    segment_ids = None  # a prompt without separators is one document: the forward's plain (constant-decay) path
    if separator is not None and bool(np.any(np.asarray(prompt) == separator)):
        segment_ids = jnp.asarray(document_ids(np.asarray(prompt), separator))
    return _generate(model, jnp.asarray(prompt), segment_ids, rng, max_new_tokens=int(max_new_tokens),
                     temperature=float(temperature), separator=separator)
