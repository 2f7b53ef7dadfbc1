"""Mamba-2's gated RMS norm (lasp_jax.ops.gated_norm) on one GPU: impl "xla" against the fused "pallas_triton"
kernels, forward and forward+backward, at Mamba-2 1.3B's SSD output (B=1, T=64K, H=64, P=64, G=1, bf16). It
decides gated_norm.QUALIFIED_GPUS (what "auto" takes) and the kernels' launch sizes (gated_norm.Config).

    python3 -m benchmarks.gated_norm_gpu [--shape 1x65536x64x64] [--groups 1] [--dtype bfloat16]
        [--impls xla,pallas_triton] [--configs 8192:4096:2048:256:2:0,...] [--iters 20] [--reps 5] [--out DIR]

--configs: launch sizes of the pallas rows, fwd_block:bwd_block:target_programs:elems_per_warp:num_stages:prefetch
each (prefetch 0 or 1; default: gated_norm.DEFAULT alone); every config gets a row. An entry of the first four
fields alone (the form before num_stages and prefetch could be set) runs as those did: num_stages 2, prefetch 0.
Inputs: o, x, z and the output's cotangent standard normals (z x2) in --dtype, D normal and weight 1 + 0.1 normal
in float32. Timing: `measure.median_ms` of the jitted forward and of forward+backward (the output and the five
gradients for a given cotangent). Floor: the bytes each must move (forward: o, x, z read, the output written;
forward+backward: that plus o, x, z and the cotangent read again and do, dx, dz written) at the device's copy
bandwidth (`measure.copy_bandwidth_gbs`).
Error: the largest `measure.rel_err` over the output and the gradients against "xla" on the float32-upcast
inputs.

Writes gated_norm_gpu.md (the table and provenance) under --out. CPU check of the script itself:
--shape 1x64x4x16 --impls xla,pallas_triton_interpret --iters 1 --reps 1 --out /tmp/gated_norm
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import jax
import jax.numpy as jnp

from benchmarks import measure
from lasp_jax.ops import gated_norm


def inputs(b, t, h, p, dtype, seed=0):
    """((o, x, D, z, weight), cotangent): the activations in dtype, D and weight float32."""
    keys = jax.random.split(jax.random.key(seed), 6)
    normal = lambda key, shape, scale=1.0, dt=dtype: (scale * jax.random.normal(key, shape, jnp.float32)).astype(dt)
    return ((normal(keys[0], (b, t, h, p)), normal(keys[1], (b, t, h, p)), normal(keys[2], (h,), dt=jnp.float32),
             normal(keys[3], (b, t, h * p), 2.0), 1.0 + normal(keys[4], (h * p,), 0.1, jnp.float32)),
            normal(keys[5], (b, t, h * p)))


def functions(impl, groups, out_dtype, config):
    """(jit forward(args), jit forward+backward(args, cotangent) -> (out, grads))."""
    norm = functools.partial(gated_norm.gated_rms_norm, groups=groups, eps=1e-5, out_dtype=out_dtype, impl=impl,
                             config=config)

    def fwd_bwd(args, g):
        out, vjp = jax.vjp(norm, *args)
        return out, vjp(g)

    return jax.jit(lambda args: norm(*args)), jax.jit(fwd_bwd)


CONFIG_FIELDS = ("fwd_block", "bwd_block", "target_programs", "elems_per_warp", "num_stages", "prefetch")
FORMER_TAIL = ("2", "0")  # num_stages and prefetch of a four-field --configs entry (they were fixed then)


def parse_configs(text: str) -> list[gated_norm.Config]:
    """--configs -> Configs (measure.parse_configs), a four-field entry completed with FORMER_TAIL."""
    short = len(CONFIG_FIELDS) - len(FORMER_TAIL)
    return measure.parse_configs(",".join(
        ":".join((item, *FORMER_TAIL)) if item.count(":") == short - 1 else item for item in text.split(",")),
        gated_norm.Config, CONFIG_FIELDS)


def table(rows, floors) -> str:
    return (f"floor at copy bandwidth: fwd {floors[0]:.3f} ms, fwd+bwd {floors[1]:.3f} ms\n\n" + measure.markdown_table(
        rows, (("impl", lambda r: r["impl"]), ("config", lambda r: r["config"]),
               ("fwd ms", lambda r: f"{r['fwd_ms']:.3f}"), ("fwd+bwd ms", lambda r: f"{r['fwd_bwd_ms']:.3f}"),
               ("max err vs xla fp32", lambda r: f"{r['max_err']:.1e}"))))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="1x65536x64x64", help="BxTxHxP")
    parser.add_argument("--groups", type=int, default=1)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--impls", default="xla,pallas_triton")
    parser.add_argument("--configs", default=measure.config_label(gated_norm.DEFAULT, CONFIG_FIELDS))
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    (b, t, h, p), = measure.parse_shapes(args.shape)
    dtype = jnp.dtype(args.dtype)
    configs = parse_configs(args.configs)
    head = measure.provenance("benchmarks.gated_norm_gpu", argv, ("jax", "jaxlib", "jax-cuda13-plugin"))
    head["device"] = jax.devices()[0].device_kind

    tensors, g = inputs(b, t, h, p, dtype)
    reference = jax.block_until_ready(
        functions("xla", args.groups, jnp.float32, gated_norm.DEFAULT)[1](
            jax.tree.map(lambda a: a.astype(jnp.float32), tensors), g.astype(jnp.float32)))
    item = dtype.itemsize
    elements = b * t * h * p
    gbs = measure.copy_bandwidth_gbs(elements * item, args.iters, args.reps)
    floors = tuple(n * elements * item / gbs / 1e6 for n in (4, 11))

    rows = []
    for impl in args.impls.split(","):
        for config in configs if impl.startswith("pallas") else [gated_norm.DEFAULT]:
            row = {"impl": impl, "config": (measure.config_label(config, CONFIG_FIELDS)
                                                  if impl.startswith("pallas") else "")}
            try:
                fwd, fwd_bwd = functions(impl, args.groups, dtype, config)
                got = jax.block_until_ready(fwd_bwd(tensors, g))
                row |= {"fwd_ms": measure.median_ms(fwd, (tensors,), args.iters, args.reps),
                        "fwd_bwd_ms": measure.median_ms(fwd_bwd, (tensors, g), args.iters, args.reps),
                        "max_err": max(measure.rel_err(a, r) for a, r in
                                       zip(jax.tree.leaves(got), jax.tree.leaves(reference), strict=True))}
            except Exception as e:  # a refused impl or launch still gets its row
                row["error"] = f"{type(e).__name__}: {e}".replace("|", "/").replace("\n", " ")[:300]
            print(row, flush=True)
            rows.append(row)

    os.makedirs(args.out, exist_ok=True)
    text = table(rows, floors)
    with open(os.path.join(args.out, "gated_norm_gpu.md"), "w") as f:
        f.write(f"# gated_rms_norm on {head['device']}\n\n`{head['command']}`, {head['date']}, {head['versions']}\n\n"
                f"B={b}, T={t}, H={h}, P={p}, G={args.groups}, {dtype.name}, copy bandwidth {gbs:.0f} GB/s\n\n"
                f"{text}\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
