"""jla's own Mamba-2 training step on one GPU, as the peer beside bench_train_gpu's mamba2-1.3b step.

    python3 -m benchmarks.peer_train_jla [--preset mamba2-1p3b] [--tokens 65536] [--documents 16] [--steps 3]
        [--remat full] [--profile] [--out DIR]

Why: issue 16's Mamba-2 1.3B step (tokens/s, MFU, peak memory) had no peer beside it. jla (jax-linear-attention
0.1.0) trains Mamba-2 in JAX with Mosaic GPU kernels of its own; this times its whole step, model, loss and
optimizer as its trainer builds them (jla.training.step.build_train_step over jla.models.build_model), in a
process of its own: one process per --remat, run one after another by the caller.

The model: jla's preset (mamba2-1p3b: 48 Mamba-2 blocks, d_model 2048, d_state 128, expand 2, head dim 64, one
group: bench_train_gpu's mamba2-1.3b) with that model's vocabulary (50304, the tokenizer's rounded up) and
embedding tying, so both count the same matmuls; jla's own choices otherwise (its remat policy, --remat,
default "full"; its norms and initialisation). AdamW at a constant 3e-4 (jla.training.optimizers). Data: one row
of --tokens random tokens with --documents packed documents cut where bench_train_gpu cuts them
(bench_train_gpu.segment_ids), the same row every step.

Timing: the median of --steps steps after one that compiles and one warm-up (block_until_ready on the loss).
MFU: jla's own (jla.training.performance, its analytic FLOPs: 2 per multiply-add, training 3x forward, which
also count the SSD's intra-chunk products) and ours (train.metrics.flops_per_token of models' mamba2-1.3b at
the same tokens: the matmul parameters and the state products only), both over train.metrics' dense bf16 peak.
Peak memory: the device's peak_bytes_in_use. --profile traces one more step and writes where its GPU time went
by kernel and kind (gpu_trace; no source lines: jla's compiled program is not read) to
OUT/peer_train_jla_profile-REMAT.{md,json}. Appends one JSON row to OUT/peer_train_jla.jsonl (an error row when
the step does not fit or fails).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import measure

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="mamba2-1p3b", help="a jla.models preset")
    parser.add_argument("--ours", default="mamba2-1.3b", help="the models preset whose FLOPs give our MFU")
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--documents", type=int, default=16, help="packed documents in the row (segment_ids)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--remat", default="full", help="jla's ModelConfig.remat")
    parser.add_argument("--profile", action="store_true", help="trace one more step: where its GPU time went")
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.tokens < 2:
        parser.error(f"--tokens must be at least 2, got {args.tokens}")
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if not 1 <= args.documents <= args.tokens:
        parser.error(f"--documents must be in [1, --tokens={args.tokens}], got {args.documents}")
    return args


def batch(tokens: int, documents: int, vocab: int, seed: int = 0) -> dict[str, jax.Array]:
    """jla's batch layout [grad_accum 1, B 1, T]: input_ids, labels (the next tokens) and segment_ids (the
    documents where bench_train_gpu.segment_ids cuts one row)."""
    from benchmarks.bench_train_gpu import segment_ids

    ids = np.random.default_rng(seed).integers(0, vocab, (1, 1, tokens + 1), dtype=np.int32)
    return {"input_ids": jnp.asarray(ids[..., :-1]), "labels": jnp.asarray(ids[..., 1:]),
            "segment_ids": jnp.asarray(segment_ids(1, tokens, documents), jnp.int32)[None]}


def profile(step, state, data, out: str, name: str) -> dict:
    """One more step under the profiler: OUT/NAME.{md,json} by kernel and kind (gpu_trace); the totals by kind."""
    import tempfile

    from benchmarks import gpu_trace

    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            *state, metrics, _ = step(*state, data, jax.random.key(2))
            jax.block_until_ready(metrics["loss"])
        summary = gpu_trace.summarize(gpu_trace.kernel_times(trace_dir), "")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write(gpu_trace.render(summary, f"jla {name} ({jax.devices()[0].device_kind})"))
    return {k: round(ms, 1) for k, ms in summary["kinds"].items()}


def our_model(name: str):
    """models' preset `name` as bench_train_gpu trains it (train.step.model_config: the vocabulary rounded up)."""
    from models import presets
    from train.config import TrainConfig
    from train.step import model_config

    cfg = TrainConfig(model=presets.get(name))
    return model_config(cfg, cfg.model.vocab_size)


