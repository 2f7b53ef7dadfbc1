"""lasp_jax.ops.kernel_support's rounding to a matmul operand's dtype, against the cast it stands for."""

import jax
import jax.numpy as jnp
import numpy as np

from lasp_jax.ops import kernel_support


def test_rounded_to_bf16_is_the_cast_bit_for_bit(rng):
    """bf16 on the bits equals astype(bf16) (eager, outside any kernel) for normals over the whole exponent range,
    subnormals, exact ties (to even, both ways), the largest finite floats (rounding to infinity or not), zeros
    and infinities. NaNs are not the cast's bits: rounded_to's docstring."""
    normals = rng.standard_normal(20000) * np.exp2(rng.uniform(-126, 127, 20000))
    subnormals = rng.uniform(-1, 1, 2000) * np.float32(2.0 ** -126)
    ties = np.array([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), 2 ** -130 * (1 + 2 ** -8)])
    edges = np.array([np.finfo(np.float32).max, -np.finfo(np.float32).max, 3.3895e38, 0.0, -0.0, np.inf, -np.inf])
    x = jnp.asarray(np.concatenate([normals, subnormals, ties, edges]), jnp.float32)
    got = np.asarray(jax.jit(kernel_support.rounded_to, static_argnums=1)(x, jnp.bfloat16))
    want = np.asarray(x.astype(jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    assert kernel_support.rounded_to(x, jnp.float32) is x


def test_rounded_to_float16_rounds(rng):
    """float16 keeps the cast's round trip (eager here: its values)."""
    x = jnp.asarray(rng.standard_normal(1000), jnp.float32)
    np.testing.assert_array_equal(np.asarray(kernel_support.rounded_to(x, jnp.float16)),
                                  np.asarray(x.astype(jnp.float16).astype(jnp.float32)))


def test_shard_map_checks_varying_axes_but_for_the_triton_interpreter():
    assert not kernel_support.checks_vma("pallas_triton_interpret")
    assert all(kernel_support.checks_vma(impl) for impl in ("xla", "pallas_triton", "pallas_mosaic",
                                                            "pallas_mosaic_interpret", "auto", "cudnn"))
