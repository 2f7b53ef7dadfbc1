"""Where the fused kernel path's time goes: each stage of `lasp_jax.ops.pieces.forward` and `backward` (constant
decay) and of `pieces_tokens.forward` and `backward` (per-token decay) timed alone under jit, the whole forward and
forward+backward through `lasp_jax.linear_attention`, and three XLA forms of the piece scans (the former select
formula, a matmul without non-finite routing, the unrolled recurrence: kept here only) next to the library's
scan kernel.

    python3 -m benchmarks.profile_pieces --out DIR [--impls pallas_mosaic,pallas_triton]
        [--shapes 1x65536x16x128,8x8192x32x128] [--iters 20] [--reps 5] [--copy-mib 2048]
        [--decays constant,tokens,tokens/16]
    python3 -m benchmarks.profile_pieces --out DIR --smoke    # CPU: interpreted kernels, tiny shapes, both decays

Constant stages, in the order the driver runs them (constant TNL rates, scale d^-0.5, bf16 unit normals, no
initial state nor end cotangent, so the scans take no boundary state):
    forward   state_sums(K, V), entering (pieces.from_zero: the scan kernel, which also gives m), output walk
    backward  state_sums(Q, dO), leaving (pieces.from_zero reverse, which also gives d), gradient walks
Each is its own jitted call on the previous stage's results (computed once, untimed), so the rows add up to the
driver's work without its fusion across stages; "forward (sum)" and "backward (sum)" add them, next to the whole
forward and forward+backward through linear_attention (impl named; the rates an argument of the jitted call, as
in `measure.fwd_and_fwd_bwd`, so no decay is constant-folded). The scans also run in
three XLA forms, on the same sums, for comparison: "select" (the first library form: a select over
[B, H, P, P, Dk, Dv] summed over one P axis), "matmul, no routing" (the [P, P] matmul at full float32
precision of the second library form, without its routing of the non-finite parts: not NaN-isolating) and
"recurrence" (S_(p+1) = a S_p + m_p unrolled, stacked). Their rel_err is against the library's scan.

Per-token stages (`--decays tokens` or tokens/N: rates uniform in [0.001, 0.1] per (b, t, h) and N packed
documents per row, `measure.decay_inputs`; the same inputs otherwise; rows in a table of their own):
    forward   tables (pieces_tokens.tables from the rates and starts: chunk tables, to_end, log decays),
              state_sums_tokens (K, V; to_end weights), entering (the scan kernel, with m), output_tokens walk
    backward  tables (from_start in place of to_end), state_sums_tokens (Q, dO; scale from_start), leaving (the
              scan kernel, with d and the crossing terms' dots against the entering states), grads_tokens walks,
              decay gradient (pieces_tokens.decay_gradient: the rest of pieces_tokens.backward after
              grads_tokens, the piece suffix sums and selects; crossing_terms is the dots themselves without G)
and the whole forward and forward+backward with the rates differentiated, whose row carries each result's
relative error against an fp32 XLA run of the same inputs (`measure.fp32_reference`; ds the rates' gradient).
The per-token stages cut the backend's own plan (`backend.plan(q, v)`, as pieces_tokens.forward does; P in
each row).

Timing: `measure.median_ms` (back-to-back calls, median of rounds). floor_ms: the bytes a stage must move at the
least (its tensors read and written once; the piece sums [B, H, P, Dk, Dv] float32 count where read or written;
per-token: the [B, H, T] float32 tables and rates, and the [B, T] counts and starts, where read or written)
over the device bandwidth `measure.copy_bandwidth_gbs` measured first. Writes profile_pieces.{json,md} under
--out after every (impl, shape, decay), so a run cut off keeps what finished. On an H200 (2026-11-29,
results/profile_pieces_h200_s8.md) the constant run took under 140 s, nearly all of it compiles (each row's
first_call_s: its compile and first run: 38 s together); the timings are milliseconds each. The per-token rows
(2026-11-30, results/profile_pieces_h200_s9_tokens.md and _scan.md, at pieces of at most 512 positions, the
per-token path's cut then) took about a minute per (impl, shape) and piece length. The first shape runs for every
impl before the second.
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
from lasp_jax.ops import impls, pieces, pieces_tokens, states, tnl_slopes, vjp

_HIGHEST = jax.lax.Precision.HIGHEST
VERSIONED = ("jax", "jaxlib", "jax-cuda13-plugin")
SMOKE = dict(impls="pallas_mosaic_interpret,pallas_triton_interpret", shapes="1x512x1x64", iters=1, reps=1,
             copy_mib=1, decays="constant,tokens/2")


FORWARD = ("state_sums (K, V)", "entering", "output walk")
BACKWARD = ("state_sums (Q, dO)", "leaving", "gradient walks")
FORWARD_TOKENS = ("tables (forward)", "state_sums_tokens (K, V)", "entering", "output_tokens walk")
BACKWARD_TOKENS = ("tables (backward)", "state_sums_tokens (Q, dO)", "leaving", "grads_tokens walks",
                   "decay gradient")


def _prefix_weights(rates, plan: pieces.Plan):
    """[H, P, P] w[h, r, j] = lambda_h^(L (r - 1 - j)) for j < r, else 0: the constant-rate weights from the end
    of piece j to the start of piece r."""
    return states.prefix_weights(rates, plan.piece_len, plan.pieces, plan.pieces)


def select_scan(sums, rates, plan: pieces.Plan, *, reverse: bool):
    """The first library form of the piece scans (no boundary state): sum_j where(w != 0, w x_j, 0) over
    [B, H, P, P, Dk, Dv], w transposed when reverse."""
    w = _prefix_weights(rates, plan)
    w = (jnp.swapaxes(w, 1, 2) if reverse else w)[None, :, :, :, None, None]
    return jnp.sum(jnp.where(w != 0, w * sums[:, :, None], 0.0), axis=3)


def unrouted_scan(sums, rates, plan: pieces.Plan, *, reverse: bool):
    """The scans as one [P, P] matmul at full float32 precision on the raw sums (the library's form before the
    scan kernel, less its routing of the non-finite parts: a later NaN would reach earlier pieces through the
    zero weights)."""
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


def _backend_and_inputs(impl: str, shape: measure.Shape, seed: int, *, per_token: bool):
    """(the impl's backend, its q, k, v, dO: measure.normal_inputs); ValueError where the impl cannot run them
    here (with per-token decay: its token variant)."""
    backend = impls.IMPLS[impl]
    q, k, v, do = measure.normal_inputs(shape, seed)
    reason = (backend.supported_tokens if per_token else backend.supported)(q, k, v)
    if reason is not None:
        raise ValueError(f"impl {impl!r} cannot run {shape}{' with per-token decay' if per_token else ''} here: "
                         f"{reason}")
    return backend, (q, k, v, do)


def profile(impl: str, shape: measure.Shape, args, bandwidth_gbs: float, rows: list[dict]) -> None:
    """Appends the rows of one impl at one shape to rows as they are measured (see the module docstring)."""
    backend, (q, k, v, do) = _backend_and_inputs(impl, shape, args.seed, per_token=False)
    b, t, h, d = shape
    rates = jnp.asarray(tnl_slopes(h))
    scale = d ** -0.5
    plan = backend.plan(q, v)
    qp, kp, vp, dop = (pieces.front_pad(x, plan.pad) for x in (q, k, v, do))  # the stages' inputs
    tensor = q.size * q.dtype.itemsize  # one [B, T, H, D] tensor
    piece_sums = b * h * plan.pieces * d * d * 4
    first = len(rows)

    base = {"impl": impl, "shape": "x".join(map(str, shape)), "pieces": plan.pieces}
    time_it = _timer(rows, base, args, bandwidth_gbs)

    def scans(name, sums, reverse):
        """The library's scan (pieces.from_zero: the kernel, its boundary sum too) and the three XLA forms;
        returns the library's per-piece result."""
        got, _ = time_it(name, lambda x, s: pieces.from_zero(x, s, plan, reverse=reverse,
                                                             interpret=backend.interpret),
                         (sums, rates), 2 * piece_sums)
        for label, form in (("select", select_scan), ("matmul, no routing", unrouted_scan),
                            ("recurrence", recurrence_scan)):
            time_it(f"{name} ({label})", lambda x, s, form=form: form(x, s, plan, reverse=reverse), (sums, rates),
                    2 * piece_sums, check=lambda out: {"rel_err_vs_library": measure.rel_err(out, got)})
        return got

    sums = time_it("state_sums (K, V)", lambda k, v, s: backend.state_sums(k, v, s, plan, reverse=False, scale=1.0),
                   (kp, vp, rates), 2 * tensor + piece_sums)
    pieces_in = scans("entering", sums, reverse=False)
    time_it("output walk", lambda q, k, v, s, p: backend.output(q, k, v, s, p, plan, scale),
            (qp, kp, vp, rates, pieces_in), 4 * tensor + piece_sums)
    grad_sums = time_it("state_sums (Q, dO)",
                        lambda q, do, s: backend.state_sums(q, do, s, plan, reverse=True, scale=scale),
                        (qp, dop, rates), 2 * tensor + piece_sums)
    pieces_out = scans("leaving", grad_sums, reverse=True)
    time_it("gradient walks", lambda q, k, v, do, s, p, g: backend.grads(q, k, v, do, s, p, g, plan, scale),
            (qp, kp, vp, dop, rates, pieces_in, pieces_out), 7 * tensor + 2 * piece_sums)
    _add_sums(rows, first, base, FORWARD, BACKWARD)

    forward, forward_backward = measure.fwd_and_fwd_bwd(functools.partial(_attend, impl=impl, scale=scale))
    time_it("linear_attention forward", forward, (q, k, v, rates), 4 * tensor)
    time_it("linear_attention forward+backward", forward_backward, (q, k, v, do, rates), 11 * tensor)


def _timer(rows: list[dict], base: dict, args, bandwidth_gbs: float):
    """time_it(stage, fn, xs, moved, check=None): times jit(fn)(*xs) by measure.median_ms, appends the row (base,
    the stage, ms, floor_ms of `moved` bytes, first_call_s, and check(result)'s entries) and returns the result."""

    def time_it(stage, fn, xs, moved, check=None):
        jitted = jax.jit(fn)
        t0 = time.perf_counter()
        out = jax.block_until_ready(jitted(*xs))
        first_call_s = time.perf_counter() - t0  # compile and run
        row = {**base, "stage": stage, "ms": measure.median_ms(jitted, xs, args.iters, args.reps),
               "floor_ms": moved / bandwidth_gbs / 1e6, "first_call_s": first_call_s}
        if check is not None:
            row.update(check(out))
        rows.append(row)
        print(json.dumps(row), flush=True)
        return out

    return time_it


def _add_sums(rows: list[dict], first: int, base: dict, forward: tuple[str, ...], backward: tuple[str, ...]) -> None:
    """Appends "forward (sum)" and "backward (sum)" of the stages named in forward and backward among rows[first:]."""
    for direction, stages in (("forward", forward), ("backward", backward)):
        parts = [r for r in rows[first:] if r["stage"] in stages]
        rows.append({**base, "stage": f"{direction} (sum)", "ms": sum(r["ms"] for r in parts),
                     "floor_ms": sum(r["floor_ms"] for r in parts)})
        print(json.dumps(rows[-1]), flush=True)


def _attend(q, k, v, rates, *, impl, scale):
    return lasp_jax.linear_attention(q, k, v, rates, scale=scale, impl=impl)


def profile_tokens(impl: str, shape: measure.Shape, mode: str, args, bandwidth_gbs: float, rows: list[dict],
                   reference) -> None:
    """Appends the per-token rows of one impl at one shape and decay mode (measure.decay_inputs: "tokens" or
    "tokens/N") to rows as they are measured (the module docstring).
    reference: measure.fp32_reference's (o, (dq, dk, dv, ds)) for these inputs."""
    backend, (q, k, v, do) = _backend_and_inputs(impl, shape, args.seed, per_token=True)
    b, t, h, d = shape
    rates, ids = measure.decay_inputs(shape, mode, args.seed)
    rates, ids = jnp.asarray(rates), None if ids is None else jnp.asarray(ids)
    tok = vjp._piece_tokens(rates, ids, None)  # the TokenDecay linear_attention builds
    scale = d ** -0.5
    plan = backend.plan(q, v)
    qp, kp, vp, dop = (pieces.front_pad(x, plan.pad) for x in (q, k, v, do))
    starts = pieces_tokens._padded(tok, plan)[1]
    tensor = q.size * q.dtype.itemsize  # one [B, T, H, D] tensor
    table = b * h * (t + plan.pad) * 4  # one [B, H, T] float32 table
    per_position = b * (t + plan.pad) * 5  # counts (int32) and starts (bool)
    piece_sums = b * h * plan.pieces * d * d * 4
    first = len(rows)
    base = {"impl": impl, "shape": "x".join(map(str, shape)), "decay": mode, "pieces": plan.pieces}
    time_it = _timer(rows, base, args, bandwidth_gbs)

    def stage_tables(weights_of):  # the chunk tables and one direction's piece weights, as the driver's
        def fn(tok):
            chunk, weights = pieces_tokens.tables(*pieces_tokens._padded(tok, plan), plan)
            return chunk, weights_of(weights), weights.log_decay
        return fn

    # rates read; cum, q_side, k_side and the weights written; the starts read and the counts written
    tables_moved = 5 * table + per_position + b * h * plan.pieces * 4
    chunk, to_end, log_decay = time_it("tables (forward)", stage_tables(lambda w: w.to_end), (tok,), tables_moved)
    sums = time_it("state_sums_tokens (K, V)", lambda k, v, w: backend.state_sums_tokens(k, v, w, plan),
                   (kp, vp, to_end), 2 * tensor + table + piece_sums)
    scan = functools.partial(pieces.from_zero, plan=plan, interpret=backend.interpret)
    pieces_in, _ = time_it("entering", lambda x, a: scan(x, a, reverse=False), (sums, log_decay), 2 * piece_sums)
    walk_tables = 3 * table + per_position
    time_it("output_tokens walk", lambda q, k, v, c, p: backend.output_tokens(q, k, v, c, p, plan, scale),
            (qp, kp, vp, chunk, pieces_in), 4 * tensor + piece_sums + walk_tables)

    _, from_start, _ = time_it("tables (backward)", stage_tables(lambda w: w.from_start), (tok,), tables_moved)
    grad_sums = time_it("state_sums_tokens (Q, dO)", lambda q, do, w: backend.state_sums_tokens(q, do, scale * w, plan),
                        (qp, dop, from_start), 2 * tensor + table + piece_sums)
    pieces_out, _, dots = time_it("leaving", lambda x, a, s: scan(x, a, reverse=True, against=s),
                                  (grad_sums, log_decay, pieces_in), 3 * piece_sums)
    _, _, _, x = time_it(
        "grads_tokens walks",
        lambda q, k, v, do, c, p, g: backend.grads_tokens(q, k, v, do, c, p, g, plan, scale),
        (qp, kp, vp, dop, chunk, pieces_in, pieces_out), 7 * tensor + 2 * piece_sums + walk_tables + table)
    time_it("decay gradient", lambda x, tok, s, c, d: pieces_tokens.decay_gradient(x, tok, s, c, d, plan),
            (x, tok, starts, chunk.counts, dots), 2 * table + per_position)
    _add_sums(rows, first, base, FORWARD_TOKENS, BACKWARD_TOKENS)

    attend = functools.partial(_attend_tokens, impl=impl, scale=scale)
    forward, forward_backward = measure.fwd_and_fwd_bwd(attend, grad_operands=1)
    ids_moved = 0 if ids is None else b * t * 4
    time_it("linear_attention forward", forward, (q, k, v, rates, ids), 4 * tensor + table + ids_moved)
    time_it("linear_attention forward+backward", forward_backward, (q, k, v, do, rates, ids),
            11 * tensor + 2 * table + ids_moved,
            check=lambda out: {f"{name}_rel_err_vs_fp32": err
                               for name, err in measure.errors(out, reference).items()})


def _attend_tokens(q, k, v, rates, ids, *, impl, scale):
    return lasp_jax.linear_attention(q, k, v, rates, segment_ids=ids, scale=scale, impl=impl)


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


def render_tokens(rows: list[dict]) -> str:
    """The per-token rows (those with a "decay") as a markdown table: one line per (impl, shape, decay, stage);
    errors of the whole forward+backward against the fp32 XLA run."""
    lines = ["", "## Per-token decay", "",
             "Rates uniform in [0.001, 0.1] per (b, t, h), differentiated (`measure.decay_inputs`); P: the backend's "
             "plan; errors ||x - ref|| / ||ref|| of the whole forward+backward against an fp32 XLA run "
             "(`measure.fp32_reference`).", "",
             "| impl | shape | decay | P | stage | ms | floor ms | ds rel_err | max rel_err (o, dq, dk, dv, ds) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['impl']} | {r['shape']} | {r['decay']} |"
        if "error" in r:
            lines.append(f"{head} | error: {r['error']} | | | | |")
            continue
        ds = f"{r['ds_rel_err_vs_fp32']:.1e}" if "ds_rel_err_vs_fp32" in r else ""
        worst = f"{r['max_rel_err_vs_fp32']:.1e}" if "max_rel_err_vs_fp32" in r else ""
        lines.append(f"{head} {r['pieces']} | {r['stage']} | {r['ms']:.4f} | {r['floor_ms']:.4f} | {ds} | {worst} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impls", default="pallas_mosaic,pallas_triton", help="impls of lasp_jax, comma-separated")
    parser.add_argument("--shapes", default="1x65536x16x128,8x8192x32x128", help="BxTxHxD, comma-separated")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--copy-mib", type=int, default=2048, help="MiB passed over to measure the memory bandwidth")
    parser.add_argument("--decays", default="constant",
                        help="of constant (TNL slopes: the stages of pieces), tokens and tokens/N (per-token rates, "
                             "N packed documents per row: the stages of pieces_tokens), comma-separated")
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
    decays = measure.parse_decays(args.decays)
    os.makedirs(args.out, exist_ok=True)
    bandwidth = measure.copy_bandwidth_gbs(args.copy_mib << 20, args.iters, args.reps)
    meta = {**measure.provenance("benchmarks.profile_pieces", argv, VERSIONED), "device": jax.devices()[0].device_kind,
            "copy_GBps": bandwidth, "timing": f"measure.median_ms, iters={args.iters}, reps={args.reps}"}
    rows = []

    def save():
        with open(os.path.join(args.out, "profile_pieces.json"), "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        constant = [r for r in rows if "decay" not in r]
        tokens = [r for r in rows if "decay" in r]
        with open(os.path.join(args.out, "profile_pieces.md"), "w") as f:
            f.write(render(meta, constant) + (render_tokens(tokens) if tokens else ""))

    for shape in shapes:  # the first shape's impls first: a run cut short has them side by side
        references = {}  # decay mode -> the fp32 run of this shape's inputs, shared by the impls
        for impl in args.impls.split(","):
            for mode in decays:
                about = {"impl": impl, "shape": "x".join(map(str, shape))}
                try:
                    if mode == "constant":
                        profile(impl, shape, args, bandwidth, rows)
                    else:
                        about["decay"] = mode
                        if mode not in references:
                            references[mode] = _token_reference(shape, mode, args.seed)
                        profile_tokens(impl, shape, mode, args, bandwidth, rows, references[mode])
                except Exception as e:  # a failing row set keeps its rows so far and the others' rows
                    rows.append({**about, "error": f"{type(e).__name__}: {e}"})
                    print(f"{impl} {shape} {mode} failed: {rows[-1]['error']}", flush=True)
                save()
    return int(any("error" in r for r in rows))


def _token_reference(shape: measure.Shape, mode: str, seed: int):
    """measure.fp32_reference of the inputs profile_tokens draws for (shape, mode, seed): (o, (dq, dk, dv, ds))."""
    q, k, v, do = measure.normal_inputs(shape, seed)
    rates, ids = measure.decay_inputs(shape, mode, seed)
    return measure.fp32_reference(q, k, v, do, rates, shape[3] ** -0.5, ids)


if __name__ == "__main__":
    sys.exit(main())
