"""One GPU: impl "pallas_mosaic" (the Mosaic GPU walks) against "pallas_triton" (the Triton walks), same inputs.

    python3 -m benchmarks.mosaic_probe --out DIR [--shapes 1x65536x16x128,1x16384x16x128] [--iters 20 --reps 7]

Per shape (bf16 unit normals, TNL slopes, scale d^-0.5; T whole pieces of `pallas_triton.plan`, e.g. 8 pieces
of 8K at B=1, H=16, 64K), both impls through the same piece driver (`lasp_jax.ops.pieces`):
  - forward: `Impl.forward` (state pass, piece scan, output walk);
  - gradient walks alone: dQ, dK, dV from the piece states S (entering each piece) and dS (the cotangent leaving
    each piece), as `pieces.backward` launches them (`Backend.grads`);
  - backward: `Impl.backward` (Q, dO state pass, reverse scan, the gradient walks);
each also against the XLA implementation in float32 (an independent check of both). Errors are relative errors
(`benchmarks.measure.rel_err`); times through `benchmarks.measure.median_ms` (back-to-back calls, median of
rounds). Every result is printed as it comes and the JSON (DIR/mosaic_probe.json) rewritten after each, so a
time limit leaves what was measured; a failing compile or run prints its traceback and the probe goes on.
The records in benchmarks/results/mosaic_probe_h200_*.json came from earlier versions of the kernels and probe
(max relative errors then, scale 1): _output_pass (the tree of 6fbe3f7: the output pass alone), _walks
(56265f2: each walk alone), _dkdv (86ebc5c: a fused dK + dV walk, since removed) and _dkdv_split_scores (a
second fused variant whose code was never committed).
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

from benchmarks import measure
from lasp_jax.ops import pallas_mosaic, pallas_triton, pieces, tnl_slopes

IMPLS = {"triton": pallas_triton.KERNELS, "mosaic": pallas_mosaic.WALKS}


def piece_states(q, k, v, do, rates, plan, scale):
    """(S, dS) [B, H, P, Dk, Dv] float32 from zero boundary states, as `pieces.forward` and `backward` build them."""
    kernels = IMPLS["triton"]
    sums = kernels.state_sums(k, v, rates, plan, reverse=False, scale=1.0)
    grads = kernels.state_sums(q, do, rates, plan, reverse=True, scale=scale)
    return pieces.entering(sums, None, rates, plan), pieces.leaving(grads, None, rates, plan)


def probe_shape(shape, args, attempt):
    """Every row of one BxTxHxD shape, each through attempt(shape, what, fn)."""
    b, t, h, d = map(int, shape.split("x"))
    q, k, v, do = measure.normal_inputs((b, t, h, d))
    rates = jnp.asarray(tnl_slopes(h))
    scale = d ** -0.5
    plan = IMPLS["triton"].plan(q, v)
    tensor_bytes = q.size * q.dtype.itemsize
    print(f"== {shape}: {plan}", flush=True)
    if plan.pad:
        print(f"skipped: T={t} is not whole pieces for the Triton plan", flush=True)
        return
    S, dS = jax.block_until_ready(jax.jit(functools.partial(piece_states, plan=plan, scale=scale))(
        q, k, v, do, rates))
    o, grads = measure.fp32_reference(q, k, v, do, rates, scale)
    xla = {"forward": (o,), "backward": grads, "gradient walks": grads}
    triton_out = {}

    passes = {  # name -> (fn(impl), args, [B, T, H, D] tensors it must move at least)
        "forward": (lambda impl: lambda q, k, v: (impl.forward(q, k, v, rates, None, scale)[0],), (q, k, v), 4),
        "gradient walks": (lambda impl: lambda q, k, v, do, S, dS: impl.grads(q, k, v, do, rates, S, dS, plan, scale),
                           (q, k, v, do, S, dS), 7),
        "backward": (lambda impl: lambda q, k, v, do, S: impl.backward(q, k, v, rates, pieces.Saved(S, None), do,
                                                                       None, scale)[:3],
                     (q, k, v, do, S), 7),
    }
    for name, (make, xs, floor_tensors) in passes.items():
        for label, impl in IMPLS.items():
            fn = jax.jit(make(impl))

            def run(fn=fn, name=name, label=label, xs=xs, floor_tensors=floor_tensors):
                got = jax.block_until_ready(fn(*xs))
                out = {"rel_err_vs_xla_f32": max(map(measure.rel_err, got, xla[name]))}
                if label == "triton":
                    triton_out[name] = got
                elif name in triton_out:
                    out["rel_err_vs_triton"] = max(map(measure.rel_err, got, triton_out[name]))
                ms = measure.median_ms(fn, xs, args.iters, args.reps)
                return {**out, "ms": ms, "floor_GBps": floor_tensors * tensor_bytes / ms / 1e6}

            attempt(shape, f"{name}: pallas_{label}", run)


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
        "timing": f"measure.median_ms, iters={args.iters}, reps={args.reps} (median ms per call)",
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