def our_flops_per_token(mcfg, tokens: int) -> float:
    """train.metrics' FLOPs per token of our model mcfg, its matmul parameters counted from shapes."""
    from train.metrics import flops_per_token
    from train.step import count_matmul_params

    return flops_per_token(mcfg, count_matmul_params(mcfg), tokens)


def run(args) -> dict:
    import equinox as eqx
    from jla.config import OptimConfig
    from jla.models import build_model, get_preset
    from jla.training.optimizers import optimizer_from_config
    from jla.training.performance import estimate_flops_per_token
    from jla.training.schedulers import create_schedule
    from jla.training.step import LossConfig, build_train_step, lm_loss

    from train.metrics import peak_tflops

    mcfg = our_model(args.ours)
    cfg = get_preset(args.preset).replace(vocab_size=mcfg.vocab_size, tie_embeddings=mcfg.tie_embeddings,
                                          remat=args.remat)
    model = build_model(cfg, key=jax.random.key(0))
    optim = OptimConfig(lr=3e-4, schedule="constant", warmup_steps=0)
    tx = optimizer_from_config(optim, create_schedule(optim.lr, "constant", warmup_steps=0, total_steps=1000,
                                                      d_model=cfg.d_model))
    opt_state = tx.init(eqx.filter(model, eqx.is_inexact_array))
    step = build_train_step(tx, lm_loss(LossConfig()))
    data, key = batch(args.tokens, args.documents, cfg.vocab_size), jax.random.key(1)
    start = time.perf_counter()
    model, opt_state, metrics, key = step(model, opt_state, data, key)
    loss = float(jax.block_until_ready(metrics["loss"]))
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(args.steps + 1):  # the first is a warm-up
        start = time.perf_counter()
        model, opt_state, metrics, key = step(model, opt_state, data, key)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - start)
    step_s = float(np.median(times[1:]))
    traced = None
    if args.profile:
        traced = profile(step, (model, opt_state), data, args.out, f"peer_train_jla_profile-{args.remat}")
    device = jax.devices()[0]
    tokens_per_s = args.tokens / step_s
    peak = peak_tflops(device.device_kind)
    jla_flops = estimate_flops_per_token(cfg, args.tokens).training
    our_flops = our_flops_per_token(mcfg, args.tokens)
    stats = device.memory_stats() or {}
    row = {"step_s": step_s, "tokens_per_s": tokens_per_s, "compile_s": round(compile_s, 1), "loss": loss,
           "mfu_jla_flops": tokens_per_s * jla_flops / (peak * 1e12) if peak else None,
           "mfu_our_flops": tokens_per_s * our_flops / (peak * 1e12) if peak else None,
           "jla_flops_per_token": jla_flops, "our_flops_per_token": our_flops,
           "peak_mem_gib": stats.get("peak_bytes_in_use", 0) / 2**30 or None}
    return row | ({"profile_ms": traced} if traced else {})


def main(argv=None) -> None:
    args = parse_args(argv)
    row = {"peer": "jla", "preset": args.preset, "remat": args.remat, "tokens": args.tokens,
           "documents": args.documents, "device": jax.devices()[0].device_kind,
           "versions": measure.package_versions(("jax", "jaxlib", "jax-cuda13-plugin", "jax-linear-attention")),
           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "command": "python -m benchmarks.peer_train_jla " + " ".join(sys.argv[1:] if argv is None else argv)}
    try:
        row.update(run(args))
    except Exception as error:  # a step that does not fit is a result: record it, say why
        row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "peer_train_jla.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
