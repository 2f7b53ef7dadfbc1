"""One GPU: the Mosaic GPU output pass (`lasp_jax.ops.pallas_mosaic`) against the Triton one, same inputs.

    python3 -m benchmarks.mosaic_probe --out DIR [--shapes 1x65536x16x128,1x16384x16x128] [--iters 20 --reps 7]

Per shape (bf16, TNL slopes), with the pieces `pallas_triton._plan` picks for its own launch (8 pieces of 8K at
B=1, H=16, T=64K) and the incoming piece states from its own state pass and piece scan:
  - output pass alone: Triton (`_output_kernel` launched as `pallas_triton.forward` launches it) and each Mosaic
    variant on the same pieces_in; max relative error of Mosaic against Triton (max|a - b| / max|b|);
  - whole forward: `pallas_triton.forward` against its state pass + piece scan + the Mosaic output pass, each
    also against the XLA implementation in float32 (an independent check of both);
  - times through `benchmarks.bench_ops_gpu.time_jax` (back-to-back calls, median of rounds).
Every result is printed as it comes and the JSON (DIR/mosaic_probe.json) rewritten after each, so a time limit
leaves what was measured; a failing compile or run prints its traceback and the probe goes on.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from lasp_jax.ops import pallas_mosaic
from lasp_jax.ops import pallas_triton as pt

VARIANTS = {
    "mosaic 3 stages": pallas_mosaic.DEFAULT,
    "mosaic 2 stages": dataclasses.replace(pallas_mosaic.DEFAULT, stages=2),
    "mosaic 3 stages approx exp": dataclasses.replace(pallas_mosaic.DEFAULT, approx_math=True),
    "mosaic 3 stages scores in registers": dataclasses.replace(pallas_mosaic.DEFAULT, scores_in_registers=True),
}


def triton_output_pass(q, k, v, s, pieces_in, plan, config=pt.DEFAULT):
    """The output-pass launch of `pallas_triton.forward` (Hkv == H, T already whole pieces)."""
    b, _, h, dk = q.shape
    dv, bv = v.shape[-1], plan.block_v
    return pt._call(
        functools.partial(pt._output_kernel, c=plan.chunk, precision=pt._precision(q.dtype)),
        (b, h, plan.pieces, dv // bv),
        [pt._rate_spec(), pt._rows_spec(plan, dk, pt._same, pt._zero), pt._rows_spec(plan, dk, pt._same, pt._zero),
         pt._rows_spec(plan, bv, pt._same, pt._same), pt._state_spec(dk, bv, pt._zero, pt._same)],
        pt._rows_spec(plan, bv, pt._same, pt._same),
        pt._out(q.shape[:3] + (dv,), q.dtype, q),
        config, pt._rates(s), q, k, v, pieces_in)


def pieces_in_of(k, v, s, plan, config=pt.DEFAULT):
    """The state entering each piece [B, H, P, Dk, Dv] float32, as `pallas_triton.forward` builds it (S_in = 0)."""
    sums = pt._piece_sums(k, v, s, plan, config, reverse=False, head=pt._same)
    return pt._prefix(sums, s, plan, plan.pieces)


def mosaic_forward(q, k, v, s, plan, config):
    return pallas_mosaic.output_pass(q, k, v, s, pieces_in_of(k, v, s, plan), plan.piece_len, config)


def probe_shape(shape, args, attempt):
    """Every row of one BxTxHxD shape, each through attempt(shape, what, fn)."""
    b, t, h, d = map(int, shape.split("x"))
    q, k, v, _ = jax_inputs(b, t, h, d)
    s = jnp.asarray(slopes(h))
    plan = pt._plan(q, v, pt.DEFAULT)
    floor_bytes = 4 * q.size * q.dtype.itemsize  # q, k, v read and o written once
    print(f"== {shape}: {plan}", flush=True)
    if plan.pad:
        print(f"skipped: T={t} is not whole pieces for the Triton plan", flush=True)
        return
    pieces_in = jax.block_until_ready(jax.jit(functools.partial(pieces_in_of, plan=plan))(k, v, s))

    def timed(fn, *xs):
        ms = time_jax(fn, xs, args.iters, args.reps)
        return {"ms": ms, "floor_GBps": floor_bytes / ms / 1e6}

    triton_out = jax.jit(functools.partial(triton_output_pass, plan=plan))
    want_out = {}

    def triton_row():
        want_out["o"] = jax.block_until_ready(triton_out(q, k, v, s, pieces_in))
        return timed(triton_out, q, k, v, s, pieces_in)

    attempt(shape, "output pass: triton", triton_row)
    for name, config in VARIANTS.items():
        fn = jax.jit(functools.partial(pallas_mosaic.output_pass, piece_len=plan.piece_len, config=config))

        def mosaic_row(fn=fn):
            got = jax.block_until_ready(fn(q, k, v, s, pieces_in))
            err = max_rel_err(got, want_out["o"]) if "o" in want_out else None
            return {"max_rel_err_vs_triton": err, **timed(fn, q, k, v, s, pieces_in)}

        attempt(shape, f"output pass: {name}", mosaic_row)

    xla = jax.jit(lambda q, k, v: lasp_jax.linear_attention(
        *(x.astype(jnp.float32) for x in (q, k, v)), s, impl="xla"))
    want_fwd = {}

    def xla_row():
        want_fwd["o"] = jax.block_until_ready(xla(q, k, v))
        return {}

    attempt(shape, "forward: xla float32 (reference only, not timed)", xla_row)
    forwards = {"triton": jax.jit(lambda q, k, v: pt.forward(q, k, v, s)[0])}
    forwards.update({f"triton state pass + {name}": jax.jit(functools.partial(
        mosaic_forward, s=s, plan=plan, config=config)) for name, config in VARIANTS.items()})
    for name, fn in forwards.items():
        def forward_row(fn=fn):
            got = jax.block_until_ready(fn(q, k, v))
            err = max_rel_err(got, want_fwd["o"]) if "o" in want_fwd else None
            return {"max_rel_err_vs_xla_f32": err, **timed(fn, q, k, v)}

        attempt(shape, f"forward: {name}", forward_row)


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
        except Exception:  # noqa: BLE001 - a probe: report and go on to the next variant or shape
            text = traceback.format_exc()
            print(f"FAILED {shape} {what}:\n{text}", flush=True)
            record["failures"].append({"shape": shape, "what": what, "traceback": text})
        save()

    for shape in args.shapes.split(","):
        attempt(shape, "shape done (or failed outside a row)", lambda shape=shape: probe_shape(shape, args, attempt) or {})
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
