"""End-to-end training on 8 forced CPU devices: sequence/data parallel runs agree, SIGKILL-and-resume and
SIGTERM/SIGINT-save-and-resume are exact, two processes equal one, a NaN stops the run with its step named, bad
configs fail before any work."""

from __future__ import annotations

import dataclasses
import json
import signal

import numpy as np
import pytest
from flax import nnx

import models

from tests.train.helpers import (STEPS, losses, read_until_ready, run_train, saved_steps,
                                 start_hooked, tiny, two_processes)
from train import loop
from train.tokenizer import ByteTokenizer


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
    got = loop.train(tiny(tmp_path, mesh=mesh, mesh_axis_type=axis_type)).losses
    np.testing.assert_allclose([got[s] for s in range(1, STEPS + 1)],
                               [reference[s] for s in range(1, STEPS + 1)], rtol=2e-5)


def test_sigkill_and_resume_gives_the_same_losses(reference, tmp_path):
    run_dir = tmp_path / "run"
    cfg = tiny(run_dir)
    proc = start_hooked(cfg, at=13, action="block")
    out = read_until_ready(proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "".join(out)
    assert max(losses(run_dir)) == 13
    saved = saved_steps(run_dir)
    # Step 10's asynchronous save may still have been in flight (an orbax tmp dir, ignored on restore).
    assert saved in ([5], [5, 10])

    done = run_train(cfg)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"resumed at step {saved[-1]}" in done.stdout
    got = losses(run_dir)
    assert [got[s] for s in range(1, STEPS + 1)] == [reference[s] for s in range(1, STEPS + 1)]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_a_signal_saves_the_current_step_and_resume_is_exact(reference, tmp_path, sig):
    """SIGTERM (a scheduler's preemption) or SIGINT (Ctrl-C) after step 13: the run saves step 13 (not a
    multiple of ckpt_every) and exits with 128 + the signal's number; a rerun continues exactly (from SIGTERM's
    save: the loop handles both signals alike, so SIGINT's rerun, ~15 s, would check nothing more)."""
    run_dir = tmp_path / "run"
    cfg = tiny(run_dir)
    proc = start_hooked(cfg, at=13, action="await_signal")
    out = read_until_ready(proc)
    proc.send_signal(sig)
    out += proc.communicate(timeout=60)[0]
    assert proc.returncode == 128 + sig, "".join(out)
    assert f"stopped by {sig.name} after step 13: checkpoint step 13 saved" in "".join(out)
    assert saved_steps(run_dir) == [10, 13] and max(losses(run_dir)) == 13
    if sig != signal.SIGTERM:
        return

    done = run_train(cfg)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resumed at step 13" in done.stdout
    got = losses(run_dir)
    assert [got[s] for s in range(1, STEPS + 1)] == [reference[s] for s in range(1, STEPS + 1)]


def test_two_processes_match_one(reference, tmp_path):
    """2 processes x 4 CPU devices (gloo collectives) train like one process with 8."""
    cfg = dataclasses.replace(tiny(tmp_path / "run"), cpu_devices=4, platform="cpu")
    outs = two_processes(cfg, tmp_path, 300)
    assert "on 8 cpu devices" in outs[0]
    got = losses(tmp_path / "run")
    np.testing.assert_allclose([got[s] for s in range(1, STEPS + 1)],
                               [reference[s] for s in range(1, STEPS + 1)], rtol=2e-5)


def test_non_finite_loss_stops_the_run_and_keeps_the_good_checkpoint(tmp_path):
    cfg = tiny(tmp_path, mesh="data=1,seq=1", lr=1e6, warmup_steps=0, ckpt_every=1, steps=8)
    with pytest.raises(loop.NonFiniteLoss, match=r"at step (\d+); stopping \(the newest checkpoint, step") as e:
        loop.train(cfg)
    bad = int(str(e.value).split("at step ")[1].split(";")[0])
    saved = saved_steps(tmp_path)
    assert saved and max(saved) == bad - 1
    meta = json.loads((tmp_path / "checkpoints" / str(bad - 1) / "meta" / "metadata").read_text())
    assert np.isfinite(meta["loss"])


@pytest.mark.parametrize("changes, message", [
    ({"mesh": "data=4,seq=4"}, "needs 16 devices but 8 are available"),
    ({"seq_len": 30}, "seq_len 30 is not divisible by the seq axis size 4"),
    ({"batch_size": 3}, "batch_size 3 is not divisible by the data axis size 2"),
    ({"data": ("/nonexistent/data.jsonl",)}, "path '/nonexistent/data.jsonl' does not exist"),
])
def test_bad_configs_fail_up_front(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        loop.train(tiny(tmp_path, **changes))
    assert not (tmp_path / "checkpoints").exists()


def test_token_ids_beyond_the_vocabulary_are_an_error(tmp_path):
    np.arange(4000, dtype=np.uint16).tofile(tmp_path / "ids.bin")
    with pytest.raises(ValueError, match="token id in the batch of step 1 is >= the model's vocabulary 1024"):
        loop.train(tiny(tmp_path, data=(str(tmp_path / "ids.bin"),), vocab_size=1000, mesh="data=1,seq=1",
                        documents="continuous"))  # token-id files have no known separator to reset at


def test_too_little_data_fails_up_front(tmp_path):
    (tmp_path / "small.txt").write_text("x = 1\n" * 20)
    with pytest.raises(ValueError, match="fewer than one batch of 4"):
        loop.train(tiny(tmp_path, data=(str(tmp_path / "small.txt"),)))


@pytest.mark.parametrize("documents, separator", [("reset", ByteTokenizer.eos_id), ("continuous", None)])
def test_the_sample_separates_documents_as_training_did(tmp_path, monkeypatch, documents, separator):
    """documents="reset" samples with the tokenizer's eos_id as generate's separator (a document ends there, as in
    the packed training rows); "continuous" with none."""
    cfg = tiny(tmp_path, documents=documents, sample_tokens=3, sample_prompt="")
    model = models.build_model(cfg.model.replace(vocab_size=ByteTokenizer.vocab_size), rngs=nnx.Rngs(0))
    separators, generate = [], models.generate
    monkeypatch.setattr(models, "generate", lambda *a, **k: separators.append(k["separator"]) or generate(*a, **k))
    text = loop.sample_text(*nnx.split((model,)), ByteTokenizer(), cfg)
    assert separators == [separator] and isinstance(text, str)
