"""Presets: each name's size matches its parameter count; counting allocates nothing; bad configs fail."""

from __future__ import annotations

import jax
import pytest
from flax import nnx

import models
from models import presets
from models.config import AttnImpl, Strategy
from tests.models import helpers

# Nominal sizes in billions, read from the names (tiny ones are checked by formula below).
NOMINAL = {"0.4b": 0.4, "1b": 1.0, "7b": 7.0}


def _formula(cfg: models.ModelConfig) -> int:
    """Parameter count written out by hand from the architecture."""
    d, hd, h = cfg.d_model, cfg.resolved_head_dim, cfg.n_heads
    total = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    for i in range(cfg.n_layers):
        if cfg.layer_kind(i) == "softmax":
            kv = cfg.resolved_softmax_kv_heads
            total += d * h * hd * 2 + d * kv * hd * 2  # q, o; k, v
        else:
            kv = cfg.resolved_kv_heads
            gate = d * h * hd if cfg.kind == "tnl" else 0  # TNL's output gate u
            total += d * h * hd * 2 + d * kv * hd * 2 + gate
        total += 3 * d * cfg.resolved_mlp_hidden  # SGLU
    return total


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_parameter_count_matches_name_and_formula(name):
    cfg = presets.get(name)
    n = models.count_params(cfg)
    print(f"{name}: {n:,} parameters ({n / 1e9:.3f} B)")
    assert n == _formula(cfg)
    size = next((v for k, v in NOMINAL.items() if f"-{k}" in name), None)
    if size is not None:
        assert abs(n / 1e9 - size) <= 0.1 * size, f"{name} has {n / 1e9:.3f} B parameters"
    else:
        assert "tiny" in name and n < 1e6


def test_count_params_equals_built_model():
    cfg = helpers.tiny("tnl-tiny-hybrid", n_layers=3, tie_embeddings=False)
    model = models.build_model(cfg, rngs=nnx.Rngs(0))
    built = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert models.count_params(cfg) == built == _formula(cfg)


def test_tnl_paper_shapes():
    cfg = presets.get("tnl-7b")
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.resolved_mlp_hidden) == (30, 4096, 32, 11008)
    hybrid = presets.get("tnl-1b-hybrid")
    assert hybrid.softmax_set == frozenset({3, 7, 11, 15})
    assert hybrid.resolved_softmax_kv_heads < hybrid.n_heads  # GQA keeps the K/V all-gather small


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="tnl-1b"):
        presets.get("tnl-2b")


@pytest.mark.parametrize("changes,match", [
    (dict(kind="mamba"), "kind"),
    (dict(remat="some"), "remat"),
    (dict(strategy="tree"), "strategy"),
    (dict(d_model=30, n_heads=4), "divisible"),
    (dict(n_kv_heads=3), "n_kv_heads"),
    (dict(softmax_layers=(0, 9)), "softmax_layers"),
    (dict(batch_axes=("data", "seq")), "seq_axis"),
    (dict(batch_axes="data"), r"batch_axes must be a tuple, got 'data' \(write \('data',\)\)"),
    (dict(attn_impl="fast"), "attn_impl must be one of"),
    (dict(dtype="int8"), "dtype must be one of"),
    (dict(init_std=1e39), "init_std=1e[+]39 is not a finite float32 value"),
    (dict(norm_eps=float("inf")), "norm_eps=inf is not a finite float32 value"),
])
def test_bad_config_is_a_clear_error(changes, match):
    with pytest.raises(ValueError, match=match):
        models.ModelConfig(**{**dict(d_model=32, n_heads=4, n_layers=2), **changes})


def test_choices_come_from_lasp_jax():
    import typing

    from lasp_jax.ops.impls import IMPLS
    from lasp_jax.parallel.api import STRATEGIES

    assert typing.get_args(Strategy) == tuple(STRATEGIES)
    assert typing.get_args(AttnImpl) == ("auto", *IMPLS)
