"""Mamba-2's SSD on the Mosaic walks with output heads paired per CTA (pallas_mosaic.Config.pair_heads, the
default) and without, beside the Triton kernels: forward and forward+backward of one layer's linear attention.

    python3 -m benchmarks.walks_gpu [--t 65536] [--heads 64] [--groups 1] [--dk 128] [--dv 64] [--docs 16]
        [--impls paired,unpaired,pallas_triton,paired:FIELD=N...] [--iters 10] [--reps 3] [--out DIR]

Why: the token walks were the largest single kernel item of a Mamba-2 1.3B training step on an H200 (431 of
1870 ms, results/profile_train_h200_s11_mamba2.md); pairing changes the output and dV walks only (`_pairs`).
Contenders: "paired" and "unpaired" are pallas_mosaic.Walks at Config(pair_heads=True / False), either with
more Config fields as ":field=value" (e.g. "paired:stages=2:approx_math=0", a launch-size sweep), "pallas_triton"
the Triton kernels, each through vjp.attend_tokens as lasp_jax.linear_attention runs them on one device.
Inputs (tests/ops/test_gva.py's GPU test at a 1.3B layer's shape by default): q = C and k = B [1, T, G, Dk], v
[1, T, H, Dv], bf16 unit normals (k times Dk^-0.5, scale Dk^-0.5), rates [1, T, H] uniform in [0.001, 0.1]
(differentiated), --docs documents per row at random starts (measure.random_documents). Timing:
measure.median_ms of the jitted forward and of forward+backward (o and dq, dk, dv, d_rates for a given dO).
Errors: the largest of measure.errors over o, dq, dk, dv and the rates' gradient against measure.fp32_reference
(the XLA impl on the float32-upcast inputs at HIGHEST precision). Each row names the pieces the contender's plan
cuts T into (its `plan(q, v)`, as pieces_tokens.forward cuts them; none for XLA). Writes walks_gpu.{jsonl,md}
under --out (a row per contender as it finishes).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import measure
from lasp_jax.ops import impls, pallas_mosaic, pieces_tokens, vjp

WALKS = {"paired": {"pair_heads": True}, "unpaired": {"pair_heads": False}}  # pallas_mosaic.Config overrides
OTHERS = ("pallas_triton", "xla")  # impls.IMPLS entries


def contender(name: str):
    """The impl a --impls entry names: "paired" or "unpaired" (the Mosaic walks), optionally with more Config
    fields as ":field=value" ("paired:stages=2:approx_math=0"), or "pallas_triton" / "xla"."""
    base, *fields = name.split(":")
    if base in OTHERS:
        if fields:
            raise ValueError(f"{name!r}: {base!r} takes no Config fields (only the Mosaic walks, {sorted(WALKS)})")
        return impls.IMPLS[base]
    if base not in WALKS:
        raise ValueError(f"unknown contender {name!r}: expected one of {sorted(WALKS)} (with :field=value "
                         f"Config overrides) or {list(OTHERS)}")
    types = {f.name: f.type for f in dataclasses.fields(pallas_mosaic.Config)}
    overrides = dict(WALKS[base])
    for field in fields:
        key, _, value = field.partition("=")
        if key not in types or not value.isdigit():
            raise ValueError(f"{field!r} in {name!r} is not field=integer for a pallas_mosaic.Config field of "
                             f"{sorted(types)}")
        overrides[key] = bool(int(value)) if types[key] in (bool, "bool") else int(value)
    return pallas_mosaic.Walks(config=dataclasses.replace(pallas_mosaic.DEFAULT, **overrides))


def inputs(t, heads, groups, dk, dv, docs, seed=0):
    """q, k [1, T, G, Dk], v, dO [1, T, H, Dv] bf16; rates [1, T, H] float32; segment ids [1, T] int32 or None."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((1, t, groups, dk))
    k = rng.standard_normal((1, t, groups, dk)) / np.sqrt(dk)
    v, do = (rng.standard_normal((1, t, heads, dv)) for _ in range(2))
    rates = jnp.asarray(rng.uniform(0.001, 0.1, (1, t, heads)), jnp.float32)
    ids = jnp.asarray(measure.random_documents(rng, 1, t, docs)) if docs > 1 else None
    return tuple(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v, do)), rates, ids


def piece_count(impl, q, v) -> int | None:
    """The number of pieces the per-token path cuts q, v into under impl (its plan), None for one that cuts
    none (XLA)."""
    return impl.plan(q, v).pieces if isinstance(impl, pieces_tokens.DrivenTokens) else None


def attend(impl, scale, q, k, v, rates, ids):
    return vjp.attend_tokens(q, k, v, rates, ids, None, impl, None, False, scale)


def table(rows) -> str:
    lines = ["| T | H | G | Dk | Dv | docs | impl | pieces | fwd ms | fwd+bwd ms | max err | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = (f"| {r['t']} | {r['heads']} | {r['groups']} | {r['dk']} | {r['dv']} | {r['docs']} | {r['impl']} | "
                f"{'' if r['pieces'] is None else r['pieces']} |")
        if "error" in r:
            lines.append(f"{head} | | | {r['error'][:120]} |")
            continue
        lines.append(f"{head} {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | {r['max_err']:.1e} | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--t", type=int, default=65536)
    parser.add_argument("--heads", type=int, default=64)
    parser.add_argument("--groups", type=int, default=1)
    parser.add_argument("--dk", type=int, default=128)
    parser.add_argument("--dv", type=int, default=64)
    parser.add_argument("--docs", type=int, default=16)
    parser.add_argument("--impls", default="paired,unpaired,pallas_triton")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = parser.parse_args(argv)
    names = args.impls.split(",")
    try:
        made = {name: contender(name) for name in names}
    except ValueError as e:
        parser.error(str(e))
    os.makedirs(args.out, exist_ok=True)
    jsonl, md = (os.path.join(args.out, f"walks_gpu.{ext}") for ext in ("jsonl", "md"))
    provenance = measure.provenance("benchmarks.walks_gpu", sys.argv[1:] if argv is None else argv,
                                    ("jax", "jaxlib", "jax-cuda13-plugin"))
    measure.append_row(jsonl, {"provenance": provenance | {"device": jax.devices()[0].device_kind}})
    (q, k, v, do), rates, ids = inputs(args.t, args.heads, args.groups, args.dk, args.dv, args.docs)
    scale = args.dk ** -0.5
    want = measure.fp32_reference(q, k, v, do, rates, scale, ids)
    shape = dict(t=args.t, heads=args.heads, groups=args.groups, dk=args.dk, dv=args.dv, docs=args.docs)
    rows = []
    for name in names:
        row = dict(shape, impl=name, pieces=piece_count(made[name], q, v))
        try:
            fwd, fwd_bwd = measure.fwd_and_fwd_bwd(functools.partial(attend, made[name], scale), grad_operands=1)
            got = jax.block_until_ready(fwd_bwd(q, k, v, do, rates, ids))
            errs = measure.errors(got, want)
            row.update(fwd_ms=measure.median_ms(fwd, (q, k, v, rates, ids), args.iters, args.reps),
                       fwd_bwd_ms=measure.median_ms(fwd_bwd, (q, k, v, do, rates, ids), args.iters, args.reps),
                       errors=errs, max_err=errs["max"])
        except Exception as e:  # a contender that cannot run here gets its reason in the table
            row["error"] = f"{type(e).__name__}: {e}"
        rows.append(row)
        measure.append_row(jsonl, row)
        print(row, flush=True)
    with open(md, "w") as f:
        f.write(table(rows) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
