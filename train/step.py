"""The model and optimizer as one sharded state, and the jitted training and evaluation steps.

Kept apart from the loop (and from Grain) so benchmarks can time exactly the step that training runs.

Numerics: the model computes in `compute_dtype` (by default bf16 on accelerators, fp32 on CPU) from float32
master parameters; the loss is the mean token cross-entropy over the global batch (the model's chunked sum
divided by the token count), with packed documents kept apart when the batch carries segment_ids; the
gradients, their clipping and AdamW run in float32. Parameters and AdamW moments follow the model's partition
specs (FSDP over `param_axis`: by default data x seq, every device).
"""

from __future__ import annotations

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, NamedSharding

import models
from train.config import TrainConfig, resolve_compute_dtype
from train.optim import make_optimizer


def model_config(cfg: TrainConfig, vocab_size: int) -> models.ModelConfig:
    """The run's model: its vocabulary the data's `vocab_size` rounded up to vocab_multiple, computing in the
    run's compute dtype (auto resolved for this backend) from float32 master weights. These three fields are
    train.config.SET_BY_TRAINING: whatever cfg.model holds for them is replaced here."""
    return cfg.model.replace(vocab_size=-(-vocab_size // cfg.vocab_multiple) * cfg.vocab_multiple,
                             dtype=resolve_compute_dtype(cfg.compute_dtype, jax.default_backend()),
                             param_dtype="float32")


def build_state(mcfg, cfg: TrainConfig, mesh):
    """(graphdef, state, n_params, n_matmul_params) of (model, optimizer), created on the devices, sharded by
    the model's partition specs (parameters and their AdamW moments alike).

    Compiled per layer kind, so that compile time does not grow with depth: one program per kind (Mamba-2,
    softmax, ...) draws one block's parameters and runs once per layer of that kind, and one more makes the rest
    (embedding, head, the optimizer's state; the blocks' random bits are dead code there). One program holding all
    48 Mamba-2 1.3B layers took 96 s to build on an H200, the per-kind programs 4 s
    (benchmarks/results/gpu_s10_log_excerpts.txt).

    Values: from cfg.seed alone, bit-identical on every mesh and axis type (threefry's bits do not depend on the
    sharding). The seed's key splits in two: the rest is built from nnx.Rngs(first), block l from
    nnx.Rngs(fold_in(second, l)). Each kind's program is traced from its first layer, so a block's parameters
    must not depend on its index otherwise (none do: TNL's per-layer decay is a host constant in the graphdef).
    """
    tx = make_optimizer(cfg)

    def make(key):
        model = models.build_model(mcfg, rngs=nnx.Rngs(key))
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    def on_specs(state):
        return jax.lax.with_sharding_constraint(state, nnx.get_partition_spec(state))

    # Keys are arguments, not constants: with a constant seed XLA tries to fold the random initialisation
    # at compile time (seen on an H200 at 1B parameters: no step within 570 s).
    @jax.jit
    def create_rest(key):
        return on_specs(nnx.state(make(key), lambda path, _: path[:2] != (0, "blocks")))

    def create_block(first_layer):
        @jax.jit
        def create(key, layer):
            block = models.Block(mcfg, first_layer, rngs=nnx.Rngs(jax.random.fold_in(key, layer)))
            return on_specs(nnx.state(block))
        return create

    rest_key, blocks_key = jax.random.split(jax.random.key(cfg.seed))
    creators = {}  # layer kind -> its program
    # Drawn on Auto axes whatever the mesh's types: on Explicit axes XLA fuses the normal draws differently
    # (values 1 ulp apart); the arrays then move onto the caller's mesh as they are, without a copy.
    auto = jax.sharding.Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))
    with jax.set_mesh(auto):
        abstract_model, abstract_opt = nnx.eval_shape(make, rest_key)
        graphdef, abstract = nnx.split((abstract_model, abstract_opt))
        flat = dict(nnx.to_flat_state(create_rest(rest_key)))
        for layer in range(mcfg.n_layers):
            kind = mcfg.layer_kind(layer)
            if kind not in creators:
                creators[kind] = create_block(layer)
            flat.update(((0, "blocks", layer, *path), x)
                        for path, x in nnx.to_flat_state(creators[kind](blocks_key, layer)))
    state = nnx.from_flat_state(flat)
    if jax.tree.structure(state) != jax.tree.structure(abstract):
        raise RuntimeError("the pieces of the training state do not assemble into the (model, optimizer) state; "
                           "has models.LanguageModel stopped keeping its blocks in `blocks`?")
    state = jax.device_put(state, jax.tree.map(lambda x: NamedSharding(mesh, x.sharding.spec), state))
    params = jax.tree.leaves(nnx.state(abstract_model, nnx.Param))
    return graphdef, state, sum(int(np.prod(x.shape)) for x in params), _matmul_params(params, mcfg)


def _matmul_params(params, mcfg) -> int:
    """The parameters (arrays or shapes) that matmuls take: every array of 2 or more dims but an untied input
    embedding (a lookup). Mamba-2's depthwise convolution weight [W, C] counts too (W x C products per token, as
    a matrix's; 0.8M of the 1.3B's 1.34G)."""
    n_matmul = sum(int(np.prod(x.shape)) for x in params if len(x.shape) >= 2)
    return n_matmul - (0 if mcfg.tie_embeddings else mcfg.vocab_size * mcfg.d_model)


def count_matmul_params(mcfg) -> int:
    """build_state's n_matmul_params of mcfg's model, from shapes only (nothing is allocated)."""
    model = nnx.eval_shape(lambda: models.build_model(mcfg, rngs=nnx.Rngs(0)))
    return _matmul_params(jax.tree.leaves(nnx.state(model, nnx.Param)), mcfg)


def make_steps(graphdef):
    """The jitted training step (donating the old state) and the evaluation step."""

    def sums(model, batch):  # segment_ids are in the batch when the run keeps documents apart
        return model.loss(batch["inputs"], batch["targets"], segment_ids=batch.get("segment_ids"))

    def loss_fn(model, batch):
        total, weight = sums(model, batch)
        return total / weight

    def train_step(state, batch):
        model, optimizer = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    def eval_step(state, batch):
        model, _ = nnx.merge(graphdef, state)
        return sums(model, batch)

    return jax.jit(train_step, donate_argnums=0), jax.jit(eval_step)
