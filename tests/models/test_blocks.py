"""The token mixers against hand-written dense references, and TNL's decay schedule.

References are written here from the papers' formulas in NumPy float64 (dense causal masks, no chunking),
independent of lasp_jax, so a wrong feature map, gate, norm or decay in the model shows up.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

import models
from models.attention import LinearMixer, alibi_slopes, tnl_decay
from models.softmax import SoftmaxMixer
from tests.models import helpers


def test_alibi_slopes_and_depth_scaling():
    np.testing.assert_allclose(alibi_slopes(8), [2.0 ** -(i + 1) for i in range(8)])
    np.testing.assert_allclose(alibi_slopes(4), [2.0 ** (-2 * (i + 1)) for i in range(4)])
    # 6 heads: the 4 slopes of 4 heads, then every other slope of 8 heads.
    np.testing.assert_allclose(alibi_slopes(6), alibi_slopes(4) + alibi_slopes(8)[0::2][:2])
    # Layer l of L: slopes * (1 - l / (L - 1) + 1e-5): the first layer decays fastest, the last barely.
    np.testing.assert_allclose(tnl_decay(4, 0, 5), np.asarray(alibi_slopes(4)) * (1 + 1e-5))
    np.testing.assert_allclose(tnl_decay(4, 2, 5), np.asarray(alibi_slopes(4)) * (0.5 + 1e-5))
    np.testing.assert_allclose(tnl_decay(4, 4, 5), np.asarray(alibi_slopes(4)) * 1e-5)


def _w(dense):
    return np.asarray(dense.kernel[...], np.float64)


def _silu(x):
    return x / (1 + np.exp(-x))


def _elu1(x):
    return np.where(x > 0, x + 1, np.exp(x))


def _srms(x, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def _heads(x, hd):
    return x.reshape(*x.shape[:-1], -1, hd)


def _decayed_linear(q, k, v, rates):
    """o[b,t,h] = sum_{s<=t} exp(-rate_h (t-s)) (q[b,t,h] . k[b,s,h]) v[b,s,h], dense, float64."""
    t = q.shape[1]
    gap = np.arange(t)[:, None] - np.arange(t)[None, :]
    mask = np.where(gap >= 0, np.exp(-np.asarray(rates)[:, None, None] * np.maximum(gap, 0)), 0.0)  # [H, T, T]
    scores = np.einsum("bthd,bshd->bhts", q, k) * mask
    return np.einsum("bhts,bshe->bthe", scores, v)


@pytest.mark.parametrize("kind,layer", [("tnl", 0), ("tnl", 2), ("linear_transformer", 1)])
def test_linear_mixer_matches_dense_reference(kind, layer, rng):
    cfg = helpers.tiny("tnl-tiny", kind=kind, n_layers=3)
    mixer = LinearMixer(cfg, layer, rngs=nnx.Rngs(3))
    x = rng.standard_normal((2, 16, cfg.d_model))
    got = np.asarray(mixer(np.asarray(x, np.float32)), np.float64)

    hd = cfg.resolved_head_dim
    q, k, v = (x @ _w(m) for m in (mixer.q, mixer.k, mixer.v))
    if kind == "tnl":
        q, k, rates = _silu(q), _silu(k), tnl_decay(cfg.n_heads, layer, cfg.n_layers)
    else:
        q, k, rates = _elu1(q), _elu1(k), np.zeros(cfg.n_heads)
    o = _decayed_linear(_heads(q, hd), _heads(k, hd), _heads(v, hd), rates).reshape(2, 16, -1)
    o = _srms(o, cfg.norm_eps)
    if kind == "tnl":
        o = o * (x @ _w(mixer.u))  # TNL's output gate (linear, no activation)
    want = o @ _w(mixer.o)
    assert helpers.max_rel(got, want) < 1e-4


def test_softmax_mixer_matches_dense_reference(rng):
    cfg = helpers.tiny("tnl-tiny-hybrid", softmax_kv_heads=2)
    mixer = SoftmaxMixer(cfg, 1, rngs=nnx.Rngs(4))
    t, hd = 12, cfg.resolved_head_dim
    x = rng.standard_normal((2, t, cfg.d_model))
    got = np.asarray(mixer(np.asarray(x, np.float32)), np.float64)

    def rope(y):
        freq = cfg.rope_theta ** (-np.arange(hd // 2) * 2.0 / hd)
        ang = np.arange(t)[:, None, None] * freq
        a, b = y[..., : hd // 2], y[..., hd // 2:]
        return np.concatenate([a * np.cos(ang) - b * np.sin(ang), a * np.sin(ang) + b * np.cos(ang)], -1)

    q = rope(_heads(x @ _w(mixer.q), hd))
    k = np.repeat(rope(_heads(x @ _w(mixer.k), hd)), 2, axis=2)  # GQA: each K/V head serves 2 query heads
    v = np.repeat(_heads(x @ _w(mixer.v), hd), 2, axis=2)
    s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(hd)
    s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = np.einsum("bhts,bshe->bthe", p, v).reshape(2, t, -1) @ _w(mixer.o)
    assert helpers.max_rel(got, want) < 1e-4


def test_gqa_linear_layers(rng):
    """n_kv_heads < n_heads: the K/V projections shrink and the model still runs forward."""
    cfg = helpers.tiny("tnl-tiny", n_kv_heads=2)
    model = models.build_model(cfg, rngs=nnx.Rngs(0))
    assert model.blocks[0].mixer.k.kernel.shape == (cfg.d_model, 2 * cfg.resolved_head_dim)
    logits = model(helpers.tokens(rng, t=8))
    assert logits.shape == (2, 8, cfg.vocab_size) and bool(jax.numpy.isfinite(logits).all())
