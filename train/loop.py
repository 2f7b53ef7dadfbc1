"""The training loop: mesh, data, the sharded state and its jitted step, evaluation, checkpoints, a sample.

Every step's loss is read back before that step's checkpoint can be written, and the parameters are checked
before each save, so a non-finite loss or state stops the run before anything it produced is saved. The run
directory is locked for the run's life (train.checkpoint.RunDirLock). SIGTERM and SIGINT stop the run at the
next step boundary after saving that step; resume then continues exactly, and is refused where it could not
(a data-order field changed). A batch [B, T] is split as P(data, seq): each host builds only its own
rows/columns (train.data.HostSlice) and `jax.make_array_from_process_local_data` assembles the global array.
The numerics of the step are train.step's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import threading
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
from train.checkpoint import Checkpointer, NonFiniteState, RunDirLock, abstract_like, every_process
from train.config import TrainConfig, resolve_mesh, validate, validate_shapes
from train.metrics import (MetricsLog, Throughput, attention_length, device_memory_gib, flops_per_token, peak_tflops,
                           perplexity)
from train.optim import learning_rate
from train.step import build_state, make_steps, model_config
from train.progress import Progress
from train.tokenizer import load_tokenizer


# Fields a resume must keep: the checkpoint's data position depends on them (with one changed, the resumed run
# would not see the batches the uninterrupted run would have seen), and `documents` decides what a row trains on.
DATA_ORDER_FIELDS = ("data", "max_data_bytes", "tokenizer", "text_field", "bin_dtype", "seq_len", "batch_size",
                     "val_fraction", "data_seed", "documents")
# What runs saved before a field existed did, for the fields added since.
_BEFORE_FIELD = {"documents": "continuous"}


class NonFiniteLoss(RuntimeError):
    """The loss or the parameters became NaN or infinite; the message names the step and the newest intact
    checkpoint."""


class StopSignals:
    """While active, SIGTERM and SIGINT only record the first one's name in `received` (the loop then saves
    and stops at the next step boundary). The first signal puts SIGINT's previous handler back, so a second
    Ctrl-C acts as it would have (KeyboardInterrupt: the escape when a save hangs); SIGTERM stays recorded until
    exit, after the save, since schedulers and container runtimes often send it more than once. The previous
    handlers are restored on exit. Inactive outside the main thread, where Python cannot set handlers."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        self.received = self.received or signal.Signals(signum).name
        if signal.SIGINT in self._previous:
            signal.signal(signal.SIGINT, self._previous.pop(signal.SIGINT))

    def _restore(self):
        previous, self._previous = self._previous, {}  # a SIGINT now may pop from the dict being restored
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        self._restore()

    def stop_requested(self) -> bool:
        """Whether any process received a signal (all processes must stop at the same step)."""
        if jax.process_count() == 1:
            return self.received is not None
        return bool(multihost_utils.process_allgather(np.int32(self.received is not None)).max())


@dataclass
class RunResult:
    """What a finished run reports: per-step training losses (from its start step), validation, a sample, and
    the signal that stopped it early (None if it ran to cfg.steps)."""

    start_step: int
    losses: dict[int, float]
    val_loss: float | None
    sample: str | None
    stopped_by: str | None = None


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
    """Generates sample_tokens after sample_prompt from the recurrent state, on one device, outside the mesh; with
    documents="reset" the tokenizer's eos_id ends a document there as in training (generate's `separator`)."""
    model_graph, model_state = nnx.split(nnx.merge(graphdef, state)[0])  # the model only, not AdamW's moments
    model = nnx.merge(model_graph, multihost_utils.process_allgather(model_state, tiled=True))
    prompt = tokenizer.encode(cfg.sample_prompt) if cfg.sample_prompt else np.asarray([tokenizer.eos_id])
    tokens = models.generate(model, jnp.asarray(prompt, jnp.int32)[None], cfg.sample_tokens,
                             rng=jax.random.key(cfg.seed + 1), temperature=cfg.sample_temperature,
                             separator=tokenizer.eos_id if cfg.documents == "reset" else None)
    return tokenizer.decode(np.asarray(tokens)[0, len(prompt):])  # generate returns the prompt first


