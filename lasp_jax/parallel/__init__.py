"""Many devices: lasp_attention and the state-passing strategies over a `seq` mesh axis, and the causal
convolution (Mamba-2's) with its halo passed between ranks."""

from lasp_jax.parallel.api import STRATEGIES, lasp_attention
from lasp_jax.parallel.causal_conv import causal_conv1d, sharded_causal_conv1d

__all__ = ["STRATEGIES", "causal_conv1d", "lasp_attention", "sharded_causal_conv1d"]
