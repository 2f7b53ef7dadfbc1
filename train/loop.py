"""The training loop: mesh, data, the sharded state and its jitted step, evaluation, checkpoints, a sample.

Every step's loss is read back before that step's checkpoint can be written, so a non-finite loss stops the
run before any state it produced is saved. A batch [B, T] is split as P(data, seq): each host builds only its
own rows/columns (train.data.HostSlice) and `jax.make_array_from_process_local_data` assembles the global
array. The numerics of the step are train.step's.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import models
from train import data as data_lib
from train.checkpoint import Checkpointer, abstract_like
from train.config import TrainConfig, resolve_mesh, validate, validate_shapes
from train.metrics import MetricsLog, Throughput, device_memory_gib, flops_per_token, peak_tflops, perplexity
from train.optim import learning_rate
from train.step import build_state, make_steps, model_config
from train.progress import Progress
from train.tokenizer import load_tokenizer


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the newest intact checkpoint."""


@dataclass
class RunResult:
    """What a finished run reports: per-step training losses (from its start step), validation, a sample."""

    start_step: int
    losses: dict[int, float]
    val_loss: float | None
    sample: str | None


def host_slice(sharding: NamedSharding, shape: tuple[int, int]) -> data_lib.HostSlice:
    """The rows and columns of a [B, T] batch held by this process's devices (a contiguous block)."""
    index_map = sharding.addressable_devices_indices_map(shape)
    bounds = []
    for dim in range(2):
        starts = [idx[dim].indices(shape[dim])[0] for idx in index_map.values()]
        stops = [idx[dim].indices(shape[dim])[1] for idx in index_map.values()]
        lo, hi = min(starts), max(stops)
        covered = sum(b - a for a, b in sorted(set(zip(starts, stops))))
        if covered != hi - lo:
            raise ValueError(f"this process's devices hold a non-contiguous part of dim {dim} of the batch; "
                             "order the mesh so each host's devices are adjacent")
        bounds.append(slice(lo, hi))
    return data_lib.HostSlice(rows=bounds[0], cols=bounds[1])


def _global_batch(local: dict[str, np.ndarray], sharding: NamedSharding, shape) -> dict[str, jax.Array]:
    return {k: jax.make_array_from_process_local_data(sharding, v, shape) for k, v in local.items()}


def evaluate(eval_step, state, batches, sharding, shape) -> float:
    """Mean validation cross-entropy over the given global batches."""
    total, weight = 0.0, 0.0
    for b in batches:
        t, w = eval_step(state, _global_batch(b, sharding, shape))
        total, weight = total + float(t), weight + float(w)
    return total / weight


def sample_text(graphdef, state, tokenizer, cfg: TrainConfig) -> str:
    """Generates sample_tokens after sample_prompt from the recurrent state, on one device, outside the mesh."""
    model_graph, model_state = nnx.split(nnx.merge(graphdef, state)[0])  # the model only, not AdamW's moments
    model = nnx.merge(model_graph, multihost_utils.process_allgather(model_state, tiled=True))
    prompt = tokenizer.encode(cfg.sample_prompt) if cfg.sample_prompt else np.asarray([tokenizer.eos_id])
    tokens = models.generate(model, jnp.asarray(prompt, jnp.int32)[None], cfg.sample_tokens,
                             rng=jax.random.key(cfg.seed + 1), temperature=cfg.sample_temperature)
    return tokenizer.decode(np.asarray(tokens)[0, len(prompt):])  # generate returns the prompt first


