"""One GPU, side by side: Mamba-2's SSD core (one layer's forward and forward+backward) in lasp_jax against jla's
Mamba-2 SSD op and fla's chunk_simple_gla, at the 1.3B layer's grouped shape by default.

    python3 -m benchmarks.ssd_peers_gpu [--batch 1] [--t 65536] [--heads 64] [--groups 1] [--dk 128] [--dv 64]
        [--docs 16] [--impls auto] [--peers jla,fla] [--jla-impl auto] [--iters 10] [--reps 5] [--seed 0]
        [--out DIR]

Why: issue 16 wants Mamba-2 1.3B training speed shown side by side with the peers; walks_gpu times our SSD core
alone and bench_ops_gpu compares the ops with as many query heads as value heads, not Mamba-2's G groups of
q = C and k = B shared by H value heads (N = Dk != P = Dv).

Isolation: every contender group runs in a process of its own, one after another (each lasp_jax impl, jla, fla),
through measure.run_workers; this process only starts them and merges their rows into one table.

Inputs, the same bits in every process (JAX draws them from one seed; the torch process copies them): q = C and
k = B [B, T, G, N], v = dt x and dO [B, T, H, P], bf16 unit normals (measure.normal_inputs); per-token rates
dt a [B, T, H] float32 uniform in [0.001, 0.1] and --docs documents per row at random starts
(measure.decay_inputs); scale 1 (Mamba-2's). Each contender takes them in its own form (`FORMS`):
  ours  lasp_jax.linear_attention(q, k, v, rates, segment_ids=, impl) as models/mamba2.py calls it (impl "auto":
        the row's `resolved` names what it picked; the Mosaic walks on an H200); the groups are read in place.
  jla   jla.layers.mamba2_fused.ssd_core(v, g, b=k, c=q, segment_ids=, impl, chunk_size=64,
        grouped_key_grads=True): the SSD call of its Mamba-2 layer in training (SSMConfig's defaults). Its
        log-gate g = -rates is formed inside the jitted call. On Hopper it runs the Mosaic GPU simple GLA on the
        groups (jla.ops.mosaic_gpu.scalar_gate.run; dB, dC summed over a group's heads in its kernel); elsewhere
        (CPU: impl auto = chunked) it repeats B, C per head in float32 inside the call. The row's `path` says
        which, from the custom calls in its compiled forward.
  fla   fla.ops.simple_gla.chunk_simple_gla(q, k, v, g=, scale=1, cu_seqlens=): it has no grouped form, so q
        and k are repeated to H heads inside the timed call (expand + reshape; the backward's sum over a
        group's heads accumulates in float32); g = -rates is an fp32 leaf formed outside the timing; the
        documents as cu_seqlens (and their CPU copy: no device sync), batch 1 only.
Every contender differentiates the rates (through its log-gate where it takes one): d_rates = -dg.

Timing and errors as bench_ops_gpu's: JAX contenders by measure.median_ms (--iters back-to-back calls, median of
--reps rounds), fla by triton.testing.do_bench (median); forward+backward returns o and the cotangents of q, k, v
and the rates for a given dO. Errors: measure.errors of o, dq, dk, dv, d_rates against measure.fp32_reference
(chunked XLA on the fp32-upcast inputs, HIGHEST precision), compiled once for all workers (their shared cache).
Writes ssd_peers_gpu.{json,md} under --out after every worker (a run cut off keeps what finished).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # the torch peer shares the GPU

import jax
import jax.numpy as jnp
import numpy as np

import lasp_jax
from benchmarks import bench_ops_gpu, measure
from lasp_jax.ops import impls

DIMS = {"batch": 1, "t": 65536, "heads": 64, "groups": 1, "dk": 128, "dv": 64, "docs": 16}  # the 1.3B layer's
PEERS = ("jla", "fla")
VERSIONED = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-linear-attention", "fla-core", "torch", "triton")
OURS = "lasp_jax "  # prefix of our contenders' names
JLA = "jla mamba2_fused.ssd_core"
FLA = "fla chunk_simple_gla"
CHUNK = 64  # jla's SSMConfig.chunk_size default (the chunk its Mosaic kernels require)
FORMS = {
    OURS: "q = C, k = B grouped; decay = rates; segment_ids",
    JLA: "c = q, b = k grouped; g = -rates in the jitted call; segment_ids; grouped_key_grads",
    FLA: "q, k repeated to H heads in the timed call; g = -rates (fp32 leaf); cu_seqlens",
}
ISOLATION = ("every contender group ran in a process of its own, one after another (each lasp_jax impl, jla, "
             "fla); inputs drawn by JAX from one seed in each")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in DIMS.items():
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--impls", default="auto", help="lasp_jax impls, comma-separated")
    parser.add_argument("--peers", default=",".join(PEERS), help=f"any of {','.join(PEERS)}, comma-separated")
    parser.add_argument("--jla-impl", default="auto", choices=("auto", "mosaic_gpu", "chunked"),
                        help="jla's impl (auto: its Mosaic GPU kernels on Hopper, chunked elsewhere)")
    measure.add_worker_flags(parser)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in (*DIMS, "iters", "reps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if args.heads % args.groups:
        parser.error(f"--heads {args.heads} is not a multiple of --groups {args.groups} (each value head reads "
                     "one group of q = C and k = B)")
    if args.docs > args.t:
        parser.error(f"--docs {args.docs} is more documents than --t {args.t} tokens")
    measure.check_worker_flags(parser, args, PEERS)
    if "fla" in args.peer_list and args.docs > 1 and args.batch > 1:
        parser.error("fla takes documents as cu_seqlens over one packed row: with --docs > 1 it needs --batch 1 "
                     "(or leave fla out of --peers)")
    return args


def workers(args) -> list[str]:
    """The processes to run, in order: each of our impls, jla, then fla (its autotuning last)."""
    return [f"lasp_jax:{impl}" for impl in args.impl_list] + [p for p in PEERS if p in args.peer_list]


def inputs(args):
    """(q, k, v, dO) bf16 (q, k [B, T, G, N]; v, dO [B, T, H, P]), rates [B, T, H] float32 numpy, segment ids
    [B, T] int32 numpy or None (one document per row); the same bits for a seed in every process."""
    q, k, _, _ = measure.normal_inputs((args.batch, args.t, args.groups, args.dk), args.seed)
    _, _, v, do = measure.normal_inputs((args.batch, args.t, args.heads, args.dv), args.seed)
    mode = f"tokens/{args.docs}" if args.docs > 1 else "tokens"
    rates, ids = measure.decay_inputs((args.batch, args.t, args.heads, args.dv), mode, args.seed)
    return (q, k, v, do), rates, ids


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker_main(args)
    argv = sys.argv[1:] if argv is None else list(argv)
    meta = {
        **measure.provenance("benchmarks.ssd_peers_gpu", argv, VERSIONED),
        "shape": {name: getattr(args, name) for name in DIMS},
        "isolation": ISOLATION,
        "timing": f"JAX: median of {args.reps} rounds of {args.iters} back-to-back calls; torch: do_bench median",
        "error": "||x - ref|| / ||ref|| of o, dq, dk, dv, d_rates against chunked XLA on the fp32-upcast inputs "
                 "(HIGHEST)",
        "devices": {},
    }
    passed = [arg for name in DIMS for arg in (f"--{name}", str(getattr(args, name)))]
    passed += ["--impls", args.impls, "--peers", args.peers, "--jla-impl", args.jla_impl, "--iters",
               str(args.iters), "--reps", str(args.reps), "--seed", str(args.seed)]
    rows, complete = measure.merge_workers("benchmarks.ssd_peers_gpu", passed, workers(args), meta,
                                           lambda rows: save(args.out, meta, rows))
    print(render(meta, rows))
    if not complete:
        raise SystemExit("stopped by SIGTERM: the table holds the rows that finished")


def worker_main(args) -> None:
    """One contender group in this process: a device row, then the contender's row (its error where it could not
    be imported or run)."""
    kind, _, impl = args.worker.partition(":")
    measure.append_row(args.rows, {"worker": args.worker, "device": jax.devices()[0].device_kind})
    name = {"lasp_jax": OURS + impl, "jla": JLA, "fla": FLA}.get(kind)
    if name is None:
        raise ValueError(f"unknown worker {args.worker!r}")
    row = {"contender": name, "form": FORMS[OURS if kind == "lasp_jax" else name]}
    start = time.perf_counter()
    try:  # a failing contender gets its reason in the table
        contender = {"lasp_jax": lambda: lasp_jax_contender(impl), "jla": lambda: jla_contender(args.jla_impl),
                     "fla": fla_contender}[kind]()
        operands, rates, ids = inputs(args)
        reference_start = time.perf_counter()
        want = measure.fp32_reference(*operands, rates, 1.0, ids)
        row["reference_s"] = round(time.perf_counter() - reference_start, 2)
        row |= contender(operands, rates, ids, 1.0, want, args)
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    row["wall_s"] = round(time.perf_counter() - start, 2)
    measure.append_row(args.rows, row)


def lasp_jax_contender(impl: str):
    """Ours, run(inputs, rates, ids, scale, want, args) -> row fields, with the impl `impl` resolved to."""

    def run(operands, rates, ids, scale, want, args):
        q, k, v, _ = operands
        picked = impls.resolve(impl, q, k, v, per_token=True)
        resolved = next(name for name, candidate in impls.IMPLS.items() if candidate is picked)
        attend = lambda q, k, v, s, ids: lasp_jax.linear_attention(  # noqa: E731
            q, k, v, s, segment_ids=ids, scale=scale, impl=impl)
        return bench_ops_gpu.time_jax(attend, operands, rates, ids, want, args) | {"resolved": resolved}

    return run


def jla_contender(impl: str):
    """jla's ssd_core as its Mamba-2 layer calls it in training, with the path it took (`path`)."""
    from jla.layers.mamba2_fused import ssd_core

    def run(operands, rates, ids, scale, want, args):
        del scale  # ssd_core has Mamba-2's scale 1 built in (the only scale this benchmark runs)

        def attend(q, k, v, s, ids):
            return ssd_core(v, -s, k, q, segment_ids=ids, impl=impl, chunk_size=CHUNK, grouped_key_grads=True)

        q, k, v, _ = operands
        compiled = jax.jit(attend).lower(q, k, v, jnp.asarray(rates), None if ids is None else jnp.asarray(ids))
        calls = sorted(set(re.findall(r'custom_call_target="([^"]+)"', compiled.compile().as_text())))
        path = (f"Mosaic GPU kernels ({', '.join(calls)}) on the groups" if any("mosaic" in c for c in calls)
                else f"no Mosaic GPU kernel: XLA (B, C repeated per head), impl={impl}")
        return bench_ops_gpu.time_jax(attend, operands, rates, ids, want, args) | {"path": path}

    return run


