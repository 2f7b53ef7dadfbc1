"""benchmarks.matmul_gpu times the projections it lists: they must be the model's own (shapes drift otherwise)."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from benchmarks import matmul_gpu
from models import presets
from tests.models.helpers import max_rel


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


def test_the_summed_dx_forms_compute_the_same_sum():
    """The in_dx_sum forms time one quantity: each equals sum_i g_i W_i^T (float64, on the bf16 weights) within
    bf16 rounding. Measured (mamba2-tiny, T = 256, seeds 0-2): autodiff 4.0e-3 to 5.2e-3 of the largest entry,
    f32_sum and concat 1.9e-3 to 3.1e-3; leaving out dt_proj's term, the smallest, is off by 0.16 to 0.19."""
    forms = matmul_gpu.cotangent_sums(256, presets.get("mamba2-tiny"))
    _, (_, gs, ws) = forms["autodiff"]
    ref = sum(np.asarray(g, np.float64) @ np.asarray(w.astype(jnp.bfloat16), np.float64).T for g, w in zip(gs, ws))
    for name, (fn, args) in forms.items():
        got = fn(*args)
        assert got.shape == ref.shape, name
        assert max_rel(got, ref) < 1e-2, name