def train(cfg: TrainConfig) -> RunResult:
    """Runs (or resumes) training to cfg.steps. Raises ValueError on bad config/data, NonFiniteLoss on NaN."""
    validate(cfg)
    files = data_lib.resolve_files(cfg.data)
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.eos_token)
    is_bin = files[0].suffix == data_lib.BIN_SUFFIX
    vocab = cfg.vocab_size or tokenizer.vocab_size
    if not is_bin and vocab < tokenizer.vocab_size:
        raise ValueError(f"vocab_size {vocab} is smaller than the tokenizer's {tokenizer.vocab_size}")
    if is_bin and cfg.tokenizer == "byte" and not cfg.vocab_size:
        raise ValueError("data: pre-tokenized .bin files need their tokenizer (tokenizer=PATH) or vocab_size=N")
    mcfg = model_config(cfg, vocab)

    axes = resolve_mesh(cfg.mesh, len(jax.devices()), jax.process_count())
    validate_shapes(cfg, axes, jax.process_count())
    devices = jax.devices()[:int(np.prod(list(axes.values())))]
    axis_type = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}[cfg.mesh_axis_type]
    mesh = jax.make_mesh(tuple(axes.values()), tuple(axes.keys()), devices=devices,
                         axis_types=(axis_type,) * len(axes))
    shape = (cfg.batch_size, cfg.seq_len)
    batch_sharding = NamedSharding(mesh, P(tuple(mcfg.batch_axes) or None, mcfg.seq_axis))
    host = host_slice(batch_sharding, shape)

    stream = data_lib.token_stream(files, tokenizer, text_field=cfg.text_field, bin_dtype=cfg.bin_dtype,
                                   max_bytes=cfg.max_data_bytes)
    train_windows, val_windows = data_lib.split(stream, cfg.seq_len, cfg.val_fraction)
    train_ds = data_lib.train_batches(train_windows, batch_size=cfg.batch_size, seed=cfg.data_seed, host=host,
                                      threads=cfg.data_threads)
    val_data = data_lib.val_batches(val_windows, batch_size=cfg.batch_size, n_batches=cfg.eval_batches, host=host)

    main = jax.process_index() == 0
    run_dir = Path(cfg.run_dir)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1, default=str))

    graphdef, state, n_params, n_matmul = build_state(mcfg, cfg, mesh)
    train_step, eval_step = make_steps(graphdef)
    data_iter = iter(train_ds)
    ckpt = Checkpointer(run_dir / "checkpoints", every=cfg.ckpt_every, keep=cfg.ckpt_keep)
    start = 0
    latest = ckpt.latest_step()
    if latest is not None and not cfg.resume:
        raise ValueError(f"run_dir {str(run_dir)!r} already holds checkpoints (newest: step {latest}); "
                         "set resume=true to continue it, or choose a new run_dir")
    if latest is not None:
        state, meta = ckpt.restore(latest, abstract_like(state), data_iter)
        start = int(meta["step"])

    log = MetricsLog(run_dir / "metrics.jsonl", enabled=main)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    n_soft = len(mcfg.softmax_set)
    fpt = flops_per_token(n_matmul, mcfg.n_layers - n_soft, mcfg.n_heads, mcfg.resolved_head_dim, n_soft,
                          cfg.seq_len)
    speed = Throughput(tokens_per_step, fpt, len(devices), peak_tflops(devices[0].device_kind, cfg.peak_tflops))
    schedule = learning_rate(cfg)
    bar = Progress(start, cfg.steps, bar=main and cfg.progress, messages=main)
    if main:
        bar.write(f"{cfg.model}: {n_params / 1e6:.2f}M parameters, mesh {dict(axes)} on {len(devices)} "
                  f"{devices[0].platform} devices, {len(train_windows)} training sequences of {cfg.seq_len} "
                  f"tokens, " + (f"resumed at step {start}" if start else "from scratch") + f"; run dir {run_dir}")

    losses: dict[int, float] = {}
    window: list[float] = []  # losses since the last log line, averaged for the bar and the log
    avg = float("nan")
    val_loss = None
    last_saved = latest
    try:
        with jax.set_mesh(mesh):
            for step in range(start + 1, cfg.steps + 1):
                local = next(data_iter)
                if local["inputs"].max(initial=0) >= mcfg.vocab_size or local["targets"].max(initial=0) >= \
                        mcfg.vocab_size:  # pre-tokenized ids beyond the model's table would be clamped silently
                    raise ValueError(f"data: a token id in the batch of step {step} is >= the model's vocabulary "
                                     f"{mcfg.vocab_size}; check vocab_size / tokenizer / bin_dtype")
                batch = _global_batch(local, batch_sharding, shape)
                state, out = train_step(state, batch)
                loss = float(out["loss"])
                if not math.isfinite(loss) or not math.isfinite(float(out["grad_norm"])):
                    kept = f"the newest checkpoint, step {last_saved}, is intact" if last_saved else "none saved"
                    raise NonFiniteLoss(f"non-finite loss ({loss}) or gradient norm at step {step}; stopping "
                                        f"({kept})")
                losses[step] = loss
                window.append(loss)
                speed.step()
                if step == start + 1:
                    speed.reset()  # the first step includes compilation
                if step % cfg.log_every == 0 or step == cfg.steps:
                    rates = speed.measure()
                    mem = device_memory_gib(jax.local_devices()[0])
                    extra = {"mem_gib": mem} if mem is not None else {}
                    avg, window = float(np.mean(window)), []
                    log.write(step, "train", loss=loss, loss_avg=avg, grad_norm=float(out["grad_norm"]),
                              lr=float(schedule(step - 1)), **rates, **extra)
                    bar.update(step, loss=avg, tokens_per_s=rates.get("tokens_per_s"), mfu=rates.get("mfu"),
                               mem_gib=mem)
                if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
                    val_loss = evaluate(eval_step, state, val_data, batch_sharding, shape)
                    log.write(step, "val", loss=val_loss, perplexity=perplexity(val_loss))
                    bar.write(f"step {step}: train loss {avg:.4f}, validation loss {val_loss:.4f} "
                              f"(perplexity {perplexity(val_loss):.2f})")
                    speed.reset()
                if ckpt.save(step, state, data_iter, {"step": step, "loss": loss, "config": dataclasses.asdict(cfg)},
                             force=step == cfg.steps):
                    last_saved = step
                    speed.reset()
    finally:
        bar.close()
        ckpt.wait()
        ckpt.close()

    sample = None
    if cfg.sample_tokens:
        sample = sample_text(graphdef, state, tokenizer, cfg)
        if main:
            print(f"--- sample ({cfg.sample_tokens} tokens after {cfg.sample_prompt!r}) ---\n"
                  f"{cfg.sample_prompt}{sample}\n---")
    if main:
        print(f"metrics: {run_dir / 'metrics.jsonl'} (plot: python -m train.plot {run_dir})")
    return RunResult(start, losses, val_loss, sample)
