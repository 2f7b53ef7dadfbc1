"""Mamba-2's SSD inputs (lasp_jax.ops.ssd_inputs: SiLU, split, v = dt x, rates) on one GPU: impl "xla" (XLA's
forward and autodiff) against "pallas_triton" (the same forward, the backward as one fused kernel), at Mamba-2
1.3B's shape (T = 64K, H = 64, P = 64, G = 1, N = 128: C = 4352, bf16). It decides ssd_inputs.QUALIFIED_GPUS
(what "auto" takes) and the kernel's launch sizes (ssd_inputs.Config).

    python3 -m benchmarks.ssd_inputs_gpu [--shape 1x65536x64x64] [--groups 1] [--d-state 128] [--dtype bfloat16]
        [--impls xla,pallas_triton] [--configs 64:2:128:4,...] [--iters 20] [--reps 5] [--out DIR]

--shape: BxTxHxP. --configs: the pallas rows' launch sizes, rows:heads:bc_width:num_warps each (default:
ssd_inputs.DEFAULT alone); every config gets a row. Inputs: xbc (x2), dt_raw and the cotangents of q, k, v, x
standard normals in --dtype, the rates' cotangent float32, dt_bias normal - 3, A_log = log U(1, 16). Timing
(`measure.median_ms`, jitted): fwd, the five outputs; fwd_bwd, the outputs and the four gradients for given
cotangents; bwd, the gradients alone (the outputs dropped: what a training step's backward runs, autodiff's
recomputing the SiLU as remat would). Floors: the bytes each must move at the device's copy bandwidth
(`measure.copy_bandwidth_gbs`): fwd reads xbc, dt_raw and writes q, k, v, x, rates; bwd reads xbc, dt_raw and the
five cotangents and writes d_xbc, d_dt_raw. Error: the largest `measure.rel_err` over the outputs and the
gradients against "xla" on the float32-upcast inputs.

Writes ssd_inputs_gpu.jsonl (one row per impl and config) and ssd_inputs_gpu.md (the table and provenance) under
--out. CPU check of the script itself: --shape 1x64x4x16 --d-state 8 --impls xla,pallas_triton_interpret
--configs 16:2:8:4 --iters 1 --reps 1 --out /tmp/ssd_inputs
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import jax
import jax.numpy as jnp

from benchmarks import measure
from lasp_jax.ops import ssd_inputs


def inputs(b, t, h, p, g, n, dtype, seed=0):
    """((xbc, dt_raw, dt_bias, a_log), cotangents of (q, k, v, x, rates)): activations in dtype, parameters and the
    rates' cotangent float32."""
    keys = iter(jax.random.split(jax.random.key(seed), 9))

    def normal(shape, scale=1.0, dt=dtype):
        return (scale * jax.random.normal(next(keys), shape, jnp.float32)).astype(dt)

    args = (normal((b, t, h * p + 2 * g * n), 2.0), normal((b, t, h)), normal((h,), dt=jnp.float32) - 3.0,
            jnp.log(jax.random.uniform(next(keys), (h,), jnp.float32, 1.0, 16.0)))
    cotangents = (normal((b, t, g, n)), normal((b, t, g, n)), normal((b, t, h, p)), normal((b, t, h, p)),
                  normal((b, t, h), dt=jnp.float32))
    return args, cotangents


def functions(impl, h, p, g, n, config):
    """(jit fwd(args), jit fwd_bwd(args, cotangents) -> (outputs, grads), jit bwd(args, cotangents) -> grads)."""
    op = functools.partial(ssd_inputs.ssd_inputs, heads=h, head_dim=p, groups=g, d_state=n, impl=impl,
                           config=config)

    def fwd_bwd(args, cts):
        outs, vjp = jax.vjp(op, *args)
        return outs, vjp(cts)

    return jax.jit(lambda args: op(*args)), jax.jit(fwd_bwd), jax.jit(lambda args, cts: fwd_bwd(args, cts)[1])


CONFIG_FIELDS = ("rows", "heads", "bc_width", "num_warps")  # --configs entries, in order


