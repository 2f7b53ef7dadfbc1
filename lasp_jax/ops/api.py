"""linear_attention: decayed causal linear attention on one device, and its one-token decoding step."""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from lasp_jax.ops import checks, impls, placement, reference, vjp


def linear_attention(q, k, v, decay=None, *, scale=1.0, initial_state=None, return_final_state=False,
                     impl="auto"):
    """o_p = sum_{r <= p} lambda_h^(p - r) (scale q_p . k_r) v_r  (+ lambda_h^p scale q_p S_0), lambda_h = exp(-s_h).

    No softmax and no normaliser. MHA, GQA and MQA: query head h reads K/V head h // (H / Hkv); K/V heads are
    indexed, never repeated in memory.

    Args:
      q: [B, T, H, Dk]; k: [B, T, Hkv, Dk]; v: [B, T, Hkv, Dv]; any T >= 1, any head dims.
      decay: None (no decay) or [H] rates s_h >= 0. A constant for autodiff: its cotangent is zero. Bad rates
        are a ValueError when decay is concrete; traced under jit, a negative or non-finite rate makes its head's
        outputs NaN (checks.attention_inputs).
      scale: a Python float multiplying q, applied inside the implementation where it forms the scores and the
        q-side state products in float32 (never a pass over q).
      initial_state: optional [B, H, Dk, Dv] state S_0 before position 0 (differentiable).
      return_final_state: also return S(T) [B, H, Dk, Dv] float32, which chains: two calls passing the state
        equal one call over the concatenated sequence.
      impl: "auto" (the first usable entry of impls.AUTO_ORDER), "xla" (chunked, every platform),
        "pallas_triton" (fused kernels, GPU), "pallas_mosaic" (the same with Mosaic GPU walks, Hopper), their
        "_interpret" twins (interpreted, any platform) or "reference" (dense, O(T^2) memory). The kernels run
        per device: on inputs split over several devices by XLA (a data-parallel mesh), "auto" takes "xla"
        and naming them is an error; lasp_attention (any seq axis size, even 1) runs them per device.
    Returns:
      o [B, T, H, Dv] in q's dtype, sharded like q (on an Explicit mesh each (batch, head) shard runs on its own
      device; under jit on an Auto mesh XLA places it), and the final state if asked for.
    """
    s = checks.attention_inputs(q, k, v, decay)
    b, _, h, dk = q.shape
    if initial_state is not None:
        initial_state = checks.state("initial_state", initial_state, (b, h, dk, v.shape[-1]))
    per_device = impls.resolve(impl, q, k, v, partitioned=impls.partitioned(q))
    scale = static_scale(scale)
    final = bool(return_final_state)
    spec = placement.explicit_spec(q)
    if spec is None:
        out = attend_under_jit(q, k, v, s, initial_state, per_device, None, final, scale)
    else:
        mesh = jax.typeof(q).sharding.mesh
        _refuse_sharded_sequence(spec, mesh)
        batch = spec[0]
        heads = placement.head_axes(spec, mesh, h, k.shape[2], taken=batch)
        out = _per_shard(q, k, v, s, initial_state, per_device=per_device, final=final, mesh=mesh, batch=batch,
                         heads=heads, scale=scale)
    if final:
        return placement.like_q(out[0], q), out[1]
    return placement.like_q(out, q)


# Always under jit: lax.associative_scan in an eager shard_map (a caller's, called without jit) crashes the CPU
# runtime of jax 0.11.2 (segfault). Under a caller's jit this jit is inlined.
attend_under_jit = jax.jit(vjp.attend, static_argnums=(5, 6, 7, 8))


def static_scale(scale) -> float:
    """scale as a finite Python float: the implementations fold it into their float32 decay tables when they
    are traced, so it must be concrete (not a traced value)."""
    try:
        value = float(scale)
    except TypeError as error:  # a tracer (ConcretizationTypeError) or a non-number
        raise ValueError(f"scale must be a concrete number (a Python float), got {scale!r}") from error
    if not np.isfinite(value):
        raise ValueError(f"scale must be finite, got {value}")
    return value


def _refuse_sharded_sequence(spec: placement.Spec, mesh):
    n = placement.size(mesh, spec[1])
    if n > 1:
        # Gathering K and V here would undo the point of LASP: that is lasp_attention's job.
        raise ValueError(f"q's sequence dim is sharded over mesh axes {spec[1]} ({n} devices): use "
                         "lasp_attention for sequence-sharded inputs (or reshard T to one device first)")


@functools.partial(jax.jit, static_argnames=("per_device", "final", "mesh", "batch", "heads", "scale"))
def _per_shard(q, k, v, s, initial_state, *, per_device, final, mesh, batch, heads, scale):
    """Explicit mesh: one call per (batch, head) shard inside shard_map (no collective: batch and heads are
    independent); T and the head dims whole on each device."""
    x_spec = P(placement.entry(batch), None, placement.entry(heads), None)
    state_spec = P(placement.entry(batch), placement.entry(heads), None, None)
    q, k, v = (jax.sharding.reshard(x, NamedSharding(mesh, x_spec)) for x in (q, k, v))
    n_heads = placement.size(mesh, heads)
    args, in_specs = [q, k, v, s], [x_spec, x_spec, x_spec, P()]
    if initial_state is not None:
        args.append(jax.sharding.reshard(initial_state, NamedSharding(mesh, state_spec)))
        in_specs.append(state_spec)

    def local(q, k, v, s, initial_state=None):
        s = placement.local_rates(s, heads, n_heads)
        return vjp.attend(q, k, v, s, initial_state, per_device, None, final, scale)

    out_specs = (x_spec, state_spec) if final else x_spec
    return jax.shard_map(local, mesh=mesh, in_specs=tuple(in_specs), out_specs=out_specs)(*args)


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
    o, state = reference.step(q, k, v, s, state, static_scale(scale))
    return o.astype(q.dtype), state
