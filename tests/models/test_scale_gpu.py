"""Paper-size models on a real GPU: a training step (loss and gradients) at long sequence length.

Run on the device machine with `pytest -m gpu tests/models/test_scale_gpu.py -s`; each test prints its
sequence length, step time and peak GPU memory. They check what only real sizes show: the paper configs
build, compile and fit with bf16 compute, full remat and the chunked cross-entropy, and the numbers stay finite;
with two GPUs, sequence parallelism gives the one-GPU loss.
"""

from __future__ import annotations

import contextlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import models
from models.presets import get as get_model_config

pytestmark = pytest.mark.gpu


def _step(cfg, t, mesh=None):
    """(mean loss, global grad norm, seconds per step after compile, peak GiB) of one loss+grad step, B = 1."""
    seq = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, t + 1))
    inputs, targets = (jnp.asarray(x, jnp.int32) for x in (seq[:, :-1], seq[:, 1:]))
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: models.build_model(cfg, rngs=nnx.Rngs(0))))
        # The key is an argument, not a constant: a constant seed lets XLA try to constant-fold the whole
        # initialisation at compile time (minutes for 1B parameters on GPU).
        state = jax.jit(lambda key: nnx.state(models.build_model(cfg, rngs=nnx.Rngs(key))))(jax.random.key(0))
        if mesh is not None:
            inputs, targets = (jax.device_put(x, NamedSharding(mesh, P(None, "seq"))) for x in (inputs, targets))

        @jax.jit
        def step(state, inputs, targets):
            def mean(s):
                total, count = nnx.merge(graphdef, s).loss(inputs, targets)
                return total / count
            loss, grads = jax.value_and_grad(mean)(state)
            return loss, _global_norm(grads)

        jax.block_until_ready(step(state, inputs, targets))
        start = time.perf_counter()
        loss, norm = jax.block_until_ready(step(state, inputs, targets))
        seconds = time.perf_counter() - start
    peak = max((d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in jax.local_devices()) / 2**30
    return float(loss), float(norm), seconds, peak


def _global_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(tree)))


@pytest.mark.parametrize("name,t", [("tnl-1b", 32768), ("tnl-1b-hybrid", 16384), ("lt-1b", 32768)])
def test_1b_long_sequence_step(name, t):
    cfg = get_model_config(name).replace(dtype="bfloat16", remat="full", ce_chunk=2048)
    loss, norm, seconds, peak = _step(cfg, t)
    print(f"\n{name}: T={t} loss={loss:.4f} grad_norm={norm:.3g} step={seconds * 1e3:.0f} ms peak={peak:.1f} GiB "
          f"({models.count_params(cfg) / 1e9:.2f} B params) on {jax.devices()[0].device_kind}")
    assert np.isfinite(loss) and np.isfinite(norm) and norm > 0
    assert abs(loss - np.log(cfg.vocab_size)) < 1.0  # an untrained model predicts ~uniformly


def test_7b_step():
    cfg = get_model_config("tnl-7b").replace(ce_chunk=1024)
    memory = (jax.devices()[0].memory_stats() or {}).get("bytes_limit", 0) / 2**30
    t = 8192 if memory > 100 else 2048
    loss, norm, seconds, peak = _step(cfg, t)
    print(f"\ntnl-7b: T={t} loss={loss:.4f} grad_norm={norm:.3g} step={seconds * 1e3:.0f} ms peak={peak:.1f} GiB "
          f"of {memory:.0f} GiB")
    assert np.isfinite(loss) and np.isfinite(norm) and abs(loss - np.log(cfg.vocab_size)) < 1.0


@pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 GPUs for a seq=2 mesh")
def test_sequence_parallel_loss_equals_one_gpu():
    cfg = get_model_config("tnl-1b-hybrid").replace(dtype="bfloat16", remat="full", n_layers=8)
    t = 16384
    mesh = jax.make_mesh((1, 2), ("data", "seq"))
    one = _step(cfg, t)
    two = _step(cfg, t, mesh=mesh)
    print(f"\n1 GPU: {one}\n2 GPUs (seq=2): {two}")
    assert abs(one[0] - two[0]) < 2e-2 * abs(one[0])
