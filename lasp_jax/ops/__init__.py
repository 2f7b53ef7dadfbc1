"""One device: linear attention (reference, chunked XLA, fused Pallas kernels), its decoding step, and decay rates."""

from lasp_jax.ops.api import linear_attention, linear_attention_step
from lasp_jax.ops.rates import tnl_slopes

__all__ = ["linear_attention", "linear_attention_step", "tnl_slopes"]