def cu_seqlens(ids) -> np.ndarray | None:
    """Segment ids [1, T] -> fla's cumulative document lengths [0, start_1, ..., T] int64 (None for None)."""
    if ids is None:
        return None
    if ids.shape[0] != 1:
        raise ValueError(f"cu_seqlens packs one row: segment ids of batch {ids.shape[0]}")
    starts = np.flatnonzero(np.diff(ids[0])) + 1
    return np.concatenate([[0], starts, [ids.shape[1]]]).astype(np.int64)


def fla_contender():
    """fla's chunk_simple_gla on q, k repeated to H heads (bench_ops_gpu.torch_peer times it and reads the
    gradients back)."""
    from fla.ops.simple_gla import chunk_simple_gla

    def make(q, k, v, rates, ids, scale):
        import torch

        g = (-torch.tensor(rates, device="cuda")).requires_grad_(True)
        lengths = cu_seqlens(ids)
        cu_cpu = None if lengths is None else torch.from_numpy(lengths)
        cu = None if lengths is None else cu_cpu.cuda()
        per_group = v.shape[2] // q.shape[2]

        def heads(x):  # [B, T, G, N] -> [B, T, H, N], head h reading group h // per_group
            b, t, groups, n = x.shape
            return x[:, :, :, None].expand(b, t, groups, per_group, n).reshape(b, t, groups * per_group, n)

        def call():
            return chunk_simple_gla(heads(q), heads(k), v, g=g, scale=scale, cu_seqlens=cu, cu_seqlens_cpu=cu_cpu)[0]

        return call, q, 1.0, g

    timed = bench_ops_gpu.torch_peer(make, head_major=False)
    return lambda *run_args: timed(*run_args) | {"path": "Triton chunk kernels on H heads"}


