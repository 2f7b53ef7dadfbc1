"""The hybrids' softmax attention on one GPU: lasp_jax's blockwise XLA loop against cuDNN's fused flash attention,
causal, with and without packed documents; forward and forward+backward, bf16. It decides what
causal_softmax_attention's impl="auto" takes (lasp_jax/ops/softmax.py): impl="cudnn" is cuDNN's own causal mask
without documents and, with documents from key 0, the packed layout on Hopper (a dense mask before it).

    python3 -m benchmarks.softmax_gpu [--lengths 8192,16384,32768,65536] [--batch 1] [--heads 16] [--kv-heads 4]
        [--head-dim 128] [--docs 8] [--impls blockwise,cudnn] [--iters 5] [--reps 3] [--out DIR]

Contenders (--impls): causal_softmax_attention's impls (blockwise, cudnn, pallas_triton: the flash kernels of
lasp_jax.ops.softmax_kernel at their default launch sizes) and "pallas_triton:BQ:BK:WARPS:STAGES" for a sweep
of those sizes, e.g. --impls cudnn,pallas_triton:64:64:4:2,pallas_triton:128:64:8:3.

Shape: the tnl-1b-hybrid softmax layer (16 query heads, 4 K/V heads, head dim 128) by default. Inputs: q, k, v,
dO standard normals rounded to bf16, scale d^-0.5; documents: --docs per row at random starts (the same in every
run). Timing: `measure.median_ms` of the jitted forward and of forward+backward (o and dq, dk, dv for a given dO;
the ids are an argument, not a constant). Memory: XLA's compile-time temporaries of forward+backward
(memory_analysis().temp_size_in_bytes), which is where a dense mask or score matrix would show. Error:
`measure.errors` against the blockwise path on the fp32-upcast inputs (HIGHEST precision). TFLOP/s counts the
causal work, 2 * 2 * B * H * T^2 * D / 2 forward and 3.5x that forward+backward, also for documents (which need
less): it compares the contenders at one T, not the hardware's peak. A contender that fails (cuDNN refusing a
shape, out of memory) gets a row with its error instead of numbers.

Writes softmax_gpu.jsonl (a row per contender, as it finishes) and softmax_gpu.md (the table and provenance)
under --out. CPU check of the script itself (XLA:CPU has no bf16 dots): --lengths 256 --dtype float32
--head-dim 32 --out /tmp/softmax (cuDNN rows then hold its refusal).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import measure
from lasp_jax.ops import softmax_kernel
from lasp_jax.ops.softmax import causal_softmax_attention
from lasp_jax.ops.states import document_numbers


def inputs(b, t, h, hkv, d, docs, dtype, seed=0):
    """q [B, T, H, D], k, v [B, T, Hkv, D], dO like q, in dtype; segment ids [B, T] int32 with `docs` documents
    per row (None for 1)."""
    keys = jax.random.split(jax.random.key(seed), 4)
    shapes = ((b, t, h, d), (b, t, hkv, d), (b, t, hkv, d), (b, t, h, d))
    q, k, v, do = (jax.random.normal(key, s, jnp.float32).astype(dtype) for key, s in zip(keys, shapes))
    if docs <= 1:
        return (q, k, v, do), None
    return (q, k, v, do), jnp.asarray(measure.random_documents(np.random.default_rng(seed), b, t, docs))


def attend_fn(impl):
    """attend(q, k, v, *ids) -> o for one contender: causal_softmax_attention's impl, or
    "pallas_triton:BQ:BK:WARPS:STAGES" for the flash kernels at those launch sizes (a sweep)."""
    if impl.startswith("pallas_triton:"):
        bq, bk, warps, stages = (int(x) for x in impl.split(":")[1:])
        config = softmax_kernel.Config(block_q=bq, block_k=bk, num_warps=warps, num_stages=stages)

        def kernels(q, k, v, *ids):
            docs = document_numbers(ids[0]) if ids else None
            return softmax_kernel.attention(q, k, v, docs, 0, q.shape[-1] ** -0.5, config)
        return kernels

    def attend(q, k, v, *ids):
        return causal_softmax_attention(q, k, v, segment_ids=ids[0] if ids else None, impl=impl)
    return attend


def measure_one(impl, tensors, ids, reference, iters, reps):
    """{fwd_ms, fwd_bwd_ms, temp_gib, errors} of one contender, or {error} where it fails."""
    q, k, v, do = tensors
    operands = () if ids is None else (ids,)
    fwd, fwd_bwd = measure.fwd_and_fwd_bwd(attend_fn(impl))
    try:
        compiled = fwd_bwd.lower(q, k, v, do, *operands).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes
        got = compiled(q, k, v, do, *operands)
        return {"fwd_ms": measure.median_ms(fwd, (q, k, v, *operands), iters, reps),
                "fwd_bwd_ms": measure.median_ms(compiled, (q, k, v, do, *operands), iters, reps),
                "temp_gib": temp / 2**30, "errors": measure.errors(got, reference)}
    except Exception as error:  # a refused shape or an OOM is a result here, not the end of the run
        return {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}


def fp32_reference(tensors, ids):
    """(o, (dq, dk, dv)) of the blockwise path on the fp32-upcast inputs."""
    q, k, v, do = (x.astype(jnp.float32) for x in tensors)
    operands = () if ids is None else (ids,)
    return jax.block_until_ready(measure.fwd_and_fwd_bwd(attend_fn("blockwise"))[1](q, k, v, do, *operands))


def table(rows) -> str:
    return measure.markdown_table(rows, (
        ("T", lambda r: f"{r['t']}"), ("docs", lambda r: f"{r['docs']}"), ("impl", lambda r: r["impl"]),
        ("fwd ms", lambda r: f"{r['fwd_ms']:.2f}"), ("fwd+bwd ms", lambda r: f"{r['fwd_bwd_ms']:.2f}"),
        ("fwd+bwd TFLOP/s", lambda r: f"{r['fwd_bwd_tflops']:.1f}"), ("temp GiB", lambda r: f"{r['temp_gib']:.2f}"),
        ("max err", lambda r: f"{r['errors']['max']:.1e}")))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="8192,16384,32768,65536")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--docs", type=int, default=8, help="documents per row in the packed case")
    p.add_argument("--impls", default="blockwise,cudnn")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    jsonl = os.path.join(args.out, "softmax_gpu.jsonl")
    head = measure.provenance("benchmarks.softmax_gpu", argv, ("jax", "jaxlib", "jax-cuda13-plugin"))
    head["device"] = jax.devices()[0].device_kind
    measure.append_row(jsonl, {"provenance": head})
    rows = []
    b, h, hkv, d = args.batch, args.heads, args.kv_heads, args.head_dim
    for t in (int(x) for x in args.lengths.split(",")):
        for docs in (1, args.docs):
            tensors, ids = inputs(b, t, h, hkv, d, docs, jnp.dtype(args.dtype))
            start = time.perf_counter()
            reference = fp32_reference(tensors, ids)
            reference_s = time.perf_counter() - start
            flops = 3.5 * 2 * 2 * b * h * t * t * d / 2
            for impl in args.impls.split(","):
                start = time.perf_counter()
                row = {"t": t, "docs": docs, "impl": impl, "batch": b, "heads": h, "kv_heads": hkv, "head_dim": d}
                row |= measure_one(impl, tensors, ids, reference, args.iters, args.reps)
                if "fwd_bwd_ms" in row:
                    row["fwd_bwd_tflops"] = flops / (row["fwd_bwd_ms"] * 1e-3) / 1e12
                row |= {"wall_s": time.perf_counter() - start, "reference_s": reference_s}
                measure.append_row(jsonl, row)
                rows.append(row)
            del reference
    with open(os.path.join(args.out, "softmax_gpu.md"), "w") as f:
        f.write(f"# Softmax attention, one {head['device']}: blockwise XLA vs cuDNN\n\n`{head['command']}`, "
                f"{head['date']}, {head['versions']}\n\nB={b}, H={h}, Hkv={hkv}, D={d}, {args.dtype}\n\n{table(rows)}\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
