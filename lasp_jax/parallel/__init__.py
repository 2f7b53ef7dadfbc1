"""Many devices: lasp_attention and the state-passing strategies over a `seq` mesh axis."""

from lasp_jax.parallel.api import STRATEGIES, lasp_attention

__all__ = ["STRATEGIES", "lasp_attention"]
