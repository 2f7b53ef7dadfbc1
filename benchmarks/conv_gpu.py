"""Mamba-2's depthwise causal convolution on one GPU: the XLA formula against the fused Pallas Triton kernels
(lasp_jax.ops.causal_conv_kernel) and the Mosaic GPU kernels (lasp_jax.ops.causal_conv_mosaic), forward and
forward+backward. It is what decides whether lasp_jax.parallel.causal_conv.QUALIFIED_GPUS names this GPU for
either kernels (with their GPU tests, tests/parallel/test_conv_kernel.py and test_conv_mosaic.py).

    python3 -m benchmarks.conv_gpu [--batch 1] [--length 65536] [--channels 4352] [--width 4] [--docs 16]
        [--activation silu] [--dtype bfloat16]
        [--contenders xla_then_silu,xla,pallas_triton,pallas_mosaic,pallas_mosaic_fused]
        [--configs 32x16x256x512x8,...] [--mosaic-configs 256x32x1024x1024x4x2,...] [--iters 10] [--reps 5]
        [--out DIR]

Contenders: "xla_then_silu" (what Mamba-2 runs: the convolution rounded to the dtype, then jax.nn.silu), "xla"
(causal_conv1d(impl="xla", activation=...)), "pallas_triton" (the kernels at their DEFAULT Config) and one row
per --configs entry, FWDxBWDxCxROWSxWARPS = Config(fwd_block_t, bwd_block_t, block_c, bwd_rows, num_warps);
"pallas_mosaic" (the Mosaic kernels, causal_conv_mosaic.convolve_zero_halo on x itself, at their DEFAULT Config
with activation None, then jax.nn.silu in XLA when --activation is silu: what the model would run, against
"xla_then_silu") and one row per --mosaic-configs entry, CxTxFRUNxBRUNxFSTAGESxBSTAGES =
causal_conv_mosaic.Config(block_c, block_t, fwd_run, bwd_run, fwd_stages, bwd_stages), run as "pallas_mosaic";
"pallas_mosaic_fused" (the SiLU fused in the kernels, against "xla"; only with --activation silu).
"pallas_triton_interpret" and "pallas_mosaic_interpret" (as "pallas_mosaic") run the kernels interpreted (the
CPU check below). Shape: Mamba-2 1.3B's convolution by
default (C = d_inner + 2 d_state = 4352, W = 4); x and dy standard normals in --dtype, weight and bias float32
uniform in +-1/sqrt(W) (the model's parameters), --docs documents per row at random starts. Timing:
`measure.median_ms` of the jitted forward and of forward+backward (y and dx, dweight, dbias for a given dy).
Error: `measure.rel_err` of y and dx against "xla" (the kernels compute the same float32 sums: expect bf16
rounding flips only, ~1e-5; with --activation silu, "xla_then_silu", "pallas_mosaic" and its configs also round
before the SiLU). A contender that fails (a config that does not compile) gets a row with its error.

Writes conv_gpu.jsonl (a row per contender, as it finishes) and conv_gpu.md (the table and provenance) under
--out (default $OUT, else benchmarks/results). CPU check of the script itself: --length 64 --channels 40 --docs 3
--dtype float32 --contenders xla,pallas_triton_interpret --iters 1 --reps 1 --out /tmp/conv; the Mosaic
kernels' (C a multiple of their block_c, L of their runs): --length 64 --channels 256 --docs 3 --dtype float32
--contenders xla,pallas_mosaic_interpret --mosaic-configs 128x16x32x32x2x2 --iters 1 --reps 1 --out /tmp/conv
(the --mosaic-configs rows run compiled: off a GPU they are rows with their error).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import measure
from lasp_jax.ops import causal_conv_kernel, causal_conv_mosaic
from lasp_jax.parallel.causal_conv import causal_conv1d


def inputs(b, t, c, w, docs, dtype, seed=0):
    """x, dy [B, T, C] in dtype; weight [W, C], bias [C] float32; segment ids [B, T] int32 (None for 1 doc)."""
    keys = jax.random.split(jax.random.key(seed), 4)
    x, dy = (jax.random.normal(key, (b, t, c), jnp.float32).astype(dtype) for key in keys[:2])
    bound = 1.0 / np.sqrt(w)
    weight = jax.random.uniform(keys[2], (w, c), jnp.float32, -bound, bound)
    bias = jax.random.uniform(keys[3], (c,), jnp.float32, -bound, bound)
    if docs <= 1:
        return (x, weight, bias, dy), None
    return (x, weight, bias, dy), jnp.asarray(measure.random_documents(np.random.default_rng(seed), b, t, docs))


def parse_config(text: str) -> causal_conv_kernel.Config:
    """'32x16x256x512x8' -> Config(fwd_block_t=32, bwd_block_t=16, block_c=256, bwd_rows=512, num_warps=8)."""
    parts = text.split("x")
    if len(parts) != 5 or not all(p.isdigit() for p in parts):
        raise ValueError(f"config {text!r} is not FWDxBWDxCxROWSxWARPS (five integers)")
    fwd, bwd, c, rows, warps = map(int, parts)
    return causal_conv_kernel.Config(fwd_block_t=fwd, bwd_block_t=bwd, block_c=c, bwd_rows=rows, num_warps=warps)


def parse_mosaic_config(text: str) -> causal_conv_mosaic.Config:
    """'256x32x1024x1024x4x2' -> causal_conv_mosaic.Config(block_c=256, block_t=32, fwd_run=1024, bwd_run=1024,
    fwd_stages=4, bwd_stages=2)."""
    parts = text.split("x")
    if len(parts) != 6 or not all(p.isdigit() for p in parts):
        raise ValueError(f"mosaic config {text!r} is not CxTxFRUNxBRUNxFSTAGESxBSTAGES (six integers)")
    c, t, fwd_run, bwd_run, fwd_stages, bwd_stages = map(int, parts)
    return causal_conv_mosaic.Config(block_c=c, block_t=t, fwd_run=fwd_run, bwd_run=bwd_run, fwd_stages=fwd_stages,
                                     bwd_stages=bwd_stages)


def conv_fn(name: str, activation, config=None):
    """conv(x, weight, bias, ids) -> y for one contender; config: a causal_conv_kernel.Config for
    "pallas_triton", a causal_conv_mosaic.Config for the Mosaic contenders, or None (DEFAULT)."""
    if name == "xla_then_silu":
        return lambda x, w, b, ids: jax.nn.silu(causal_conv1d(x, w, b, segment_ids=ids, impl="xla"))
    if name.startswith("pallas_mosaic"):
        fused = activation if name == "pallas_mosaic_fused" else None
        then_silu = activation is not None and fused is None
        interpret = name == "pallas_mosaic_interpret"
        mosaic = causal_conv_mosaic.DEFAULT if config is None else config

        def run(x, w, b, ids):  # x itself, zeros before it (no padded copy)
            y = causal_conv_mosaic.convolve_zero_halo(x, w, b, ids, activation=fused, interpret=interpret,
                                                      config=mosaic)
            return jax.nn.silu(y) if then_silu else y
        return run
    if config is None:
        return lambda x, w, b, ids: causal_conv1d(x, w, b, segment_ids=ids, activation=activation, impl=name)

    def tuned(x, w, b, ids):  # causal_conv1d's padding, then the kernels at this config
        k = w.shape[0] - 1
        ide = None if ids is None else jnp.pad(ids, ((0, 0), (k, 0)))
        return causal_conv_kernel.convolve(jnp.pad(x, ((0, 0), (k, 0), (0, 0))), w, b, ide, activation=activation,
                                           config=config)
    return tuned


def measure_one(conv, tensors, ids, reference, iters, reps) -> tuple[dict, tuple | None]:
    """({fwd_ms, fwd_bwd_ms, and the errors of y, dx, dweight against `reference`}, (y, (dx, dw, db))), or
    ({error}, None); reference: "xla"'s (y, (dx, dw, db)) or None."""
    x, weight, bias, dy = tensors

    def fwd_bwd(x, weight, bias, dy, ids):
        y, vjp = jax.vjp(lambda *a: conv(*a, ids), x, weight, bias)
        return y, vjp(dy)

    try:
        fwd = jax.jit(conv)
        both = jax.jit(fwd_bwd)
        got = jax.block_until_ready(both(x, weight, bias, dy, ids))
        row = {"fwd_ms": measure.median_ms(fwd, (x, weight, bias, ids), iters, reps),
               "fwd_bwd_ms": measure.median_ms(both, (x, weight, bias, dy, ids), iters, reps)}
    except Exception as e:  # a config that does not compile, out of memory: a row saying so
        return {"error": f"{type(e).__name__}: {str(e)[:300]}"}, None
    if reference is not None:
        (y, (dx, dw, _)), (y_ref, (dx_ref, dw_ref, _)) = got, reference
        row |= {"y_err": measure.rel_err(y, y_ref), "dx_err": measure.rel_err(dx, dx_ref),
                "dweight_err": measure.rel_err(dw, dw_ref)}
    return row, got


