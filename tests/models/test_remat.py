"""Remat policies change what the backward keeps, never the gradients."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from flax import nnx

import models
from tests.models import helpers


@functools.cache
def _reference():
    cfg = helpers.tiny("tnl-tiny-hybrid", n_layers=2)
    graphdef, state = nnx.split(models.build_model(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    batch = (helpers.tokens(rng, t=16), helpers.tokens(rng, t=16), np.ones((2, 16), np.float32))
    return cfg, state, batch, helpers.loss_grads_logits(graphdef)(state, *batch)


@pytest.mark.parametrize("remat", ["block", "full"])
def test_remat_keeps_gradients(remat):
    cfg, state, batch, ((ref_loss, _), ref_grads) = _reference()
    graphdef, _ = nnx.split(models.build_model(cfg.replace(remat=remat), rngs=nnx.Rngs(0)))
    run = helpers.loss_grads_logits(graphdef)
    jaxpr = str(run.trace(state, *batch).jaxpr)
    assert "remat" in jaxpr or "checkpoint" in jaxpr
    (loss, _), grads = run(state, *batch)
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-6)
    assert helpers.max_rel(grads, ref_grads) < 1e-5
