"""Several GPUs, side by side: lasp_attention (ring, allgather, scan) at a fixed number of tokens per GPU, against
jla's context_parallel_linear_attention (simple_gla) and the LASP package's lasp_fuse_parallel; each against its
own one-GPU time at that length (weak scaling). bf16, B=1, H=16, d=128, TNL decay rates, scale d^-0.5 unless
--scale; forward and forward+backward.

    python3 -m benchmarks.bench_lasp_gpu [--per-gpu 65536] [--gpus 2,4,8] [--impl pallas_mosaic] [--peers jla]
        [--decays constant,tokens,tokens/16] [--out DIR]

Each GPU count n runs on the first n devices with T = n x per-gpu; efficiency = one-GPU time / n-GPU time, each
framework against its own one-GPU row (ours: linear_attention with --impl; jla: its simple_gla with its Mosaic
GPU kernels; jla's context parallelism runs its chunked XLA op on every shard, twice: from a zero state, then
from the true one). Every row's output and input cotangents are checked against `measure.fp32_reference` on one
device (the fp32-upcast inputs, HIGHEST precision). Decay modes as in bench_ops_gpu (`measure.decay_inputs`):
per-token rates and segment ids sharded like the tokens, the rates differentiated; LASP's peer takes a constant
decay only.

Isolation: ours and jla each run in a process of their own (this process starts them and merges their rows);
lasp_fuse_parallel runs under torchrun before (benchmarks/peer_lasp_parallel.py writes lasp_peer.json under
--out, which this script's table reads if it is there). Timing as in bench_ops_gpu (`measure.median_ms`).
Writes lasp_gpu.{json,md,png} under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lasp_jax
from benchmarks import measure

STRATEGIES = ("ring", "allgather", "scan")
VERSIONED = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-linear-attention", "lasp", "torch")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-gpu", type=int, default=65536)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--gpus", default="", help="GPU counts, e.g. 2,4,8 (default: every GPU here)")
    parser.add_argument("--impl", default="pallas_mosaic", help="lasp_jax impl")
    parser.add_argument("--peers", default="jla", help="jla or nothing (the LASP peer runs under torchrun)")
    parser.add_argument("--decays", default="constant",
                        help="decay modes, comma-separated: constant, tokens, tokens/N (N documents per row)")
    parser.add_argument("--scale", type=float, default=None, help="attention scale (default d^-0.5)")
    parser.add_argument("--jla-impl", default="mosaic_gpu", help="jla's impl for its one-GPU row")
    measure.add_worker_flags(parser, worker_choices=("lasp_jax", "jla"))
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.peers not in ("", "jla"):
        parser.error(f"--peers must be 'jla' or '', got {args.peers!r}")
    try:
        args.counts = [int(n) for n in args.gpus.split(",")] if args.gpus else []
    except ValueError:
        parser.error(f"--gpus must be comma-separated integers, got {args.gpus!r}")
    try:
        args.decay_list = measure.parse_decays(args.decays)
    except ValueError as e:
        parser.error(str(e))
    if args.scale is None:
        args.scale = args.dim ** -0.5
    measure.check_worker_flags(parser, args)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker_main(args)
    argv = sys.argv[1:] if argv is None else list(argv)
    meta = {**measure.provenance("benchmarks.bench_lasp_gpu", argv, VERSIONED),
            "shape_per_gpu": [1, args.per_gpu, args.heads, args.dim], "scale": args.scale,
            "isolation": "ours and jla each ran in a process of their own; lasp_fuse_parallel under torchrun",
            "devices": {}}
    passed = ["--per-gpu", str(args.per_gpu), "--heads", str(args.heads), "--dim", str(args.dim), "--gpus",
              args.gpus, "--impl", args.impl, "--scale", repr(args.scale), "--jla-impl", args.jla_impl, "--iters",
              str(args.iters), "--reps", str(args.reps), "--seed", str(args.seed), "--decays", args.decays]
    names = ["lasp_jax"] + (["jla"] if args.peers == "jla" else [])
    rows, complete = measure.merge_workers("benchmarks.bench_lasp_gpu", passed, names, meta)
    peer_path = os.path.join(args.out, "lasp_peer.json")
    if os.path.exists(peer_path):
        with open(peer_path) as f:
            rows.append(json.load(f) | {"framework": "LASP"})
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "lasp_gpu.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    table = render(meta, rows)
    with open(os.path.join(args.out, "lasp_gpu.md"), "w") as f:
        f.write(table)
    plot(rows, meta, os.path.join(args.out, "lasp_gpu.png"))
    print(table)
    if not complete:
        raise SystemExit("stopped by SIGTERM: the table holds the rows that finished")


def worker_main(args) -> None:
    """One framework in this process: its one-GPU row, then its rows on every GPU count."""
    devices = jax.devices()
    counts = args.counts or [len(devices)]
    if any(not 1 < n <= len(devices) for n in counts):
        raise SystemExit(f"needs at least 2 devices, and each count of --gpus ({counts}) must be in "
                         f"2..{len(devices)} (the devices here)")
    measure.append_row(args.rows, {"worker": args.worker, "device": f"{max(counts)} x {devices[0].device_kind}"})
    t, h, d = args.per_gpu, args.heads, args.dim
    if args.worker == "lasp_jax":
        one_gpu = {f"1 GPU lasp_jax linear_attention ({args.impl}), T={t}": (
            lambda q, k, v, s, ids: lasp_jax.linear_attention(q, k, v, s, segment_ids=ids, scale=args.scale,
                                                              impl=args.impl), None, "")}
    else:
        from jla.ops import linear_attention as jla_attention

        one_gpu = {f"1 GPU jla simple_gla ({args.jla_impl}), T={t}": (
            lambda q, k, v, s, ids: jla_attention("simple_gla", q, k, v, g=_jla_gate(q, s), scale=args.scale,
                                                  impl=args.jla_impl, segment_ids=ids)[0], None, "")}
    for n in [1] + counts:
        shape = (1, n * t, h, d)
        inputs = measure.normal_inputs(shape, args.seed)
        if n == 1:
            contenders = one_gpu
        else:
            contenders = _ours(args, devices[:n]) if args.worker == "lasp_jax" else _jla(args, devices[:n])
            sharding = next(iter(contenders.values()))[1]
        for mode in args.decay_list:
            rates, ids = measure.decay_inputs(shape, mode, args.seed)
            want = measure.fp32_reference(*inputs, rates, args.scale, ids)
            # The rates are arguments of the jitted calls, not constants XLA could fold (`measure.fwd_and_fwd_bwd`).
            operands = (jnp.asarray(rates), None if ids is None else jnp.asarray(ids))
            placed = inputs
            if n > 1:
                placed = tuple(jax.device_put(x, sharding) for x in inputs)
                token_spec = NamedSharding(sharding.mesh, P(None, sharding.spec[1]))
                operands = (jax.device_put(operands[0], token_spec if rates.ndim == 3 else
                                           NamedSharding(sharding.mesh, P())),
                            None if ids is None else jax.device_put(operands[1], token_spec))
            for name, (attend, _, label) in contenders.items():
                row = {"run": name, "gpus": n, "framework": args.worker, "label": label, "decay": mode}
                try:
                    fwd, fwd_bwd = measure.fwd_and_fwd_bwd(attend, grad_operands=int(rates.ndim == 3))
                    row["errors"] = measure.errors(fwd_bwd(*placed, *operands), want)
                    row["fwd_ms"] = measure.median_ms(fwd, (*placed[:3], *operands), args.iters, args.reps)
                    row["fwd_bwd_ms"] = measure.median_ms(fwd_bwd, (*placed, *operands), args.iters, args.reps)
                except Exception as e:  # report it and go on
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                measure.append_row(args.rows, row)
            del want
        del inputs


def _jla_gate(q, rates):
    """jla's per-token log-gate g [B, T, H] = -s, for per-token rates or rates s [H] the same at every position
    (its layout has no per-head form)."""
    return jnp.broadcast_to(-rates, q.shape[:3])


def _ours(args, devices) -> dict:
    """{name: (attend(q, k, v, rates), input sharding, label)}: lasp_attention with every strategy over a 'seq'
    axis of `devices`."""
    w, t = len(devices), args.per_gpu
    mesh = jax.make_mesh((w,), ("seq",), devices=devices)
    spec = NamedSharding(mesh, P(None, "seq"))
    return {f"{w} GPUs lasp_attention {strategy}, T={w * t}": (
        lambda q, k, v, s, ids, strategy=strategy: lasp_jax.lasp_attention(
            q, k, v, s, segment_ids=ids, mesh=mesh, strategy=strategy, scale=args.scale, impl=args.impl), spec,
        f"lasp_attention {strategy}") for strategy in STRATEGIES}


def _jla(args, devices) -> dict:
    """{name: (attend(q, k, v, rates), input sharding, label)}: jla's context_parallel_linear_attention over a
    'cp' axis of `devices`."""
    from jla.distributed.context_parallel import context_parallel_linear_attention

    w, t = len(devices), args.per_gpu
    mesh = jax.make_mesh((w,), ("cp",), devices=devices)
    spec = NamedSharding(mesh, P(None, "cp"))

    def attend(q, k, v, rates, ids):
        g = jax.sharding.reshard(_jla_gate(q, rates), spec)
        return context_parallel_linear_attention("simple_gla", q, k, v, g=g, scale=args.scale, mesh=mesh,
                                                 axis="cp", segment_ids=ids)[0]

    return {f"{w} GPUs jla context_parallel_linear_attention, T={w * t}": (attend, spec, "context parallel")}


def render(meta, rows) -> str:
    """The table: each row's times, its weak-scaling efficiency against its framework's one-GPU row, each peer's
    fwd+bwd time over it at the same GPU count, and its largest error against the fp32 reference."""
    timed = [r for r in rows if "fwd_bwd_ms" in r]
    mode = lambda r: r.get("decay", "constant")  # noqa: E731 (the LASP peer's file predates the modes)
    base = {(r["framework"], mode(r)): r["fwd_bwd_ms"] for r in timed if r["gpus"] == 1}
    peers = {"jla CP": lambda r: r["framework"] == "jla" and r["gpus"] > 1,
             "lasp_fuse_parallel": lambda r: r["framework"] == "LASP"}
    lines = [f"Devices: {meta['devices']}; date: {meta['date']}; versions: {meta['versions']}",
             f"Per GPU: B, T, H, d = {meta['shape_per_gpu']}, bf16, scale {meta['scale']:.4g}; "
             f"isolation: {meta['isolation']}", f"Command: `{meta['command']}`", "",
             "| run | decay | fwd ms | fwd+bwd ms | weak-scaling efficiency | "
             + " | ".join(f"{p} / this" for p in peers) + " | max rel. err. vs fp32 |",
             "|---|---|---|---|---|" + "---|" * len(peers) + "---|"]
    for r in rows:
        if "fwd_bwd_ms" not in r:
            lines.append(f"| {r.get('run', r.get('worker'))} | {mode(r)} | error: {r.get('error', '?')[:100]} | |"
                         + " |" * (len(peers) + 2))
            continue
        own = base.get((r["framework"], mode(r)))
        efficiency = f"{own / r['fwd_bwd_ms']:.0%}" if own and r["gpus"] > 1 else "-"
        cells = []
        for match in peers.values():
            peer = next((p for p in timed if match(p) and p["gpus"] == r["gpus"] and mode(p) == mode(r)), None)
            own_row = peer is r  # a peer's row against itself says nothing
            cells.append(f"{peer['fwd_bwd_ms'] / r['fwd_bwd_ms']:.2f}x" if peer and r["gpus"] > 1 and not own_row
                         else "-")
        err = f"{r['errors']['max']:.2e}" if "errors" in r else "-"
        lines.append(f"| {r['run']} | {mode(r)} | {r.get('fwd_ms', float('nan')):.3f} | {r['fwd_bwd_ms']:.3f} | "
                     f"{efficiency} | "
                     + " | ".join(cells) + f" | {err} |")
    return "\n".join(lines) + "\n"


def plot(rows, meta, path):
    """fwd+bwd ms and weak-scaling efficiency against the GPU count, one line per strategy / framework."""
    plt = measure.pyplot()
    if plt is None:
        return
    timed = [r for r in rows if "fwd_bwd_ms" in r]
    fig, (ax_ms, ax_eff) = plt.subplots(1, 2, figsize=(11, 4))
    groups = dict.fromkeys((r["framework"], r.get("decay", "constant")) for r in timed)
    for framework, mode in groups:
        mine = [r for r in timed if r["framework"] == framework and r.get("decay", "constant") == mode]
        ones = [r["fwd_bwd_ms"] for r in mine if r["gpus"] == 1]
        lines = {}
        for r in mine:
            if r["gpus"] > 1:
                lines.setdefault(f"{framework} {r.get('label', '')} {mode}", []).append((r["gpus"], r["fwd_bwd_ms"]))
        for label, pts in lines.items():
            pts = sorted(([(1, ones[0])] if ones else []) + pts)
            gpus, ms = zip(*pts)
            ax_ms.plot(gpus, ms, marker="o", label=label)
            if ones:
                ax_eff.plot(gpus, [ones[0] / m for m in ms], marker="o", label=label)
    ax_ms.set(xlabel="GPUs", ylabel="fwd+bwd ms", title="fixed tokens per GPU", yscale="log")
    ax_eff.set(xlabel="GPUs", ylabel="one-GPU time / n-GPU time", title="weak-scaling efficiency", ylim=(0, 1.1))
    ax_ms.legend(fontsize=7)
    fig.suptitle(f"{', '.join(sorted(set(meta['devices'].values())))}, {meta['date'][:10]}, "
                 f"per GPU {meta['shape_per_gpu']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
