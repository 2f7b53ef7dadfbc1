"""lasp_jax: Linear Attention Sequence Parallelism (LASP, LASP-2) in JAX.

    linear_attention(q, k, v, decay=None, *, segment_ids=None, scale=1.0, initial_state=None,
                     return_final_state=False, impl="auto")
    lasp_attention(q, k, v, decay=None, *, segment_ids=None, mesh=None, seq_axis="seq", strategy="ring",
                   scale=1.0, impl="auto", batch_axes=None)
    linear_attention_step(q, k, v, state, decay=None, *, scale=1.0, reset=None)

decay: None, [H] constant rates, or [B, T, H] per-token rates (differentiable); segment_ids: packed documents.
"""

from lasp_jax.ops import linear_attention, linear_attention_step
from lasp_jax.parallel import lasp_attention

__all__ = ["linear_attention", "lasp_attention", "linear_attention_step"]
__version__ = "0.1.0"
