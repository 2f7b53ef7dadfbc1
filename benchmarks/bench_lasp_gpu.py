"""Several GPUs: lasp_attention (ring, allgather, scan) at a fixed number of tokens per GPU, against our own
one-GPU time at that length (weak scaling), bf16, B=1, H=16, d=128, TNL slopes; forward and forward+backward.

    python3 -m benchmarks.bench_lasp_gpu [--per-gpu 65536] [--gpus 2,4,8] [--impl pallas_triton] [--out DIR]

Each GPU count n runs on the first n devices with T = n x per-gpu; efficiency = one-GPU time / n-GPU time.
Every strategy's output and input cotangents are checked against one-device chunked XLA on the same inputs.

The LASP package's lasp_fuse_parallel runs beside it through torchrun (benchmarks/peer_lasp_parallel.py);
the two write lasp_gpu.json and lasp_peer.json under --out, and this script's table reads the peer's file if
it is there. Timing as in bench_ops_gpu (back-to-back calls, median of rounds).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import numpy as np
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lasp_jax
from benchmarks.bench_ops_gpu import jax_fns, jax_inputs, slopes, time_jax


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-gpu", type=int, default=65536)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--gpus", default="", help="GPU counts, e.g. 2,4,8 (default: every GPU here)")
    parser.add_argument("--impl", default="pallas_triton")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = parser.parse_args(argv)

    devices = jax.devices()
    t, h, d = args.per_gpu, args.heads, args.dim
    counts = [int(n) for n in args.gpus.split(",")] if args.gpus else [len(devices)]
    if any(not 1 < n <= len(devices) for n in counts):
        parser.error(f"needs at least 2 GPUs, and each count of --gpus ({args.gpus or len(devices)}) must be in "
                     f"2..{len(devices)} (the devices here)")
    s = slopes(h)
    meta = {"command": "python3 -m benchmarks.bench_lasp_gpu " + " ".join(argv or os.sys.argv[1:]),
            "device": f"{max(counts)} x {devices[0].device_kind}",
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "versions": {"jax": jax.__version__}, "shape_per_gpu": [1, t, h, d]}
    rows = []

    # One GPU at the per-GPU length.
    one = jax_inputs(1, t, h, d)
    fwd, fwd_bwd = jax_fns(lambda q, k, v: lasp_jax.linear_attention(q, k, v, s, impl=args.impl))
    rows.append({"run": f"1 GPU, T={t}", "gpus": 1, "fwd_ms": time_jax(fwd, one[:3], args.iters, args.reps),
                 "fwd_bwd_ms": time_jax(fwd_bwd, one, args.iters, args.reps)})
    print(json.dumps(rows[-1]), flush=True)
    del one

    os.makedirs(args.out, exist_ok=True)
    for n in counts:
        rows += _strategies(args, devices[:n], s)
        with open(os.path.join(args.out, "lasp_gpu.json"), "w") as f:  # after each count: a cut-off run keeps it
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    peer_path = os.path.join(args.out, "lasp_peer.json")
    if os.path.exists(peer_path):
        with open(peer_path) as f:
            rows.append(json.load(f))
    base = rows[0]["fwd_bwd_ms"]
    peer = next((r for r in rows if "lasp_fuse_parallel" in r["run"] and "fwd_bwd_ms" in r), None)
    lines = [f"Device: {meta['device']}; date: {meta['date']}; jax {jax.__version__}; per GPU: B=1, T={t}, "
             f"H={h}, d={d}, bf16", f"Command: `{meta['command']}`", "",
             "| run | fwd ms | fwd+bwd ms | fwd+bwd / 1-GPU | weak-scaling efficiency | lasp_fuse_parallel / this | "
             "max rel err vs 1-GPU XLA |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['run']} | error: {r['error'][:100]} | | | | | |")
            continue
        same_size = peer is not None and r.get("gpus") == peer.get("gpus")  # the peer ran on one GPU count
        ratio = f"{peer['fwd_bwd_ms'] / r['fwd_bwd_ms']:.1f}x" if same_size else "-"
        # Weak scaling is ours against our own one-GPU time; the peer's row has no one-GPU time of its own.
        efficiency = "-" if r is peer else f"{base / r['fwd_bwd_ms']:.0%}"
        lines.append(f"| {r['run']} | {r.get('fwd_ms', float('nan')):.3f} | {r['fwd_bwd_ms']:.3f} | "
                     f"{r['fwd_bwd_ms'] / base:.2f} | {efficiency} | {ratio} | "
                     f"{r.get('max_rel_err_o_dq_dk_dv', '-')} |")
    table = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "lasp_gpu.md"), "w") as f:
        f.write(table)
    plot(rows, meta, os.path.join(args.out, "lasp_gpu.png"))
    print(table)


def _strategies(args, devices, s):
    """Rows for every strategy on `devices` (T = len(devices) x per-gpu), each checked against one-device XLA."""
    w, t, h, d = len(devices), args.per_gpu, args.heads, args.dim
    mesh = jax.make_mesh((w,), ("seq",), devices=devices)
    spec = NamedSharding(mesh, P(None, "seq"))
    inputs = jax_inputs(1, w * t, h, d)
    _, ref_fwd_bwd = jax_fns(lambda q, k, v: lasp_jax.linear_attention(q, k, v, s, impl="xla"))
    reference = jax.tree.map(lambda x: np.asarray(x, np.float32), ref_fwd_bwd(*inputs))
    full = [jax.device_put(x, spec) for x in inputs]
    del inputs
    rows = []
    for strategy in ("ring", "allgather", "scan"):
        fwd, fwd_bwd = jax_fns(lambda q, k, v, strategy=strategy: lasp_jax.lasp_attention(
            q, k, v, jnp.asarray(s), mesh=mesh, strategy=strategy, impl=args.impl))
        row = {"run": f"{w} GPUs lasp_attention {strategy}, T={w * t}", "gpus": w, "strategy": strategy}
        try:
            row["fwd_ms"] = time_jax(fwd, full[:3], args.iters, args.reps)
            row["fwd_bwd_ms"] = time_jax(fwd_bwd, full, args.iters, args.reps)
            got = jax.tree.map(lambda x: np.asarray(x, np.float32), fwd_bwd(*full))
            row["max_rel_err_o_dq_dk_dv"] = max(
                float(np.linalg.norm(a - b) / np.linalg.norm(b))
                for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(reference)))
        except Exception as e:  # report it and go on to the next strategy
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def plot(rows, meta, path):
    """fwd+bwd ms and weak-scaling efficiency against the GPU count, one line per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = rows[0]["fwd_bwd_ms"]
    fig, (ax_ms, ax_eff) = plt.subplots(1, 2, figsize=(11, 4))
    for strategy in ("ring", "allgather", "scan"):
        pts = [(1, base)] + [(r["gpus"], r["fwd_bwd_ms"]) for r in rows
                             if r.get("strategy") == strategy and "fwd_bwd_ms" in r]
        gpus, ms = zip(*pts)
        ax_ms.plot(gpus, ms, marker="o", label=strategy)
        ax_eff.plot(gpus, [base / m for m in ms], marker="o", label=strategy)
    ax_ms.set(xlabel="GPUs", ylabel="fwd+bwd ms", title="lasp_attention, fixed tokens per GPU")
    ax_eff.set(xlabel="GPUs", ylabel="one-GPU time / n-GPU time", title="weak-scaling efficiency", ylim=(0, 1.1))
    ax_ms.legend()
    fig.suptitle(f"{meta['device']}, {meta['date'][:10]}, per GPU {meta['shape_per_gpu']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
