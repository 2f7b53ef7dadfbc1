"""One device: linear attention, its reference, its chunked XLA form and (later) fused kernels."""

from lasp_jax.ops.api import linear_attention, linear_attention_step
from lasp_jax.ops.rates import tnl_slopes

__all__ = ["linear_attention", "linear_attention_step", "tnl_slopes"]
