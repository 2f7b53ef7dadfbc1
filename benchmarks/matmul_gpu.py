"""The training step's projection matmuls, one at a time, on one GPU: how close each runs to the device's peak.

    python3 -m benchmarks.matmul_gpu [--model mamba2-1.3b] [--tokens 65536] [--iters 20] [--reps 5] [--out DIR]

Why: in the Mamba-2 1.3B step on an H200 the matmuls take about half the GPU time (710-730 ms of 1.41-1.46 s,
benchmarks/results/profile_train_h200_s19_mamba2_named.md), at about 740 TFLOP/s on average, while the step's
profile cannot say which projection's which pass is slow (cuBLAS kernels carry no source line). Here each projection
of one block runs alone as autodiff forms it in the step: x [T, d_in] and the fp32 weight cast to bf16, forward y =
x W, and the backward's dX = dY W^T and dW = X^T dY (bf16 product, then cast to the weight's fp32). The tied LM head
is timed the same way, as one GEMM over all T: a bound for models.loss, which runs it in chunks of positions with
fp32 logits and an fp32 dW. Variant "dw_f32" asks the dW product for a float32 result (preferred_element_type),
which is what the step does next anyway; it may pick another cuBLAS kernel. Projection "in_dx_sum" is the
in-projections' input gradient, the sum of gate_proj's, in_proj's and dt_proj's dX (the step's 12 ms "cotangent
sum" add fusion): "autodiff" as jax.vjp forms it (bf16 products, then adds), "f32_sum" with float32 products summed
in float32 and rounded once, "concat" as one product over the concatenated cotangents and weights; each row also
counts the compiled program's fusions and GEMM custom calls (whether XLA folded an add into a GEMM's output). XLA
flags (e.g. autotuning) apply to the whole process: compare them by running the script under different XLA_FLAGS.

Rows: projection, pass, ms (`measure.median_ms`), TFLOP/s and its share of train.metrics.peak_tflops. Writes
matmul_gpu.jsonl and matmul_gpu.md under --out. CPU check of the script itself: --tokens 256 --model mamba2-tiny
--iters 1 --reps 1 --out /tmp/matmul.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import jax
import jax.numpy as jnp

from benchmarks import measure
from models import presets
from train.metrics import peak_tflops


def projections(cfg) -> dict[str, tuple[int, int]]:
    """{name: (d_in, d_out)} of a Mamba-2 block's projections (models.mamba2.Mamba2Mixer) and the tied LM head."""
    if cfg.kind != "mamba2":
        raise ValueError(f"matmul_gpu knows Mamba-2 presets' projections only, not kind {cfg.kind!r}")
    d, inner = cfg.d_model, cfg.expand * cfg.d_model
    return {"gate_proj": (d, inner), "in_proj": (d, inner + 2 * cfg.n_groups * cfg.d_state),
            "dt_proj": (d, cfg.ssm_heads), "out_proj": (inner, d), "lm_head": (d, cfg.vocab_size)}


def passes(tokens: int, d_in: int, d_out: int, seed: int = 0):
    """{pass: (fn, args)}: forward, dX and dW (bf16 result and float32 result) as autodiff forms them."""
    kx, ky, kw = jax.random.split(jax.random.key(seed), 3)
    bf = jnp.bfloat16
    x = jax.random.normal(kx, (tokens, d_in), bf)
    dy = jax.random.normal(ky, (tokens, d_out), bf)
    w = jax.random.normal(kw, (d_in, d_out), jnp.float32)
    return {
        "forward": (jax.jit(lambda x, w: jnp.dot(x, w.astype(bf))), (x, w)),
        "dX": (jax.jit(lambda dy, w: jnp.dot(dy, w.astype(bf).T)), (dy, w)),
        "dW": (jax.jit(lambda x, dy: jnp.dot(x.T, dy).astype(jnp.float32)), (x, dy)),
        "dW_f32": (jax.jit(lambda x, dy: jnp.dot(x.T, dy, preferred_element_type=jnp.float32)), (x, dy)),
    }