def _lock_run_dir(run_dir: Path, main: bool) -> RunDirLock | None:
    """Creates run_dir and locks it on process 0; every process raises if that failed. Returns the lock."""
    lock, error = None, None
    if main:
        try:
            if run_dir.exists() and not run_dir.is_dir():
                raise ValueError(f"run_dir {str(run_dir)!r} is a file, not a directory")
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ValueError(f"run_dir {str(run_dir)!r} cannot be created: {e.strerror}") from None
            lock = RunDirLock(run_dir)
            note = lock.acquire()
            if note:
                print(f"note: {note}", flush=True)
        except ValueError as e:
            lock, error = None, e
    if jax.process_count() > 1 and not multihost_utils.broadcast_one_to_all(np.int32(error is None)):
        error = error or ValueError(f"run_dir {str(run_dir)!r} cannot be used (see process 0's error)")
    if error:
        raise error
    return lock


def check_resume(cfg: TrainConfig, saved: dict, step: int) -> None:
    """Raises ValueError if resuming the checkpoint of `step` (saved: its config as a dict) under cfg would not
    continue that run exactly: a data-order field changed, or cfg.steps is below the checkpoint."""
    now = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    saved = {**_BEFORE_FIELD, **saved} if saved else saved
    changed = [f"{name}={saved[name]!r} -> {now[name]!r}" for name in DATA_ORDER_FIELDS
               if name in saved and name in now and saved[name] != now[name]]
    if changed:
        raise ValueError(f"resume: the checkpoint of step {step} in run_dir {cfg.run_dir!r} was trained with other "
                         f"data settings ({', '.join(changed)}); resuming would not continue its data order. "
                         "Restore those values, or choose a new run_dir")
    if cfg.steps < step:
        raise ValueError(f"steps={cfg.steps} is below the newest checkpoint's step {step} in run_dir "
                         f"{cfg.run_dir!r}; raise steps to continue it, or choose a new run_dir")


def train(cfg: TrainConfig) -> RunResult:
    """Runs (or resumes) training to cfg.steps, or until SIGTERM/SIGINT (saved, then RunResult.stopped_by).

    Raises ValueError on bad config/data or a run_dir in use, NonFiniteLoss on NaN/inf, and
    train.checkpoint.CheckpointError when a save fails or no checkpoint of the run restores.
    """
    validate(cfg)
    files = data_lib.resolve_files(cfg.data)
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.eos_token)
    is_bin = files[0].suffix == data_lib.BIN_SUFFIX
    vocab = cfg.vocab_size or tokenizer.vocab_size
    if not is_bin and vocab < tokenizer.vocab_size:
        raise ValueError(f"vocab_size {vocab} is smaller than the tokenizer's {tokenizer.vocab_size}")
    if is_bin and cfg.tokenizer == "byte" and not cfg.vocab_size:
        raise ValueError("data: pre-tokenized .bin files need their tokenizer (tokenizer=PATH) or vocab_size=N")
    if is_bin and cfg.tokenizer == "byte" and cfg.documents == "reset":
        raise ValueError("documents=reset finds documents by their separator token, which .bin files without their "
                         "tokenizer do not name: give tokenizer=PATH, or documents=continuous")
    mcfg = model_config(cfg, vocab)

    axes = resolve_mesh(cfg.mesh, len(jax.devices()), jax.process_count())
    validate_shapes(cfg, axes, jax.process_count())
    main = jax.process_index() == 0
    run_dir = Path(cfg.run_dir)
    lock = _lock_run_dir(run_dir, main)
    try:
        with StopSignals() as signals:
            return _train(cfg, mcfg, axes, files, tokenizer, run_dir, main, signals)
    finally:
        if lock:
            lock.release()


