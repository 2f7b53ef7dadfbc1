"""End-to-end training on 8 forced CPU devices: sequence/data parallel runs agree, SIGKILL-and-resume is exact,
two processes equal one, a NaN stops the run with its step named, bad configs fail before any work."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from train import loop
from train.config import TrainConfig
from train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
STEPS = 20


def tiny(run_dir, **changes) -> TrainConfig:
    """A ~20K-parameter TNL on the first 200 KB of the standard library, 20 steps, float32."""
    base = TrainConfig(
        model="tnl-tiny", model_overrides={"d_model": 32, "n_layers": 2, "n_heads": 2, "mlp_hidden": 64,
                                           "ce_chunk": 16},
        run_dir=str(run_dir), steps=STEPS, mesh="data=2,seq=4", data=("stdlib",), max_data_bytes=200_000,
        seq_len=32, batch_size=4, val_fraction=0.05, lr=3e-3, warmup_steps=5, decay_steps=STEPS,
        compute_dtype="float32", ckpt_every=5, ckpt_keep=2, log_every=1, eval_every=0, eval_batches=1,
        progress=False, sample_tokens=0, data_threads=1)
    return dataclasses.replace(base, **changes)


def _cli_args(cfg: TrainConfig) -> list[str]:
    """The command line that reproduces cfg on top of the default config."""
    args = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name == "model_overrides":
            args += [a for k, v in value.items() for a in ("--set", f"model.{k}={v}")]
        elif isinstance(value, tuple):
            args += ["--set", f"{f.name}={','.join(value)}"]
        else:
            args += ["--set", f"{f.name}={value}"]
    return args


def _losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if r["kind"] == "train"}


def _env():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("XLA_FLAGS", None)  # each subprocess forces its own device count through cpu_devices
    return env


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The data=2 x seq=4 run every other run is compared with."""
    result = loop.train(tiny(tmp_path_factory.mktemp("ref")))
    assert sorted(result.losses) == list(range(1, STEPS + 1))
    return result.losses


def test_loss_falls(reference):
    assert np.mean([reference[s] for s in range(16, 21)]) < reference[1] - 0.5


@pytest.mark.parametrize("mesh, axis_type", [("data=1,seq=1", "auto"), ("data=1,seq=4", "auto"),
                                             ("data=2,seq=4", "explicit")])
def test_sequence_parallel_runs_match(reference, tmp_path, mesh, axis_type):
    """One device, seq=4, and data=2 x seq=4 on an Explicit mesh give the reference's (data=2 x seq=4, Auto)
    20 losses."""
    losses = loop.train(tiny(tmp_path, mesh=mesh, mesh_axis_type=axis_type)).losses
    np.testing.assert_allclose([losses[s] for s in range(1, STEPS + 1)],
                               [reference[s] for s in range(1, STEPS + 1)], rtol=2e-5)


_KILLABLE = textwrap.dedent("""
    # Runs `python -m train ARGS`, but blocks forever after logging step KILL_AT (the parent then SIGKILLs it).
    import os, sys, time
    from train import metrics
    write = metrics.MetricsLog.write
    def write_then_block(self, step, kind, **values):
        write(self, step, kind, **values)
        if kind == "train" and step == int(os.environ["KILL_AT"]):
            print("READY_TO_KILL", flush=True)
            time.sleep(3600)
    metrics.MetricsLog.write = write_then_block
    from train.__main__ import main
    sys.exit(main(sys.argv[1:]))
""")


def test_sigkill_and_resume_gives_the_same_losses(reference, tmp_path):
    run_dir = tmp_path / "run"
    cfg = tiny(run_dir)
    args = _cli_args(dataclasses.replace(cfg, cpu_devices=8, platform="cpu"))
    proc = subprocess.Popen([sys.executable, "-c", _KILLABLE, *args], cwd=ROOT, env=dict(_env(), KILL_AT="13"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = []
    for line in proc.stdout:
        out.append(line)
        if "READY_TO_KILL" in line:
            proc.send_signal(signal.SIGKILL)
            break
    assert proc.wait(timeout=60) == -signal.SIGKILL, "".join(out)
    assert max(_losses(run_dir)) == 13
    saved = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    # Step 10's asynchronous save may still have been in flight (an orbax tmp dir, ignored on restore).
    assert saved in ([5], [5, 10])

    done = subprocess.run([sys.executable, "-m", "train", *args], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"resumed at step {saved[-1]}" in done.stdout
    losses = _losses(run_dir)
    assert [losses[s] for s in range(1, STEPS + 1)] == [reference[s] for s in range(1, STEPS + 1)]


def test_two_processes_match_one(reference, tmp_path):
    """2 processes x 4 CPU devices (gloo collectives) train like one process with 8."""
    cfg = dataclasses.replace(tiny(tmp_path / "run"), cpu_devices=4, platform="cpu")
    with socket.socket() as s:  # a free port for the coordinator
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-m", "train", *_cli_args(cfg), "--coordinator",
                               f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)],
                              cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outs)
    assert "on 8 cpu devices" in outs[0]
    losses = _losses(tmp_path / "run")
    np.testing.assert_allclose([losses[s] for s in range(1, STEPS + 1)],
                               [reference[s] for s in range(1, STEPS + 1)], rtol=2e-5)


def test_non_finite_loss_stops_the_run_and_keeps_the_good_checkpoint(tmp_path):
    cfg = tiny(tmp_path, mesh="data=1,seq=1", lr=1e6, warmup_steps=0, ckpt_every=1, steps=8)
    with pytest.raises(loop.NonFiniteLoss, match=r"at step (\d+); stopping \(the newest checkpoint, step") as e:
        loop.train(cfg)
    bad = int(str(e.value).split("at step ")[1].split(";")[0])
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and max(saved) == bad - 1
    meta = json.loads((tmp_path / "checkpoints" / str(bad - 1) / "meta" / "metadata").read_text())
    assert np.isfinite(meta["loss"])


@pytest.mark.parametrize("changes, message", [
    ({"mesh": "data=4,seq=4"}, "needs 16 devices but 8 are available"),
    ({"seq_len": 30}, "seq_len 30 is not divisible by the seq axis size 4"),
    ({"batch_size": 3}, "batch_size 3 is not divisible by the data axis size 2"),
    ({"data": ("/nonexistent/data.jsonl",)}, "path '/nonexistent/data.jsonl' does not exist"),
    ({"model": "tnl-huge"}, "unknown model config 'tnl-huge'"),
    ({"model_overrides": {"vocab_size": 100}}, "smaller than the data's 257 token ids"),
])
def test_bad_configs_fail_up_front(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        loop.train(tiny(tmp_path, **changes))
    assert not (tmp_path / "checkpoints").exists()


def test_token_ids_beyond_the_vocabulary_are_an_error(tmp_path):
    np.arange(4000, dtype=np.uint16).tofile(tmp_path / "ids.bin")
    with pytest.raises(ValueError, match="token id in the batch of step 1 is >= the model's vocabulary 1024"):
        loop.train(tiny(tmp_path, data=(str(tmp_path / "ids.bin"),), vocab_size=1000, mesh="data=1,seq=1"))


def test_too_little_data_fails_up_front(tmp_path):
    (tmp_path / "small.txt").write_text("x = 1\n" * 20)
    with pytest.raises(ValueError, match="fewer than one batch of 4"):
        loop.train(tiny(tmp_path, data=(str(tmp_path / "small.txt"),)))
