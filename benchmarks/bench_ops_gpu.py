"""One GPU, side by side: linear_attention's kernels against jla's simple_gla (Mosaic GPU), fla's
chunk_simple_gla and the LASP package's lightning_attn; forward and forward+backward, bf16, TNL decay rates, and
each contender's bf16 error against an fp32 run of the same inputs.

    python3 -m benchmarks.bench_ops_gpu [--shapes 1x16384x16x128,...] [--impls pallas_mosaic[,pallas_triton,xla]]
        [--peers jla,fla,lasp] [--decays constant,tokens,tokens/16] [--scale S (default d^-0.5)] [--iters 10]
        [--reps 5] [--out DIR]

Isolation: every contender group runs in a process of its own, one after another (each lasp_jax impl, jla, and
the torch peers together), so no framework's compiled programs, allocator pool or autotuning shares a process
with another's timing; this process only starts them and merges their rows into one table.

Inputs: q, k, v, dO independent standard normals rounded to bf16, drawn by JAX from one seed in every process
(the same bits everywhere; the torch process copies them over), scale = d^-0.5 unless --scale. The contenders
take the same rates s_h (TNL slopes), each in its own form: lasp_jax `decay=s, scale=`; jla log-gate g = -s
broadcast to its per-token layout [B, T, H] inside the jitted call, `scale=`; fla `g_gamma=-s, scale=`; LASP's
lightning_attn has no scale argument, so it gets q * scale rounded to bf16, formed outside its timing. The JAX
contenders get s as an argument of the jitted call, not a constant (see `measure.fwd_and_fwd_bwd`).
Per-token decay (`--decays tokens`, `tokens/N` for N packed documents per row; `measure.decay_inputs`): rates
[B, T, H] in [0.001, 0.1], differentiated (forward+backward also returns their cotangent, whose error is the
table's ds); lasp_jax `decay=rates, segment_ids=`; jla g = -rates, `segment_ids=`; fla `g=-rates` with
`cu_seqlens` for documents (batch 1 only); LASP's lightning_attn takes a constant decay per head only (no rows).

Timing: JAX contenders by `measure.median_ms` (back-to-back calls, median of rounds); torch peers by
triton.testing.do_bench (CUDA events, median). Forward+backward returns the output and the three input
cotangents for a given dO (no loss reduction). Error: `measure.rel_err` of o, dq, dk, dv against
`measure.fp32_reference` (chunked XLA on the fp32-upcast inputs, HIGHEST precision), computed in each process
(compiled once per shape: the workers share a compilation cache). Bytes floor (`measure.copy_bandwidth_gbs`
over --copy-mib, measured by the first worker, whichever contenders run): forward reads q, k, v and writes o
(4 tensors); forward+backward adds reading q, k, v, dO and writing dq, dk, dv (11 tensors). Each row has
wall_s, the seconds its worker spent on it (compiles, the error run, the timing), and reference_s, the fp32
reference's for its shape in that worker.

Writes ops_gpu.{json,md,png} under --out (after every worker: a run cut off keeps what finished).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # the torch peers share the GPU

import jax
import jax.numpy as jnp
import numpy as np

import lasp_jax
from benchmarks import measure

DEFAULT_SHAPES = "1x16384x16x128,1x65536x16x128,1x262144x16x128,8x8192x32x128"
PEERS = ("jla", "fla", "lasp")
VERSIONED = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-linear-attention", "fla-core", "lasp", "torch", "triton")
OURS = "lasp_jax "  # prefix of our contenders' names
CONSTANT_ONLY = ("LASP lightning_attn",)  # peers with no per-token decay: no rows in the per-token modes
ISOLATION = ("every contender group ran in a process of its own, one after another (each lasp_jax impl, jla, the "
             "torch peers); inputs drawn by JAX from one seed in each")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="BxTxHxD, comma-separated")
    parser.add_argument("--impls", default="pallas_mosaic", help="lasp_jax impls, comma-separated")
    parser.add_argument("--peers", default=",".join(PEERS), help=f"any of {','.join(PEERS)}, comma-separated")
    parser.add_argument("--decays", default="constant",
                        help="decay modes, comma-separated: constant, tokens, tokens/N (N documents per row)")
    parser.add_argument("--scale", type=float, default=None, help="attention scale (default d^-0.5)")
    parser.add_argument("--copy-mib", type=int, default=2048, help="MiB passed over to measure the memory bandwidth")
    parser.add_argument("--jla-impl", default="mosaic_gpu",
                        help="jla's impl (mosaic_gpu: its Hopper kernels; chunked runs anywhere, for CPU checks)")
    measure.add_worker_flags(parser)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.shape_list = measure.parse_shapes(args.shapes)
        args.decay_list = measure.parse_decays(args.decays)
    except ValueError as e:
        parser.error(str(e))
    measure.check_worker_flags(parser, args, PEERS)
    if args.scale is not None and not args.scale > 0:
        parser.error(f"--scale must be positive, got {args.scale}")
    return args


def workers(args) -> list[str]:
    """The processes to run, in order: each of our impls, jla, then the torch peers (fla's autotuning last)."""
    names = [f"lasp_jax:{impl}" for impl in args.impl_list]
    if "jla" in args.peer_list:
        names.append("jla")
    torch_peers = [p for p in args.peer_list if p != "jla"]
    if torch_peers:
        names.append("torch:" + "+".join(torch_peers))
    return names


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker_main(args)
    argv = sys.argv[1:] if argv is None else list(argv)
    meta = {
        **measure.provenance("benchmarks.bench_ops_gpu", argv, VERSIONED),
        "isolation": ISOLATION,
        "timing": f"JAX: median of {args.reps} rounds of {args.iters} back-to-back calls; torch: do_bench median",
        "error": "||x - ref|| / ||ref|| of o, dq, dk, dv against chunked XLA on the fp32-upcast inputs (HIGHEST)",
        "devices": {}, "copy_GBps": None,
    }
    # The workers get this run's flags (minus --out), so their rows answer the same command.
    passed = ["--shapes", args.shapes, "--iters", str(args.iters), "--reps", str(args.reps), "--seed",
              str(args.seed), "--jla-impl", args.jla_impl, "--impls", args.impls, "--peers", args.peers,
              "--copy-mib", str(args.copy_mib), "--decays", args.decays]
    if args.scale is not None:
        passed += ["--scale", repr(args.scale)]
    rows, complete = measure.merge_workers("benchmarks.bench_ops_gpu", passed, workers(args), meta,
                                           lambda rows: save(args.out, meta, rows))
    print(render(meta, rows))
    if not complete:
        raise SystemExit("stopped by SIGTERM: the table holds the rows that finished")


def worker_main(args) -> None:
    """One contender group in this process: a device row (the first worker's with the copy bandwidth), then one
    row per contender and shape."""
    kind, _, detail = args.worker.partition(":")
    device_row = {"worker": args.worker, "device": jax.devices()[0].device_kind}
    if args.worker == workers(args)[0]:
        device_row["copy_GBps"] = measure.copy_bandwidth_gbs(args.copy_mib << 20, args.iters, args.reps)
    if kind == "torch":
        contenders = torch_contenders(detail.split("+"))
    elif kind == "jla":
        contenders = {f"jla simple_gla ({args.jla_impl})": jla_contender(args.jla_impl)}
    elif kind == "lasp_jax":
        contenders = {OURS + detail: lasp_jax_contender(detail)}
    else:
        raise ValueError(f"unknown worker {args.worker!r}")
    measure.append_row(args.rows, device_row)
    if not contenders:  # the torch peers asked for are not installed (printed above)
        return
    for shape in args.shape_list:
        scale = args.scale if args.scale is not None else shape[3] ** -0.5
        inputs = measure.normal_inputs(shape, args.seed)
        for mode in args.decay_list:
            rates, ids = measure.decay_inputs(shape, mode, args.seed)
            start = time.perf_counter()
            want = measure.fp32_reference(*inputs, rates, scale, ids)
            reference_s = time.perf_counter() - start
            for name, contender in contenders.items():
                if mode != "constant" and name in CONSTANT_ONLY:
                    continue
                row = {"shape": list(shape), "decay": mode, "contender": name, "scale": scale}
                start = time.perf_counter()
                try:
                    row |= contender(inputs, rates, ids, scale, want, args)
                except Exception as e:  # one failing contender must not hide the others
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                row |= {"wall_s": round(time.perf_counter() - start, 2), "reference_s": round(reference_s, 2)}
                measure.append_row(args.rows, row)
            del want
        del inputs


def time_jax(attend, inputs, rates, ids, want, args) -> dict:
    """fwd / fwd+bwd ms and errors of a JAX attend(q, k, v, rates, ids) -> o (rates [H] or [B, T, H] float32,
    ids [B, T] int32 or None: arguments; per-token rates differentiated)."""
    rates = jnp.asarray(rates, jnp.float32)
    ids = None if ids is None else jnp.asarray(ids)
    fwd, fwd_bwd = measure.fwd_and_fwd_bwd(attend, grad_operands=int(rates.ndim == 3))
    q, k, v, do = inputs
    result = {"errors": measure.errors(fwd_bwd(q, k, v, do, rates, ids), want)}
    result["fwd_ms"] = measure.median_ms(fwd, (q, k, v, rates, ids), args.iters, args.reps)
    result["fwd_bwd_ms"] = measure.median_ms(fwd_bwd, (q, k, v, do, rates, ids), args.iters, args.reps)
    return result


def lasp_jax_contender(impl: str):
    def run(inputs, rates, ids, scale, want, args):
        return time_jax(lambda q, k, v, s, ids: lasp_jax.linear_attention(q, k, v, s, segment_ids=ids, scale=scale,
                                                                           impl=impl),
                         inputs, rates, ids, want, args)

    return run


def jla_contender(impl: str):
    """jla's simple_gla: its per-token log-gate g [B, T, H] = -s (constant rates broadcast inside the jitted call,
    the form a constant decay takes in its API: dg is computed by its backward and dropped, as a caller with a
    fixed decay would), segment_ids for documents."""
    from jla.ops import linear_attention as jla_attention

    def run(inputs, rates, ids, scale, want, args):
        def attend(q, k, v, s, ids):
            g = jnp.broadcast_to(-s, q.shape[:3])
            return jla_attention("simple_gla", q, k, v, g=g, scale=scale, impl=impl, segment_ids=ids)[0]

        return time_jax(attend, inputs, rates, ids, want, args)

    return run


def _to_torch(x):
    """A JAX bf16 array as a CUDA torch tensor with the same bits (through host memory: no dlpack assumptions)."""
    import torch

    return torch.from_numpy(np.asarray(x).view(np.int16)).cuda().view(torch.bfloat16)


def _to_jax(t):
    """A torch tensor (with or without autograd history) as a float32 JAX array, through host memory."""
    return jnp.asarray(t.detach().float().cpu().numpy())


def torch_contenders(names: list[str]) -> dict:
    """{name: run} for the torch peers asked for; one that does not import is reported and left out."""
    contenders = {}
    if "fla" in names:
        try:
            from fla.ops.simple_gla import chunk_simple_gla
        except ImportError as e:
            print(f"fla unavailable: {e}", flush=True)
        else:
            def fla(q, k, v, rates, ids, scale):
                import torch

                if rates.ndim == 1:
                    g_gamma = -torch.tensor(rates, device="cuda")
                    return (lambda: chunk_simple_gla(q, k, v, g_gamma=g_gamma, scale=scale)[0]), q, 1.0, None
                g = (-torch.tensor(rates, device="cuda")).requires_grad_(True)
                cu_seqlens = None
                if ids is not None:  # its varlen form: the documents of one row as cumulative lengths
                    if ids.shape[0] != 1:
                        raise NotImplementedError("fla's cu_seqlens packs one row (batch 1)")
                    starts = np.flatnonzero(np.diff(ids[0])) + 1
                    cu_seqlens = torch.tensor(np.concatenate([[0], starts, [ids.shape[1]]]), device="cuda")
                return (lambda: chunk_simple_gla(q, k, v, g=g, scale=scale, cu_seqlens=cu_seqlens)[0]), q, 1.0, g

            contenders["fla chunk_simple_gla"] = torch_peer(fla, head_major=False)
    if "lasp" in names:
        try:
            from lasp import lightning_attn
        except ImportError as e:
            print(f"lasp unavailable: {e}", flush=True)
        else:
            def lasp(q, k, v, rates, ids, scale):
                import torch

                rates = torch.tensor(rates, device="cuda").reshape(-1, 1, 1)
                scaled = (q.detach().float() * scale).to(q.dtype).requires_grad_(True)  # no scale argument
                return (lambda: lightning_attn(scaled, k, v, rates)), scaled, scale, None

            contenders["LASP lightning_attn"] = torch_peer(lasp, head_major=True)
    return contenders


def torch_peer(make, head_major: bool):
    """A contender from make(q, k, v, rates, ids, scale) -> (call() -> o, the leaf standing for q, d(leaf)/d(q),
    the log-gate leaf g = -rates or None), on torch copies of the JAX inputs ([B, H, T, D] when head_major). Timed
    by do_bench (median); the errors from one more forward+backward, read back to JAX (dq = the leaf's gradient
    times d(leaf)/d(q), in float32; ds = -dg)."""

    def run(inputs, rates, ids, scale, want, args):
        import torch
        import triton

        layout = (lambda t: t.permute(0, 2, 1, 3).contiguous()) if head_major else (lambda t: t)
        q, k, v, do = (layout(_to_torch(x)) for x in inputs)
        q, k, v = (x.requires_grad_(True) for x in (q, k, v))
        call, q_leaf, q_factor, gate = make(q, k, v, rates, ids, scale)
        leaves = [q_leaf, k, v] + ([] if gate is None else [gate])

        def fwd():
            with torch.no_grad():
                return call()

        def fwd_bwd():
            o = call()
            o.backward(do)
            return o

        result = {"fwd_ms": float(triton.testing.do_bench(fwd, warmup=25, rep=200, return_mode="median")),
                  "fwd_bwd_ms": float(triton.testing.do_bench(fwd_bwd, warmup=25, rep=200, grad_to_none=leaves,
                                                              return_mode="median"))}
        for x in leaves:
            x.grad = None
        o = fwd_bwd()
        back = (lambda t: t.permute(0, 2, 1, 3)) if head_major else (lambda t: t)
        o, dq, dk, dv = (_to_jax(back(t)) for t in (o, q_leaf.grad, k.grad, v.grad))
        grads = (dq * q_factor, dk, dv) + (() if gate is None else (-_to_jax(gate.grad),))
        result["errors"] = measure.errors((o, grads), want)
        return result

    return run


def save(out, meta, rows):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "ops_gpu.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(os.path.join(out, "ops_gpu.md"), "w") as f:
        f.write(render(meta, rows))
    plot(rows, meta, os.path.join(out, "ops_gpu.png"))


def _floor_ms(row, meta, tensors: int) -> float:
    """HBM floor of `tensors` bf16 tensors of the row's shape at the measured copy bandwidth (nan without it)."""
    return tensors * 2 * int(np.prod(row["shape"])) / (meta["copy_GBps"] or np.nan) / 1e6


def render(meta, rows) -> str:
    copy = f"{meta['copy_GBps']:.0f} GB/s (read + write)" if meta["copy_GBps"] else "not measured"
    lines = [f"Devices: {meta['devices']}; date: {meta['date']}; copy bandwidth: {copy}",
             f"Versions: {meta['versions']}", f"Command: `{meta['command']}`", f"Isolation: {meta['isolation']}.",
             f"Timing: {meta['timing']}. Error: {meta['error']}.", "",
             "| B x T x H x D | decay | contender | fwd ms | fwd+bwd ms | HBM floor fwd / fwd+bwd ms | "
             "rel. err. vs fp32: o / dq / dk / dv [/ ds] |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "shape" not in r:
            lines.append(f"| | | {r.get('worker', '?')} | error: {r['error'][:100]} | | | |")
            continue
        shape, mode = "x".join(map(str, r["shape"])), r.get("decay", "constant")
        if "error" in r:
            lines.append(f"| {shape} | {mode} | {r['contender']} | error: {r['error'][:100]} | | | |")
            continue
        e = " / ".join(f"{r['errors'][n]:.2e}" for n in ("o", "dq", "dk", "dv", "ds") if n in r["errors"])
        lines.append(f"| {shape} | {mode} | {r['contender']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | "
                     f"{_floor_ms(r, meta, 4):.3f} / {_floor_ms(r, meta, 11):.3f} | {e} |")
    lines += ["", ratios(rows)]
    return "\n".join(lines) + "\n"


def ratios(rows) -> str:
    """Per shape, decay mode and impl of ours: each peer's time over ours (above 1: ours is faster), fwd /
    fwd+bwd."""
    timed = [r for r in rows if "fwd_ms" in r]
    peers = list(dict.fromkeys(r["contender"] for r in timed if not r["contender"].startswith(OURS)))
    if not peers:
        return ""
    lines = ["Peer ms / our ms (above 1: ours faster), fwd / fwd+bwd:", "",
             "| B x T x H x D | decay | ours | " + " | ".join(f"vs {p}" for p in peers) + " |",
             "|---|---|---|" + "---|" * len(peers)]
    for ours in (r for r in timed if r["contender"].startswith(OURS)):
        cells = []
        mode = ours.get("decay", "constant")
        for p in peers:
            peer = next((r for r in timed if r["contender"] == p and r["shape"] == ours["shape"]
                         and r.get("decay", "constant") == mode), None)
            cells.append("-" if peer is None else f"{peer['fwd_ms'] / ours['fwd_ms']:.2f}x / "
                                                  f"{peer['fwd_bwd_ms'] / ours['fwd_bwd_ms']:.2f}x")
        shape = "x".join(map(str, ours["shape"]))
        lines.append(f"| {shape} | {mode} | {ours['contender'][len(OURS):]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows, meta, path):
    """fwd and fwd+bwd ms per shape, one bar per contender (log scale)."""
    plt = measure.pyplot()
    if plt is None:
        return
    timed = [r for r in rows if "fwd_ms" in r]
    case = lambda r: (tuple(r["shape"]), r.get("decay", "constant"))  # noqa: E731
    shapes = sorted({case(r) for r in timed}, key=lambda c: (c[0][0] * c[0][2], c[0][1], c[1]))
    names = list(dict.fromkeys(r["contender"] for r in timed))
    if not shapes:
        return
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / len(names)
    for ax, key in zip(axes, ("fwd_ms", "fwd_bwd_ms")):
        for i, name in enumerate(names):
            vals = [next((r[key] for r in timed if case(r) == c and r["contender"] == name), np.nan)
                    for c in shapes]
            ax.bar(np.arange(len(shapes)) + i * width, vals, width, label=name)
        ax.set_xticks(np.arange(len(shapes)) + 0.4 - width / 2)
        ax.set_xticklabels(["x".join(map(str, s)) + ("" if d == "constant" else f"\n{d}") for s, d in shapes],
                           fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("ms (log)")
        ax.set_title(key.replace("_ms", "").replace("_", "+"))
    axes[0].legend(fontsize=8)
    fig.suptitle(f"linear attention, bf16, {', '.join(sorted(set(meta['devices'].values())))}, {meta['date'][:10]}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
