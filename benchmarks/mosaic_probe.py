"""One GPU: impl "pallas_mosaic" (the Mosaic GPU walks) against "pallas_triton" (the Triton walks), same inputs.

    python3 -m benchmarks.mosaic_probe --out DIR [--shapes 1x65536x16x128,1x16384x16x128] [--iters 20 --reps 7]

Per shape (bf16, TNL slopes; T whole pieces of `pallas_triton._plan`, e.g. 8 pieces of 8K at B=1, H=16, 64K),
both through pallas_triton's own code, the Triton Config against the same Config with `mosaic` set:
  - forward: `pallas_triton.forward` (state pass, piece scan, output walk);
  - gradient walks alone: dQ, dK, dV from the piece states S (entering each piece) and dS (the cotangent leaving
    each piece), as `backward` launches them (`_triton_grads` / `_mosaic_grads`);
  - backward: `pallas_triton.backward` (Q, dO state pass, reverse scan, the gradient walks);
each also against the XLA implementation in float32 (an independent check of both). Errors are max relative
errors (max|a - b| / max|b|); times through `benchmarks.bench_ops_gpu.time_jax` (back-to-back calls, median of
rounds). Every result is printed as it comes and the JSON (DIR/mosaic_probe.json) rewritten after each, so a
time limit leaves what was measured; a failing compile or run prints its traceback and the probe goes on.
The records in benchmarks/results/mosaic_probe_h200_*.json came from earlier versions of the kernels and probe:
_output_pass (the tree of 6fbe3f7: the output pass alone), _walks (56265f2: each walk alone), _dkdv (86ebc5c: a
fused dK + dV walk, since removed) and _dkdv_split_scores (a second fused variant whose code was never committed).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
import jaxlib

import lasp_jax
from benchmarks.bench_ops_gpu import jax_inputs, max_rel_err, slopes, time_jax
from lasp_jax.ops import pallas_triton as pt

CONFIGS = {"triton": pt.KERNELS.config, "mosaic": pt.MOSAIC.config}


def piece_states(q, k, v, do, s, plan, config):
    """(S, dS) [B, H, P, Dk, Dv] float32 from zero boundary states, as `forward` and `backward` build them."""
    sums = pt._piece_sums(k, v, s, plan, config, reverse=False, head=pt._same)
    grads = pt._piece_sums(q, do, s, plan, config, reverse=True, head=pt._same)
    return pt._prefix(sums, s, plan, plan.pieces), pt._suffix(grads, s, plan)


def probe_shape(shape, args, attempt):
    """Every row of one BxTxHxD shape, each through attempt(shape, what, fn)."""
    b, t, h, d = map(int, shape.split("x"))
    q, k, v, do = jax_inputs(b, t, h, d)
    s = jnp.asarray(slopes(h))
    plan = pt._plan(q, v, CONFIGS["triton"])
    tensor_bytes = q.size * q.dtype.itemsize
    print(f"== {shape}: {plan}", flush=True)
    if plan.pad:
        print(f"skipped: T={t} is not whole pieces for the Triton plan", flush=True)
        return
    S, dS = jax.block_until_ready(jax.jit(functools.partial(piece_states, plan=plan, config=CONFIGS["triton"]))(
        q, k, v, do, s))
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    o, vjp_fn = jax.vjp(lambda q, k, v: lasp_jax.linear_attention(q, k, v, s, impl="xla"), *f32)
    xla = {"forward": (o,), "backward": vjp_fn(do.astype(jnp.float32))}
    xla["gradient walks"] = xla["backward"]
    triton_out = {}

    passes = {  # name -> (fn(config), args, [B, T, H, D] tensors it must move at least)
        "forward": (lambda c: lambda q, k, v: (pt.forward(q, k, v, s, None, c)[0],), (q, k, v), 4),
        "gradient walks": (lambda c: lambda q, k, v, do, S, dS: (
            pt._mosaic_grads(q, k, v, do, s, S, dS, plan, c) if c.mosaic is not None
            else pt._triton_grads(q, k, v, do, s, S, dS, plan, c, 1)), (q, k, v, do, S, dS), 7),
        "backward": (lambda c: lambda q, k, v, do, S: pt.backward(q, k, v, s, (S, None), do, None, c)[:3],
                     (q, k, v, do, S), 7),
    }
    for name, (make, xs, floor_tensors) in passes.items():
        for impl, config in CONFIGS.items():
            fn = jax.jit(make(config))

            def run(fn=fn, name=name, impl=impl, xs=xs, floor_tensors=floor_tensors):
                got = jax.block_until_ready(fn(*xs))
                out = {"max_rel_err_vs_xla_f32": max_rel_err(got, xla[name])}
                if impl == "triton":
                    triton_out[name] = got
                elif name in triton_out:
                    out["max_rel_err_vs_triton"] = max_rel_err(got, triton_out[name])
                ms = time_jax(fn, xs, args.iters, args.reps)
                return {**out, "ms": ms, "floor_GBps": floor_tensors * tensor_bytes / ms / 1e6}

            attempt(shape, f"{name}: pallas_{impl}", run)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--shapes", default="1x65536x16x128,1x16384x16x128", help="BxTxHxD, comma-separated")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "mosaic_probe.json")
    record = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(),
        "device_kind": jax.devices()[0].device_kind,
        "versions": {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "python": platform.python_version()},
        "timing": f"bench_ops_gpu.time_jax, iters={args.iters}, reps={args.reps} (median ms per call)",
        "results": [],
        "failures": [],
    }
    print(json.dumps({k: record[k] for k in ("device_kind", "versions")}), flush=True)

    def save():
        with open(path, "w") as f:
            json.dump(record, f, indent=1)

    def attempt(shape, what, fn):
        """Runs fn() -> dict, records and prints it; a failure is printed with its traceback and recorded."""
        try:
            row = {"shape": shape, "what": what, **fn()}
            record["results"].append(row)
            print(json.dumps(row), flush=True)
        except Exception:  # noqa: BLE001 - a probe: report and go on to the next row or shape
            text = traceback.format_exc()
            print(f"FAILED {shape} {what}:\n{text}", flush=True)
            record["failures"].append({"shape": shape, "what": what, "traceback": text})
        save()

    for shape in args.shapes.split(","):
        attempt(shape, "shape done (or failed outside a row)",
                lambda shape=shape: probe_shape(shape, args, attempt) or {})
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
