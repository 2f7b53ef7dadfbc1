"""What every benchmark measures the same way: median timing, the relative error, the inputs, the fp32 reference,
and the workers' subprocess plumbing (each framework times in a process of its own).

Timing (`median_ms`): a jitted fn is enqueued `iters` times back to back and timed to its last result (launch
latency overlaps, as in training), the median of `reps` such rounds; the first call (compile, warm-up) is
untimed. Error (`rel_err`): ||x - ref||_2 / ||ref||_2 over the whole tensor, both upcast to float32 on device
(a bf16 result against an fp32 reference lands near 3e-3; fp32 against fp32 near 1e-6).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import lasp_jax

# How a shape is named on the command line and in result files: batch x length x heads x head dim.
Shape = tuple[int, int, int, int]


def parse_shapes(text: str, names: str = "BxTxHxD") -> list[tuple[int, ...]]:
    """'1x16384x16x128,8x8192x32x128' -> [(1, 16384, 16, 128), (8, 8192, 32, 128)], each with as many dims as
    `names` spells ("TxD": two); ValueError names a bad one."""
    dims = len(names.split("x"))
    shapes = []
    for item in filter(None, text.split(",")):
        parts = item.split("x")
        if len(parts) != dims or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"shape {item!r} is not {names} with {dims} positive integers")
        shapes.append(tuple(int(p) for p in parts))
    return shapes


def parse_configs(text: str, config_type, fields: tuple[str, ...]) -> list:
    """'8192:4096:256,...' -> [config_type(**{field: value, ...}), ...], one positive integer per field in order
    (0 or 1 for a field whose default is a bool); ValueError names a bad entry. The kernels' sweeps' --configs."""
    flags = {f for f in fields if isinstance(getattr(config_type(), f), bool)}
    configs = []
    for item in filter(None, text.split(",")):
        parts = item.split(":")
        if len(parts) != len(fields) or not all(
                p in ("0", "1") if f in flags else p.isdigit() and int(p) > 0 for f, p in zip(fields, parts)):
            raise ValueError(f"config {item!r} is not {':'.join(fields)} (positive integers"
                             + (f"; {', '.join(sorted(flags))} 0 or 1)" if flags else ")"))
        configs.append(config_type(**{f: (p == "1") if f in flags else int(p) for f, p in zip(fields, parts)}))
    return configs


def config_label(config, fields: tuple[str, ...]) -> str:
    """The --configs entry that parse_configs reads back as `config`."""
    return ":".join(str(int(getattr(config, field))) for field in fields)


def markdown_table(rows: list[dict], columns: tuple) -> str:
    """The rows as a markdown table: columns ((header, cell), ...), cell(row) -> str, then a "note" column with
    the row's error. A cell whose keys the row lacks (a failed row has no timings) is left empty."""
    def cell(fn, row):
        try:
            return fn(row)
        except KeyError:
            return ""

    lines = ["| " + " | ".join([h for h, _ in columns] + ["note"]) + " |", "|" + "---|" * (len(columns) + 1)]
    lines += ["| " + " | ".join([cell(fn, r) for _, fn in columns] + [r.get("error", "")]) + " |" for r in rows]
    return "\n".join(lines)


