"""One GPU: linear_attention's implementations against fla's chunk_simple_gla and the LASP package's
lightning_attn, forward and forward+backward, bf16, TNL decay slopes, with the HBM floor and a copy-bandwidth
measurement taken in the same run.

    python3 -m benchmarks.bench_ops_gpu [--shapes 1x16384x16x128,1x65536x16x128,...] [--impls pallas_triton,xla]
        [--peers fla,lasp] [--sweep [--sweep-shapes 1x65536x16x128,...]] [--breakdown] [--out DIR]

Timing: JAX calls are enqueued `--iters` times back to back and timed to the last result (so launch latency
overlaps, as in training), the median of `--reps` such rounds; torch peers through triton.testing.do_bench
(CUDA events, median). Forward+backward returns the output and the three input cotangents for a given dO
(no loss reduction), for every contender. Needs the peers installed (fla-core, lasp); absent ones are skipped.

Bytes floor: forward reads q, k, v and writes o (4 tensors); forward+backward adds reading q, k, v, dO and
writing dq, dk, dv (11 tensors). "GB/s" is that floor over the measured time.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch peers share the GPU

import jax
import jax.numpy as jnp
import numpy as np

import lasp_jax
from lasp_jax.ops import pallas_triton, vjp

DEFAULT_SHAPES = "1x16384x16x128,1x65536x16x128,1x262144x16x128,8x8192x32x128"


def slopes(h):
    """TNL / lightning decay rates s_i = 2^(-8 (i + 1) / H)."""
    return np.asarray([2.0 ** (-8.0 * (i + 1) / h) for i in range(h)], np.float32)


def time_jax(fn, args, iters, reps):
    """Median ms per call of a jitted fn over `reps` rounds of `iters` back-to-back calls."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) * 1e3 / iters)
    return float(np.median(times))


def jax_fns(attend):
    """(forward, forward+backward) jitted from attend(q, k, v) -> o."""
    fwd = jax.jit(attend)

    def fwd_bwd(q, k, v, do):
        o, vjp_fn = jax.vjp(attend, q, k, v)
        return o, vjp_fn(do)

    return fwd, jax.jit(fwd_bwd)


def max_rel_err(got, want) -> float:
    """Largest over the leaves of max|got - want| / max|want| (o, dq, dk, dv)."""
    errs = jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32)))
                                           / jnp.max(jnp.abs(y.astype(jnp.float32)))), got, want)
    return max(jax.tree.leaves(errs))


