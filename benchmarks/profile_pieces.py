"""Where the fused kernel path's time goes: each stage of `lasp_jax.ops.pieces.forward` and `backward` timed alone
under jit, the whole forward and forward+backward through `lasp_jax.linear_attention`, and the piece scans'
former select formula (a copy kept here only) and two other forms next to the library's matmul.

    python3 -m benchmarks.profile_pieces --out DIR [--impls pallas_mosaic,pallas_triton]
        [--shapes 1x65536x16x128,8x8192x32x128] [--iters 20] [--reps 5] [--copy-mib 2048]
    python3 -m benchmarks.profile_pieces --out DIR --smoke    # CPU: interpreted kernels, tiny shapes

Stages, in the order the driver runs them (constant TNL rates, scale d^-0.5, bf16 unit normals, no initial state
nor end cotangent, so the scans take no boundary state):
    forward   state_sums(K, V), boundary_sum (end), entering, output walk
    backward  state_sums(Q, dO), boundary_sum (start), leaving, gradient walks
Each is its own jitted call on the previous stage's results (computed once, untimed), so the rows add up to the
driver's work without its fusion across stages; "forward (sum)" and "backward (sum)" add them, next to the whole
forward and forward+backward through linear_attention (impl named; the rates an argument of the jitted call, as
in `measure.fwd_and_fwd_bwd`, so no decay is constant-folded). The scans also run in
three other forms, on the same sums, for comparison: "select" (the formula before the matmul: a select over
[B, H, P, P, Dk, Dv] summed over one P axis), "matmul, no routing" (the matmul on the raw sums: what the
non-finite routing costs; not NaN-isolating) and "recurrence" (S_(p+1) = a S_p + m_p unrolled, stacked). Their
rel_err is against the library's scan.

Timing: `measure.median_ms` (back-to-back calls, median of rounds). floor_ms: the bytes a stage must move at the
least (its tensors read and written once; the piece sums [B, H, P, Dk, Dv] float32 count where read or written)
over the device bandwidth `measure.copy_bandwidth_gbs` measured first. Writes profile_pieces.{json,md} under
--out after every (impl, shape), so a run cut off keeps what finished. On an H200 (2026-11-29,
results/profile_pieces_h200_s8.md) the whole run took under 140 s, nearly all of it compiles (each row's
first_call_s: its compile and first run: 38 s together); the timings are milliseconds each. The first shape runs for every impl before the second.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp

import lasp_jax
from benchmarks import measure
from lasp_jax.ops import impls, pieces, states, tnl_slopes

_HIGHEST = jax.lax.Precision.HIGHEST
VERSIONED = ("jax", "jaxlib", "jax-cuda13-plugin")
SMOKE = dict(impls="pallas_mosaic_interpret,pallas_triton_interpret", shapes="1x512x1x64", iters=1, reps=1,
             copy_mib=1)


FORWARD = ("state_sums (K, V)", "boundary_sum (end)", "entering", "output walk")
BACKWARD = ("state_sums (Q, dO)", "boundary_sum (start)", "leaving", "gradient walks")


def _prefix_weights(rates, plan: pieces.Plan):
    """[H, P, P] w[h, r, j] = lambda_h^(L (r - 1 - j)) for j < r, else 0: the constant-rate weights from the end
    of piece j to the start of piece r."""
    return states.prefix_weights(rates, plan.piece_len, plan.pieces, plan.pieces)


def select_scan(sums, rates, plan: pieces.Plan, *, reverse: bool):
    """The piece scans before the matmul (no boundary state): sum_j where(w != 0, w x_j, 0) over
    [B, H, P, P, Dk, Dv], w transposed when reverse."""
    w = _prefix_weights(rates, plan)
    w = (jnp.swapaxes(w, 1, 2) if reverse else w)[None, :, :, :, None, None]
    return jnp.sum(jnp.where(w != 0, w * sums[:, :, None], 0.0), axis=3)


def unrouted_scan(sums, rates, plan: pieces.Plan, *, reverse: bool):
    """The library's matmul on the raw sums, without its routing of the non-finite parts (so a later NaN would
    reach earlier pieces through the zero weights): what the routing costs."""
    b, h, n = sums.shape[:3]
    w = jnp.broadcast_to(_prefix_weights(rates, plan), (b, h, n, n))
    spec = "bhrj,bhrn->bhjn" if reverse else "bhrj,bhjn->bhrn"
    return jnp.einsum(spec, w, sums.reshape(b, h, n, -1), precision=_HIGHEST).reshape(sums.shape)


def recurrence_scan(sums, rates, plan: pieces.Plan, *, reverse: bool):
    """The scan as its recurrence, S_(p+1) = a S_p + m_p (a = lambda^L), unrolled over the pieces and stacked:
    NaN-isolating by construction; as fast as XLA fuses it."""
    a = jnp.exp(-rates * plan.piece_len)[None, :, None, None]
    state, out = jnp.zeros_like(sums[:, :, 0]), [None] * plan.pieces
    for p in reversed(range(plan.pieces)) if reverse else range(plan.pieces):
        out[p] = state
        state = a * state + sums[:, :, p]
    return jnp.stack(out, axis=2)


def profile(impl: str, shape: measure.Shape, args, bandwidth_gbs: float, rows: list[dict]) -> None:
    """Appends the rows of one impl at one shape to rows as they are measured (see the module docstring)."""
    backend = impls.IMPLS[impl]
    b, t, h, d = shape
    q, k, v, do = measure.normal_inputs(shape, args.seed)
    reason = backend.supported(q, k, v)
    if reason is not None:
        raise ValueError(f"impl {impl!r} cannot run {shape} here: {reason}")
    rates = jnp.asarray(tnl_slopes(h))
    scale = d ** -0.5
    plan = backend.plan(q, v)
    qp, kp, vp, dop = (pieces.front_pad(x, plan.pad) for x in (q, k, v, do))  # the stages' inputs
    tensor = q.size * q.dtype.itemsize  # one [B, T, H, D] tensor
    piece_sums = b * h * plan.pieces * d * d * 4
    first = len(rows)

    def time_it(stage, fn, xs, moved, ref=None):
        """Times jit(fn)(*xs) and records it; returns its result."""
        jitted = jax.jit(fn)
        t0 = time.perf_counter()
        out = jax.block_until_ready(jitted(*xs))
        first_call_s = time.perf_counter() - t0  # compile and run
        row = {"impl": impl, "shape": "x".join(map(str, shape)), "pieces": plan.pieces, "stage": stage,
               "ms": measure.median_ms(jitted, xs, args.iters, args.reps), "floor_ms": moved / bandwidth_gbs / 1e6,
               "first_call_s": first_call_s}
        if ref is not None:
            row["rel_err_vs_library"] = measure.rel_err(out, ref)
        rows.append(row)
        print(json.dumps(row), flush=True)
        return out

    def scans(name, sums, reverse):
        """The library's scan and the two comparison forms; returns the library's result."""
        library = pieces.leaving if reverse else pieces.entering
        got = time_it(name, lambda x, s: library(x, None, s, plan), (sums, rates), 2 * piece_sums)
        for label, form in (("select", select_scan), ("matmul, no routing", unrouted_scan),
                            ("recurrence", recurrence_scan)):
            time_it(f"{name} ({label})", lambda x, s, form=form: form(x, s, plan, reverse=reverse), (sums, rates),
                    2 * piece_sums, ref=got)
        return got

    sums = time_it("state_sums (K, V)", lambda k, v, s: backend.state_sums(k, v, s, plan, reverse=False, scale=1.0),
                   (kp, vp, rates), 2 * tensor + piece_sums)
    time_it("boundary_sum (end)", lambda x, s: pieces.boundary_sum(x, s, plan, from_end=True), (sums, rates),
            piece_sums)
    pieces_in = scans("entering", sums, reverse=False)
    time_it("output walk", lambda q, k, v, s, p: backend.output(q, k, v, s, p, plan, scale),
            (qp, kp, vp, rates, pieces_in), 4 * tensor + piece_sums)
    grad_sums = time_it("state_sums (Q, dO)",
                        lambda q, do, s: backend.state_sums(q, do, s, plan, reverse=True, scale=scale),
                        (qp, dop, rates), 2 * tensor + piece_sums)
    time_it("boundary_sum (start)", lambda x, s: pieces.boundary_sum(x, s, plan, from_end=False), (grad_sums, rates),
            piece_sums)
    pieces_out = scans("leaving", grad_sums, reverse=True)
    time_it("gradient walks", lambda q, k, v, do, s, p, g: backend.grads(q, k, v, do, s, p, g, plan, scale),
            (qp, kp, vp, dop, rates, pieces_in, pieces_out), 7 * tensor + 2 * piece_sums)
    for direction, stages in (("forward", FORWARD), ("backward", BACKWARD)):
        parts = [r for r in rows[first:] if r["stage"] in stages]
        rows.append({"impl": impl, "shape": rows[first]["shape"], "pieces": plan.pieces, "stage": f"{direction} (sum)",
                     "ms": sum(r["ms"] for r in parts), "floor_ms": sum(r["floor_ms"] for r in parts)})
        print(json.dumps(rows[-1]), flush=True)

    forward, forward_backward = measure.fwd_and_fwd_bwd(functools.partial(_attend, impl=impl, scale=scale))
    time_it("linear_attention forward", forward, (q, k, v, rates), 4 * tensor)
    time_it("linear_attention forward+backward", forward_backward, (q, k, v, do, rates), 11 * tensor)


def _attend(q, k, v, rates, *, impl, scale):
    return lasp_jax.linear_attention(q, k, v, rates, scale=scale, impl=impl)


def render(meta: dict, rows: list[dict]) -> str:
    """A markdown table: one line per (impl, shape, stage)."""
    lines = [f"# Fused kernel path, stage by stage ({meta['device']})", "",
             f"`{meta['command']}` ({meta['date']}); {meta['timing']}; floor: bytes moved at "
             f"{meta['copy_GBps']:.0f} GB/s (copy bandwidth).", "",
             "| impl | shape | P | stage | ms | floor ms | rel_err vs library |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['impl']} | {r['shape']} | | error: {r['error']} | | | |")
            continue
        err = f"{r['rel_err_vs_library']:.1e}" if "rel_err_vs_library" in r else ""
        lines.append(f"| {r['impl']} | {r['shape']} | {r['pieces']} | {r['stage']} | {r['ms']:.4f} | "
                     f"{r['floor_ms']:.4f} | {err} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impls", default="pallas_mosaic,pallas_triton", help="impls of lasp_jax, comma-separated")
    parser.add_argument("--shapes", default="1x65536x16x128,8x8192x32x128", help="BxTxHxD, comma-separated")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--copy-mib", type=int, default=2048, help="MiB passed over to measure the memory bandwidth")
    parser.add_argument("--smoke", action="store_true",
                        help=f"CPU check: defaults {SMOKE['impls']} at {SMOKE['shapes']}, one call per timing")
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if parser.parse_args(argv).smoke:  # the smoke values replace the defaults; flags given still win
        parser.set_defaults(**SMOKE)
    args = parser.parse_args(argv)
    unknown = sorted(set(args.impls.split(",")) - set(impls.IMPLS))
    if unknown:
        raise SystemExit(f"unknown impls {unknown}: expected some of {sorted(impls.IMPLS)}")
    shapes = measure.parse_shapes(args.shapes)
    os.makedirs(args.out, exist_ok=True)
    bandwidth = measure.copy_bandwidth_gbs(args.copy_mib << 20, args.iters, args.reps)
    meta = {**measure.provenance("benchmarks.profile_pieces", argv, VERSIONED), "device": jax.devices()[0].device_kind,
            "copy_GBps": bandwidth, "timing": f"measure.median_ms, iters={args.iters}, reps={args.reps}"}
    rows = []
    for shape in shapes:  # the first shape's impls first: a run cut short has them side by side
        for impl in args.impls.split(","):
            try:
                profile(impl, shape, args, bandwidth, rows)
            except Exception as e:  # a failing (impl, shape) keeps its rows so far and the others' rows
                rows.append({"impl": impl, "shape": "x".join(map(str, shape)), "error": f"{type(e).__name__}: {e}"})
                print(f"{impl} {shape} failed: {rows[-1]['error']}", flush=True)
            with open(os.path.join(args.out, "profile_pieces.json"), "w") as f:
                json.dump({"meta": meta, "rows": rows}, f, indent=1)
            with open(os.path.join(args.out, "profile_pieces.md"), "w") as f:
                f.write(render(meta, rows))
    return int(any("error" in r for r in rows))


if __name__ == "__main__":
    sys.exit(main())