def median_ms(fn, args, iters: int, reps: int) -> float:
    """Median ms per call of `fn(*args)` over `reps` rounds of `iters` back-to-back calls (after one untimed)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) * 1e3 / iters)
    return float(np.median(times))


@jax.jit
def _rel_err(x, ref):
    x, ref = x.astype(jnp.float32), ref.astype(jnp.float32)
    return jnp.sqrt(jnp.sum(jnp.square(x - ref)) / jnp.sum(jnp.square(ref)))  # no reshape of a sharded array


def rel_err(x, ref) -> float:
    """||x - ref|| / ||ref|| (2-norms over every element, float32 on x's device)."""
    return float(_rel_err(x, ref))


def errors(got, want) -> dict[str, float]:
    """{o, dq, dk, dv[, ds]: rel_err} for two (o, (dq, dk, dv[, ds])) results (ds: the per-token rates'
    cotangent), plus their max under "max"."""
    names = ("o", "dq", "dk", "dv", "ds")[:len(jax.tree.leaves(want))]
    errs = {n: rel_err(a, b) for n, a, b in zip(names, jax.tree.leaves(got), jax.tree.leaves(want), strict=True)}
    return errs | {"max": max(errs.values())}


def normal_inputs(shape: Shape, seed: int = 0, dtype=jnp.bfloat16):
    """q, k, v, dO [B, T, H, D], independent standard normals (q and k unscaled: `scale` is the kernels' job),
    rounded to dtype. The same seed gives the same bits in every process on the same device kind."""
    keys = jax.random.split(jax.random.key(seed), 4)
    return tuple(jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in keys)


def parse_decays(text: str) -> list[str]:
    """'constant,tokens,tokens/16' -> the decay modes of a run; ValueError names a bad one. "constant": TNL
    slopes [H]; "tokens": per-token rates [B, T, H]; "tokens/N": the same over packed rows of N documents."""
    modes = [m for m in text.split(",") if m]
    for mode in modes:
        kind, _, docs = mode.partition("/")
        if kind not in ("constant", "tokens") or (docs and not (docs.isdigit() and int(docs) > 0)) or (
                docs and kind == "constant"):
            raise ValueError(f"decay mode {mode!r} is not constant, tokens or tokens/N (N documents per row)")
    return modes


def decay_inputs(shape: Shape, mode: str, seed: int = 0):
    """(rates, segment_ids or None) of a decay mode (`parse_decays`) for q of `shape`, the same bits in every
    process: constant TNL slopes [H]; per-token rates [B, T, H] float32 uniform in [0.001, 0.1] (the range
    issue 15's reference figures used); N documents per row cut at N - 1 distinct random positions (ids [B, T]
    int32 counting the starts)."""
    b, t, h, _ = shape
    kind, _, docs = mode.partition("/")
    if kind == "constant":
        return np.asarray(lasp_jax.ops.tnl_slopes(h), np.float32), None
    rng = np.random.default_rng(seed + 1)
    rates = rng.uniform(0.001, 0.1, (b, t, h)).astype(np.float32)
    return rates, (random_documents(rng, b, t, int(docs)) if docs else None)


def random_documents(rng: np.random.Generator, b: int, t: int, docs: int) -> np.ndarray:
    """[B, T] int32 segment ids: each row cut into `docs` documents at docs - 1 distinct positions in [1, T) drawn
    from rng (the ids count the starts before each position)."""
    starts = np.zeros((b, t), np.int32)
    for row in starts:
        row[rng.choice(np.arange(1, t), docs - 1, replace=False)] = 1
    return np.cumsum(starts, axis=1, dtype=np.int32)


def fwd_and_fwd_bwd(attend, grad_operands: int = 0):
    """(forward, forward+backward) jitted from attend(q, k, v, *operands) -> o: forward(q, k, v, *operands) and
    forward_backward(q, k, v, dO, *operands) -> (o, (dq, dk, dv)) for a given dO (no loss reduction; `operands`,
    e.g. decay rates, are not differentiated). Pass the decay as an operand, not a closure constant: a constant
    lets XLA fold what a contender derives from it at compile time (jla's gate cumsum took 5 to 66 s per
    compile on an H200, 2026-11-29). The first `grad_operands` operands are differentiated too (per-token rates:
    a model learns them), their cotangents after dv."""

    def fwd_bwd(q, k, v, do, *operands):
        n = 3 + grad_operands
        o, vjp_fn = jax.vjp(lambda *x: attend(*x[:3], *x[3:], *operands[grad_operands:]), q, k, v,
                            *operands[:grad_operands])
        return o, vjp_fn(do)[:n]

    return jax.jit(attend), jax.jit(fwd_bwd)


def _xla_attend(q, k, v, decay, segment_ids=None, *, scale: float):
    return lasp_jax.linear_attention(q, k, v, decay, segment_ids=segment_ids, scale=scale, impl="xla")


def fp32_reference(q, k, v, do, decay, scale: float, segment_ids=None):
    """(o, (dq, dk, dv)) of the chunked XLA path on the inputs upcast to float32, every product at HIGHEST
    precision (no TF32): the "fp32 run of the same inputs" that each contender's bf16 result is measured against
    (its own error is near 1e-6). The same program in every worker of a run, so `run_workers`' shared
    compilation cache compiles it once per shape (2.2 s of a 2.6 s reference at 1x16384x4x64 on CPU; a cache
    hit 0.18 s). Waited for: no timing that follows overlaps it. Per-token rates [B, T, H] are differentiated
    (their cotangent last); segment_ids [B, T] or None."""
    decay = jnp.asarray(decay, jnp.float32)
    _, fwd_bwd = fwd_and_fwd_bwd(functools.partial(_xla_attend, scale=scale), grad_operands=int(decay.ndim == 3))
    with jax.default_matmul_precision("highest"):
        return jax.block_until_ready(fwd_bwd(*(x.astype(jnp.float32) for x in (q, k, v, do)), decay,
                                             None if segment_ids is None else jnp.asarray(segment_ids)))


def copy_bandwidth_gbs(n_bytes: int, iters: int, reps: int) -> float:
    """Device memory bandwidth in GB/s (bytes read plus written per ms) of a jitted pass over n_bytes of float32,
    timed by `median_ms`: a negation (one read, one write per element, as a copy; XLA elides a plain copy)."""
    x = jnp.ones((max(n_bytes // 4, 1),), jnp.float32)
    ms = median_ms(jax.jit(jnp.negative), (x,), iters, reps)
    return 2 * x.nbytes / ms / 1e6


class _Stopped(Exception):
    """SIGTERM arrived while a worker ran."""


def _raise_stopped(signum, frame):
    raise _Stopped


def add_worker_flags(parser: argparse.ArgumentParser, worker_choices=None) -> None:
    """The flags the side-by-side scripts share: --iters and --reps (median_ms), --seed (the inputs), --out, and
    the hidden --worker NAME / --rows FILE that run_workers gives their own subprocesses."""
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    parser.add_argument("--worker", choices=worker_choices, help=argparse.SUPPRESS)
    parser.add_argument("--rows", help=argparse.SUPPRESS)


def check_worker_flags(parser: argparse.ArgumentParser, args: argparse.Namespace, peers=None) -> None:
    """add_worker_flags' check (--worker needs --rows); with `peers` (the script's known peers) also
    args.impl_list and args.peer_list from the comma-separated --impls and --peers, unknown peers refused."""
    if peers is not None:
        args.impl_list = [i for i in args.impls.split(",") if i]
        args.peer_list = [p for p in args.peers.split(",") if p]
        unknown = sorted(set(args.peer_list) - set(peers))
        if unknown:
            parser.error(f"unknown peers {unknown}: expected any of {list(peers)}")
    if args.worker and not args.rows:
        parser.error("--worker needs --rows")


def run_workers(module: str, args: list[str], names: list[str], collect) -> bool:
    """Runs `python -m module *args --worker NAME --rows FILE` for each name in turn, each in a process of its own (one
    framework's timing undisturbed by another's compiled programs, allocator pool or autotuning); the worker appends
    one JSON row per line to FILE. The workers share one JAX compilation cache (JAX_COMPILATION_CACHE_DIR, a folder
    of this run unless set): what they all compile, the fp32 reference above all, compiles once. Passes each
    worker's rows to collect(name, rows), with an error row naming it when it failed (the rows it wrote before are
    kept). SIGTERM (a step's time limit) stops the worker in flight: its rows so far are collected with a row saying
    so, no further worker starts, and the result is False; else True."""
    previous = signal.signal(signal.SIGTERM, _raise_stopped)
    try:
        with tempfile.TemporaryDirectory(prefix="bench_workers_") as scratch:
            env = dict(os.environ)
            env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(scratch, "jax_cache"))
            for i, name in enumerate(names):
                path = os.path.join(scratch, f"{i}.jsonl")
                cmd = [sys.executable, "-m", module, *args, "--worker", name, "--rows", path]
                print("$ " + shlex.join(cmd), flush=True)
                try:
                    rc = subprocess.run(cmd, env=env).returncode  # on an exception it kills the worker first
                except _Stopped:
                    collect(name, read_rows(path) + [{"worker": name, "error": "stopped by SIGTERM while running"}])
                    return False
                rows = read_rows(path)
                if rc != 0:
                    rows.append({"worker": name, "error": f"worker exited with {rc} (its log is above)"})
                collect(name, rows)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return True


def merge_workers(module: str, args: list[str], names: list[str], meta: dict, save=None) -> tuple[list[dict], bool]:
    """run_workers, merging the rows into one table: each worker's device row into meta["devices"][name] (with its
    copy_GBps, where it gives one, into meta["copy_GBps"]), every other row into the returned list in order; save
    (rows), if given, after every worker (a run cut off keeps what finished). Returns (rows, run_workers' result)."""
    rows = []

    def collect(name, worker_rows):
        for row in worker_rows:
            if "device" in row:
                meta["devices"][name] = row["device"]
                if row.get("copy_GBps"):
                    meta["copy_GBps"] = row["copy_GBps"]
            else:
                rows.append(row)
        if save is not None:
            save(rows)

    return rows, run_workers(module, args, names, collect)


def read_rows(path: str) -> list[dict]:
    """The JSON rows of a worker's file, one per line ([] when it wrote none); a line cut off mid-write is
    skipped."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


def append_row(path: str, row: dict) -> None:
    """Appends `row` to a worker's rows file and prints it (the log shows progress)."""
    line = json.dumps(row)
    with open(path, "a") as f:
        f.write(line + "\n")
    print(line, flush=True)


def provenance(module: str, argv: list[str], versioned: tuple[str, ...]) -> dict:
    """What every results file records: the command that made it, the date (UTC) and the versions."""
    import datetime
    import sys

    return {"command": f"python3 -m {module} " + shlex.join(argv),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "versions": {"python": sys.version.split()[0]} | package_versions(versioned)}


def package_versions(names: tuple[str, ...]) -> dict[str, str]:
    """{distribution: version} for the installed ones among `names` (read from metadata: nothing is imported)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def pyplot():
    """matplotlib.pyplot on the Agg backend (files, no display), or None where matplotlib is not installed: the
    tables are written either way, the plots only where it is."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
