"""Training throughput and the longest trainable sequence on one or more GPUs: the full step of `python -m train`.

    python -m benchmarks.bench_train_gpu [--model tnl-1b] [--tokens-per-gpu 65536] [--gpus 1,2] [--documents N]
        [--out DIR]

Per GPU count n (one process driving n GPUs, mesh data=D x seq=n/D with D = --data, D sequences of
n/D x tokens-per-gpu tokens, LASP over seq; parameters and AdamW moments are replicated):
  memory      compile only: XLA's buffers per device (arguments + temporaries) at --tokens-per-gpu with remat
              --remat-longest (to compare GPU counts, --strategy and --xla-flags without running a step).
  throughput  the jitted training step of train.step (bf16 compute*, fp32 master weights, AdamW, clipping) on
              synthetic tokens: median of --steps steps after 2 warm-ups -> tokens/s per GPU, MFU (train.metrics'
              model FLOPs over the dense bf16 peak, 989.4 TFLOP/s per H200) and peak device memory.
  longest     a full step at --longest-from tokens per GPU, else at what fitted on fewer GPUs in this run, else
              at the length predicted to fit from two memory readings (rounded down to 8K); each out-of-memory
              attempt lowers it by 12.5% until one fits or time runs out.
* compute_dtype "auto": bf16 on GPUs, float32 on a CPU (XLA:CPU has no bf16 dot), where a tiny preset runs the
same step as a check (tests/test_bench_train_gpu.py).
Each configuration and each attempt runs in its own process (see `Children`), so every peak-memory reading is
its own; its output, with timestamped milestones (state built, lowered, compiled, each step), goes to
OUT/child-PHASE-N-TOKENS.log. Results go to OUT/train_gpu.jsonl as they are made (a cut-off run keeps what it
did; every record names --model and --documents), then OUT/train_gpu.md and .png (command, device, date,
versions). Synthetic tokens: nothing here needs Grain.

Models: any preset of models.presets (`--model`, e.g. tnl-1b, mamba2-1.3b, mamba2-1.3b-hybrid). MFU's model
FLOPs are train.metrics.flops_per_token's (the matmul parameters that train.step.build_state counts, and the
recurrent state's products from the model's linear_state_shape: Mamba-2's SSM heads x d_state x head dim; the
hybrids' softmax layers over the causal half of each document, train.metrics.attention_length of the rows).
--attn-impl applies to Mamba-2's SSD as to TNL's attention (its heads are GVA: q and k with fewer heads than v,
and d_state 128 != head dim 64); an impl that cannot take them fails in the child with lasp_jax's reason (in the
record's error). Where "auto" takes XLA for them (lasp_jax.ops.impls.resolve decides), expect a long compile:
TNL's 1-GPU 64K step on XLA had not compiled after 340 s (below); a smaller --tokens-per-gpu or a larger
--budget-s then.

Documents (`--documents N`, default 0: no segment_ids): each row packs N documents cut at N - 1 distinct random
positions (measure.decay_inputs' tokens/N cut, seed 0), fed as batch["segment_ids"] [D, T] int32 (the documents
before each position, sharded as the tokens), as train/ feeds them under TrainConfig.documents="reset": each
linear layer's state restarts at a start (which puts TNL on lasp_jax's per-token path), Mamba-2's convolution
is cut there and softmax layers mask across documents. N = 1 gives segment_ids of one document: the
per-token path's cost with no cut.

Results: benchmarks/results/TRAIN_GPU_NOTES.md. With the fused kernels (--attn-impl pallas_triton or
pallas_mosaic, or "auto" on an H100/H200) the 1-GPU 64K step compiles in ~16 s (measured with pallas_triton);
with the chunked XLA attention it had not reached its first step after 340 s.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

K = 1024
# ModelConfig fields of the kernels' impls that the command line sets (--mamba2-impl, ...); "" keeps the model's own
IMPL_FLAGS = ("mamba2_impl", "softmax_impl", "norm_impl", "conv_impl")


def _oom(e: Exception) -> bool:
    text = str(e)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def _say(message: str) -> None:
    """A timestamped milestone on stdout (the parent keeps each child's output in OUT/child-*.log)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _records(path: Path) -> list[dict]:
    """The records of a JSONL results file (none if it does not exist yet)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _record(out: Path, args, **r) -> dict:
    """Appends r, with the run's model, documents per row and the time, to OUT/train_gpu.jsonl; returns it."""
    r = {"model": args.model, "documents": args.documents, "remat_every": args.remat_every,
         **{flag: getattr(args, flag) or "auto" for flag in IMPL_FLAGS},
         **({"param_axis": args.param_axis} if args.param_axis else {}), **r,
         "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with open(out / "train_gpu.jsonl", "a") as fh:
        fh.write(json.dumps(r) + "\n")
    print(json.dumps(r), flush=True)
    return r


def segment_ids(rows: int, seq_len: int, documents: int):
    """[rows, seq_len] int32 ids of `documents` documents per row (0 counting up at each start), cut at random
    positions of a fixed seed (measure.decay_inputs' tokens/N rows), or None when documents is 0."""
    if documents == 0:
        return None
    from benchmarks import measure

    return measure.decay_inputs((rows, seq_len, 1, 1), f"tokens/{documents}", seed=0)[1]


class Step:
    """The training state and compiled step of one (GPU count, sequence length, remat) configuration."""

    def __init__(self, args, n_gpus: int, tokens_per_gpu: int, remat: str):
        import jax
        import numpy as np
        from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

        from models import presets
        from train.config import TrainConfig
        from train.metrics import attention_length, flops_per_token
        from train.step import build_state, make_steps, model_config

        self.jax, self.n_gpus, self.tokens_per_gpu, self.remat = jax, n_gpus, tokens_per_gpu, remat
        self.mcfg_name, self.documents = args.model, args.documents
        self.data = args.data
        self.seq_len = n_gpus // self.data * tokens_per_gpu
        overrides = {"remat": remat, "ce_chunk": args.ce_chunk, "strategy": args.strategy}
        if args.remat_every != 1:
            overrides["remat_every"] = args.remat_every
        overrides.update({flag: getattr(args, flag) for flag in IMPL_FLAGS if getattr(args, flag)})
        if args.attn_impl:
            overrides["attn_impl"] = args.attn_impl
        if args.param_axis:
            overrides["param_axis"] = tuple(args.param_axis.split(","))
        mesh = f"data={self.data},seq={n_gpus // self.data}"
        cfg = TrainConfig(model=presets.get(args.model).replace(**overrides), mesh=mesh,
                          seq_len=self.seq_len, batch_size=self.data, compute_dtype="auto", warmup_steps=10,
                          decay_steps=1000)
        self.mcfg = model_config(cfg, cfg.model.vocab_size)
        self.devices = jax.devices()[:n_gpus]
        self.mesh = jax.make_mesh((self.data, n_gpus // self.data), ("data", "seq"), devices=self.devices,
                                  axis_types=(AxisType.Auto,) * 2)
        _say(f"{n_gpus} GPU(s), {self.seq_len} tokens, remat {remat}: building the state")
        graphdef, self.state, self.n_params, self.n_matmul = build_state(self.mcfg, cfg, self.mesh)
        jax.block_until_ready(self.state)
        self.train_step, _ = make_steps(graphdef)
        sharding = NamedSharding(self.mesh, P("data", "seq"))
        tokens = np.random.default_rng(0).integers(0, self.mcfg.vocab_size, (self.data, self.seq_len + 1),
                                                        np.int32)
        self.batch = {"inputs": jax.device_put(tokens[:, :-1], sharding),
                      "targets": jax.device_put(tokens[:, 1:], sharding)}
        ids = segment_ids(self.data, self.seq_len, args.documents)
        if ids is not None:  # as train/data.py's batches under documents="reset"
            self.batch["segment_ids"] = jax.device_put(ids, sharding)
        # The hybrids' softmax layers attend within documents: their FLOPs count the documents' lengths.
        self.attention_length = self.seq_len if ids is None else attention_length(ids)
        self.flops_per_token = flops_per_token(self.mcfg, self.n_matmul, self.attention_length)
        _say("state built; lowering and compiling the step")
        t0 = time.perf_counter()
        with jax.set_mesh(self.mesh):
            lowered = self.train_step.lower(self.state, self.batch)
            _say(f"lowered in {time.perf_counter() - t0:.1f} s")
            self.compiled = lowered.compile()
        self.compile_s = time.perf_counter() - t0
        _say(f"compiled in {self.compile_s:.1f} s")
        # Which fused kernels the step runs (what "auto" chose): a Pallas Triton kernel is a custom call to
        # __gpu$xla.gpu.triton; none where the attention runs on XLA.
        self.custom_calls = sorted(set(re.findall(r'custom_call_target="([^"]+)"', self.compiled.as_text())))
        mem = self.compiled.memory_analysis()
        # Per device: what the program's buffers need (arguments, donated into the outputs, plus temporaries).
        self.xla_gib = (mem.argument_size_in_bytes + mem.temp_size_in_bytes) / 2**30 if mem else None

    def run(self, steps: int, warmups: int = 2) -> dict:
        """The record of `steps` steps after `warmups` untimed ones: the median step time, each synced by reading its
        loss. The statistic is measure.median_ms's at iters=1, but not its loop: the step donates its state (each
        call takes the state the last one returned, where median_ms repeats fn(*args)), and each step is a
        milestone in the child's log, which the parent's watchdog (`_hung`) needs to tell a child that recovered
        from an out-of-memory warning from a hung one."""
        import numpy as np

        from train.metrics import mfu, peak_tflops

        times, loss = [], None
        with self.jax.set_mesh(self.mesh):
            for i in range(warmups + steps):
                t = time.perf_counter()
                self.state, out = self.compiled(self.state, self.batch)
                loss = float(out["loss"])  # syncs
                _say(f"step {i}: {time.perf_counter() - t:.3f} s, loss {loss:.4f}")
                if i >= warmups:
                    times.append(time.perf_counter() - t)
        step_s = float(np.median(times))
        tps = self.data * self.seq_len / step_s
        peak = peak_tflops(self.devices[0].device_kind)
        mems = [_peak_gib(d) for d in self.devices]
        return {
            "gpus": self.n_gpus, "data": self.data, "tokens_per_gpu": self.tokens_per_gpu, "seq_len": self.seq_len,
            "remat": self.remat, "attn_impl": self.mcfg.attn_impl, "dtype": self.mcfg.dtype, "params": self.n_params,
            "matmul_params": self.n_matmul, "custom_calls": self.custom_calls, "loss": loss,
            "compile_s": round(self.compile_s, 1), "step_s": step_s, "tokens_per_s_per_gpu": tps / self.n_gpus,
            "mfu": mfu(tps, self.flops_per_token, self.n_gpus, peak),
            "model_tflop_per_step": self.flops_per_token * self.data * self.seq_len / 1e12,
            "attention_length": round(self.attention_length, 1),
            "peak_mem_gib": max(mems) if all(m is not None for m in mems) else None, "xla_gib": self.xla_gib,
        }


    def profile(self, out: Path, name: str) -> dict:
        """One more step under the profiler: OUT/NAME.md (and .json) say where its GPU time went (gpu_trace), with
        the compiled HLO in OUT/NAME.hlo.txt.gz to read further; returns the totals by kernel kind in ms."""
        import gzip
        import tempfile

        from benchmarks import gpu_trace

        with tempfile.TemporaryDirectory() as trace_dir:
            with self.jax.set_mesh(self.mesh), self.jax.profiler.trace(trace_dir, create_perfetto_trace=True):
                self.state, step_out = self.compiled(self.state, self.batch)
                float(step_out["loss"])
            times = gpu_trace.kernel_times(trace_dir)
        hlo = self.compiled.as_text()
        with gzip.open(out / f"{name}.hlo.txt.gz", "wt") as fh:
            fh.write(hlo)
        summary = gpu_trace.summarize(times, hlo)
        (out / f"{name}.json").write_text(json.dumps(summary, indent=1))
        (out / f"{name}.md").write_text(gpu_trace.render(summary, (
            f"{self.mcfg_name}, {self.n_gpus} GPU(s) ({self.devices[0].device_kind}), {self.tokens_per_gpu} "
            f"tokens/GPU, {self.documents} documents per row, remat {self.remat} every {self.mcfg.remat_every}, "
            + "".join(f"{flag} {getattr(self.mcfg, flag)}, " for flag in IMPL_FLAGS) +
            f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}")))
        _say(f"profiled: {name}.md")
        return {k: round(ms, 1) for k, ms in summary["kinds"].items()}

    def close(self) -> None:
        """Frees this configuration's device buffers now (buffers left to the garbage collector once held ~36% of
        an H200 when the next configuration was built in the same process, 2026-11-22)."""
        for x in self.jax.tree.leaves((self.state, self.batch)):
            if not x.is_deleted():
                x.delete()
        self.jax.clear_caches()


def _peak_gib(device) -> float | None:
    stats = device.memory_stats() or {}
    return stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None


def _capacity_gib(device) -> float:
    return (device.memory_stats() or {}).get("bytes_limit", 0) / 2**30


def _timed_or_oom(args, out: Path, n: int, tokens: int, remat: str, kind: str, steps: int, fitted: dict,
                  oom: dict, profile: bool = False, warmups: int = 2) -> None:
    """Records `kind` with the timings of `steps` steps (plus `fitted`), or, out of memory, the configuration
    (plus `oom`); with `profile`, the GPU time of one more step by kernel kind (Step.profile)."""
    step = None
    try:
        step = Step(args, n, tokens, remat)
        timed = step.run(steps, warmups)
        if profile:
            name = f"profile-{args.model}-{n}-{tokens}-{remat}-{args.remat_every}-{args.mamba2_impl or 'auto'}"
            if args.param_axis:
                name += "-params-" + args.param_axis.replace(",", "-")
            for flag in IMPL_FLAGS[1:]:  # mamba2_impl is in every name
                if getattr(args, flag):
                    name += f"-{flag.split('_')[0]}-{getattr(args, flag)}"
            timed["profile_ms"] = step.profile(out, name)
        _record(out, args, kind=kind, **fitted, **timed)
    except Exception as e:
        if not _oom(e):
            raise
        _record(out, args, kind=kind, gpus=n, data=args.data, tokens_per_gpu=tokens, remat=remat, **oom)
    finally:
        if step is not None:
            step.close()


def child_throughput(args, out: Path, n: int, tokens: int, remat: str) -> None:
    _timed_or_oom(args, out, n, tokens, remat, "throughput", args.steps, {}, {"oom": True}, profile=args.profile)


def child_memory(args, out: Path, n: int, tokens: int, remat: str) -> None:
    step = Step(args, n, tokens, remat)
    _record(out, args, kind="memory", gpus=n, data=args.data, tokens_per_gpu=tokens, remat=remat,
            strategy=args.strategy, xla_flags=args.xla_flags, xla_gib=step.xla_gib,
            capacity_gib=_capacity_gib(step.devices[0]), compile_s=round(step.compile_s, 1))
    step.close()


def child_attempt(args, out: Path, n: int, tokens: int, remat: str) -> None:
    """One full step of the longest search at `tokens` per GPU: a "longest" record with fits True or False."""
    # One warm-up: at these lengths a step takes tens of seconds, and whether it fits is known at the first.
    _timed_or_oom(args, out, n, tokens, remat, "longest", 1, {"fits": True}, {"fits": False}, warmups=1)


CHILDREN = {"throughput": child_throughput, "memory": child_memory, "attempt": child_attempt}
_MILESTONE = re.compile(r"^\[\d\d:\d\d:\d\d\] ", re.M)  # a `_say` line
_OOM_MARKS = ("RESOURCE_EXHAUSTED", "ran out of memory")
_STUCK_MARK = "may be stuck"  # XLA's rendezvous warning: a GPU waits for a peer in a collective
_HUNG_AFTER_OOM_S = 120.0


def _hung(text: str, silent_s: float) -> bool:
    """Whether a child's log shows a GPU out of memory since its last milestone, then a peer stuck in a
    collective or two minutes of silence. (XLA also prints out-of-memory warnings it recovers from, e.g. while
    autotuning a compile; those come before the "compiled" milestone, or are followed by more milestones.)"""
    starts = [m.start() for m in _MILESTONE.finditer(text)]
    tail = text[starts[-1]:] if starts else text
    if not any(mark in tail for mark in _OOM_MARKS):
        return False
    return _STUCK_MARK in tail or silent_s > _HUNG_AFTER_OOM_S


class Children:
    """Runs each configuration in its own process on the first n GPUs this process may use, before a deadline.

    When one GPU of several runs out of memory the others can wait in a collective for ever (seen on 2 H200s,
    2026-11-22: the search's whole budget went to one hung attempt), so a child that `_hung` describes is killed
    and counted as out of memory."""

    def __init__(self, args, argv, out: Path, deadline: float, visible: list[str], env: dict):
        self.args, self.argv, self.out, self.deadline = args, argv, out, deadline
        self.visible, self.env = visible, env

    def command(self, phase: str, n: int, tokens: int, remat: str) -> list[str]:
        return [sys.executable, "-m", "benchmarks.bench_train_gpu", *self.argv, "--child",
                f"{phase}:{n}:{tokens}:{remat}"]

    def run(self, phase: str, n: int, tokens: int, remat: str) -> dict | None:
        """The child's last record, or None when it did not finish (the reason is recorded)."""
        kind = "longest" if phase == "attempt" else phase
        about = {"kind": kind, "gpus": n, "tokens_per_gpu": tokens, "remat": remat}
        left = self.deadline - time.monotonic()
        if left < 45:
            _record(self.out, self.args, **about, note="not run: out of time")
            return None
        before = len(_records(self.out / "train_gpu.jsonl"))
        log = self.out / f"child-{phase}-{n}-{tokens}-{remat}.log"  # kept whole: it shows where the time went
        with open(log, "w") as fh:
            child = subprocess.Popen(self.command(phase, n, tokens, remat), stdout=fh, stderr=subprocess.STDOUT,
                                     env=dict(self.env, CUDA_VISIBLE_DEVICES=",".join(self.visible[:n])))
            size, grew = 0, time.monotonic()
            while child.poll() is None:
                time.sleep(2)
                now, text = time.monotonic(), log.read_text(errors="replace")
                if len(text) != size:
                    size, grew = len(text), now
                hung = _hung(text, now - grew)
                if hung or now > self.deadline:
                    child.kill()
                    child.wait()
                    if hung:
                        _record(self.out, self.args, **about, oom=True,
                                **({"fits": False} if kind == "longest" else {}),
                                note="out of memory on a GPU; the others hung in a collective (killed)")
                        return _records(self.out / "train_gpu.jsonl")[-1]
                    _record(self.out, self.args, **about, note="stopped at the time budget; last lines of "
                            f"{log.name}: " + " / ".join(log.read_text(errors="replace").splitlines()[-3:]))
                    return None
        new = _records(self.out / "train_gpu.jsonl")[before:]
        if child.returncode or not new:
            _record(self.out, self.args, **about, note=f"failed (see {log.name})",
                    error=log.read_text(errors="replace")[-1500:])
            return None
        return new[-1]


def _fitted_elsewhere(out: Path, n: int, data: int, remat: str) -> int | None:
    """The longest tokens-per-GPU that fitted on fewer GPUs earlier in this run (the records after the last
    setup record), same data size and remat: per-GPU memory per token is about the same (each GPU holds T / n
    tokens and a full replica of the state)."""
    records = _records(out / "train_gpu.jsonl")
    last_setup = max(i for i, r in enumerate(records) if r["kind"] == "setup")
    fits = [r["tokens_per_gpu"] for r in records[last_setup:] if r["kind"] == "longest" and r.get("fits")
            and r["gpus"] < n and r.get("data", 1) == data and r.get("remat") == remat]
    return max(fits, default=None)


def search_longest(args, children: Children, out: Path, n: int) -> None:
    """From --longest-from, else what fitted on fewer GPUs, else a prediction from XLA's buffers at two lengths,
    down by 12.5% per out-of-memory attempt until one fits."""
    remat, floor = args.remat_longest, args.tokens_per_gpu
    start = args.longest_from or _fitted_elsewhere(out, n, args.data, remat)
    if not start:
        readings = []
        for tokens in (floor, 2 * floor):
            r = children.run("memory", n, tokens, remat)
            if r is None or r.get("xla_gib") is None:
                return
            readings.append((tokens, r["xla_gib"], r["capacity_gib"]))
        (t1, m1, capacity), (t2, m2, _) = readings
        per_token = (m2 - m1) / (t2 - t1)
        if per_token <= 0:
            _record(out, args, kind="longest", gpus=n, remat=remat, fits=None,
                    note=f"no prediction: XLA's buffers did not grow from {t1} to {t2} tokens per GPU")
            return
        capacity = args.capacity_gib or capacity
        start = int((0.97 * capacity - (m1 - per_token * t1)) / per_token) // (8 * K) * (8 * K)
        floor = t2
        _record(out, args, kind="longest_predicted", gpus=n, gib_per_k_tokens=per_token * K,
                fixed_gib=m1 - per_token * t1, capacity_gib=capacity, tokens_per_gpu=start)
    tokens, tried = start, False
    while tokens > floor:
        r = children.run("attempt", n, tokens, remat)
        if r is None or r.get("fits"):
            return
        tokens, tried = int(tokens * 0.875) // (8 * K) * (8 * K), True
    why = "every length tried ran out of memory" if tried else f"the first length, {start}, is not above it"
    _record(out, args, kind="longest", gpus=n, remat=remat, fits=None,
            note=f"none fitted above {floor} per GPU ({why})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tnl-1b")
    parser.add_argument("--tokens-per-gpu", type=int, default=64 * K)
    parser.add_argument("--gpus", default="1,2")
    parser.add_argument("--data", type=int, default=1, help="data-parallel size D (each GPU count must divide)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--remat-throughput", default="block_attention,block,full",
                        help="tried in order until one fits")
    parser.add_argument("--remat-longest", default="full")
    parser.add_argument("--longest-from", type=int, default=0,
                        help="tokens per GPU to try first in the longest search (0: predict from two probes)")
    parser.add_argument("--ce-chunk", type=int, default=2048)
    parser.add_argument("--attn-impl", default="", help="lasp_jax impl (default: the model's 'auto')")
    parser.add_argument("--documents", type=int, default=0,
                        help="documents packed per row, fed as segment_ids (0: none, no segment_ids)")
    parser.add_argument("--budget-s", type=float, default=380.0,
                        help="start nothing new after this many seconds, and stop what still runs")
    parser.add_argument("--phases", default="throughput,longest", help="of throughput, longest, memory")
    parser.add_argument("--strategy", default="ring", help="the models' LASP exchange: ring, allgather or scan")
    parser.add_argument("--xla-flags", default="", help="appended to XLA_FLAGS in the workers")
    parser.add_argument("--capacity-gib", type=float, default=0.0, help="device memory to fit (0: the device's)")
    parser.add_argument("--remat-every", type=int, default=1, choices=range(1, 1025), metavar="N",
                        help="ModelConfig.remat_every: keep every n-th block's input only (longer sequences)")
    parser.add_argument("--mamba2-impl", default="", choices=("", "auto", "xla", "pallas_triton"),
                        help="ModelConfig.mamba2_impl: Mamba-2's gated norm and ssd_inputs' backward (default: the "
                        "model's 'auto')")
    parser.add_argument("--softmax-impl", default="", choices=("", "auto", "blockwise", "cudnn", "pallas_triton"),
                        help="ModelConfig.softmax_impl: the hybrids' softmax layers (default: the model's 'auto')")
    parser.add_argument("--norm-impl", default="", choices=("", "auto", "xla", "pallas_triton"),
                        help="ModelConfig.norm_impl: the blocks' SRMSNorm (default: the model's 'auto')")
    parser.add_argument("--conv-impl", default="", choices=("", "auto", "xla", "pallas_mosaic"),
                        help="ModelConfig.conv_impl: Mamba-2's convolution (default: the model's 'auto')")
    parser.add_argument("--param-axis", default="",
                        help="ModelConfig.param_axis, comma-separated mesh axes (default: the model's, data,seq)")
    parser.add_argument("--profile", action="store_true",
                        help="throughput: trace one more step; OUT/profile-*.md says where its GPU time went")
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    parser.add_argument("--child", help=argparse.SUPPRESS)  # "phase:n:tokens:remat" in a worker process
    parser.add_argument("--summary", help="only re-render this JSONL's .md table and .png plot")
    args = parser.parse_args(argv)
    if args.summary:
        write_summary(Path(args.summary))
        return 0
    _check(parser, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    if args.child:
        phase, n, tokens, remat = args.child.split(":")
        CHILDREN[phase](args, out, int(n), int(tokens), remat)
        return 0

    deadline = time.monotonic() + args.budget_s
    argv = list(sys.argv[1:] if argv is None else argv)
    info = subprocess.run([sys.executable, "-c", "import jax, flax, optax; d = jax.devices(); print(len(d), "
                           "d[0].device_kind, jax.__version__, flax.__version__, optax.__version__, sep='|')"],
                          capture_output=True, text=True)
    n_dev, kind, jax_v, flax_v, optax_v = (info.stdout.strip().split("|") + [""] * 5)[:5]
    _record(out, args, kind="setup", command="python -m benchmarks.bench_train_gpu " + " ".join(argv), device=kind,
            n_devices=n_dev, versions={"jax": jax_v, "flax": flax_v, "optax": optax_v}, error=info.stderr[-500:]
            if info.returncode else None)
    gpus = [int(g) for g in args.gpus.split(",") if n_dev.isdigit() and int(g) <= int(n_dev)]
    if any(g % args.data for g in gpus):
        parser.error(f"--data {args.data} must divide every GPU count in --gpus {args.gpus}")
    # The first n of the GPUs this process may use (several runs can share one machine, each on its own GPUs).
    visible = (os.environ.get("CUDA_VISIBLE_DEVICES")
               or ",".join(map(str, range(int(n_dev) if n_dev.isdigit() else 0)))).split(",")
    # Each child owns its GPUs: the allocator takes its share at start as one region. Grown region by region
    # (XLA_PYTHON_CLIENT_PREALLOCATE=false), the 512K Mamba-2 attempts could not place their 86-95 GiB of
    # temporaries with a quarter of an H200 in use (benchmarks/results/TRAIN_GPU_NOTES.md, session 10).
    env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION="0.95", XLA_PYTHON_CLIENT_PREALLOCATE="true",
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags).strip())
    children = Children(args, argv, out, deadline, visible, env)
    for phase in args.phases.split(","):
        for n in gpus:
            if phase == "longest":
                search_longest(args, children, out, n)
            elif phase == "memory":
                children.run(phase, n, args.tokens_per_gpu, args.remat_longest)
            else:  # the first remat that fits
                for remat in args.remat_throughput.split(","):
                    r = children.run(phase, n, args.tokens_per_gpu, remat)
                    if r is None or not r.get("oom"):
                        break
    write_summary(out / "train_gpu.jsonl")
    return 0


def _check(parser, args) -> None:
    """Refuses, before any child starts, a model that is no preset and a document count no row can hold."""
    from models import presets

    try:
        presets.get(args.model)
    except ValueError as e:
        parser.error(str(e))
    if not 0 <= args.documents <= args.tokens_per_gpu:
        parser.error(f"--documents {args.documents} must be in [0, --tokens-per-gpu {args.tokens_per_gpu}]")


def write_summary(jsonl: Path) -> None:
    """jsonl's records as a Markdown table per run (JSONL -> .md) and the throughput against the GPU count
    (JSONL -> .png). Runs appended to one file (benchmarks/results/train_gpu_h200.jsonl) get one section each."""
    records = _records(jsonl)
    fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
    every = lambda r: f" every {r['remat_every']}" if r.get("remat_every", 1) != 1 else ""  # noqa: E731
    lines = []
    for r in records:
        if r["kind"] == "setup":
            lines += ["", f"## {r['device']} x{r['n_devices']}, {r['time']}", "", f"Command: `{r['command']}`  ",
                      f"Versions: {r['versions']}", "",
                      "| model | documents | phase | GPUs | tokens/GPU | remat | step (s) | tokens/s/GPU | MFU | "
                      "peak mem (GiB) | XLA buffers (GiB) | note |",
                      "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
            continue
        note = r.get("note") or ("out of memory" if r.get("oom") or r.get("fits") is False else "")
        for field in ("param_axis", *IMPL_FLAGS):
            if r.get(field, "auto") != "auto":
                note = f"{field} {r[field]}" + (f"; {note}" if note else "")
        if r["kind"] == "memory" and "strategy" in r:
            note = f"strategy {r['strategy']}" + (f", XLA flags {r['xla_flags']}" if r["xla_flags"] else "")
        if r["kind"] == "longest_predicted":
            note = (f"predicted {r['tokens_per_gpu']} tokens/GPU: {r['gib_per_k_tokens']:.3f} GiB per 1K tokens "
                    f"+ {r['fixed_gib']:.1f} GiB fixed, of {r['capacity_gib']:.1f} GiB")
        gpus = f"{r.get('gpus', '')}" + (f" (data {r['data']})" if r.get("data", 1) > 1 else "")
        lines.append(f"| {r.get('model', '')} | {r.get('documents', '')} | {r['kind']} | {gpus} | "
                     f"{r.get('tokens_per_gpu', '')} | {r.get('remat', '')}{every(r)} | "
                     f"{fmt(r.get('step_s'), '.3f')} | {fmt(r.get('tokens_per_s_per_gpu'), ',.0f')} | "
                     f"{fmt(r.get('mfu'), '.1%')} | {fmt(r.get('peak_mem_gib'), '.1f')} | "
                     f"{fmt(r.get('xla_gib'), '.1f')} | {note} |")
    jsonl.with_suffix(".md").write_text("# Training step (bench_train_gpu)\n" + "\n".join(lines) + "\n")
    _plot_throughput([r for r in records if r["kind"] == "throughput" and "step_s" in r], jsonl.with_suffix(".png"))


def _plot_throughput(rows: list[dict], path: Path) -> None:
    """tokens/s per GPU and MFU against the GPU count, one line per (model, documents, data-parallel size, tokens
    per GPU) (the last record of each configuration)."""
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    line_of = lambda r: (r.get("model", ""), r.get("documents", 0), r.get("data", 1), r["tokens_per_gpu"])  # noqa: E731
    last = {(line_of(r), r["gpus"]): r for r in rows}
    fig, (ax_tps, ax_mfu) = plt.subplots(1, 2, figsize=(11, 4))
    for line in sorted({key for key, _ in last}):
        model, documents, data, tokens = line
        pts = sorted((g, r) for (key, g), r in last.items() if key == line)
        mesh = f"data={data} x seq=n/{data}" if data > 1 else "seq=n"
        label = ", ".join(filter(None, [model, f"{documents} docs/row" if documents else "",
                                        f"{mesh}, {tokens // K}K tokens/GPU"]))
        gpus = [g for g, _ in pts]
        ax_tps.plot(gpus, [r["tokens_per_s_per_gpu"] for _, r in pts], marker="o", label=label)
        with_mfu = [(g, r["mfu"]) for g, r in pts if r.get("mfu") is not None]  # None: no known peak FLOP/s
        if with_mfu:
            ax_mfu.plot([g for g, _ in with_mfu], [100 * m for _, m in with_mfu], marker="o", label=label)
    ax_tps.set(xlabel="GPUs", ylabel="tokens/s per GPU", title="training step throughput")
    ax_mfu.set(xlabel="GPUs", ylabel="MFU (%)", title="model FLOPs utilisation")
    counts = sorted({g for _, g in last})
    for ax in (ax_tps, ax_mfu):
        ax.set_xscale("log", base=2)
        ax.set_xticks(counts, [str(g) for g in counts])
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
