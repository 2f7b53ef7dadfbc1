"""ModelConfig: one frozen description of every model in this package (TNL, Linear Transformer, Mamba-2, hybrids).

A model is a stack of pre-norm residual blocks: token mixer (linear attention, a Mamba-2 mixer, or softmax
attention in the layers `softmax_layers` names) then channel mixer (SGLU; none when the hidden size is 0, the
default for Mamba-2, whose blocks are mixer only). The config also carries how the model meets a mesh
(which axes the batch, the sequence and the parameters shard over), how much it recomputes in the backward
(remat) and in how many pieces the cross-entropy is computed, so one config runs from a CPU toy to 7B. Named
sizes are in models/presets.py.

Fields with a fixed set of values are `Literal`s, checked by `check_fields` (shared with train.TrainConfig):
the one place that validates choices, float fields (finite as float32, since that is what the model and the
optimiser compute with: 1e39 is a finite Python float and inf in float32) and tuple fields (a bare string
would be iterated character by character).
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Literal

import numpy as np

from lasp_jax.ops.impls import IMPLS
from lasp_jax.parallel.api import STRATEGIES

Strategy = Literal[tuple(STRATEGIES)]  # LASP state exchanges, from lasp_jax's own table
AttnImpl = Literal[("auto", *IMPLS)]  # per-device linear attention implementations, from lasp_jax's table
Dtype = Literal["float32", "bfloat16", "float16"]
# ModelConfig.remat's choices (see the field)
Remat = Literal["none", "block", "block_attention", "block_attention_conv", "full"]


@functools.cache
def _hints(cls) -> dict[str, typing.Any]:
    return typing.get_type_hints(cls)


def check_fields(obj) -> None:
    """ValueError naming the field of dataclass `obj` whose value its annotation rules out: a Literal's value
    not among its choices, a float that is not finite in float32, a tuple field given something else."""
    name_of = type(obj).__name__
    for f in dataclasses.fields(obj):
        tp, value = _hints(type(obj))[f.name], getattr(obj, f.name)
        if typing.get_origin(tp) is Literal and value not in typing.get_args(tp):
            raise ValueError(f"{name_of}: {f.name} must be one of {typing.get_args(tp)}, got {value!r}")
        if tp is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name_of}: {f.name} must be a number, got {value!r}")
            with np.errstate(over="ignore"):  # the cast itself tells: past float32's range it gives inf
                finite = bool(np.isfinite(np.float32(value)))
            if not finite:
                raise ValueError(f"{name_of}: {f.name}={value!r} is not a finite float32 value "
                                 f"(|x| <= {float(np.finfo(np.float32).max):.4g})")
        if typing.get_origin(tp) is tuple and not isinstance(value, tuple):
            raise ValueError(f"{name_of}: {f.name} must be a tuple, got {value!r}"
                             + (f" (write ({value!r},))" if isinstance(value, str) else ""))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    # --- architecture ---
    kind: Literal["tnl", "linear_transformer", "mamba2"] = "tnl"  # token mixer of the linear layers
    vocab_size: int = 64000
    d_model: int = 1024
    n_layers: int = 24
    n_heads: int = 8
    n_kv_heads: int | None = None  # K/V heads of the linear layers (GQA/MQA); None: n_heads
    head_dim: int | None = None  # None: d_model // n_heads (Mamba-2: also the SSM heads' dim, P)
    # SGLU hidden size; 0: no channel mixer; None: 0 for Mamba-2, else round(mlp_ratio * d_model) up to a
    # multiple of 256
    mlp_hidden: int | None = None
    mlp_ratio: float = 8 / 3
    # Softmax-attention layers (hybrids): () none; an int k: every k-th layer (k-1, 2k-1, ...); or a tuple of
    # layer indices.
    softmax_layers: int | tuple[int, ...] = ()
    softmax_kv_heads: int | None = None  # K/V heads of the softmax layers; None: n_kv_heads
    rope_theta: float = 10000.0  # rotary positions of the softmax layers (linear layers need none)
    tie_embeddings: bool = True  # the LM head reuses the token embedding (TNL's Hugging Face models do)
    scale_embedding: bool = True  # multiply embeddings by sqrt(d_model) (TNL); False for plain LT
    norm_eps: float = 1e-6  # SRMSNorm's epsilon
    lt_output_norm: bool = True  # Linear Transformer: SRMSNorm on the attention output (see models/attention.py)
    init_std: float = 0.02  # normal init of every matrix and of the embedding (TNL's init_std)

    # --- Mamba-2 (kind="mamba2"; models/mamba2.py) ---
    expand: int = 2  # inner width d_inner = expand * d_model, in d_inner / head_dim SSM heads
    d_state: int = 128  # N: the state of each SSM head is N x head_dim
    n_groups: int = 1  # G groups of B and C (q and k), shared by the SSM heads (GVA); divides the SSM heads
    conv_width: int = 4  # width of the depthwise causal convolution over x, B and C
    dt_min: float = 1e-3  # the step sizes dt are initialised log-uniform in [dt_min, dt_max]
    dt_max: float = 0.1

    # --- numerics and memory ---
    dtype: Dtype = "float32"  # compute dtype of activations and matmuls
    param_dtype: Dtype = "float32"  # master weights
    # none: keep every activation; block: per block, keep the matmul outputs (and Mamba-2's gated norm's per-row
    # statistic, [B, T, G] float32), recompute the rest;
    # block_attention: as block, and keep the linear attention's output and per-piece states too, so its
    # forward kernels run once a step (per layer o and [B, H, T / piece, Dk, Dv] float32 more);
    # block_attention_conv: as block_attention, and keep Mamba-2's convolution output ([B, T, C] more per layer);
    # full: per block, keep only its input.
    remat: Remat = "none"
    # n > 1: between the forward and the backward keep only every n-th block's input; each run of n blocks is
    # recomputed from it (one more forward of the model), inside it each block as `remat` says. 1: `remat` alone
    remat_every: int = 1
    ce_chunk: int = 1024  # positions (per sequence, per seq rank) in one cross-entropy chunk

    # --- parallelism ---
    seq_axis: str = "seq"  # mesh axis the sequence is split over (LASP)
    batch_axes: tuple[str, ...] = ("data",)  # mesh axes the batch is split over
    # mesh axes the parameters and AdamW moments are sharded over jointly (FSDP, models.sharding.param_axes):
    # ("data", "seq") spans every device of the mesh, so per-device state shrinks as GPUs are added; one name
    # shards over that axis alone; None replicates
    param_axis: str | tuple[str, ...] | None = ("data", "seq")
    strategy: Strategy = "ring"  # LASP state exchange (lasp_jax.lasp_attention)
    attn_impl: AttnImpl = "auto"  # per-device linear attention implementation (lasp_jax impl=)
    # Mamba-2's gated RMSNorm (lasp_jax.ops.gated_norm) and the SiLU/split/v = dt x backward (lasp_jax.ops.ssd_inputs):
    # the fused Pallas Triton kernels, run per device, or XLA's fusions; "auto" takes the kernels on the GPUs where
    # their GPU tests passed (the H200), else xla
    mamba2_impl: Literal["auto", "xla", "pallas_triton", "pallas_triton_interpret"] = "auto"
    # Every model's SRMSNorm (the blocks' pre-norms and the final norm; lasp_jax.ops.rms_norm): the fused Pallas
    # Triton kernels, run per device, or XLA's fusions; "auto" takes the kernels on the GPUs where their GPU test
    # passed (the H200), else xla. Its own field, not mamba2_impl's: TNL and LT use the norm too
    norm_impl: Literal["auto", "xla", "pallas_triton", "pallas_triton_interpret"] = "auto"
    # Mamba-2's causal convolution in training and prefill (lasp_jax.parallel.causal_conv's impl; a decode step's
    # W-position window takes "auto"): "auto" takes the Mosaic GPU kernels on the GPUs where their GPU test passed
    # (the H200), per device (also under a mesh with a seq axis of size 1 that splits the batch), else xla
    conv_impl: Literal["auto", "xla", "pallas_mosaic", "pallas_mosaic_interpret", "pallas_triton",
                       "pallas_triton_interpret"] = "auto"
    # The softmax layers' attention in the training forward (lasp_jax.ops.softmax impl=; under a seq axis LASP-2H's
    # ranks, where "auto" takes the flash kernels where qualified, else the blockwise loop, and "cudnn" is refused)
    softmax_impl: Literal["auto", "blockwise", "cudnn", "pallas_triton", "pallas_triton_interpret"] = "auto"

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"ModelConfig: {msg}")

        check_fields(self)
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "ce_chunk", "expand", "d_state", "n_groups",
                     "conv_width"):
            if getattr(self, name) < 1:
                bad(f"{name} must be >= 1, got {getattr(self, name)}")
        if isinstance(self.remat_every, bool) or not isinstance(self.remat_every, int) or self.remat_every < 1:
            bad(f"remat_every must be an int >= 1 (1: keep each block's input), got {self.remat_every!r}")
        if self.mlp_hidden is not None and self.mlp_hidden < 0:
            bad(f"mlp_hidden must be >= 0 (0: no channel mixer), got {self.mlp_hidden}")
        if self.head_dim is None and self.d_model % self.n_heads:
            bad(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; set head_dim")
        for name in ("n_kv_heads", "softmax_kv_heads"):
            h = getattr(self, name)
            if h is not None and (h < 1 or self.n_heads % h):
                bad(f"{name}={h} must divide n_heads={self.n_heads}")
        if isinstance(self.softmax_layers, int):
            if self.softmax_layers < 0:
                bad(f"softmax_layers as every-k must be >= 1 (or 0 / () for none), got {self.softmax_layers}")
        else:
            layers = tuple(self.softmax_layers)
            if any(not 0 <= i < self.n_layers for i in layers) or len(set(layers)) != len(layers):
                bad(f"softmax_layers {layers} must be distinct layer indices in [0, {self.n_layers})")
        if self.batch_axes and self.seq_axis in self.batch_axes:
            bad(f"seq_axis {self.seq_axis!r} cannot also be a batch axis {self.batch_axes}")
        axes = (self.param_axis,) if isinstance(self.param_axis, str) else self.param_axis
        known = (*self.batch_axes, self.seq_axis)
        if axes is not None and (not isinstance(axes, tuple) or len(set(axes)) != len(axes)
                                 or any(a not in known for a in axes)):
            bad(f"param_axis must be None, or one or more distinct names among the batch and seq axes {known}; "
                f"got {self.param_axis!r}")
        if self.kind == "mamba2":
            inner, hd = self.expand * self.d_model, self.resolved_head_dim
            if inner % hd:
                bad(f"Mamba-2's inner width expand * d_model = {inner} is not divisible by head_dim={hd}")
            if (inner // hd) % self.n_groups:
                bad(f"n_groups={self.n_groups} must divide the {inner // hd} SSM heads (expand * d_model / head_dim)")
            if not 0 < self.dt_min <= self.dt_max:
                bad(f"dt_min={self.dt_min} and dt_max={self.dt_max} must satisfy 0 < dt_min <= dt_max")
        if self.softmax_set and self.resolved_head_dim % 2:
            bad(f"softmax layers use rotary positions, which need an even head_dim, got {self.resolved_head_dim}")

    # --- derived ---
    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def resolved_kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def resolved_softmax_kv_heads(self) -> int:
        return self.softmax_kv_heads if self.softmax_kv_heads is not None else self.resolved_kv_heads

    @property
    def ssm_heads(self) -> int:
        """Mamba-2's SSM heads H = expand * d_model / head_dim (the value heads; B and C have n_groups)."""
        return self.expand * self.d_model // self.resolved_head_dim

    @property
    def linear_state_shape(self) -> tuple[int, int, int]:
        """(heads, Dk, Dv) of a linear (or Mamba-2) layer's recurrent state: what one token's state products
        cost (model FLOPs) and what decoding carries per layer."""
        if self.kind == "mamba2":
            return self.ssm_heads, self.d_state, self.resolved_head_dim
        return self.n_heads, self.resolved_head_dim, self.resolved_head_dim

    @property
    def resolved_mlp_hidden(self) -> int:
        """SGLU hidden size; 0 when the blocks have no channel mixer."""
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        if self.kind == "mamba2":
            return 0
        h = round(self.mlp_ratio * self.d_model)
        return -(-h // 256) * 256 if h >= 256 else h

    @property
    def softmax_set(self) -> frozenset[int]:
        """Indices of the softmax-attention layers."""
        if isinstance(self.softmax_layers, int):
            k = self.softmax_layers
            return frozenset(range(k - 1, self.n_layers, k)) if k else frozenset()
        return frozenset(self.softmax_layers)

    def layer_kind(self, i: int) -> str:
        """'softmax' or the linear kind ('tnl' / 'linear_transformer' / 'mamba2') of layer i."""
        return "softmax" if i in self.softmax_set else self.kind

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)
