"""One GPU: the Mosaic GPU walks (`lasp_jax.ops.pallas_mosaic.walk`) against the Triton kernels, same inputs.

    python3 -m benchmarks.mosaic_probe --out DIR [--shapes 1x65536x16x128,1x16384x16x128] [--iters 20 --reps 7]

Per shape (bf16, TNL slopes), on the pieces `pallas_triton._plan` picks (8 pieces of 8K at B=1, H=16, T=64K),
with the piece states S (entering each piece) and dS (the cotangent leaving each piece) from pallas_triton's own
state passes and piece scans:
  - o:      Triton `_output_kernel` (launched as `pallas_triton.forward` launches it) vs walk(Q, K, V, S);
  - dQ:     Triton `_dq_kernel` (as `pallas_triton.backward` launches it) vs walk(dO, V, K, S^T);
  - dK, dV: Triton `_dkdv_kernel`, as `backward` launches it at the default blocks (one launch per gradient,
            64-wide tiles) and fused (one launch over whole states), vs walk(V, dO, Q, dS^T, reverse) and
            walk(K, Q, dO, dS, reverse);
  - whole forward and backward: `pallas_triton.forward` / `backward` vs the same state passes and scans with
    the walks in place of the Triton walks (built here from pallas_triton's helpers), each also against the
    XLA implementation in float32 (an independent check of both).
Errors are max relative errors (max|a - b| / max|b|) of each Mosaic result against the Triton one; times
through `benchmarks.bench_ops_gpu.time_jax` (back-to-back calls, median of rounds). Every result is printed as
it comes and the JSON (DIR/mosaic_probe.json) rewritten after each, so a time limit leaves what was measured;
a failing compile or run prints its traceback and the probe goes on.
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
from lasp_jax.ops import pallas_mosaic
from lasp_jax.ops import pallas_triton as pt

CONFIG = pt.DEFAULT  # the Triton kernels' blocks (forward and backward as pallas_triton runs them)


def _transposed(x):
    return jnp.swapaxes(x, -1, -2)


def triton_output(q, k, v, s, pieces_in, plan):
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
        CONFIG, pt._rates(s), q, k, v, pieces_in)


def triton_dq(do, k, v, s, pieces_in, plan):
    """The dQ launch of `pallas_triton.backward` (Hkv == H)."""
    b, _, h, dk = k.shape
    dv, bk = v.shape[-1], plan.block_k
    return pt._call(
        functools.partial(pt._dq_kernel, c=plan.chunk, precision=pt._precision(k.dtype)), (b, h, plan.pieces, dk // bk),
        [pt._rate_spec(), pt._rows_spec(plan, dv, pt._same, pt._zero), pt._rows_spec(plan, bk, pt._same, pt._same),
         pt._rows_spec(plan, dv, pt._same, pt._zero), pt._state_spec(bk, dv, pt._same, pt._zero)],
        pt._rows_spec(plan, bk, pt._same, pt._same),
        pt._out(k.shape, k.dtype, k),
        CONFIG, pt._rates(s), do, k, v, pieces_in)


def triton_dkdv(q, k, v, do, s, pieces_out, plan, fused):
    """dK, dV by `_dkdv_kernel`: fused (one launch over whole states) or one launch each over the plan's
    tiles, as `pallas_triton.backward` launches them (Hkv == H)."""
    b, _, h, dk = q.shape
    dv, bk, bv, pieces = v.shape[-1], plan.block_k, plan.block_v, plan.pieces
    kernel = functools.partial(pt._dkdv_kernel, c=plan.chunk, precision=pt._precision(q.dtype))
    rows, state = pt._rows_spec, pt._state_spec
    same, zero = pt._same, pt._zero
    dk_shape, dv_shape = pt._out(q.shape, k.dtype, q), pt._out(q.shape[:3] + (dv,), v.dtype, q)
    if fused:
        return pt._call(
            functools.partial(kernel, with_dk=True, with_dv=True), (b, h, pieces, 1),
            [pt._rate_spec(), rows(plan, dk, same, zero), rows(plan, dk, same, zero), rows(plan, dv, same, zero),
             rows(plan, dv, same, zero), state(dk, dv, zero, zero)],
            [rows(plan, dk, same, zero), rows(plan, dv, same, zero)], [dk_shape, dv_shape],
            CONFIG, pt._rates(s), q, k, v, do, pieces_out)
    dk_ = pt._call(
        functools.partial(kernel, with_dk=True, with_dv=False), (b, h, pieces, dk // bk),
        [pt._rate_spec(), rows(plan, bk, same, same), rows(plan, dv, same, zero), rows(plan, dv, same, zero),
         state(bk, dv, same, zero)],
        rows(plan, bk, same, same), dk_shape,
        CONFIG, pt._rates(s), q, v, do, pieces_out)
    dv_ = pt._call(
        functools.partial(kernel, with_dk=False, with_dv=True), (b, h, pieces, dv // bv),
        [pt._rate_spec(), rows(plan, dk, same, zero), rows(plan, dk, same, zero), rows(plan, bv, same, same),
         state(dk, bv, zero, same)],
        rows(plan, bv, same, same), dv_shape,
        CONFIG, pt._rates(s), q, k, do, pieces_out)
    return dk_, dv_


def pieces_in_of(k, v, s, plan):
    """The state entering each piece [B, H, P, Dk, Dv] float32, as `pallas_triton.forward` builds it (S_in = 0)."""
    sums = pt._piece_sums(k, v, s, plan, CONFIG, reverse=False, head=pt._same)
    return pt._prefix(sums, s, plan, plan.pieces)


def pieces_out_of(q, do, s, plan):
    """The cotangent leaving each piece [B, H, P, Dk, Dv] float32, as `pallas_triton.backward` builds it (G = 0)."""
    sums = pt._piece_sums(q, do, s, plan, CONFIG, reverse=True, head=pt._same)
    return pt._suffix(sums, s, plan)


def walk_grads(q, k, v, do, s, pieces_in, pieces_out, plan, config):
    """dQ, dK, dV as three walks."""
    walk = functools.partial(pallas_mosaic.walk, s=s, piece_len=plan.piece_len, config=config)
    dq = walk(do, v, k, states_in=_transposed(pieces_in), reverse=False)
    dk = walk(v, do, q, states_in=_transposed(pieces_out), reverse=True)
    dv = walk(k, q, do, states_in=pieces_out, reverse=True)
    return dq, dk, dv


def mosaic_forward(q, k, v, s, plan, config):
    """`pallas_triton.forward`'s o (S_in = 0, whole pieces) with the output walk."""
    return pallas_mosaic.walk(q, k, v, s, pieces_in_of(k, v, s, plan), plan.piece_len, reverse=False, config=config)


