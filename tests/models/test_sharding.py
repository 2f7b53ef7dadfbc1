"""ZeRO-3 parameter specs and activation specs read from the ambient mesh."""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import PartitionSpec as P

import models
from models import sharding
from tests.models import helpers


def test_param_sharding_takes_the_largest_divisible_dim():
    cfg = helpers.tiny("tnl-tiny")
    assert sharding.param_sharding((64, 32), cfg) == (("data", "seq"), None)  # no mesh: the largest dim
    assert sharding.param_sharding((8,), cfg) == (None,)  # vectors stay replicated
    assert sharding.param_sharding((64, 32), cfg.replace(param_axis=None)) == (None, None)
    with jax.set_mesh(helpers.make_mesh((4, 2))):
        assert sharding.param_sharding((6, 32), cfg) == (None, ("data", "seq"))  # 6 does not split 8 ways
        assert sharding.param_sharding((6, 10), cfg) == (None, None)
    with jax.set_mesh(jax.make_mesh((8,), ("seq",))):
        assert sharding.param_sharding((64, 32), cfg) == ("seq", None)  # no data axis on this mesh: seq alone


def test_activation_spec_follows_the_mesh():
    cfg = helpers.tiny("tnl-tiny")
    assert sharding.activation_spec(cfg, 3) == P()
    with jax.set_mesh(helpers.make_mesh((2, 4))):
        assert sharding.activation_spec(cfg, 3) == P(("data",), "seq", None)
        assert sharding.seq_size(cfg) == 4
    with jax.set_mesh(jax.make_mesh((8,), ("data",))):
        assert sharding.activation_spec(cfg, 3) == P(("data",), None, None)
        assert sharding.seq_size(cfg) == 1


def test_model_built_under_a_mesh_is_placed_on_its_specs():
    mesh = helpers.make_mesh((2, 4))
    with jax.set_mesh(mesh):
        model = models.build_model(helpers.tiny("tnl-tiny"), rngs=nnx.Rngs(0))
    specs = nnx.get_partition_spec(nnx.state(model))
    for x, spec in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(specs)):
        assert x.sharding.spec == spec
    assert model.embed.table[...].sharding.spec == P(("data", "seq"), None)
