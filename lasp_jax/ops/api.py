"""linear_attention: decayed causal linear attention on one device, and its one-token decoding step."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from lasp_jax.ops import checks, impls, reference, vjp


def linear_attention(q, k, v, decay=None, *, scale=1.0, initial_state=None, return_final_state=False,
                     impl="auto"):
    """o_p = sum_{r <= p} lambda_h^(p - r) (scale q_p . k_r) v_r  (+ lambda_h^p scale q_p S_0), lambda_h = exp(-s_h).

    No softmax and no normaliser. MHA, GQA and MQA: query head h reads K/V head h // (H / Hkv); K/V heads are
    indexed, never repeated in memory.

    Args:
      q: [B, T, H, Dk]; k: [B, T, Hkv, Dk]; v: [B, T, Hkv, Dv]; any T >= 1, any head dims.
      decay: None (no decay) or [H] rates s_h >= 0. A constant for autodiff: its cotangent is zero.
      scale: multiplies q.
      initial_state: optional [B, H, Dk, Dv] state S_0 before position 0 (differentiable).
      return_final_state: also return S(T) [B, H, Dk, Dv] float32, which chains: two calls passing the state
        equal one call over the concatenated sequence.
      impl: "auto" (the first usable entry of impls.AUTO_ORDER), "xla" (chunked, every platform),
        "pallas_triton" (fused kernels, GPU), "pallas_mosaic" (the same with Mosaic GPU walks, Hopper), their
        "_interpret" twins (interpreted, any platform) or "reference" (dense, O(T^2) memory). The kernels run
        per device: on inputs split over several devices by XLA (a data-parallel mesh), "auto" takes "xla"
        and naming them is an error; lasp_attention (any seq axis size, even 1) runs them per device.
    Returns:
      o [B, T, H, Dv] in q's dtype, and the final state if asked for.
    """
    s = checks.attention_inputs(q, k, v, decay)
    b, _, h, dk = q.shape
    if initial_state is not None:
        initial_state = checks.state("initial_state", initial_state, (b, h, dk, v.shape[-1]))
    per_device = impls.resolve(impl, q, k, v, partitioned=impls.partitioned(q))
    if scale != 1.0:
        q = q * jnp.asarray(scale, q.dtype)
    spec = _explicit_spec(q)
    if spec is not None:
        q, k, v = (_whole_sequence(x, spec) for x in (q, k, v))
        if initial_state is not None:  # laid out like q's batch and heads, as the state products need
            initial_state = jax.sharding.reshard(initial_state, P(spec[0], spec[2], None, None))
    out = vjp.attend(q, k, v, s, initial_state, per_device, None, bool(return_final_state))
    if spec is None or spec[1] is None:
        return out
    if return_final_state:
        return jax.sharding.reshard(out[0], P(*spec)), out[1]
    return jax.sharding.reshard(out, P(*spec))


def _explicit_spec(x) -> tuple | None:
    """x's Explicit sharding as a 4-entry spec, or None when it has none."""
    spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
    if not spec or all(entry is None for entry in spec):
        return None
    spec = tuple(spec) + (None,) * (4 - len(spec))
    if spec[1] is not None:
        axes = (spec[1],) if isinstance(spec[1], str) else tuple(spec[1])
        size = math.prod(jax.typeof(x).sharding.mesh.shape[a] for a in axes)
        if size > 1:
            # Gathering K and V here would undo the point of LASP: that is lasp_attention's job.
            raise ValueError(f"q's sequence dim is sharded over mesh axes {axes} ({size} devices): use "
                             "lasp_attention for sequence-sharded inputs (or reshard T to one device first)")
    return spec


def _whole_sequence(x, q_spec):
    """Drops a T sharding over size-1 mesh axes (no data moves); q's sharding is restored on the output."""
    if q_spec[1] is None:
        return x
    x_spec = tuple(jax.typeof(x).sharding.spec) + (None,) * 4
    return jax.sharding.reshard(x, P(x_spec[0], None, *x_spec[2:4]))


def linear_attention_step(q, k, v, state, decay=None, *, scale=1.0):
    """One decoding step with constant memory: the recurrence behind linear_attention.

    Args:
      q: [B, H, Dk]; k: [B, Hkv, Dk]; v: [B, Hkv, Dv]; state: [B, H, Dk, Dv], S(p) (zeros before position 0,
        or the final state of linear_attention over the prefix).
    Returns:
      (o [B, H, Dv] in q's dtype, S(p + 1) [B, H, Dk, Dv] float32).
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if np.ndim(x) != 3:
            raise ValueError(f"{name} must have rank 3 [B, heads, head_dim] for one step, got shape {np.shape(x)}")
    s = checks.attention_inputs(q[:, None], k[:, None], v[:, None], decay)
    state = checks.state("state", state, (q.shape[0], q.shape[1], q.shape[2], v.shape[-1]))
    o, state = reference.step(q.astype(jnp.float32) * scale, k, v, s, state)
    return o.astype(q.dtype), state
