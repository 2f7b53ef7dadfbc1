"""Shared pieces of the model tests: tiny configs, one jitted loss/grad/logits function, sharded copies."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import models
from models import presets, sharding
from models.documents import document_ids

VOCAB = 64

# These tests compare numbers, not speed: skipping LLVM's optimisations cuts XLA:CPU compile time ~3x.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def tiny(name: str = "tnl-tiny", **changes) -> models.ModelConfig:
    """A preset shrunk to CPU-test size (d 32, 4 heads, 2 layers unless changed)."""
    base = dict(d_model=32, n_heads=4, mlp_hidden=64, vocab_size=VOCAB, n_layers=2, ce_chunk=4)
    return presets.get(name).replace(**{**base, **changes})


def tokens(rng, b=2, t=32, vocab=VOCAB):
    return jnp.asarray(rng.integers(0, vocab, (b, t)), jnp.int32)


def loss_grads_logits(graphdef):
    """jit of state, tokens, targets, weights -> ((mean loss, logits), grads), for one graphdef."""

    @jit
    def run(state, tok, tgt, w):
        def mean_loss(s):
            model = nnx.merge(graphdef, s)
            total, count = model.loss(tok, tgt, w)
            return total / count, model(tok)

        return jax.value_and_grad(mean_loss, has_aux=True)(state)

    return run


def make_mesh(shape, explicit=True):
    kind = AxisType.Explicit if explicit else AxisType.Auto
    return jax.make_mesh(shape, ("data", "seq"), axis_types=(kind, kind))


def shard_state(state, mesh, cfg):
    """The parameters of a model built without a mesh placed over `mesh` on the FSDP specs a model of `cfg` built
    under it gets (models.sharding.param_sharding: axis sizes known, so every split divides its dim)."""
    with jax.set_mesh(mesh):
        return jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P(*sharding.param_sharding(x.shape, cfg)))),
                            state)


def shard_batch(x, mesh):
    return jax.device_put(x, NamedSharding(mesh, P("data", "seq")))


def max_rel(a, b) -> float:
    """Largest per-leaf relative error max|a-b| / max|b| over two pytrees."""
    errs = jax.tree.leaves(jax.tree.map(
        lambda x, y: float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))
                           / max(float(np.max(np.abs(np.asarray(y, np.float64)))), 1e-30)), a, b))
    return max(errs)


def full_and_stepwise(graphdef, state, tok, separator: int | None = None):
    """Full-forward logits [B, T, V], and the same positions decoded one token at a time (and after a prefill
    of the first half), all fp32.

    separator: None (each row one sequence), or a token id ending documents: the forward takes the packer's
    segment ids (models.documents.document_ids), the prefill the first half's, and decoding ends a document
    after each separator (LanguageModel.end_documents), after the prefill too.
    """
    segment_ids = None if separator is None else jnp.asarray(document_ids(np.asarray(tok), separator))
    return _full_and_stepwise(graphdef, state, jnp.asarray(tok), segment_ids, separator)


@functools.partial(jit, static_argnums=(0, 4))
def _full_and_stepwise(graphdef, state, tok, segment_ids, separator):
    model = nnx.merge(graphdef, state)
    b, t = tok.shape

    def end(state, x):
        return state if separator is None else model.end_documents(state, x == separator)

    def steps(state, toks):
        def body(state, x):
            logits, state = model.decode_step(x, state)
            return end(state, x), logits
        return jnp.moveaxis(jax.lax.scan(body, state, toks.T)[1], 0, 1)

    stepwise = steps(model.init_decode_state(b, t), tok)
    half = t // 2
    last, state = model.prefill(tok[:, :half], model.init_decode_state(b, t),
                                None if segment_ids is None else segment_ids[:, :half])
    state = end(state, tok[:, half - 1])
    after_prefill = jnp.concatenate([last[:, None], steps(state, tok[:, half:-1])], axis=1)  # positions half-1..t-2
    return model(tok, segment_ids=segment_ids), stepwise, after_prefill
