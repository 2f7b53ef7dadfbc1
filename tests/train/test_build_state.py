"""train.step.build_state: the (model, optimizer) state on the model's partition specs, drawn from cfg.seed alike on
every mesh, and compiled per layer kind (one program per kind, run once per layer), so that its compile does not
grow with depth (one program for all layers took 96 s to build on an H200 for Mamba-2 1.3B).
"""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import models
from tests.models import helpers
from train.config import TrainConfig
from train.optim import make_optimizer
from train.step import build_state

# Two kinds (Mamba-2, softmax at layers 1 and 3), so one kind's program is reused over its layers; no MLP, as the
# Mamba-2 presets (fewer random draws to compile).
MCFG = helpers.tiny("mamba2-tiny-hybrid", n_layers=4, d_state=8, mlp_hidden=0)
SEED = 3


def _cfg(mcfg):
    return TrainConfig(model=mcfg, seed=SEED, seq_len=32, batch_size=2, compute_dtype="float32")


def _build(mesh, mcfg=MCFG, dump_to=None):
    """build_state's outputs and, with dump_to, (number of its own programs, threefry calls in their StableHLO)."""
    if dump_to is None:
        return build_state(mcfg, _cfg(mcfg), mesh), None
    previous = jax.config.read("jax_dump_ir_to")
    jax.config.update("jax_dump_ir_to", str(dump_to))
    try:
        built = build_state(mcfg, _cfg(mcfg), mesh)
    finally:
        jax.config.update("jax_dump_ir_to", previous)
    modules = [p for p in dump_to.iterdir() if "create" in p.name]  # leaves out op-by-op programs (jit-cached)
    return built, (len(modules), sum(len(re.findall(r"call @threefry2x32", p.read_text())) for p in modules))


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    """MCFG's state on data x seq = 1x1, with its programs' counts."""
    return _build(helpers.make_mesh((1, 1), False), dump_to=tmp_path_factory.mktemp("ir"))


def _values(state):
    return [np.asarray(x) for x in jax.tree.leaves(state)]


def _specs(mesh):
    """The PartitionSpec of every leaf of the (model, optimizer) state built under mesh, in leaf order."""
    def make():
        model = models.build_model(MCFG, rngs=nnx.Rngs(0))
        return model, nnx.Optimizer(model, make_optimizer(_cfg(MCFG)), wrt=nnx.Param)

    with jax.set_mesh(mesh):
        specs = nnx.get_partition_spec(nnx.state(nnx.eval_shape(make)))
    return jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))


def test_state_is_on_the_specs_and_the_same_on_every_mesh(one_device):
    """Every leaf (parameters, both AdamW moments, counts) is on its partition spec, every matrix split over all 8
    devices of data x seq = 2x4 (Explicit axes) but Mamba-2's convolution weight, which is whole on each
    (models/mamba2.py); the values there equal the one-device state's."""
    (_, ref, n_params, _), _ = one_device
    mesh = helpers.make_mesh((2, 4), True)
    (graphdef, state, _, _), _ = _build(mesh)
    leaves, specs = jax.tree.leaves(state), _specs(mesh)
    assert len(leaves) == len(specs)
    for x, spec in zip(leaves, specs):
        assert x.sharding.is_equivalent_to(NamedSharding(mesh, spec), x.ndim), (x.shape, x.sharding, spec)
    matrices = [(jax.tree_util.keystr(path), x) for path, x in jax.tree_util.tree_leaves_with_path(state)
                if x.ndim >= 2]
    params = jax.tree.leaves(nnx.state(nnx.merge(graphdef, state)[0], nnx.Param))
    assert len(matrices) == 3 * sum(x.ndim >= 2 for x in params)  # parameter, first and second moment
    whole = [name for name, x in matrices if "conv_weight" in name]
    assert whole  # the hybrid has Mamba-2 layers
    for name, x in matrices:
        assert x.addressable_shards[0].data.size * (1 if name in whole else 8) == x.size, name
    assert n_params == models.count_params(MCFG)
    assert all(np.array_equal(a, b) for a, b in zip(_values(state), _values(ref), strict=True))


def test_each_layer_draws_its_own_parameters_from_the_seed(one_device):
    """Block l holds what Block(cfg, l) draws from nnx.Rngs(fold_in(the seed's blocks key, l)), so a kind's program,
    built from its first layer, stands for every layer of the kind (to 1 ulp: the direct build runs op by op,
    fused differently); two layers of one kind differ."""
    (graphdef, state, _, _), _ = one_device
    blocks = nnx.merge(graphdef, state)[0].blocks
    blocks_key = jax.random.split(jax.random.key(SEED))[1]
    for layer, block in enumerate(blocks):
        direct = models.Block(MCFG, layer, rngs=nnx.Rngs(jax.random.fold_in(blocks_key, layer)))
        got, want = (jax.tree_util.tree_leaves_with_path(nnx.state(b)) for b in (block, direct))
        assert [path for path, _ in got] == [path for path, _ in want]
        for (_, a), (_, b) in zip(got, want):  # measured: 1 ulp (1.2e-7 relative), op-by-op vs compiled
            np.testing.assert_allclose(a, b, rtol=3e-7, atol=0)
    assert not np.array_equal(blocks[0].mixer.in_proj.kernel[...], blocks[2].mixer.in_proj.kernel[...])
    assert not np.array_equal(blocks[1].mixer.q.kernel[...], blocks[3].mixer.q.kernel[...])


def test_compiled_init_does_not_grow_with_depth(one_device, tmp_path):
    """2 and 4 layers compile the same three programs (embedding and optimizer state, the Mamba-2 blocks, the
    softmax blocks) with as many random draws: the blocks' draws are compiled once per kind, not per layer."""
    _, four = one_device
    _, two = _build(helpers.make_mesh((1, 1), False), MCFG.replace(n_layers=2), dump_to=tmp_path)
    assert two[0] == 3 and two[1] > 0
    assert four == two
