"""FSDP over every device: parameters and AdamW moments sharded over data x seq jointly (param_axis
("data", "seq")), with the loss and gradients of the one-device model.

On a data=1 x seq=n mesh, param_axis "data" alone leaves every parameter replicated on all n devices (the
TNL-1B state is 12 GiB per GPU at any n); over both axes each device holds 1/n of it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from models import sharding
from tests.models import helpers
from train.config import TrainConfig
from train.step import build_state

FSDP = ("data", "seq")


def test_spec_spans_both_axes_and_falls_back_to_fewer():
    cfg = helpers.tiny(param_axis=FSDP)
    assert sharding.param_axes(cfg) == FSDP  # no mesh: as configured
    assert sharding.param_sharding((64, 32), cfg) == (FSDP, None)
    assert sharding.param_sharding((8,), cfg) == (None,)
    assert sharding.param_sharding((64, 32), cfg.replace(param_axis=None)) == (None, None)
    with jax.set_mesh(helpers.make_mesh((4, 2))):
        assert sharding.param_sharding((32, 64), cfg) == (None, FSDP)
        assert sharding.param_sharding((6, 12), cfg) == (None, "data")  # 8 divides neither dim, 4 divides 12
        assert sharding.param_sharding((6, 10), cfg) == (None, None)
    with jax.set_mesh(jax.make_mesh((8,), ("seq",))):
        assert sharding.param_axes(cfg) == ("seq",)  # a mesh without data: over seq alone
        assert sharding.param_sharding((64, 32), cfg) == ("seq", None)


@functools.cache
def _one_device():
    """Tiny TNL (d 32, 2 layers), its parameters and a batch, and the one-device (loss, logits), grads."""
    cfg = helpers.tiny(param_axis=FSDP)
    model = models.build_model(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(3)
    tok, tgt = helpers.tokens(rng), helpers.tokens(rng)
    w = jnp.asarray(rng.uniform(size=tok.shape) > 0.2, jnp.float32)
    run = helpers.loss_grads_logits(graphdef)
    return graphdef, state, (tok, tgt, w), run, run(state, tok, tgt, w)


@pytest.mark.parametrize("shape,explicit", [((2, 2), True), ((1, 4), False)])
def test_loss_and_gradients_equal_one_device(shape, explicit):
    graphdef, state, batch, run, ((ref_loss, ref_logits), ref_grads) = _one_device()
    mesh = helpers.make_mesh(shape, explicit)
    with jax.set_mesh(mesh):
        sstate = helpers.shard_state(state, mesh, helpers.tiny(param_axis=FSDP))
        (loss, logits), grads = run(sstate, *(helpers.shard_batch(x, mesh) for x in batch))
    # Every matrix lives on 1/4 of its elements per device, split over both axes at once.
    for x in jax.tree.leaves(sstate):
        if x.ndim >= 2:
            assert FSDP in tuple(x.sharding.spec)
            assert x.addressable_shards[0].data.size * 4 == x.size
    # Measured worst over both meshes: loss equal, logits 2.2e-7, gradients 6.4e-7 (max|diff| / max|ref|).
    assert abs(float(loss) - float(ref_loss)) <= 3e-7 * abs(float(ref_loss))
    assert helpers.max_rel(logits, ref_logits) < 5e-7
    assert helpers.max_rel(grads, ref_grads) < 1.5e-6
    if explicit:  # Explicit axes: the gradients come back on the parameters' own specs (no replicated copy)
        assert all(g.sharding.spec == x.sharding.spec for g, x in zip(jax.tree.leaves(grads), jax.tree.leaves(sstate)))


def test_training_state_is_sharded_over_every_device():
    """train.step.build_state places the parameters and both AdamW moments of every matrix on data x seq = 1x4,
    a quarter of each per device."""
    cfg = TrainConfig(model=helpers.tiny(param_axis=FSDP), mesh="data=1,seq=4", seq_len=32, batch_size=1)
    _, state, _, _ = build_state(cfg.model, cfg, helpers.make_mesh((1, 4), explicit=False))
    abstract = nnx.eval_shape(lambda: models.build_model(cfg.model, rngs=nnx.Rngs(0)))
    n_matrices = sum(x.ndim >= 2 for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    matrices = [x for x in jax.tree.leaves(state) if x.ndim >= 2]
    assert len(matrices) == 3 * n_matrices  # parameters, first and second moments
    for x in matrices:  # (jit's outputs drop the size-1 data axis from the spec: P("seq") here)
        assert "seq" in jax.tree.leaves(tuple(x.sharding.spec))
        assert x.addressable_shards[0].data.size * 4 == x.size


def test_param_axis_names_are_checked():
    """A misspelt axis would otherwise be dropped by param_axes without a word (parameters then replicated)."""
    for bad in (("data", "sq"), ("seq", "seq"), "model"):
        with pytest.raises(ValueError, match="param_axis must be None, or one or more distinct names"):
            helpers.tiny(param_axis=bad)
