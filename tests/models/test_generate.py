"""Decoding token by token (d x d state per linear layer, KV cache per softmax layer) equals the full forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from tests.models import helpers


@pytest.mark.parametrize("name", ["tnl-tiny", "lt-tiny", "tnl-tiny-hybrid"])
def test_decode_equals_full_forward(name, rng):
    cfg = helpers.tiny(name, n_layers=3 if name == "tnl-tiny-hybrid" else 2)
    model = models.build_model(cfg, rngs=nnx.Rngs(0))
    tok = helpers.tokens(rng, b=2, t=12)
    full, stepwise, after_prefill = helpers.full_and_stepwise(*nnx.split(model), tok)
    assert helpers.max_rel(stepwise, full) < 2e-5
    assert helpers.max_rel(after_prefill, full[:, 5:11]) < 2e-5
    # The decoding state is constant-size for linear layers and a cache only for softmax ones.
    state = model.init_decode_state(2, 1000)
    for i, s in enumerate(state["layers"]):
        if cfg.layer_kind(i) == "softmax":
            assert s["k"].shape == (2, 1000, cfg.resolved_softmax_kv_heads, cfg.resolved_head_dim)
        else:
            assert s.shape == (2, cfg.n_heads, cfg.resolved_head_dim, cfg.resolved_head_dim)


def test_generate_greedy_follows_full_forward(rng):
    cfg = helpers.tiny("tnl-tiny-hybrid", n_layers=3)
    model = models.build_model(cfg, rngs=nnx.Rngs(0))
    prompt = helpers.tokens(rng, b=2, t=5)
    out = models.generate(model, prompt, 7, rng=jax.random.key(0), temperature=0.0)
    assert out.shape == (2, 12) and out.dtype == jnp.int32
    np.testing.assert_array_equal(out[:, :5], prompt)
    # Greedy: every new token is the argmax of the full forward over the tokens before it.
    graphdef, state = nnx.split(model)
    full = helpers.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, out)
    np.testing.assert_array_equal(out[:, 5:], np.argmax(full[:, 4:-1], axis=-1))
    sampled = models.generate(model, prompt, 7, rng=jax.random.key(1), temperature=1.0)
    assert sampled.shape == (2, 12) and int(sampled.max()) < cfg.vocab_size and int(sampled.min()) >= 0


def test_generate_rejects_bad_input():
    model = models.build_model(helpers.tiny("tnl-tiny"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="prompt"):
        models.generate(model, jnp.zeros((3,), jnp.int32), 4, rng=jax.random.key(0))
    with pytest.raises(ValueError, match="max_new_tokens"):
        models.generate(model, jnp.zeros((1, 3), jnp.int32), 0, rng=jax.random.key(0))
