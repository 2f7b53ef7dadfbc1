"""Host time to lower the Mosaic GPU convolution kernels (lasp_jax.ops.causal_conv_mosaic) for CUDA, per tile height.

    python3 -m benchmarks.conv_lowering [--block-t 8,16,32] [--length 65536] [--channels 4352] [--width 4]

Why: Mosaic GPU's layout inference runs in Python when a step is lowered, before XLA compiles it, and its cost grows
faster than the kernels' ops; each tile's block_t rows are unrolled, so block_t sets it (12.7 s for the default's
forward and backward on an H200 host, results/conv_gpu_h200_s25.md). Runs anywhere (no GPU needed): the convolution
with documents at Mamba-2 1.3B's shape by default, as convolve_zero_halo (what the model calls), the forward alone,
then forward and backward; other Config fields at their defaults. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp

from lasp_jax.ops import causal_conv_mosaic


def lowered(config: causal_conv_mosaic.Config, length: int, channels: int, width: int, backward: bool):
    """jax.stages.Lowered of convolve_zero_halo for CUDA at B=1 with documents, bf16 x, float32 weight and bias:
    the forward alone, or (backward) y and the gradients of x, weight and bias for a given dy."""
    x = jax.ShapeDtypeStruct((1, length, channels), jnp.bfloat16)
    weight, bias = jax.ShapeDtypeStruct((width, channels), jnp.float32), jax.ShapeDtypeStruct((channels,), jnp.float32)
    ids = jax.ShapeDtypeStruct((1, length), jnp.int32)
    conv = lambda x, w, b, ids: causal_conv_mosaic.convolve_zero_halo(x, w, b, ids, config=config)  # noqa: E731

    def step(x, w, b, ids, g):
        y, vjp = jax.vjp(lambda *a: conv(*a, ids), x, w, b)
        return y, vjp(g)

    fn, args = (step, (x, weight, bias, ids, x)) if backward else (conv, (x, weight, bias, ids))
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))


def lowering_seconds(config: causal_conv_mosaic.Config, length: int, channels: int, width: int) -> tuple[float, float]:
    """(forward, forward and backward) seconds to lower for CUDA (`lowered`)."""
    times = []
    for backward in (False, True):
        start = time.perf_counter()
        lowered(config, length, channels, width, backward)
        times.append(time.perf_counter() - start)
    return times[0], times[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--block-t", default="8,16,32", help="tile heights, comma-separated")
    parser.add_argument("--length", type=int, default=65536)
    parser.add_argument("--channels", type=int, default=4352)
    parser.add_argument("--width", type=int, default=4)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    print("| block_t | forward s | forward+backward s |\n|---|---|---|")
    for block_t in map(int, args.block_t.split(",")):
        fwd, both = lowering_seconds(causal_conv_mosaic.Config(block_t=block_t), args.length, args.channels,
                                     args.width)
        print(f"| {block_t} | {fwd:.1f} | {both:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
