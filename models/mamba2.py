"""Mamba-2's token mixer (Dao and Gu 2024, "Transformers are SSMs"), its SSD core run by lasp_jax.

Written from the paper's equations, in our words:

    z = x W_z;  xBC = x W_xBC;  dt = x W_dt               z, x: [d_inner]; B, C: [G, N]; dt: [H]
    x, B, C = silu(causal_conv(xBC))                      depthwise, width W, over x, B and C together
    dt = softplus(dt + dt_bias);  a = exp(A_log) > 0      per token, per head (fp32)
    y_t = sum_{r <= t, same document} exp(-(dt_(r+1) a + ... + dt_t a)) (C_t . B_r) dt_r x_r  +  D x_t
    out = W_out RMSNorm_G(y * silu(z)) * g                RMSNorm per group of d_inner / G channels, weight g

The sum is the SSD recurrence h_t = exp(-dt_t a) h_(t-1) + dt_t B_t^T x_t, y_t = C_t h_t, i.e. exactly lasp_jax's
decayed linear attention with q = C, k = B, v = dt x, per-token rates dt a (decay [B, T, H]) and scale 1. The
SSM heads H = d_inner / head_dim are the value heads; B and C have G = n_groups heads, SSM head h reading group
h // (H / G) (grouped-value attention, GVA). Everything the op needs crosses ranks as lasp_attention's states;
the convolution, under a seq axis, gets the previous rank's last W-1 positions (sharded_causal_conv1d's halo).
With packed documents (segment_ids) the state resets and no convolution tap crosses a document start.

Numerics: dt, the rates and the norm statistics in fp32 (the rates are exp(A_log) * softplus, >= 0 by
construction); projections, the convolution's output and v in the compute dtype; the SSD state fp32. The gated
norm (lasp_jax.ops.gated_norm) and the backward of the SiLU, split and v = dt x (lasp_jax.ops.ssd_inputs) run as
fused Pallas kernels or as XLA's fusions (cfg.mamba2_impl), per device under a mesh; so does the convolution
(cfg.conv_impl: the Mosaic GPU kernels on an H200), in sharded_causal_conv1d's shard_map.

Initialisation (the paper's): dt_bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max] (floored at 1e-4);
A_log = log(A), A uniform in [1, 16]; D = 1; the gated norm's weight 1; the convolution's weight and bias uniform
in +-1/sqrt(W) (a depthwise Conv1d's default). The projections follow this package's convention, N(0, init_std^2),
with the out-projection divided by sqrt(n_layers) (Mamba's rescaling of the layers that write the residual).

Differences from the reference model, kept for the package's conventions: the block's pre-norm and the final norm
are SRMSNorm without a learned scale (ahead of the in-projections a scale is absorbed by their weights), the
projections' init is the normal one above instead of PyTorch's uniform default (same scale at these widths), and
z, xBC and dt have a projection each (the reference's one in-projection holds [W_z | W_xBC | W_dt]).

Decoding keeps, per layer, the SSD state [B, H, N, head_dim] fp32 and the convolution's last W-1 inputs
[B, W-1, d_inner + 2 G N]: constant memory at any position.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

import lasp_jax
from lasp_jax.ops import gated_norm, kernel_support, ssd_inputs
from lasp_jax.parallel import causal_conv1d, sharded_causal_conv1d
from models import sharding
from models.attention import linear_attend
from models.config import ModelConfig
from models.layers import Dense

A_RANGE = (1.0, 16.0)  # A = -exp(A_log) is initialised with |A| uniform in this range
DT_FLOOR = 1e-4  # smallest initial step size
CONV_NAME = "mamba2_conv"  # the convolution's output, for remat policies (models.lm: remat "block_attention_conv")


def _param(value: jax.Array, cfg: ModelConfig, *, replicated: bool = False) -> nnx.Param:
    """value as a parameter in param_dtype on its ZeRO-3 spec, or replicated (placed at once under a mesh)."""
    value = value.astype(jnp.dtype(cfg.param_dtype))
    spec = (None,) * value.ndim if replicated else sharding.param_sharding(value.shape, cfg)
    return nnx.Param(value, out_sharding=spec,
                     eager_sharding=sharding.ambient_mesh() is not None)


def init_dt_bias(key: jax.Array, heads: int, dt_min: float, dt_max: float) -> jax.Array:
    """[heads] fp32: softplus^-1 of dt, dt log-uniform in [dt_min, dt_max] and at least DT_FLOOR, so that
    softplus(0 + dt_bias) starts at dt. softplus^-1(y) = y + log(1 - exp(-y)), written with expm1 (y is small)."""
    u = jax.random.uniform(key, (heads,), jnp.float32)
    dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = jnp.maximum(dt, DT_FLOOR)
    return dt + jnp.log(-jnp.expm1(-dt))


class Mamba2Mixer(nnx.Module):
    """Mamba-2 token mixer; see the module docstring for the computation."""

    def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        del layer  # every Mamba-2 layer is alike
        self.cfg = cfg
        inner, heads, groups, n = cfg.expand * cfg.d_model, cfg.ssm_heads, cfg.n_groups, cfg.d_state
        self.conv_channels = inner + 2 * groups * n  # x, B, C
        # Three projections where the reference has one: the gated norm's kernels take z as an operand of its own,
        # which a slice of one projection would first copy out (forward and remat), its cotangent copied into the
        # joint one; and dt's cotangent, concatenated with xBC's, made the convolution's backward write [T, C + H].
        self.gate_proj = Dense(cfg.d_model, inner, cfg, rngs=rngs)  # z
        self.in_proj = Dense(cfg.d_model, self.conv_channels, cfg, rngs=rngs)  # xBC
        self.dt_proj = Dense(cfg.d_model, heads, cfg, rngs=rngs)  # dt
        bound = 1.0 / math.sqrt(cfg.conv_width)
        uniform = lambda shape: jax.random.uniform(rngs.params(), shape, jnp.float32, -bound, bound)
        # [W, C], replicated (W x C floats, 70 KB at 1.3B): gathered from shards of C it came channel-major (each
        # channel's taps adjacent), which the convolution's elementwise fusions read strided. At seq 2 on H200s
        # they took 1.3 to 2.8x their one-GPU time, replicated 1.0 to 1.3x; the 1.3B's step 1.864 -> 1.744 s
        # (benchmarks/results/TRAIN_GPU_NOTES.md, session 15).
        self.conv_weight = _param(uniform((cfg.conv_width, self.conv_channels)), cfg, replicated=True)
        self.conv_bias = _param(uniform((self.conv_channels,)), cfg)
        self.dt_bias = _param(init_dt_bias(rngs.params(), heads, cfg.dt_min, cfg.dt_max), cfg)
        self.A_log = _param(jnp.log(jax.random.uniform(rngs.params(), (heads,), jnp.float32, *A_RANGE)), cfg)
        self.D = _param(jnp.ones((heads,), jnp.float32), cfg)
        self.norm_weight = _param(jnp.ones((inner,), jnp.float32), cfg)
        self.out_proj = Dense(inner, cfg.d_model, cfg, rngs=rngs)
        self.out_proj.kernel[...] = self.out_proj.kernel[...] / math.sqrt(cfg.n_layers)

    # --- pieces shared by the forward, the prefill and the step ---
    def _split_in(self, x):
        """x [B, T, D] -> z [B, T, d_inner], xBC [B, T, conv channels], dt [B, T, H] (compute dtype).

        The projections are put on the activation layout at once: left to themselves, XLA keeps them on the
        FSDP-sharded kernels' output split and then cannot reach (batch, seq) without a full rematerialization
        (Auto meshes).
        """
        return tuple(sharding.constrain_activation(proj(x), self.cfg)
                     for proj in (self.gate_proj, self.in_proj, self.dt_proj))

    def _conv_params(self):
        return self.conv_weight[...], self.conv_bias[...]  # replicated: nothing to gather

    def _ssd_inputs(self, xbc, dt):
        """Convolved xBC [..., C] and raw dt [..., H] -> q = C [..., G, N], k = B [..., G, N], v = dt x
        [..., H, P], x [..., H, P] and the per-token rates dt a [..., H] fp32 (lasp_jax.ops.ssd_inputs: XLA's
        forward; with cfg.mamba2_impl's kernel, its backward as one Pallas kernel, per device under a mesh)."""
        cfg = self.cfg
        # SiLU on the convolution's rounded output: on an H200 at the 1.3B's shape the Mosaic convolution kernels
        # then SiLU take 1.31 ms forward + backward against 1.98 ms with the SiLU fused inside their float32 sum
        # (benchmarks/results/conv_gpu_h200_s17.md; through XLA 3.02 against 3.39, conv_gpu_h200_s10.md).
        split = dict(heads=cfg.ssm_heads, head_dim=cfg.resolved_head_dim, groups=cfg.n_groups, d_state=cfg.d_state)
        impl = ssd_inputs.resolve(cfg.mamba2_impl, xbc, per_device=True)
        dt_bias, a_log = self.dt_bias[...], self.A_log[...]
        if impl == "xla" or xbc.ndim != 3:  # XLA partitions its own fusions; decoding runs on one device
            return ssd_inputs.ssd_inputs(xbc, dt, dt_bias, a_log, impl="xla", **split)
        op = lambda xbc, dt, dt_bias, a_log: ssd_inputs.ssd_inputs(  # noqa: E731
            xbc, dt, dt_bias, a_log, impl=impl, **split)
        return sharding.per_device(op, cfg, (xbc, dt), (dt_bias, a_log), check_vma=kernel_support.checks_vma(impl))

    def _out(self, o, x, z):
        """SSD output o and its input x [..., H, P], gate z [..., d_inner] -> out-projection [..., D]: the gated
        RMSNorm (lasp_jax.ops.gated_norm, cfg.mamba2_impl; fp32 inside) and the out-projection. With the kernels
        and leading dims [B, T] the two are one op (gated_rms_norm_project: no forward kernel rerun by remat for
        the projection's weight gradient, under a policy that keeps gated_norm.STATS_NAME), per device under a
        mesh."""
        cfg = self.cfg
        impl = gated_norm.resolve(cfg.mamba2_impl, o, x, z, cfg.n_groups, per_device=True)
        options = dict(groups=cfg.n_groups, eps=cfg.norm_eps, out_dtype=jnp.dtype(cfg.dtype), impl=impl)
        d_skip, norm_weight = self.D[...], self.norm_weight[...]
        if impl == "xla" or o.ndim != 4:  # XLA partitions its own fusions; decoding runs on one device
            return self.out_proj(gated_norm.gated_rms_norm(o, x, d_skip, z, norm_weight, **options))
        norm_project = lambda o, x, z, d, w, w_proj: gated_norm.gated_rms_norm_project(  # noqa: E731
            o, x, d, z, w, w_proj, **options)
        # The projection's weight in the compute dtype before the per-device call: its gather moves half the bytes.
        w_proj = self.out_proj.kernel[...].astype(jnp.dtype(cfg.dtype))
        return sharding.per_device(norm_project, cfg, (o, x, z), (d_skip, norm_weight, w_proj),
                                   check_vma=kernel_support.checks_vma(impl))

    # --- training forward ---
    def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        """x [B, T, D] -> [B, T, D]; segment_ids [B, T] or None (packed documents)."""
        cfg = self.cfg
        z, xbc, dt = self._split_in(x)
        weight, bias = self._conv_params()
        # As the SSD's lasp_attention: under a seq axis (the halo), and per device under a seq axis of size 1 too
        # (causal_conv1d refuses the kernels under a partitioned mesh; its "auto" takes XLA's there).
        if sharding.in_seq_shard_map(cfg, xbc.shape[0]):
            xbc = sharded_causal_conv1d(xbc, weight, bias, segment_ids=segment_ids, seq_axis=cfg.seq_axis,
                                        batch_axes=sharding.batch_axes(cfg), impl=cfg.conv_impl)
        else:  # the one-device form, whose padding follows x's batch sharding
            xbc = causal_conv1d(xbc, weight, bias, segment_ids=segment_ids, impl=cfg.conv_impl)
        q, k, v, x_heads, rates = self._ssd_inputs(checkpoint_name(xbc, CONV_NAME), dt)
        o = linear_attend(q, k, v, rates, cfg, segment_ids=segment_ids)
        return self._out(o, x_heads, z)

    # --- decoding ---
    def init_state(self, batch: int, max_len: int) -> dict[str, jax.Array]:
        """Before position 0: the SSD state zeros [B, H, N, P] fp32 and the convolution's last W-1 inputs
        zeros [B, W-1, C] (compute dtype). max_len is not needed: the memory is constant."""
        cfg = self.cfg
        return {"ssm": jnp.zeros((batch, *cfg.linear_state_shape), jnp.float32),
                "conv": jnp.zeros((batch, cfg.conv_width - 1, self.conv_channels), jnp.dtype(cfg.dtype))}

    def prefill(self, x: jax.Array, state: dict, segment_ids: jax.Array | None = None) -> tuple[jax.Array, dict]:
        """Whole prompt from `state` (one device). x [B, T, D] -> (y [B, T, D], state after T positions).

        segment_ids: None or [B, T] ints (documents in the prompt): `state` belongs to position 0's document, the
        returned one to the last position's (its carried inputs zero before that document's start, as after
        end_documents).
        """
        z, xbc, dt = self._split_in(x)
        # The carried inputs stand before the prompt: convolve them with it, keep the prompt's outputs.
        held = jnp.concatenate([state["conv"], xbc.astype(state["conv"].dtype)], axis=1)
        width = self.cfg.conv_width - 1
        held_ids = None
        if segment_ids is not None:
            held_ids = jnp.concatenate([jnp.repeat(segment_ids[:, :1], width, axis=1), segment_ids], axis=1)
        conv = causal_conv1d(held, *self._conv_params(), segment_ids=held_ids, impl=self.cfg.conv_impl)[:, width:]
        q, k, v, x_heads, rates = self._ssd_inputs(conv, dt)
        o, ssm = lasp_jax.linear_attention(q, k, v, rates, segment_ids=segment_ids, initial_state=state["ssm"],
                                           return_final_state=True, impl=self.cfg.attn_impl)
        carried = held[:, held.shape[1] - width:]
        if segment_ids is not None:
            last_doc = held_ids[:, held.shape[1] - width:] == segment_ids[:, -1:]  # [B, W-1]
            carried = jnp.where(last_doc[..., None], carried, jnp.zeros_like(carried))
        return self._out(o, x_heads, z), {"ssm": ssm, "conv": carried}

    def step(self, x: jax.Array, state: dict, pos: jax.Array) -> tuple[jax.Array, dict]:
        """One token: x [B, D] -> (y [B, D], next state); constant memory whatever `pos`."""
        del pos  # the state is all the past there is
        z, xbc, dt = (part[:, 0] for part in self._split_in(x[:, None]))
        window = jnp.concatenate([state["conv"], xbc[:, None].astype(state["conv"].dtype)], axis=1)  # [B, W, C]
        conv = causal_conv1d(window, *self._conv_params())[:, -1]
        q, k, v, x_heads, rates = self._ssd_inputs(conv, dt)
        o, ssm = lasp_jax.linear_attention_step(q, k, v, state["ssm"], rates)
        return self._out(o, x_heads, z), {"ssm": ssm, "conv": window[:, 1:]}

    def end_documents(self, state: dict, ended: jax.Array, pos: jax.Array) -> dict:
        """Rows where ended [B] start a new document at `pos`: the SSD state and the carried convolution inputs
        return to init_state's zeros (no tap reaches across a document start)."""
        del pos  # the state holds no position
        return {name: jnp.where(ended.reshape(-1, *(1,) * (s.ndim - 1)), jnp.zeros_like(s), s)
                for name, s in state.items()}