def jax_inputs(b, t, h, d, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q, k = (jax.random.normal(kk, (b, t, h, d), jnp.float32) / np.sqrt(d) for kk in keys[:2])
    v, do = (jax.random.normal(kk, (b, t, h, d), jnp.float32) for kk in keys[2:])
    return tuple(x.astype(jnp.bfloat16) for x in (q, k, v, do))


def copy_bandwidth_gbs():
    """Device-to-device copy of 2 GiB through torch, bytes read plus written over the median time."""
    import torch
    import triton

    n = 1 << 30
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * 2 * n / ms / 1e6


def torch_peers(names, b, t, h, d, s):
    """{name: (fwd_fn, fwd_bwd_fn, grads)} for the torch peers that import."""
    import torch

    peers = {}
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda", generator=gen) * scale).to(torch.bfloat16)

    if "fla" in names:
        try:
            from fla.ops.simple_gla import chunk_simple_gla
        except ImportError as e:
            print(f"fla unavailable: {e}")
        else:
            q, k = rand(b, t, h, d, scale=d ** -0.5), rand(b, t, h, d, scale=d ** -0.5)
            v, do = rand(b, t, h, d), rand(b, t, h, d)
            g_gamma = -torch.tensor(s, device="cuda")
            ins = [x.requires_grad_(True) for x in (q, k, v)]

            def fla_fwd(q=q, k=k, v=v):
                with torch.no_grad():
                    return chunk_simple_gla(q, k, v, g_gamma=g_gamma, scale=1.0)[0]

            def fla_fwd_bwd(q=q, k=k, v=v, do=do):
                o = chunk_simple_gla(q, k, v, g_gamma=g_gamma, scale=1.0)[0]
                o.backward(do)
                return o

            peers["fla chunk_simple_gla"] = (fla_fwd, fla_fwd_bwd, ins)
    if "lasp" in names:
        try:
            from lasp import lightning_attn
        except ImportError as e:
            print(f"lasp unavailable: {e}")
        else:
            q, k = rand(b, h, t, d, scale=d ** -0.5), rand(b, h, t, d, scale=d ** -0.5)
            v, do = rand(b, h, t, d), rand(b, h, t, d)
            ss = torch.tensor(s, device="cuda").reshape(h, 1, 1)
            ins = [x.requires_grad_(True) for x in (q, k, v)]

            def lasp_fwd(q=q, k=k, v=v):
                with torch.no_grad():
                    return lightning_attn(q, k, v, ss)

            def lasp_fwd_bwd(q=q, k=k, v=v, do=do):
                o = lightning_attn(q, k, v, ss)
                o.backward(do)
                return o

            peers["LASP lightning_attn"] = (lasp_fwd, lasp_fwd_bwd, ins)
    return peers


def time_torch(fn, grads):
    import triton

    return float(triton.testing.do_bench(fn, warmup=25, rep=200, grad_to_none=grads, return_mode="median"))


def sweep_configs():
    """Kernel variants timed with --sweep (name -> Config); KERNEL_NOTES.md has the history."""
    base = pallas_triton.DEFAULT
    whole = dataclasses.replace(base, block_k=128, block_v=128, wide_warps=8)
    return {
        "default": base,
        "2 stages": dataclasses.replace(base, num_stages=2),
        "3 stages everywhere": dataclasses.replace(base, crowded_stages=3),
        "8 warps for whole states": dataclasses.replace(base, wide_warps=8),
        "whole Dv tiles, 8 warps": dataclasses.replace(base, block_v=128, wide_warps=8),
        "whole-state tiles, 8 warps": whole,
        "whole-state tiles, 8 warps, 2 stages": dataclasses.replace(whole, num_stages=2),
        "whole-state tiles, 8 warps, 512 programs": dataclasses.replace(whole, target_programs=512),
    }


def breakdown(q, k, v, do, s, iters, reps):
    """ms of the kernels' forward and backward on their own (default config): where forward+backward goes."""
    s = jnp.asarray(s)
    saved = jax.jit(lambda q, k, v: pallas_triton.forward(q, k, v, s)[3])(q, k, v)
    parts = {
        "forward (K,V state pass, piece scan, output pass)": (
            jax.jit(lambda q, k, v: pallas_triton.forward(q, k, v, s)[0]), (q, k, v)),
        "backward (Q,dO state pass, reverse scan, dQ, dK+dV)": (
            jax.jit(lambda q, k, v, do: pallas_triton.backward(q, k, v, s, saved, do)[:3]), (q, k, v, do)),
    }
    return {name: time_jax(fn, args, iters, reps) for name, (fn, args) in parts.items()}


def count_kernels(fn, args):
    """Triton kernels in the compiled HLO (how many passes over HBM the program launches)."""
    text = fn.lower(*args).compile().as_text()
    return text.count("__gpu$xla.gpu.triton")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="BxTxHxD, comma-separated")
    parser.add_argument("--impls", default="pallas_triton,xla")
    parser.add_argument("--peers", default="fla,lasp")
    parser.add_argument("--sweep", action="store_true", help="time kernel variants at the --sweep-shapes")
    parser.add_argument("--sweep-shapes", default="1x65536x16x128", help="BxTxHxD, comma-separated")
    parser.add_argument("--breakdown", action="store_true", help="time the kernels' forward and backward alone at 64K")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = parser.parse_args(argv)

    device = jax.devices()[0]
    meta = {
        "command": "python3 -m benchmarks.bench_ops_gpu " + " ".join(argv or os.sys.argv[1:]),
        "device": device.device_kind,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": {"jax": jax.__version__, "python": platform.python_version()},
    }
    try:
        import torch
        import triton

        meta["versions"].update(torch=torch.__version__, triton=triton.__version__)
        for name in ("fla", "lasp"):
            try:
                from importlib.metadata import version

                meta["versions"][name] = version("fla-core" if name == "fla" else name)
            except Exception:  # a missing peer is reported by its absence
                pass
        meta["copy_GBps"] = copy_bandwidth_gbs()
    except ImportError:
        meta["copy_GBps"] = None
    print(json.dumps(meta), flush=True)

    rows = []
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    for b, t, h, d in shapes:
        s = slopes(h)
        q, k, v, do = jax_inputs(b, t, h, d)
        tensor_bytes = b * t * h * d * 2
        contenders = {}
        for impl in args.impls.split(","):
            contenders[impl] = jax_fns(
                lambda q, k, v, impl=impl, s=s: lasp_jax.linear_attention(q, k, v, s, impl=impl))
        if args.breakdown and t == 65536:
            meta["breakdown_64K_ms"] = breakdown(q, k, v, do, s, args.iters, args.reps)
            print(json.dumps(meta["breakdown_64K_ms"]), flush=True)
        if args.sweep and f"{b}x{t}x{h}x{d}" in args.sweep_shapes.split(","):
            for name, config in sweep_configs().items():
                kernels = pallas_triton.Kernels(config)
                contenders[f"pallas_triton[{name}]"] = jax_fns(
                    lambda q, k, v, kernels=kernels, s=s: vjp.attend(q, k, v, jnp.asarray(s), None, kernels, None,
                                                                     False))
        # Every kernel variant is checked against chunked XLA on these inputs: a fast wrong variant must show.
        want = jax.jit(jax_fns(lambda q, k, v, s=s: lasp_jax.linear_attention(q, k, v, s, impl="xla"))[1])(
            q, k, v, do)
        for name, (fwd, fwd_bwd) in contenders.items():
            row = {"shape": [b, t, h, d], "impl": name}
            try:
                if name.startswith("pallas_"):
                    row["max_rel_err_vs_xla"] = max_rel_err(fwd_bwd(q, k, v, do), want)
                row["fwd_ms"] = time_jax(fwd, (q, k, v), args.iters, args.reps)
                row["fwd_bwd_ms"] = time_jax(fwd_bwd, (q, k, v, do), args.iters, args.reps)
                if name == "pallas_triton":
                    row["kernels_fwd"] = count_kernels(fwd, (q, k, v))
                    row["kernels_fwd_bwd"] = count_kernels(fwd_bwd, (q, k, v, do))
            except Exception as e:  # one failing contender must not hide the others
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
        del q, k, v, do
        if args.peers:
            for name, (fwd, fwd_bwd, grads) in torch_peers(args.peers.split(","), b, t, h, d, s).items():
                row = {"shape": [b, t, h, d], "impl": name}
                try:
                    row["fwd_ms"] = time_torch(fwd, grads)
                    row["fwd_bwd_ms"] = time_torch(fwd_bwd, grads)
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                rows.append(row)
                print(json.dumps(row), flush=True)
            import torch

            torch.cuda.empty_cache()
        for row in rows:
            if row["shape"] == [b, t, h, d] and "fwd_ms" in row:
                row["fwd_GBps"] = 4 * tensor_bytes / row["fwd_ms"] / 1e6
                row["fwd_bwd_GBps"] = 11 * tensor_bytes / row["fwd_bwd_ms"] / 1e6
                row["floor_fwd_ms"] = 4 * tensor_bytes / (meta["copy_GBps"] or np.nan) / 1e6
                row["floor_fwd_bwd_ms"] = 11 * tensor_bytes / (meta["copy_GBps"] or np.nan) / 1e6

        save(args.out, meta, rows)  # after every shape: a run cut off keeps what it measured
    print(render_table(meta, rows))


