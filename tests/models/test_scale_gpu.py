"""Paper-size models on a real GPU: what only real sizes show, checked by numbers that a wrong model changes.

Run on the device machine with `pytest -m gpu tests/models/test_scale_gpu.py -s`; each test prints what it
measured. An untrained model's loss is about log V whatever its attention computes, so the checks compare
logits and gradients of two computations that must agree:
- at paper width (d 2048, 16 heads of 128) the model through the GPU kernels (attn_impl auto) against the
  chunked XLA attention (4 layers, T 8192: cheap, and a kernel wired in wrongly shows at once);
- with two GPUs, sequence parallelism (seq=2) against one GPU;
  both in float32 with full-precision matmuls, so they agree to ~1e-6 (about 6 minutes on two H200s, most of
  it compiling);
- the 1B configs at long sequences and 7B build, compile and fit with bf16 compute, full remat and the chunked
  cross-entropy, with finite, non-zero gradients (these are the memory checks; the two above the numerics).
Logits are compared at the positions around the seq shards' boundary and at both ends (all of [T, V] would be
2 GB per copy); gradients leaf by leaf. Errors are max|a - b| / max|b| per leaf, the largest over leaves.
"""

from __future__ import annotations

import contextlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import models
from models import presets

pytestmark = pytest.mark.gpu

# float32 (full-precision matmuls) logits and gradients of two computations of the same model, kernels against
# XLA or one GPU against two. Measured on two H200s (2026-11-29, 4 layers, T 8192): logits 1.1e-6 to 1.3e-6,
# gradients 4.8e-6 to 6.8e-6 over tnl-1b, lt-1b and tnl-1b-hybrid; the bounds are ~3x those.
LOGITS_TOL, GRADS_TOL = 4e-6, 2e-5


def _positions(t: int) -> np.ndarray:
    """The positions whose logits are compared: both ends and the middle (the seq=2 shard boundary)."""
    return np.concatenate([np.arange(64), np.arange(t // 2 - 64, t // 2 + 64), np.arange(t - 64, t)])


def _run(cfg, t, mesh=None, with_logits=False):
    """One loss+grad step at B = 1 on fixed random tokens: (loss, grads and logits at _positions, or the global
    gradient norm and None, seconds per step after compiling, peak GiB). With logits, float32 matmuls run at
    full precision (XLA's default on GPUs is TF32: two orders of the same sums were 2e-4 apart in the logits,
    1e-3 in the gradients)."""
    seq = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, t + 1))
    inputs, targets = (jnp.asarray(x, jnp.int32) for x in (seq[:, :-1], seq[:, 1:]))
    pos = jnp.asarray(_positions(t))
    with contextlib.ExitStack() as stack:
        if mesh is not None:
            stack.enter_context(jax.set_mesh(mesh))
        if with_logits:
            stack.enter_context(jax.default_matmul_precision("highest"))
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
            if not with_logits:  # the fit checks keep only the norm, as training's step does
                return loss, optax.tree.norm(grads), None
            return loss, grads, nnx.merge(graphdef, state)(inputs)[:, pos].astype(jnp.float32)

        jax.block_until_ready(step(state, inputs, targets))
        start = time.perf_counter()
        loss, grads, logits = jax.block_until_ready(step(state, inputs, targets))
        seconds = time.perf_counter() - start
    peak = max((d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in jax.local_devices()) / 2**30
    return float(loss), grads if with_logits else float(grads), logits, seconds, peak


def _max_rel(a, b) -> float:
    """Largest per-leaf max|a - b| / max|b| over two pytrees, one leaf on the host at a time."""
    worst = 0.0
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(jax.device_get(x), np.float64), np.asarray(jax.device_get(y), np.float64)
        worst = max(worst, float(np.max(np.abs(x - y)) / max(float(np.max(np.abs(y))), 1e-30)))
    return worst


def _small(name: str, **changes):
    """A paper preset at its real width, 4 layers (a hybrid keeps a softmax layer: the 4th), float32."""
    return presets.get(name).replace(n_layers=4, dtype="float32", remat="none", ce_chunk=2048, **changes)


@pytest.mark.parametrize("name", ["tnl-1b", "lt-1b", "tnl-1b-hybrid"])
def test_kernels_match_xla_at_paper_width(name):
    t = 8192
    kern = _run(_small(name), t, with_logits=True)
    xla = _run(_small(name, attn_impl="xla"), t, with_logits=True)
    logits_err, grads_err = _max_rel(kern[2], xla[2]), _max_rel(kern[1], xla[1])
    print(f"\n{name} (4 layers, fp32, T={t}): auto vs xla logits {logits_err:.2e} grads {grads_err:.2e}; "
          f"step {kern[3] * 1e3:.0f} / {xla[3] * 1e3:.0f} ms on {jax.devices()[0].device_kind}")
    assert logits_err < LOGITS_TOL and grads_err < GRADS_TOL


@pytest.mark.skipif(jax.device_count() < 2, reason="sequence parallelism needs 2 GPUs for a seq=2 mesh")
def test_sequence_parallel_matches_one_gpu():
    cfg, t = _small("tnl-1b-hybrid"), 8192
    mesh = jax.make_mesh((1, 2), ("data", "seq"), axis_types=(AxisType.Auto,) * 2)  # as training's default
    one = _run(cfg, t, with_logits=True)
    two = _run(cfg, t, mesh=mesh, with_logits=True)
    logits_err, grads_err = _max_rel(two[2], one[2]), _max_rel(two[1], one[1])
    print(f"\ntnl-1b-hybrid (4 layers, fp32, T={t}): seq=2 vs 1 GPU logits {logits_err:.2e} grads {grads_err:.2e}; "
          f"step {one[3] * 1e3:.0f} / {two[3] * 1e3:.0f} ms")
    assert logits_err < LOGITS_TOL and grads_err < GRADS_TOL


@pytest.mark.parametrize("name,t", [("tnl-1b", 32768), ("tnl-1b-hybrid", 16384), ("lt-1b", 32768)])
def test_1b_long_sequence_step_fits(name, t):
    cfg = presets.get(name).replace(dtype="bfloat16", remat="full", ce_chunk=2048)
    loss, norm, _, seconds, peak = _run(cfg, t)
    print(f"\n{name}: T={t} loss={loss:.4f} grad_norm={norm:.3g} step={seconds * 1e3:.0f} ms peak={peak:.1f} GiB "
          f"({models.count_params(cfg) / 1e9:.2f} B params) on {jax.devices()[0].device_kind}")
    assert np.isfinite(loss) and np.isfinite(norm) and norm > 0


def test_7b_step_fits():
    cfg = presets.get("tnl-7b").replace(ce_chunk=1024)
    memory = (jax.devices()[0].memory_stats() or {}).get("bytes_limit", 0) / 2**30
    t = 8192 if memory > 100 else 2048
    loss, norm, _, seconds, peak = _run(cfg, t)
    print(f"\ntnl-7b: T={t} loss={loss:.4f} grad_norm={norm:.3g} step={seconds * 1e3:.0f} ms peak={peak:.1f} GiB "
          f"of {memory:.0f} GiB")
    assert np.isfinite(loss) and np.isfinite(norm) and norm > 0