def cotangent_sums(tokens: int, cfg, seed: int = 0):
    """{variant: (fn, args)}: the in-projections' dX summed over gate_proj, in_proj and dt_proj (module docstring)."""
    d = cfg.d_model
    outs = [projections(cfg)[name][1] for name in ("gate_proj", "in_proj", "dt_proj")]
    keys = jax.random.split(jax.random.key(seed), 2 * len(outs) + 1)
    bf = jnp.bfloat16
    x = jax.random.normal(keys[0], (tokens, d), bf)
    gs = tuple(jax.random.normal(k, (tokens, n), bf) for k, n in zip(keys[1::2], outs))
    ws = tuple(jax.random.normal(k, (d, n), jnp.float32) for k, n in zip(keys[2::2], outs))

    def autodiff(x, gs, ws):
        return jax.vjp(lambda x: tuple(jnp.dot(x, w.astype(bf)) for w in ws), x)[1](gs)[0]

    def f32_sum(x, gs, ws):
        del x
        return sum(jnp.dot(g, w.astype(bf).T, preferred_element_type=jnp.float32) for g, w in zip(gs, ws)).astype(bf)

    def concat(x, gs, ws):
        del x
        return jnp.dot(jnp.concatenate(gs, axis=-1), jnp.concatenate([w.astype(bf) for w in ws], axis=-1).T)

    return {name: (jax.jit(fn), (x, gs, ws)) for name, fn in
            (("autodiff", autodiff), ("f32_sum", f32_sum), ("concat", concat))}


def compiled_counts(fn, args, path: str) -> str:
    """'F fusions, G cuBLAS calls' of fn's optimized program, whose HLO text is written to path."""
    text = fn.lower(*args).compile().as_text()
    with open(path, "w") as fh:
        fh.write(text)
    fusions = len(re.findall(r"^\s*\S+ = \S+ fusion\(", text, re.M))
    gemms = len(re.findall(r"custom_call_target=\"__cublas", text))
    return f"{fusions} fusions, {gemms} cuBLAS calls"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mamba2-1.3b")
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    cfg = presets.get(args.model)
    device = jax.devices()[0]
    peak = peak_tflops(device.device_kind)
    meta = measure.provenance("benchmarks.matmul_gpu", sys.argv[1:] if argv is None else argv, ("jax", "jaxlib"))
    meta.update(device=device.device_kind, xla_flags=os.environ.get("XLA_FLAGS", ""), tokens=args.tokens)
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for name, (d_in, d_out) in projections(cfg).items():
        flops = 2.0 * args.tokens * d_in * d_out
        for pass_name, (fn, fn_args) in passes(args.tokens, d_in, d_out).items():
            ms = measure.median_ms(fn, fn_args, args.iters, args.reps)
            tflops = flops / ms / 1e9
            row = dict(meta, projection=name, shape=f"{args.tokens}x{d_in}x{d_out}", step_pass=pass_name,
                       ms=round(ms, 4), tflops=round(tflops, 1), peak_share=round(tflops / peak, 3) if peak else None)
            rows.append(row)
            measure.append_row(os.path.join(args.out, "matmul_gpu.jsonl"), row)
            print(f"{name:10s} {pass_name:8s} {ms:8.3f} ms {tflops:7.1f} TFLOP/s", flush=True)
    flops = 2.0 * args.tokens * cfg.d_model * sum(projections(cfg)[n][1] for n in ("gate_proj", "in_proj", "dt_proj"))
    for variant, (fn, fn_args) in cotangent_sums(args.tokens, cfg).items():
        ms = measure.median_ms(fn, fn_args, args.iters, args.reps)
        tflops = flops / ms / 1e9
        row = dict(meta, projection="in_dx_sum", shape=f"{args.tokens}x(3 products)x{cfg.d_model}",
                   step_pass=variant, ms=round(ms, 4), tflops=round(tflops, 1),
                   peak_share=round(tflops / peak, 3) if peak else None,
                   program=compiled_counts(fn, fn_args, os.path.join(args.out, f"in_dx_sum_{variant}.hlo.txt")))
        rows.append(row)
        measure.append_row(os.path.join(args.out, "matmul_gpu.jsonl"), row)
        print(f"in_dx_sum  {variant:8s} {ms:8.3f} ms {tflops:7.1f} TFLOP/s  {row['program']}", flush=True)
    table = measure.markdown_table(rows, tuple((key, lambda r, key=key: str(r.get(key, ""))) for key in (
        "projection", "shape", "step_pass", "ms", "tflops", "peak_share", "program")))
    with open(os.path.join(args.out, "matmul_gpu.md"), "w") as fh:
        fh.write(f"# Projection matmuls on {device.device_kind} (peak {peak} TFLOP/s)\n\n"
                 f"{meta}\n\n{table}\n")


if __name__ == "__main__":
    main()