def _train(cfg: TrainConfig, mcfg, axes, files, tokenizer, run_dir: Path, main: bool,
           signals: StopSignals) -> RunResult:
    """train() once the config is checked and run_dir is locked."""
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
    separator = tokenizer.eos_id if cfg.documents == "reset" else None  # batches carry segment_ids with one
    train_ds = data_lib.train_batches(train_windows, batch_size=cfg.batch_size, seed=cfg.data_seed, host=host,
                                      threads=cfg.data_threads, separator=separator)
    val_data = data_lib.val_batches(val_windows, batch_size=cfg.batch_size, n_batches=cfg.eval_batches, host=host,
                                    separator=separator)

    graphdef, state, n_params, n_matmul = build_state(mcfg, cfg, mesh)
    train_step, eval_step = make_steps(graphdef)
    data_iter = iter(train_ds)
    ckpt = Checkpointer(run_dir / "checkpoints", every=cfg.ckpt_every, keep=cfg.ckpt_keep)
    bar = None
    try:
        latest = ckpt.latest_step()
        if latest is not None and not cfg.resume:
            raise ValueError(f"run_dir {str(run_dir)!r} already holds checkpoints (newest: step {latest}); "
                             "set resume=true to continue it, or choose a new run_dir")
        newest = ckpt.newest_meta() if latest is not None else None
        if newest:  # before any checkpoint is restored or set aside
            refused = None
            try:
                check_resume(cfg, newest[1].get("config", {}), newest[0])
            except ValueError as e:
                refused = e
            if not every_process(refused is None):
                raise refused or ValueError("resume refused on another process (see its error)")
        restored = ckpt.restore_newest(abstract_like(state), data_iter) if latest is not None else None
        start = 0
        if restored:
            for step, why in restored.skipped:
                print(f"warning: skipped checkpoint step {step}, which cannot be restored ({why})", flush=True)
            state, start = restored.state, restored.step
        if main:
            (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1, default=str))

        log = MetricsLog(run_dir / "metrics.jsonl", enabled=main)
        tokens_per_step = cfg.batch_size * cfg.seq_len
        speed = Throughput(tokens_per_step, flops_per_token(mcfg, n_matmul, cfg.seq_len), len(devices),
                           peak_tflops(devices[0].device_kind, cfg.peak_tflops))
        schedule = learning_rate(cfg)
        bar = Progress(start, cfg.steps, bar=main and cfg.progress, messages=main)
        bar.write(f"{mcfg.kind} model: {n_params / 1e6:.2f}M parameters, mesh {dict(axes)} on {len(devices)} "
                  f"{devices[0].platform} devices, {len(train_windows)} training sequences of {cfg.seq_len} "
                  f"tokens, " + (f"resumed at step {start}" if start else "from scratch") + f"; run dir {run_dir}")
        if start == cfg.steps:
            bar.write(f"the run is complete: its newest checkpoint is step {start} = steps; nothing to train")

        losses: dict[int, float] = {}
        window: list[float] = []  # losses since the last log line, averaged for the bar and the log
        avg = float("nan")
        val_loss = None
        last_saved = start or None

        def non_finite(what: str, step: int) -> NonFiniteLoss:
            ckpt.wait()  # a pending save of an earlier (checked) step is on disk before it is called intact
            kept = f"the newest checkpoint, step {last_saved}, is intact" if last_saved else "no checkpoint saved"
            return NonFiniteLoss(f"{what} at step {step}; stopping ({kept})")

        stopped_at = None
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
                    raise non_finite(f"non-finite loss ({loss}) or gradient norm", step)
                losses[step] = loss
                window.append(loss)
                # Softmax layers attend within documents: their FLOPs follow this batch's (this process's rows).
                documents = mcfg.softmax_set and "segment_ids" in local
                speed.step(flops_per_token(mcfg, n_matmul, attention_length(local["segment_ids"])) if documents
                           else None)
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
                stop = signals.stop_requested()
                try:
                    saved = ckpt.save(step, state, data_iter, {"step": step, "loss": loss,
                                                               "config": dataclasses.asdict(cfg)},
                                      force=step == cfg.steps or stop)
                except NonFiniteState:
                    raise non_finite(f"non-finite parameters or optimizer state (loss {loss})", step) from None
                if saved:
                    last_saved = step
                    speed.reset()
                if stop:
                    stopped_at = step
                    break
        ckpt.wait()
    finally:
        if bar:
            bar.close()
        ckpt.close()

    if stopped_at is not None:
        if main:
            print(f"stopped by {signals.received} after step {stopped_at}: checkpoint step {stopped_at} saved in "
                  f"{run_dir / 'checkpoints'}; run again to resume", flush=True)
        return RunResult(start, losses, val_loss, None, stopped_by=signals.received)
    sample = None
    if cfg.sample_tokens:
        sample = sample_text(graphdef, state, tokenizer, cfg)
        if main:
            print(f"--- sample ({cfg.sample_tokens} tokens after {cfg.sample_prompt!r}) ---\n"
                  f"{cfg.sample_prompt}{sample}\n---")
    if main:
        print(f"metrics: {run_dir / 'metrics.jsonl'} (plot: python -m train.plot {run_dir})")
    return RunResult(start, losses, val_loss, sample)
