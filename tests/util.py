"""Shared test helpers: random inputs, error norms, and lowering the kernels for CUDA without a GPU."""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.experimental.pallas import triton as pl_triton
from jax.sharding import AbstractDevice

from lasp_jax.ops.rates import tnl_slopes

# Relative-error bounds for the CPU tests, ~2-3x the worst measured over seeds 0-2 (2026-11-29, XLA:CPU):
# fp32: 4.3e-7 (lasp_attention, every strategy, seq 1..8 incl. 3 and 6, per rank, o and dq, dk, dv), 3.0e-7
# (linear_attention's contract, every impl), 6.5e-8 (blockwise softmax against float64).
# bf16 (against fp32 math on the same rounded inputs): 3.43e-3 (contract, interpreted Triton dq), 2.7e-3
# (lasp_attention), 1.8e-3 (softmax): one bf16 rounding of the outputs and gradients (2^-9 relative).
# Compiled GPU runs round differently (other accumulation orders, longer T): measure their own bounds.
F32_TOL = 1e-6
BF16_TOL = 7e-3

# The peer benchmarks' jla parts run only where the peer is installed (not a dependency of this package).
needs_jla = pytest.mark.skipif(importlib.util.find_spec("jla") is None,
                               reason="jax-linear-attention (the jla peer, pip install jax-linear-attention==0.1.0) "
                                      "is not installed")


def rel_err(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def per_rank_errors(x, ref, ranks: int) -> list[float]:
    """rel_err on each rank's piece of the sequence (axis 1 cut in `ranks` equal pieces): one rank's error cannot
    hide in the others' norm."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    t = x.shape[1] // ranks
    return [rel_err(x[:, r * t:(r + 1) * t], ref[:, r * t:(r + 1) * t]) for r in range(ranks)]


def document_ids(starts, t: int) -> np.ndarray:
    """[B, T] int32 segment ids from each row's document starts (starts[row]: positions where a new document
    begins; position 0 always begins one): the number of starts at or before each position."""
    ids = np.zeros((len(starts), t), np.int32)
    for row, row_starts in enumerate(starts):
        for s in row_starts:
            ids[row, s:] += 1
    return ids


def qkv(rng, b, t, h, hkv, dk, dv, dtype=jnp.float32):
    """Fresh normal q [B,T,H,Dk], k [B,T,Hkv,Dk], v [B,T,Hkv,Dv]; q, k scaled so outputs stay O(1)."""
    q = rng.standard_normal((b, t, h, dk)) / np.sqrt(dk)
    k = rng.standard_normal((b, t, hkv, dk)) / np.sqrt(dk)
    v = rng.standard_normal((b, t, hkv, dv))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


_FAST = {"xla_backend_optimization_level": 0}


def conv_inputs(rng, dtype, b: int, t: int, c: int, w: int):
    """A causal convolution's test inputs: xe [b, W-1+t, c] (the halo rows random too) and y's cotangent g
    [b, t, c] in dtype; weight [w, c] and bias [c] float32 (the model's parameters)."""
    xe = jnp.asarray(rng.standard_normal((b, w - 1 + t, c)), dtype)
    weight = jnp.asarray(rng.standard_normal((w, c)) / np.sqrt(w), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(c), jnp.float32)
    g = jnp.asarray(rng.standard_normal((b, t, c)), dtype)
    return xe, weight, bias, g


def conv_values_and_grads(conv, xe, weight, bias, g, compiler_options=_FAST):
    """y and (dxe, dweight, dbias) of <g, y> (the cotangent of y: g in y's dtype) of conv(xe, weight, bias),
    jitted (by default at XLA's lowest optimization level: the interpreted kernels compile faster). g is an
    argument, not a captured constant: captured, it is embedded in the executable (570 MB at Mamba-2's shape), and
    the Triton convolution's GPU test spent over 120 of its 173 s compressing that for the compilation cache."""
    def loss(xe, weight, bias, g):
        y = conv(xe, weight, bias)
        return jnp.sum(y.astype(jnp.float32) * g.astype(jnp.float32)), y
    (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True),
                            compiler_options=compiler_options)(xe, weight, bias, g)
    return y, grads


def decay(kind: str, h: int, rng):
    """'on': mixed rates incl. a fast and a zero one; 'zero': all zeros; 'off': None; 'slopes': TNL slopes."""
    if kind == "off":
        return None
    if kind == "zero":
        return jnp.zeros((h,), jnp.float32)
    if kind == "slopes":
        return jnp.asarray(tnl_slopes(h))
    rates = rng.uniform(0.0, 0.3, size=h)
    rates[0] = 0.0
    rates[-1] = 2.0  # lambda^64 ~ 1e-56: exercises underflow, never overflow
    return jnp.asarray(rates, jnp.float32)


def dense_causal_softmax(q, k, v, local_rows=None):
    """float64 causal softmax; with local_rows=L the (wrong) rank-local mask i % L >= j is used instead."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    t = q.shape[1]
    s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    rows = np.arange(t)[:, None] if local_rows is None else np.arange(t)[:, None] % local_rows
    s = np.where(np.arange(t)[None, :] <= rows, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhts,bshe->bthe", p / p.sum(-1, keepdims=True), v)


def fake_gpu(monkeypatch, kind: str, capability: str | None = None) -> None:
    """jax reports a GPU backend whose one device is `kind` (of that compute capability, or none): the gates that
    read jax.default_backend() and jax.devices(), checked without a GPU. Make meshes before calling it."""
    attrs = {"device_kind": kind} | ({} if capability is None else {"compute_capability": capability})
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "devices", lambda *_: [type("Gpu", (), attrs)])


# Abstract GPUs to lower the compiled kernels for: an H200, and an A100 (sm_80, the oldest the Triton lowering targets).
H200 = AbstractDevice("NVIDIA H200", 132, "gpu")
A100 = AbstractDevice("NVIDIA A100-SXM4-80GB", 108, "gpu")


def cuda_mlir(fn, mesh, *args) -> str:
    """The StableHLO that jit(fn) exports for CUDA on the abstract `mesh`: the Triton IR is built here (PTX
    compilation and the run need a GPU)."""
    with jax.sharding.use_abstract_mesh(mesh):
        exported = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[
            export.DisabledSafetyCheck.custom_call(pl_triton.CUSTOM_CALL_TARGET_NAME)])(*args)
    return exported.mlir_module()