def save(out, meta, rows):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "ops_gpu.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(os.path.join(out, "ops_gpu.md"), "w") as f:
        f.write(render_table(meta, rows))
    plot(rows, meta, os.path.join(out, "ops_gpu.png"))


def render_table(meta, rows):
    lines = [
        f"Device: {meta['device']}; date: {meta['date']}; versions: {meta['versions']}; "
        f"copy bandwidth: {meta['copy_GBps']:.0f} GB/s (read + write)" if meta["copy_GBps"] else "",
        f"Command: `{meta['command']}`", "",
        "| B x T x H x D | impl | fwd ms | fwd+bwd ms | fwd GB/s | fwd+bwd GB/s | HBM floor fwd / fwd+bwd ms | "
        "max rel. err. vs XLA |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        if "error" in r:
            lines.append(f"| {shape} | {r['impl']} | error: {r['error'][:80]} | | | | | |")
            continue
        err = f"{r['max_rel_err_vs_xla']:.1e}" if "max_rel_err_vs_xla" in r else ""
        lines.append(f"| {shape} | {r['impl']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | "
                     f"{r.get('fwd_GBps', 0):.0f} | {r.get('fwd_bwd_GBps', 0):.0f} | "
                     f"{r.get('floor_fwd_ms', 0):.3f} / {r.get('floor_fwd_bwd_ms', 0):.3f} | {err} |")
    return "\n".join(lines) + "\n"


def plot(rows, meta, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    shapes = sorted({tuple(r["shape"]) for r in rows}, key=lambda s: (s[0] * s[2], s[1]))
    impls = [i for i in dict.fromkeys(r["impl"] for r in rows) if "[" not in i]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, key in zip(axes, ("fwd_ms", "fwd_bwd_ms")):
        width = 0.8 / max(len(impls), 1)
        for i, impl in enumerate(impls):
            vals = [next((r.get(key, np.nan) for r in rows if tuple(r["shape"]) == s and r["impl"] == impl), np.nan)
                    for s in shapes]
            ax.bar(np.arange(len(shapes)) + i * width, vals, width, label=impl)
        ax.set_xticks(np.arange(len(shapes)) + 0.4 - width / 2)
        ax.set_xticklabels(["x".join(map(str, s)) for s in shapes], fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("ms (log)")
        ax.set_title(key.replace("_ms", "").replace("_", "+"))
    axes[0].legend(fontsize=8)
    fig.suptitle(f"linear attention, bf16, {meta['device']}, {meta['date'][:10]}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
