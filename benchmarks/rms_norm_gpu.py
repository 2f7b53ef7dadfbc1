"""The blocks' SRMSNorm (lasp_jax.ops.rms_norm) on one GPU: impl "xla" against the fused "pallas_triton" kernels,
forward and forward+backward, at [T, D] = [65536, 2048] (Mamba-2 1.3B's d_model, T = 64K) and [65536, 4096], bf16.
It decides rms_norm.QUALIFIED_GPUS (what "auto" takes) and the kernels' launch sizes (rms_norm.Config).

    python3 -m benchmarks.rms_norm_gpu [--shapes 65536x2048,65536x4096] [--dtype bfloat16]
        [--impls xla,pallas_triton] [--configs 8192:4096:256:2:0,...] [--iters 20] [--reps 5] [--out DIR]

--configs: launch sizes of the pallas rows, fwd_block:bwd_block:elems_per_warp:num_stages:xla_forward (0 or 1)
each (default: rms_norm.DEFAULT and a small sweep around it, SWEEP); every (shape, config) gets a row. Inputs: x
and y's cotangent standard normals in --dtype. Timing: `measure.median_ms` of the jitted forward and of
forward+backward (y and dx for a given cotangent); bwd ms is their difference. Floor: the bytes each must move
(forward: x read, y written; forward+backward: that plus x and the cotangent read again and dx written) at the
device's copy bandwidth (`measure.copy_bandwidth_gbs`). Error: the larger `measure.rel_err` of y and dx against
"xla" on the float32-upcast inputs.

Writes rms_norm_gpu.jsonl (one row per line) and rms_norm_gpu.md (the table and provenance) under --out. CPU check
of the script itself: --shapes 64x48 --impls xla,pallas_triton_interpret --iters 1 --reps 1 --out /tmp/rms_norm
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import jax
import jax.numpy as jnp

from benchmarks import measure
from lasp_jax.ops import rms_norm

EPS = 1e-6  # ModelConfig.norm_eps's default
# Around DEFAULT: smaller and larger blocks each way, fewer warps, and XLA's forward with the kernel's backward
# (whether XLA's forward, fusible in a model, loses anything on its own).
SWEEP = ("4096:2048:512:2:0", "16384:8192:512:2:0", "8192:8192:512:2:0", "8192:4096:256:2:0",
         "8192:4096:128:2:0", "8192:4096:512:2:1")


def inputs(t, d, dtype, seed=0):
    """(x, y's cotangent) [t, d] in dtype."""
    keys = jax.random.split(jax.random.key(seed))
    return tuple(jax.random.normal(key, (t, d), jnp.float32).astype(dtype) for key in keys)


def functions(impl, config):
    """(jit forward(x), jit forward+backward(x, g) -> (y, dx))."""
    norm = functools.partial(rms_norm.srms_norm, eps=EPS, impl=impl, config=config)

    def fwd_bwd(x, g):
        y, vjp = jax.vjp(norm, x)
        return y, vjp(g)[0]

    return jax.jit(norm), jax.jit(fwd_bwd)


CONFIG_FIELDS = ("fwd_block", "bwd_block", "elems_per_warp", "num_stages", "xla_forward")  # --configs, in order


def table(rows) -> str:
    return measure.markdown_table(rows, (
        ("T x D", lambda r: r["shape"]), ("impl", lambda r: r["impl"]), ("config", lambda r: r["config"]),
        ("fwd ms", lambda r: f"{r['fwd_ms']:.3f}"), ("fwd+bwd ms", lambda r: f"{r['fwd_bwd_ms']:.3f}"),
        ("bwd ms", lambda r: f"{r['fwd_bwd_ms'] - r['fwd_ms']:.3f}"),
        ("floor fwd / fwd+bwd ms", lambda r: f"{r['floor_fwd_ms']:.3f} / {r['floor_fwd_bwd_ms']:.3f}"),
        ("max err vs xla fp32", lambda r: f"{r['max_err']:.1e}")))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="65536x2048,65536x4096", help="TxD,...")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--impls", default="xla,pallas_triton")
    parser.add_argument("--configs", default=",".join((measure.config_label(rms_norm.DEFAULT, CONFIG_FIELDS), *SWEEP)))
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    shapes = measure.parse_shapes(args.shapes, names="TxD")
    dtype = jnp.dtype(args.dtype)
    configs = measure.parse_configs(args.configs, rms_norm.Config, CONFIG_FIELDS)
    head = measure.provenance("benchmarks.rms_norm_gpu", argv, ("jax", "jaxlib", "jax-cuda13-plugin"))
    head["device"] = jax.devices()[0].device_kind
    os.makedirs(args.out, exist_ok=True)
    rows_path = os.path.join(args.out, "rms_norm_gpu.jsonl")
    if os.path.exists(rows_path):
        os.remove(rows_path)

    rows = []
    for t, d in shapes:
        x, g = inputs(t, d, dtype)
        reference = jax.block_until_ready(functions("xla", rms_norm.DEFAULT)[1](x.astype(jnp.float32),
                                                                               g.astype(jnp.float32)))
        gbs = measure.copy_bandwidth_gbs(x.nbytes, args.iters, args.reps)
        base = {"shape": f"{t}x{d}", "dtype": dtype.name, "copy_GBps": round(gbs),
                "floor_fwd_ms": 2 * x.nbytes / gbs / 1e6, "floor_fwd_bwd_ms": 5 * x.nbytes / gbs / 1e6}
        for impl in args.impls.split(","):
            for config in configs if impl.startswith("pallas") else [rms_norm.DEFAULT]:
                row = base | {"impl": impl, "config": (measure.config_label(config, CONFIG_FIELDS)
                                                      if impl.startswith("pallas") else "")}
                try:
                    fwd, fwd_bwd = functions(impl, config)
                    got = jax.block_until_ready(fwd_bwd(x, g))
                    row |= {"fwd_ms": measure.median_ms(fwd, (x,), args.iters, args.reps),
                            "fwd_bwd_ms": measure.median_ms(fwd_bwd, (x, g), args.iters, args.reps),
                            "max_err": max(measure.rel_err(a, r) for a, r in zip(got, reference, strict=True))}
                except Exception as e:  # a refused impl or launch still gets its row
                    row["error"] = f"{type(e).__name__}: {e}".replace("|", "/").replace("\n", " ")[:300]
                measure.append_row(rows_path, row)
                rows.append(row)

    text = table(rows)
    with open(os.path.join(args.out, "rms_norm_gpu.md"), "w") as f:
        f.write(f"# srms_norm on {head['device']}\n\n`{head['command']}`, {head['date']}, {head['versions']}\n\n"
                f"{dtype.name}, eps {EPS}; config = fwd_block:bwd_block:elems_per_warp:num_stages:xla_forward\n\n"
                f"{text}\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