def mosaic_backward(q, k, v, s, pieces_in, do, plan, config):
    """`pallas_triton.backward` (G = 0, whole pieces) with the three walks."""
    return walk_grads(q, k, v, do, s, pieces_in, pieces_out_of(q, do, s, plan), plan, config)


def probe_shape(shape, args, attempt):
    """Every row of one BxTxHxD shape, each through attempt(shape, what, fn)."""
    b, t, h, d = map(int, shape.split("x"))
    q, k, v, do = jax_inputs(b, t, h, d)
    s = jnp.asarray(slopes(h))
    plan = pt._plan(q, v, CONFIG)
    tensor_bytes = q.size * q.dtype.itemsize
    print(f"== {shape}: {plan}", flush=True)
    if plan.pad:
        print(f"skipped: T={t} is not whole pieces for the Triton plan", flush=True)
        return
    config = pallas_mosaic.DEFAULT
    pieces_in = jax.block_until_ready(jax.jit(functools.partial(pieces_in_of, plan=plan))(k, v, s))
    pieces_out = jax.block_until_ready(jax.jit(functools.partial(pieces_out_of, plan=plan))(q, do, s))
    walk = functools.partial(pallas_mosaic.walk, s=s, piece_len=plan.piece_len, config=config)
    want = {}

    def row(key, fn, xs, floor_tensors, reference=None):
        """Runs jitted fn on xs: its time, and its error against want[reference] (or stores want[key])."""
        def run():
            got = jax.block_until_ready(fn(*xs))
            out = {}
            if reference is None:
                want[key] = got
            elif reference in want:
                out["max_rel_err_vs_triton"] = max_rel_err(got, want[reference])
            ms = time_jax(fn, xs, args.iters, args.reps)
            return {**out, "ms": ms, "floor_GBps": floor_tensors * tensor_bytes / ms / 1e6}
        return run

    # Walks alone. floor_tensors: the [B, T, H, D] tensors each must read or write at least once.
    attempt(shape, "o: triton _output_kernel",
            row("o", jax.jit(functools.partial(triton_output, plan=plan)), (q, k, v, s, pieces_in), 4))
    attempt(shape, "o: mosaic walk(q, k, v, S)",
            row("o", jax.jit(lambda q, k, v, S: walk(q, k, v, states_in=S, reverse=False)), (q, k, v, pieces_in), 4,
                reference="o"))
    attempt(shape, "dq: triton _dq_kernel",
            row("dq", jax.jit(functools.partial(triton_dq, plan=plan)), (do, k, v, s, pieces_in), 4))
    attempt(shape, "dq: mosaic walk(do, v, k, S^T)",
            row("dq", jax.jit(lambda do, v, k, S: walk(do, v, k, states_in=_transposed(S), reverse=False)),
                (do, v, k, pieces_in), 4, reference="dq"))
    for fused in (False, True):
        name = "fused, whole states" if fused else "dK and dV launches, default tiles"
        attempt(shape, f"dk, dv: triton _dkdv_kernel ({name})",
                row("dkdv" if not fused else "dkdv fused",
                    jax.jit(functools.partial(triton_dkdv, plan=plan, fused=fused)), (q, k, v, do, s, pieces_out), 6))
    attempt(shape, "dk, dv: mosaic two reverse walks",
            row("dkdv", jax.jit(lambda q, k, v, do, G: (walk(v, do, q, states_in=_transposed(G), reverse=True),
                                                         walk(k, q, do, states_in=G, reverse=True))),
                (q, k, v, do, pieces_out), 6, reference="dkdv"))

    # Whole passes, with the XLA float32 implementation as an independent reference.
    def xla_row():
        f32 = [x.astype(jnp.float32) for x in (q, k, v)]
        o, vjp = jax.vjp(lambda q, k, v: lasp_jax.linear_attention(q, k, v, s, impl="xla"), *f32)
        want["xla"] = jax.block_until_ready((o, *vjp(do.astype(jnp.float32))))
        return {}

    attempt(shape, "xla float32 forward and backward (reference only, not timed)", xla_row)

    def whole(what, fn, xs, slot, floor_tensors, vs_triton):
        def run():
            got = jax.block_until_ready(fn(*xs))
            out = {}
            if "xla" in want:
                ref = want["xla"][:1] if slot == "fwd" else want["xla"][1:]
                out["max_rel_err_vs_xla_f32"] = max_rel_err(got, ref)
            if vs_triton:
                out["max_rel_err_vs_triton"] = max_rel_err(got, want[slot]) if slot in want else None
            else:
                want[slot] = got
            ms = time_jax(fn, xs, args.iters, args.reps)
            return {**out, "ms": ms, "floor_GBps": floor_tensors * tensor_bytes / ms / 1e6}
        attempt(shape, what, run)

    whole("forward: pallas_triton.forward", jax.jit(lambda q, k, v: (pt.forward(q, k, v, s, None, CONFIG)[0],)),
          (q, k, v), "fwd", 4, vs_triton=False)
    whole("forward: triton state pass + mosaic walk",
          jax.jit(lambda q, k, v: (mosaic_forward(q, k, v, s, plan, config),)), (q, k, v), "fwd", 4, vs_triton=True)
    whole("backward: pallas_triton.backward",
          jax.jit(lambda q, k, v, S, do: pt.backward(q, k, v, s, (S, None), do, None, CONFIG)[:3]),
          (q, k, v, pieces_in, do), "bwd", 7, vs_triton=False)
    whole("backward: triton state pass + three mosaic walks",
          jax.jit(lambda q, k, v, S, do: mosaic_backward(q, k, v, s, S, do, plan, config)),
          (q, k, v, pieces_in, do), "bwd", 7, vs_triton=True)


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
        attempt(shape, "shape done (or failed outside a row)", lambda shape=shape: probe_shape(shape, args, attempt) or {})
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
