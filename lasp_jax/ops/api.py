"""linear_attention: decayed causal linear attention on one device, and its one-token decoding step."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from lasp_jax.ops import checks, impls, kernel_support, placement, reference, vjp


def linear_attention(q, k, v, decay=None, *, segment_ids=None, scale=1.0, initial_state=None,
                     return_final_state=False, impl="auto"):
    """o_t = scale sum_{r <= t, same document} exp(-(s_(r+1) + ... + s_t)) (q_t . k_r) v_r  (+ the initial state's
    term): decayed causal linear attention.

    No softmax and no normaliser. Heads broadcast both ways: H = max(Hq, Hv) output heads, and output head h
    reads q head h // (H / Hq), k head h // (H / Hk), v head h // (H / Hv): MHA, GQA / MQA (fewer K/V heads than
    Q heads) and GVA (Mamba-2's groups: q and k with fewer heads than v). Inputs are indexed, never repeated in
    memory; the gradient of an input head sums, in float32, over the output heads that read it.

    Constant decay (decay [H], lambda_h = exp(-s_h)): o_p = sum_{r <= p} lambda_h^(p - r) (scale q_p . k_r) v_r
    + lambda_h^p scale q_p S_0, and the state S(P) = lambda_h^P S_0 + sum_{r < P} lambda_h^(P - r) k_r^T v_r.
    Per-token decay (decay [B, T, H]) or documents (segment_ids): the state is the one after each position,
    H_t = exp(-s_t) H_(t-1) + k_t^T v_t, reset to k_t^T v_t where a document starts; position t reads
    scale q_t H_t, so S_0 reaches it as exp(-(s_0 + ... + s_t)) S_0 (within position 0's document only), and the
    final state is H_(T-1). Constant decay with segment_ids keeps the constant convention (S_0 reaches p as
    lambda^p, the final state is lambda H_(T-1)), so adding one document's ids changes nothing.

    Args:
      q: [B, T, Hq, Dk]; k: [B, T, Hk, Dk]; v: [B, T, Hv, Dv]; any T >= 1, any head dims; k has q's heads or v's,
        and the smaller of Hq, Hv divides the larger (checks.attention_inputs).
      decay: None (no decay), [H] constant rates s_h >= 0 (a constant for autodiff: its cotangent is zero), or
        [B, T, H] per-token rates s_t >= 0 (differentiable: gradients flow to them; a model computes them from
        its input). Bad rates are a ValueError when decay is concrete; traced under jit, a negative or non-finite
        rate makes its head's outputs NaN (constant), or (per-token) the outputs of its (batch row, head) that
        depend on it, from its position on (checks.attention_inputs).
      segment_ids: None, or [B, T] integers: packed documents; the state resets wherever the id changes from
        position t-1 to t. initial_state belongs to position 0's document; the final state is the state after
        the last position (its document's).
      scale: a Python float multiplying q, applied inside the implementation where it forms the scores and the
        q-side state products in float32 (never a pass over q).
      initial_state: optional [B, H, Dk, Dv] state S_0 before position 0 (differentiable).
      return_final_state: also return the final state [B, H, Dk, Dv] float32, which chains: two calls passing
        the state (and the same decay, ids) equal one call over the concatenated sequence.
      impl: "auto" (the first usable entry of impls.AUTO_ORDER), "xla" (chunked, every platform),
        "pallas_triton" (fused kernels, GPU), "pallas_mosaic" (the same with Mosaic GPU walks, Hopper), their
        "_interpret" twins (interpreted, any platform) or "reference" (dense, O(T^2) memory). The kernels run
        per device: on inputs split over several devices by XLA (a data-parallel mesh), "auto" takes "xla"
        and naming them is an error; lasp_attention (any seq axis size, even 1) runs them per device.
        Per-token decay, segment_ids and every head layout above run on every impl ("auto": a kernel only
        where its GPU tests for that case passed, impls.qualification; else "xla").
    Returns:
      o [B, T, H, Dv] in q's dtype, sharded like q (on an Explicit mesh each (batch, head) shard runs on its own
      device; under jit on an Auto mesh XLA places it), and the final state if asked for.
    """
    rates = checks.attention_inputs(q, k, v, decay)
    b, t, _, dk = q.shape
    h = checks.output_heads(q, v)
    ids = checks.segment_ids(segment_ids, b, t)
    if initial_state is not None:
        initial_state = checks.state("initial_state", initial_state, (b, h, dk, v.shape[-1]))
    per_device = impls.resolve(impl, q, k, v, per_token=rates.ndim == 3 or ids is not None,
                               partitioned=kernel_support.partitioned(q))
    scale = static_scale(scale)
    final = bool(return_final_state)
    constant = rates if rates.ndim == 1 and ids is not None else None
    if constant is not None:  # per token, a constant for autodiff, S_0 not decayed by position 0's rate
        rates = jax.lax.stop_gradient(jnp.broadcast_to(constant, (b, t, h)).at[:, 0].set(0.0))
    spec = placement.explicit_spec(q)
    if spec is None:
        out = attend_under_jit(q, k, v, rates, ids, initial_state, per_device, None, final, scale)
    else:
        mesh = jax.typeof(q).sharding.mesh
        _refuse_sharded_sequence(spec, mesh)
        batch = spec[0]
        heads = placement.head_axes(spec, mesh, h, min(x.shape[2] for x in (q, k, v)), taken=batch)
        out = _per_shard(q, k, v, rates, ids, initial_state, per_device=per_device, final=final, mesh=mesh,
                         batch=batch, heads=heads, scale=scale)
    if final:
        o, state = out
        if constant is not None:
            state = jnp.exp(-jax.lax.stop_gradient(constant))[None, :, None, None] * state
        return placement.like_q(o, q), state
    return placement.like_q(out, q)


def attend(q, k, v, rates, ids, s_init, impl, exchange, final, scale):
    """vjp.attend (constant rates [H], no ids) or vjp.attend_tokens (rates [B, L, H], ids or None)."""
    if rates.ndim == 3:
        return vjp.attend_tokens(q, k, v, rates, ids, s_init, impl, exchange, final, scale)
    return vjp.attend(q, k, v, rates, s_init, impl, exchange, final, scale)


# Always under jit: lax.associative_scan in an eager shard_map (a caller's, called without jit) crashes the CPU
# runtime of jax 0.11.2 (segfault). Under a caller's jit this jit is inlined.
attend_under_jit = jax.jit(attend, static_argnums=(6, 7, 8, 9))


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
def _per_shard(q, k, v, rates, ids, initial_state, *, per_device, final, mesh, batch, heads, scale):
    """Explicit mesh: one call per (batch, head) shard inside shard_map (no collective: batch and heads are
    independent); T and the head dims whole on each device. Per-token rates are split like q's [B, T, H]."""
    x_spec = P(placement.entry(batch), None, placement.entry(heads), None)
    state_spec = P(placement.entry(batch), placement.entry(heads), None, None)
    q, k, v = (jax.sharding.reshard(x, NamedSharding(mesh, x_spec)) for x in (q, k, v))
    n_heads = placement.size(mesh, heads)
    rates_spec = P() if rates.ndim == 1 else P(*x_spec[:3])
    args = [q, k, v, jax.sharding.reshard(rates, NamedSharding(mesh, rates_spec))]
    in_specs = [x_spec, x_spec, x_spec, rates_spec]
    for x, x_s in ((ids, P(*x_spec[:2])), (initial_state, state_spec)):
        args.append(None if x is None else jax.sharding.reshard(x, NamedSharding(mesh, x_s)))
        in_specs.append(None if x is None else x_s)

    def local(q, k, v, rates, ids, initial_state):
        if rates.ndim == 1:
            rates = placement.local_rates(rates, heads, n_heads)
        return attend(q, k, v, rates, ids, initial_state, per_device, None, final, scale)

    out_specs = (x_spec, state_spec) if final else x_spec
    return jax.shard_map(local, mesh=mesh, in_specs=tuple(in_specs), out_specs=out_specs)(*args)


def linear_attention_step(q, k, v, state, decay=None, *, scale=1.0, reset=None):
    """One decoding step with constant memory: the recurrence behind linear_attention.

    Args:
      q: [B, Hq, Dk]; k: [B, Hk, Dk]; v: [B, Hv, Dv] (heads as in linear_attention, H = max(Hq, Hv));
      state: [B, H, Dk, Dv] (zeros before position 0, or the
        final state of linear_attention over the prefix, with the same kind of decay).
      decay: None or [H] constant rates: the state is S(p), the step returns S(p + 1) (linear_attention's
        constant convention). Or [B, H]: this position's per-token rates s_p (per-token decay, documents): the
        state is H_(p-1), the step returns H_p = exp(-s_p) H_(p-1) + k_p^T v_p and o_p = scale q_p H_p.
      reset: None or [B] bool, per-token decay only: a document starts at this position (the state is dropped
        first; linear_attention's segment_ids changing here).
    Returns:
      (o [B, H, Dv] in q's dtype, the next state [B, H, Dk, Dv] float32).
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if np.ndim(x) != 3:
            raise ValueError(f"{name} must have rank 3 [B, heads, head_dim] for one step, got shape {np.shape(x)}")
    per_token = decay is not None and np.ndim(decay) == 2
    rates = checks.attention_inputs(q[:, None], k[:, None], v[:, None],
                                    jnp.asarray(decay)[:, None] if per_token else decay)
    state = checks.state("state", state, (q.shape[0], max(q.shape[1], v.shape[1]), q.shape[2], v.shape[-1]))
    if reset is not None:
        if not per_token:
            raise ValueError("reset (a document start) needs per-token decay rates [B, H]; with constant rates "
                             "zero the state yourself (jnp.where(reset, 0, state))")
        if np.shape(reset) != (q.shape[0],) or jnp.result_type(reset) != jnp.bool_:
            raise ValueError(f"reset must be a [B] = [{q.shape[0]}] bool array, got {np.shape(reset)} "
                             f"{jnp.result_type(reset)}")
    if per_token:
        o, state = reference.step_tokens(q, k, v, rates[:, 0], state, static_scale(scale), reset)
    else:
        o, state = reference.step(q, k, v, rates, state, static_scale(scale))
    return o.astype(q.dtype), state
