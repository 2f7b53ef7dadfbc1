"""Shared by the training tests: the tiny run config, its command line (train.cli.flags, as `cli_args`), a
`python -m train` subprocess that a test can act on at a chosen step, and a run as two processes."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

from models import presets
from train.cli import flags as cli_args  # every field of a config as `python -m train` flags
from train.config import TrainConfig
from train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
STEPS = 20


def tiny(run_dir, **changes) -> TrainConfig:
    """A ~20K-parameter TNL on the first 200 KB of the standard library, 20 steps, float32."""
    base = TrainConfig(
        model=presets.get("tnl-tiny").replace(d_model=32, n_layers=2, n_heads=2, mlp_hidden=64, ce_chunk=16),
        run_dir=str(run_dir), steps=STEPS, mesh="data=2,seq=4", data=("stdlib",), max_data_bytes=200_000,
        seq_len=32, batch_size=4, val_fraction=0.05, lr=3e-3, warmup_steps=5, decay_steps=STEPS,
        compute_dtype="float32", ckpt_every=5, ckpt_keep=2, log_every=1, eval_every=0, eval_batches=1,
        progress=False, sample_tokens=0, data_threads=1)
    return dataclasses.replace(base, **changes)


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if r["kind"] == "train"}


def saved_steps(run_dir) -> list[int]:
    """The finished checkpoints' steps (orbax's temporary directories are not digits)."""
    return sorted(int(p.name) for p in (Path(run_dir) / "checkpoints").iterdir() if p.name.isdigit())


def env(**extra) -> dict[str, str]:
    out = dict(os.environ, PYTHONPATH=str(ROOT), **extra)
    out.pop("XLA_FLAGS", None)  # each subprocess forces its own device count through cpu_devices
    return out


# Runs `python -m train ARGS` and, right after logging step AT, acts as ACTION says: "block" prints READY and
# sleeps (the parent kills it), "await_signal" prints READY and waits until SIGNALS (default 1) SIGTERM/SIGINTs
# have reached the loop's handler, printing HANDLED n after each (the parent sends them), "break_checkpoints"
# replaces RUN_DIR/checkpoints by a file (the next save fails).
_HOOKED = textwrap.dedent("""
    import os, shutil, signal, sys, time
    from pathlib import Path
    from train import metrics
    write = metrics.MetricsLog.write
    def write_then_act(self, step, kind, **values):
        write(self, step, kind, **values)
        if kind != "train" or step != int(os.environ["AT"]):
            return
        action = os.environ["ACTION"]
        if action == "break_checkpoints":
            ckpts = self.path.parent / "checkpoints"
            shutil.rmtree(ckpts)
            ckpts.write_text("not a directory")
            return
        if action == "block":
            print("READY", flush=True)
            time.sleep(3600)
        handler, handled = signal.getsignal(signal.SIGTERM), []  # the loop's, for both signals
        def count(signum, frame):  # stays in place only where the loop's handler leaves it
            handler(signum, frame)
            handled.append(signum)
            print(f"HANDLED {len(handled)}", flush=True)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, count)
        print("READY", flush=True)
        while len(handled) < int(os.environ.get("SIGNALS", "1")):
            time.sleep(0.02)
    metrics.MetricsLog.write = write_then_act
    from train.__main__ import main
    sys.exit(main(sys.argv[1:]))
""")


def start_hooked(cfg: TrainConfig, at: int, action: str, signals: int = 1) -> subprocess.Popen:
    """`python -m train` on cfg (8 CPU devices) with the hook above; stdout and stderr merged, as text."""
    args = cli_args(dataclasses.replace(cfg, cpu_devices=8, platform="cpu"))
    return subprocess.Popen([sys.executable, "-c", _HOOKED, *args], cwd=ROOT,
                            env=env(AT=str(at), ACTION=action, SIGNALS=str(signals)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def read_until_ready(proc: subprocess.Popen, marker: str = "READY") -> list[str]:
    """The subprocess's lines up to and including the first that holds marker (all of them if it ends first)."""
    out = []
    for line in proc.stdout:
        out.append(line)
        if marker in line:
            break
    return out


def run_train(cfg: TrainConfig, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m train` on cfg (8 CPU devices) to its end."""
    args = cli_args(dataclasses.replace(cfg, cpu_devices=8, platform="cpu"))
    return subprocess.run([sys.executable, "-m", "train", *args], cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=timeout)


def two_processes(cfg: TrainConfig, logs: Path, timeout: float) -> list[str]:
    """`python -m train` on cfg as 2 processes (jax.distributed over a local coordinator; output in
    logs/process_{0,1}.log); both must exit 0 within `timeout` seconds (a hang is killed). Their outputs."""
    with socket.socket() as s:  # a free port for the coordinator
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    paths = [logs / f"process_{i}.log" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-m", "train", *cli_args(cfg), "--coordinator", f"localhost:{port}",
                               "--num-processes", "2", "--process-id", str(i)],
                              cwd=ROOT, env=env(), stdout=path.open("w"), stderr=subprocess.STDOUT)
             for i, path in enumerate(paths)]
    try:
        for p in procs:
            p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            p.kill()
            p.wait()
    outs = [path.read_text() for path in paths]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outs)
    return outs
