"""benchmarks.matmul_gpu times the projections it lists: they must be the model's own (shapes drift otherwise)."""

import pytest
from flax import nnx

import models
from benchmarks import matmul_gpu
from models import presets


def test_projections_are_the_models():
    cfg = presets.get("mamba2-tiny")
    mixer = models.build_model(cfg, rngs=nnx.Rngs(0)).blocks[0].mixer
    listed = matmul_gpu.projections(cfg)
    for name in ("gate_proj", "in_proj", "dt_proj", "out_proj"):
        assert getattr(mixer, name).kernel[...].shape == listed[name], name
    assert listed["lm_head"] == (cfg.d_model, cfg.vocab_size)


def test_other_models_are_refused():
    with pytest.raises(ValueError, match="Mamba-2"):
        matmul_gpu.projections(presets.get("tnl-tiny"))
