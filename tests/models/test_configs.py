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
NOMINAL = {"0.4b": 0.4, "1b": 1.0, "7b": 7.0, "130m": 0.13, "370m": 0.37, "780m": 0.78, "1.3b": 1.3, "2.7b": 2.7}
# The Mamba-2 paper's models: within 4% of their names (measured: 0.8%, 0.5%, 0.0%, 3.4%, 0.1%; the names round).
MAMBA2_TOLERANCE = 0.04


def _formula(cfg: models.ModelConfig) -> int:
    """Parameter count written out by hand from the architecture."""
    d, hd, h = cfg.d_model, cfg.resolved_head_dim, cfg.n_heads
    total = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    for i in range(cfg.n_layers):
        if cfg.layer_kind(i) == "softmax":
            kv = cfg.resolved_softmax_kv_heads
            total += d * h * hd * 2 + d * kv * hd * 2  # q, o; k, v
        elif cfg.layer_kind(i) == "mamba2":
            inner, ssm_heads = cfg.expand * d, cfg.expand * d // hd
            conv = inner + 2 * cfg.n_groups * cfg.d_state  # x, B, C
            total += d * (inner + conv + ssm_heads)  # gate_proj (z), in_proj (xBC), dt_proj (dt)
            total += conv * (cfg.conv_width + 1) + 3 * ssm_heads + inner  # conv weight, bias; dt_bias, A_log, D; norm
            total += inner * d  # out-projection
        else:
            kv = cfg.resolved_kv_heads
            gate = d * h * hd if cfg.kind == "tnl" else 0  # TNL's output gate u
            total += d * h * hd * 2 + d * kv * hd * 2 + gate
        total += 3 * d * cfg.resolved_mlp_hidden  # SGLU (none in Mamba-2 blocks)
    return total


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_parameter_count_matches_name_and_formula(name):
    cfg = presets.get(name)
    n = models.count_params(cfg)
    print(f"{name}: {n:,} parameters ({n / 1e9:.3f} B)")
    assert n == _formula(cfg)
    size = next((v for k, v in NOMINAL.items() if f"-{k}" in name), None)
    if size is not None:
        tolerance = MAMBA2_TOLERANCE if cfg.kind == "mamba2" and not cfg.softmax_set else 0.1
        assert abs(n / 1e9 - size) <= tolerance * size, f"{name} has {n / 1e9:.3f} B parameters"
    else:
        assert "tiny" in name and n < 1e6


@pytest.mark.parametrize("name", ["tnl-tiny-hybrid", "mamba2-tiny-hybrid"])
def test_count_params_equals_built_model(name):
    cfg = helpers.tiny(name, n_layers=3, tie_embeddings=False, mlp_hidden=None if "mamba2" in name else 64)
    model = models.build_model(cfg, rngs=nnx.Rngs(0))
    built = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert models.count_params(cfg) == built == _formula(cfg)


def test_tnl_paper_shapes():
    cfg = presets.get("tnl-7b")
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.resolved_mlp_hidden) == (30, 4096, 32, 11008)
    hybrid = presets.get("tnl-1b-hybrid")
    assert hybrid.softmax_set == frozenset({3, 7, 11, 15})
    assert hybrid.resolved_softmax_kv_heads < hybrid.n_heads  # GQA keeps the K/V all-gather small


def test_mamba2_paper_shapes():
    """The published shapes (layers, d_model) with d_state 128, head dim 64, expand 2 and no MLP."""
    shapes = {"130m": (24, 768), "370m": (48, 1024), "780m": (48, 1536), "1.3b": (48, 2048), "2.7b": (64, 2560)}
    for size, (layers, d) in shapes.items():
        cfg = presets.get(f"mamba2-{size}")
        assert (cfg.n_layers, cfg.d_model, cfg.vocab_size) == (layers, d, 50280)
        assert (cfg.d_state, cfg.resolved_head_dim, cfg.expand, cfg.n_groups, cfg.conv_width) == (128, 64, 2, 1, 4)
        assert cfg.resolved_mlp_hidden == 0 and cfg.ssm_heads == 2 * d // 64
    hybrid = presets.get("mamba2-1.3b-hybrid")
    assert hybrid.softmax_set == frozenset(range(7, 48, 8))
    assert {hybrid.layer_kind(i) for i in range(48)} == {"mamba2", "softmax"}


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
    (dict(kind="mamba2", head_dim=24), "not divisible by head_dim=24"),
    (dict(kind="mamba2", n_groups=3), "n_groups=3 must divide the 8 SSM heads"),
    (dict(kind="mamba2", d_state=0), "d_state must be >= 1"),
    (dict(kind="mamba2", dt_min=0.2, dt_max=0.1), "dt_min=0.2 and dt_max=0.1"),
    (dict(mlp_hidden=-1), "mlp_hidden must be >= 0"),
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