def table(rows, floors) -> str:
    return (f"floor at copy bandwidth: fwd {floors[0]:.3f} ms, bwd {floors[1]:.3f} ms, fwd+bwd "
            f"{floors[0] + floors[1]:.3f} ms\n\n" + measure.markdown_table(
                rows, (("impl", lambda r: r["impl"]), ("config", lambda r: r["config"]),
                       ("fwd ms", lambda r: f"{r['fwd_ms']:.3f}"), ("bwd ms", lambda r: f"{r['bwd_ms']:.3f}"),
                       ("fwd+bwd ms", lambda r: f"{r['fwd_bwd_ms']:.3f}"),
                       ("max err vs xla fp32", lambda r: f"{r['max_err']:.1e}"))))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="1x65536x64x64", help="BxTxHxP")
    parser.add_argument("--groups", type=int, default=1)
    parser.add_argument("--d-state", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--impls", default="xla,pallas_triton")
    parser.add_argument("--configs", default=measure.config_label(ssd_inputs.DEFAULT, CONFIG_FIELDS))
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    (b, t, h, p), = measure.parse_shapes(args.shape)
    g, n = args.groups, args.d_state
    dtype = jnp.dtype(args.dtype)
    configs = measure.parse_configs(args.configs, ssd_inputs.Config, CONFIG_FIELDS)
    head = measure.provenance("benchmarks.ssd_inputs_gpu", argv, ("jax", "jaxlib", "jax-cuda13-plugin"))
    head["device"] = jax.devices()[0].device_kind

    tensors, cts = inputs(b, t, h, p, g, n, dtype)
    f32 = lambda tree: jax.tree.map(lambda a: a.astype(jnp.float32), tree)  # noqa: E731
    reference = jax.block_until_ready(functions("xla", h, p, g, n, ssd_inputs.DEFAULT)[1](f32(tensors), f32(cts)))
    item, r, c = dtype.itemsize, b * t, h * p + 2 * g * n
    gbs = measure.copy_bandwidth_gbs(r * c * item, args.iters, args.reps)
    fwd_bytes = r * ((c + h + 2 * g * n + 2 * h * p) * item + 4 * h)
    bwd_bytes = r * ((2 * c + 2 * h + 2 * g * n + 2 * h * p) * item + 4 * h)
    floors = tuple(nbytes / gbs / 1e6 for nbytes in (fwd_bytes, bwd_bytes))

    os.makedirs(args.out, exist_ok=True)
    jsonl = os.path.join(args.out, "ssd_inputs_gpu.jsonl")
    open(jsonl, "w").close()
    rows = []
    for impl in args.impls.split(","):
        for config in configs if impl.startswith("pallas") else [ssd_inputs.DEFAULT]:
            row = {"impl": impl, "config": (measure.config_label(config, CONFIG_FIELDS)
                                                  if impl.startswith("pallas") else ""),
                   "device": head["device"], "shape": [b, t, h, p, g, n], "dtype": dtype.name}
            try:
                fwd, fwd_bwd, bwd = functions(impl, h, p, g, n, config)
                got = jax.block_until_ready(fwd_bwd(tensors, cts))
                row |= {"fwd_ms": measure.median_ms(fwd, (tensors,), args.iters, args.reps),
                        "bwd_ms": measure.median_ms(bwd, (tensors, cts), args.iters, args.reps),
                        "fwd_bwd_ms": measure.median_ms(fwd_bwd, (tensors, cts), args.iters, args.reps),
                        "max_err": max(measure.rel_err(a, ref) for a, ref in
                                       zip(jax.tree.leaves(got), jax.tree.leaves(reference), strict=True))}
            except Exception as e:  # a refused impl or launch still gets its row
                row["error"] = f"{type(e).__name__}: {e}".replace("|", "/").replace("\n", " ")[:300]
            measure.append_row(jsonl, row)
            rows.append(row)

    text = table(rows, floors)
    with open(os.path.join(args.out, "ssd_inputs_gpu.md"), "w") as f:
        f.write(f"# ssd_inputs on {head['device']}\n\n`{head['command']}`, {head['date']}, {head['versions']}\n\n"
                f"B={b}, T={t}, H={h}, P={p}, G={g}, N={n} (C={c}), {dtype.name}, copy bandwidth {gbs:.0f} GB/s\n\n"
                f"{text}\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
