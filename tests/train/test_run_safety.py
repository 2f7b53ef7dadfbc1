"""What protects a run and its directory: failed saves end the run, one run per directory, damaged checkpoints
are skipped on resume, non-finite states are never saved, resumes that would not be exact are refused."""

from __future__ import annotations

import dataclasses
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tests.train.helpers import (ROOT, env, losses, read_until_ready, run_train, saved_steps,
                                 start_hooked, tiny, two_processes)
from train import loop
from train.checkpoint import Checkpointer

FAST = {"mesh": "data=1,seq=1", "steps": 10, "ckpt_keep": 3}  # one device: the quickest compile


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 10-step run with checkpoints 5 and 10 and its losses; tests copy it before changing it."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    result = loop.train(tiny(run_dir, **FAST))
    assert saved_steps(run_dir) == [5, 10]
    return run_dir, result.losses


def _copy(trained, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained[0], run_dir)
    return run_dir


def test_a_failing_save_ends_the_run_within_seconds(tmp_path):
    """The checkpoint directory becomes a file after step 3 (root ignores permissions, so a read-only directory
    would not fail here); step 5's save fails. Before, orbax's background thread logged the error and the main
    thread blocked for minutes waiting for a signal; now the run exits 4 naming the step."""
    cfg = tiny(tmp_path / "run", **FAST)
    begin = time.monotonic()
    proc = start_hooked(cfg, at=3, action="break_checkpoints")
    out = proc.communicate(timeout=150)[0]
    assert proc.returncode == 4, out
    assert "error: saving checkpoint step 5 in" in out and "Not a directory" in out
    assert len(out.splitlines()) < 10, out  # the model line and the error, no traceback
    assert max(losses(tmp_path / "run")) == 5
    print(f"failed run took {time.monotonic() - begin:.1f} s")


_HOLD_LOCK = """
import sys, time
from train.checkpoint import RunDirLock
RunDirLock(sys.argv[1]).acquire()
print("LOCKED", flush=True)
time.sleep(3600)
"""


def test_a_run_dir_in_use_is_refused_and_a_killed_runs_lock_taken_over(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(run_dir)], cwd=ROOT, env=env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "LOCKED"
        with pytest.raises(ValueError, match=rf"is in use by another run \(pid {holder.pid} on host "):
            loop.train(tiny(run_dir, **FAST | {"steps": 2}))
        assert not (run_dir / "checkpoints").exists() and not (run_dir / "config.json").exists()
    finally:
        holder.kill()
        holder.wait()
    loop.train(tiny(run_dir, **FAST | {"steps": 2}))  # the kernel dropped the killed holder's lock
    assert f"took over the lock of run_dir {str(run_dir)!r} left by pid {holder.pid}" in capsys.readouterr().out
    assert saved_steps(run_dir) == [2]
    assert (run_dir / ".lock").read_text() == ""  # released at the end


def _damage(step_dir, how):
    state = step_dir / "state"
    if how == "truncated data file":
        biggest = max((p for p in state.rglob("*") if p.is_file() and "d" in p.parts), key=lambda p: p.stat().st_size)
        biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    elif how == "deleted data file":
        for p in state.rglob("*"):
            if p.is_file() and "d" in p.parts:
                p.unlink()
    elif how == "missing manifest":
        (state / "manifest.ocdbt").unlink()
    elif how == "missing metadata":
        (step_dir / "meta" / "metadata").unlink()
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how, why", [
    ("truncated data file", "OUT_OF_RANGE: Error reading"), ("deleted data file", "NOT_FOUND: Error opening"),
    ("missing manifest", "NOT_FOUND: Error opening"), ("missing metadata", "FileNotFoundError"),
])
def test_a_damaged_newest_checkpoint_is_skipped_and_resume_stays_exact(trained, tmp_path, capsys, how, why):
    """Step 10 damaged: resume says why it skipped it (one line, not tensorstore's spec), sets it aside,
    continues from step 5 with the losses of the uninterrupted run, and saves step 10 again."""
    run_dir = _copy(trained, tmp_path)
    _damage(run_dir / "checkpoints" / "10", how)
    result = loop.train(tiny(run_dir, **FAST))
    out = capsys.readouterr().out
    warning = [line for line in out.splitlines() if line.startswith("warning: skipped checkpoint step 10,")]
    assert len(warning) == 1 and why in warning[0] and len(warning[0]) < 500, out
    assert result.start_step == 5 and "resumed at step 5" in out
    assert [result.losses[s] for s in range(6, 11)] == [trained[1][s] for s in range(6, 11)]
    assert saved_steps(run_dir) == [5, 10] and (run_dir / "checkpoints" / "10.unrestorable").is_dir()


def test_non_finite_parameters_are_never_saved(tmp_path, monkeypatch):
    """Parameters turned NaN by step 3's update while its loss (of step 3's inputs) is finite: step 3 is not
    saved, the run stops naming step 3, and only step 2, which is intact, is called so."""
    make_steps = loop.make_steps
    calls = []

    def poisoned(graphdef):
        train_step, eval_step = make_steps(graphdef)

        def step(state, batch):
            state, out = train_step(state, batch)
            calls.append(1)
            if len(calls) == 3:
                state = jax.tree.map(lambda x: x * np.nan if np.issubdtype(x.dtype, np.floating) else x, state)
            return state, out
        return step, eval_step

    monkeypatch.setattr(loop, "make_steps", poisoned)
    with pytest.raises(loop.NonFiniteLoss, match=r"non-finite parameters or optimizer state \(loss [0-9.]+\) at "
                                                 r"step 3; stopping \(the newest checkpoint, step 2, is intact\)"):
        loop.train(tiny(tmp_path, **FAST | {"ckpt_every": 1}))
    assert saved_steps(tmp_path) == [1, 2]