def table(rows) -> str:
    head = "| contender | fwd ms | fwd+bwd ms | y err | dx err | dweight err |\n|---|---|---|---|---|---|\n"
    fmt = lambda r, k, f: format(r[k], f) if k in r else "-"
    return head + "".join(
        f"| {r['contender']} | " + (f"error: {r['error']} |  |  |  |  |" if "error" in r else
                                  f"{fmt(r, 'fwd_ms', '.3f')} | {fmt(r, 'fwd_bwd_ms', '.3f')} | "
                                  f"{fmt(r, 'y_err', '.2e')} | {fmt(r, 'dx_err', '.2e')} | "
                                  f"{fmt(r, 'dweight_err', '.2e')} |") + "\n" for r in rows)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--length", type=int, default=65536)
    p.add_argument("--channels", type=int, default=4352)
    p.add_argument("--width", type=int, default=4)
    p.add_argument("--docs", type=int, default=16, help="documents per row")
    p.add_argument("--activation", default="silu", choices=("silu", "none"))
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--contenders", default="xla_then_silu,xla,pallas_triton,pallas_mosaic,pallas_mosaic_fused")
    p.add_argument("--configs", default="", help="extra Triton kernel configs, FWDxBWDxCxROWSxWARPS,...")
    p.add_argument("--mosaic-configs", default="",
                   help="extra Mosaic kernel configs (as pallas_mosaic), CxTxFRUNxBRUNxFSTAGESxBSTAGES,...")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results")
    args = p.parse_args(argv)
    configs = [parse_config(c) for c in args.configs.split(",") if c]
    mosaic_configs = [parse_mosaic_config(c) for c in args.mosaic_configs.split(",") if c]
    activation = None if args.activation == "none" else args.activation
    os.makedirs(args.out, exist_ok=True)
    jsonl = os.path.join(args.out, "conv_gpu.jsonl")
    head = measure.provenance("benchmarks.conv_gpu", argv, ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin"))
    head["device"] = jax.devices()[0].device_kind
    measure.append_row(jsonl, {"provenance": head})
    shape = {"batch": args.batch, "length": args.length, "channels": args.channels, "width": args.width,
             "docs": args.docs, "activation": args.activation, "dtype": args.dtype}
    tensors, ids = inputs(args.batch, args.length, args.channels, args.width, args.docs, jnp.dtype(args.dtype))
    contenders = [(name, None) for name in args.contenders.split(",") if name]
    contenders += [("pallas_triton:" + text, cfg) for text, cfg in zip(args.configs.split(","), configs)]
    contenders += [("pallas_mosaic:" + text, cfg) for text, cfg in zip(args.mosaic_configs.split(","), mosaic_configs)]
    if "xla" not in [name for name, _ in contenders]:
        contenders.insert(0, ("xla", None))  # the errors' reference
    contenders.sort(key=lambda item: item[0] != "xla")
    reference, rows = None, []
    for name, cfg in contenders:
        if name in ("xla_then_silu", "pallas_mosaic_fused") and activation is None:
            continue
        start = time.perf_counter()
        row, result = measure_one(conv_fn(name.split(":")[0], activation, cfg), tensors, ids, reference, args.iters,
                                  args.reps)
        if name == "xla":
            reference = result
        row = {"contender": name} | shape | row | {"wall_s": time.perf_counter() - start}
        measure.append_row(jsonl, row)
        rows.append(row)
    text = table(rows)
    with open(os.path.join(args.out, "conv_gpu.md"), "w") as f:
        f.write(f"# Causal convolution, one {head['device']}: XLA vs Pallas Triton and Mosaic GPU kernels\n\n"
                f"`{head['command']}`, {head['date']}, {head['versions']}\n\n"
                f"B={args.batch}, T={args.length}, C={args.channels}, W={args.width}, {args.docs} documents per "
                f"row, activation {args.activation}, {args.dtype} x (float32 weight and bias)\n\n{text}")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