def save(out, meta, rows):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "ssd_peers_gpu.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(os.path.join(out, "ssd_peers_gpu.md"), "w") as f:
        f.write(render(meta, rows))


def render(meta, rows) -> str:
    """The markdown table: one line per contender, its time over our first impl's (above 1: ours faster)."""
    s = meta["shape"]
    lines = [f"Devices: {meta['devices']}; date: {meta['date']}", f"Versions: {meta['versions']}",
             f"Command: `{meta['command']}`", f"Isolation: {meta['isolation']}.",
             f"Timing: {meta['timing']}. Error: {meta['error']}.",
             f"Shape: B {s['batch']}, T {s['t']}, H {s['heads']} value heads, G {s['groups']} groups of q = C and "
             f"k = B, N {s['dk']}, P {s['dv']}, {s['docs']} documents per row, bf16, scale 1, rates differentiated.",
             "", "| contender | ran | inputs as taken | fwd ms | fwd+bwd ms | vs ours fwd / fwd+bwd | "
                 "rel. err. vs fp32: o / dq / dk / dv / d_rates |", "|---|---|---|---|---|---|---|"]
    ours = next((r for r in rows if r.get("contender", "").startswith(OURS) and "fwd_ms" in r), None)
    for r in rows:
        head = f"| {r.get('contender', r.get('worker', '?'))} | {r.get('resolved', r.get('path', ''))} | " \
               f"{r.get('form', '')} |"
        if "error" in r:
            lines.append(f"{head} error: {r['error'][:160]} | | | |")
            continue
        ratio = "-" if ours is None else (f"{r['fwd_ms'] / ours['fwd_ms']:.2f}x / "
                                          f"{r['fwd_bwd_ms'] / ours['fwd_bwd_ms']:.2f}x")
        errs = " / ".join(f"{r['errors'][n]:.2e}" for n in ("o", "dq", "dk", "dv", "ds"))
        lines.append(f"{head} {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | {ratio} | {errs} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