def test_a_run_dir_that_is_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "run").write_text("")
    with pytest.raises(ValueError, match="run_dir '.*run' is a file, not a directory"):
        loop.train(tiny(tmp_path / "run", **FAST))
    with pytest.raises(ValueError, match="run_dir '.*run/sub' cannot be created: Not a directory"):
        loop.train(tiny(tmp_path / "run" / "sub", **FAST))


def test_steps_below_the_newest_checkpoint_are_refused(trained, tmp_path, capsys):
    run_dir = _copy(trained, tmp_path)
    with pytest.raises(ValueError, match=r"steps=7 is below the newest checkpoint's step 10"):
        loop.train(tiny(run_dir, **FAST | {"steps": 7}))
    assert loop.train(tiny(run_dir, **FAST)).losses == {}  # steps == the checkpoint: done, and said so
    assert "the run is complete: its newest checkpoint is step 10 = steps" in capsys.readouterr().out


def test_a_resume_with_another_data_order_is_refused(trained, tmp_path):
    """seq_len, batch_size and data_seed all changed: the error names each with its saved and its new value."""
    run_dir = _copy(trained, tmp_path)
    with pytest.raises(ValueError, match=r"trained with other data settings \(seq_len=32 -> 16, batch_size=4 -> 8, "
                                         r"data_seed=0 -> 1\); resuming would not continue its data order"):
        loop.train(tiny(run_dir, **FAST | {"steps": 12, "seq_len": 16, "batch_size": 8, "data_seed": 1}))
    assert saved_steps(run_dir) == [5, 10]


def test_a_refused_resume_restores_nothing_and_sets_nothing_aside(trained, tmp_path, monkeypatch):
    """Step 10 damaged and data_seed changed: the resume is refused from the newest checkpoint's meta alone,
    before any restore (before: step 5 was restored and step 10 renamed .unrestorable, then it was refused)."""
    run_dir = _copy(trained, tmp_path)
    _damage(run_dir / "checkpoints" / "10", "truncated data file")
    monkeypatch.setattr(Checkpointer, "restore_newest",
                        lambda *args: pytest.fail("a checkpoint was restored before the resume was checked"))
    with pytest.raises(ValueError, match=r"the checkpoint of step 10 .* was trained with other data settings "
                                         r"\(data_seed=0 -> 1\)"):
        loop.train(tiny(run_dir, **FAST | {"data_seed": 1}))
    assert saved_steps(run_dir) == [5, 10] and not (run_dir / "checkpoints" / "10.unrestorable").exists()


def test_a_second_sigterm_still_lets_the_save_finish(tmp_path):
    """Two SIGTERMs after step 3, the second once the first is handled: step 3 is still saved and the run
    exits 143 (before: the first restored the default handler, so the second killed the run unsaved)."""
    run_dir = tmp_path / "run"
    proc = start_hooked(tiny(run_dir, **FAST), at=3, action="await_signal", signals=2)
    try:
        out = read_until_ready(proc)
        proc.send_signal(signal.SIGTERM)
        out += read_until_ready(proc, "HANDLED 1")
        proc.send_signal(signal.SIGTERM)
        out += proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, "".join(out)
    assert "stopped by SIGTERM after step 3: checkpoint step 3 saved" in "".join(out)
    assert saved_steps(run_dir) == [3]


def _two_processes(cfg, logs) -> list[str]:
    """cfg as 2 processes x 1 CPU device on a data=2 mesh (each process reads and checkpoints its own rows), within
    150 s (`helpers.two_processes`)."""
    return two_processes(dataclasses.replace(cfg, mesh="data=2,seq=1", cpu_devices=1, platform="cpu"), logs, 150)


def test_a_checkpoint_one_host_cannot_read_is_skipped_by_both(tmp_path):
    """Two processes; step 10's data position of process 1 is deleted, so on resume only process 1 fails to
    read step 10 (inside orbax's restore, before its closing barrier). Both skip it and resume from step 5 with
    the first run's losses (before, process 0 went on to step 10's checksums while process 1 read step 5, and
    their collectives no longer paired up)."""
    run_dir = tmp_path / "run"
    cfg = tiny(run_dir, steps=10)
    _two_processes(cfg, tmp_path)
    first = losses(run_dir)
    (run_dir / "checkpoints" / "10" / "data" / "process_1-of-2.json").unlink()
    outs = _two_processes(cfg, tmp_path)
    assert "warning: skipped checkpoint step 10, which cannot be restored (another process could not restore it)" \
        in outs[0] and "resumed at step 5" in outs[0], outs[0]
    assert losses(run_dir) == first and saved_steps(run_dir) == [5, 10]


def test_no_restorable_checkpoint_exits_4_with_a_short_message(trained, tmp_path):
    """From the command line: `error: ...` naming each checkpoint's failure, no traceback, a few lines."""
    run_dir = _copy(trained, tmp_path)
    for step in (5, 10):
        _damage(run_dir / "checkpoints" / str(step), "truncated data file")
    done = run_train(tiny(run_dir, **FAST))
    assert done.returncode == 4, done.stderr
    assert "Traceback" not in done.stderr
    assert re.search(r"error: no checkpoint in .* can be restored: step 10: ValueError: OUT_OF_RANGE: .*; step 5: "
                     r"ValueError: OUT_OF_RANGE: ", done.stderr), done.stderr
    assert len(done.stderr.splitlines()) < 20, done.stderr
