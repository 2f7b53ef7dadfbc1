"""Checkpointer (orbax + Grain iterator state), the optimiser schedule, metrics JSONL, MFU and the plot."""

from __future__ import annotations

import errno
import json
import os
import shutil
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from models.config import ModelConfig
from train import checkpoint, metrics, optim
from train.checkpoint import CheckpointError, Checkpointer, NonFiniteState, abstract_like, state_digest
from train.config import TrainConfig


def _iter():
    return iter(grain.MapDataset.range(100).shuffle(seed=0).batch(4).to_iter_dataset())


def test_checkpoint_restores_state_and_iterator_and_keeps_k(tmp_path):
    ckpt = Checkpointer(tmp_path, every=2, keep=2)
    state = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.asarray(0)}
    it = _iter()
    saved = []
    for step in range(1, 7):
        next(it)
        state = {"w": state["w"] + 1, "step": jnp.asarray(step)}
        if ckpt.save(step, state, it, {"step": step, "loss": 1.0 / step}):
            saved.append(step)
    ckpt.wait()
    assert saved == [2, 4, 6] and ckpt.latest_step() == 6
    assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [4, 6]  # keep 2
    expect_next = next(it)
    fresh = _iter()
    restored, meta = ckpt.restore(6, abstract_like(state), fresh)
    assert meta["step"] == 6 and meta["loss"] == pytest.approx(1 / 6)
    np.testing.assert_array_equal(restored["w"], state["w"])
    np.testing.assert_array_equal(next(fresh), expect_next)
    ckpt.close()


def test_checkpoint_refuses_a_non_finite_loss(tmp_path):
    ckpt = Checkpointer(tmp_path, every=1, keep=2)
    it = _iter()
    assert ckpt.save(1, {"w": jnp.ones(2)}, it, {"step": 1, "loss": 2.0})
    with pytest.raises(ValueError, match="refusing to checkpoint step 2: loss is nan"):
        ckpt.save(2, {"w": jnp.full(2, jnp.nan)}, it, {"step": 2, "loss": float("nan")})
    ckpt.wait()
    assert ckpt.latest_step() == 1
    ckpt.close()


def test_checkpoint_refuses_non_finite_parameters(tmp_path):
    """A finite loss but an inf in the state (lr=1e39's first update): nothing is written."""
    ckpt = Checkpointer(tmp_path, every=1, keep=2)
    with pytest.raises(NonFiniteState, match="refusing to checkpoint step 1: the parameters or optimizer state"):
        ckpt.save(1, {"w": jnp.asarray([1.0, jnp.inf]), "step": jnp.asarray(1)}, _iter(), {"step": 1, "loss": 2.0})
    ckpt.wait()
    assert ckpt.latest_step() is None
    ckpt.close()


def test_checksums_do_not_depend_on_the_sharding_and_see_one_flipped_bit():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 16)), jnp.float32)
    mesh = jax.make_mesh((2, 4), ("a", "b"))
    sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("a", "b")))
    tree = {"x": x, "h": x.astype(jnp.bfloat16), "n": jnp.arange(5)}
    assert state_digest(tree) == state_digest({**tree, "x": sharded})
    bits = np.asarray(x).view(np.uint32).copy()
    weights = 2 * np.arange(bits.size, dtype=np.uint64) + 1  # the module docstring's sum, in exact integers
    assert state_digest(tree)[1]["['x']"] == int((bits.ravel().astype(np.uint64) * weights).sum() % 2**32)
    for index, bit in [(0, 0), (77, 31), (127, 12)]:
        flipped = bits.copy()
        flipped.flat[index] ^= np.uint32(1 << bit)
        assert state_digest({**tree, "x": jnp.asarray(flipped.view(np.float32))})[1] != state_digest(tree)[1]


def test_restore_skips_a_checkpoint_whose_arrays_changed_silently(tmp_path):
    """Step 2's state files are replaced by valid ones holding one flipped bit (what a silent disk error
    leaves): its checksums no longer match, so restore falls back to step 1 and says why."""
    state = {"w": jnp.arange(6.0)}
    flipped = {"w": jnp.asarray(np.asarray(state["w"]).view(np.uint32) ^ np.uint32(1 << 3)).view(jnp.float32)}
    ckpt = Checkpointer(tmp_path / "run", every=1, keep=3)
    other = Checkpointer(tmp_path / "other", every=1, keep=3)
    for step in (1, 2):
        ckpt.save(step, state, _iter(), {"step": step, "loss": 1.0})
    other.save(2, flipped, _iter(), {"step": 2, "loss": 1.0})
    ckpt.wait()
    other.wait()
    target = tmp_path / "run" / "2" / "state"
    shutil.rmtree(target)
    shutil.copytree(tmp_path / "other" / "2" / "state", target)
    restored = ckpt.restore_newest(abstract_like(state), _iter())
    assert restored.step == 1
    assert restored.skipped == [(2, "CheckpointError: 1 of 1 arrays differ from their saved checksums (silent "
                                    "corruption), e.g. ['w']")]
    np.testing.assert_array_equal(restored.state["w"], state["w"])
    ckpt.close()
    other.close()


def test_a_step_another_process_cannot_restore_is_skipped_by_every_process(tmp_path, monkeypatch):
    """Multi-host resume, simulated on one process: step 2 reads here but not on another host. Every process
    skips it (before, each decided alone: this one went on to step 2's checksum collectives while the other
    restored step 1, and both hung); the processes agree after each read and each verification."""
    state = {"w": jnp.arange(6.0)}
    ckpt = Checkpointer(tmp_path, every=1, keep=3)
    for step in (1, 2):
        ckpt.save(step, state, _iter(), {"step": step, "loss": 1.0})
    ckpt.wait()
    votes = []

    def another_host_fails_step_2(ok):  # checkpoint.every_process with the other host's vote on step 2 a no
        votes.append(ok)
        return ok and len(votes) != 1

    monkeypatch.setattr(checkpoint, "every_process", another_host_fails_step_2)
    restored = ckpt.restore_newest(abstract_like(state), _iter())
    assert restored.step == 1 and restored.skipped == [(2, "another process could not restore it")]
    assert votes[:3] == [True, True, True]  # this process read step 2; read step 1, verified it
    assert (tmp_path / "2.unrestorable").is_dir() and ckpt.latest_step() == 1
    ckpt.close()


def test_a_step_set_aside_twice_keeps_both_and_a_failed_rename_is_a_checkpoint_error(tmp_path, monkeypatch):
    """Step 2 unreadable when 2.unrestorable already exists (the same step went bad before): it goes to
    2.unrestorable.1 (before: OSError ENOTEMPTY, a traceback and exit 1). A rename that fails is a
    CheckpointError (exit 4)."""
    state = {"w": jnp.arange(6.0)}
    ckpt = Checkpointer(tmp_path, every=1, keep=3)
    (tmp_path / "2.unrestorable").mkdir()
    (tmp_path / "2.unrestorable" / "earlier").write_text("kept")
    for attempt in range(2):
        for step in (1, 2) if attempt == 0 else (2,):
            ckpt.save(step, state, _iter(), {"step": step, "loss": 1.0})
        ckpt.wait()
        (tmp_path / "2" / "meta" / "metadata").unlink()
        if attempt == 0:
            assert ckpt.restore_newest(abstract_like(state), _iter()).step == 1
    assert (tmp_path / "2.unrestorable" / "earlier").read_text() == "kept"
    assert (tmp_path / "2.unrestorable.1" / "state").is_dir()

    def refused(self, target):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(type(tmp_path), "rename", refused)
    with pytest.raises(CheckpointError, match=r"cannot set aside unrestorable checkpoint step 2 in .*: "
                                              r"PermissionError: \[Errno 13\] Permission denied"):
        ckpt.restore_newest(abstract_like(state), _iter())
    ckpt.close()


def test_a_save_into_a_vanished_directory_fails_at_once(tmp_path):
    """The directory replaced by a file under a running Checkpointer: the save raises within seconds (with
    orbax's asynchronous directory creation it blocked for minutes)."""
    ckpt = Checkpointer(tmp_path / "c", every=1, keep=2)
    shutil.rmtree(tmp_path / "c")
    (tmp_path / "c").write_text("")
    begin = time.monotonic()
    with pytest.raises(CheckpointError, match=r"saving checkpoint step 1 in .* failed: NotADirectoryError"):
        ckpt.save(1, {"w": jnp.ones(2)}, _iter(), {"step": 1, "loss": 1.0})
    assert time.monotonic() - begin < 10


def test_a_save_failing_in_the_background_surfaces_at_the_next_save(tmp_path, monkeypatch):
    """A failure after save() returned (orbax's background finalize; ENOSPC here) is raised by the next save
    under the step that failed, at once."""
    ckpt = Checkpointer(tmp_path, every=1, keep=2)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt._manager, "_finalize", disk_full)
    assert ckpt.save(1, {"w": jnp.ones(2)}, _iter(), {"step": 1, "loss": 1.0})
    begin = time.monotonic()
    with pytest.raises(CheckpointError, match=r"saving checkpoint step 1 in .* failed: OSError: \[Errno 28\] No "
                                              r"space left on device"):
        ckpt.save(2, {"w": jnp.ones(2)}, _iter(), {"step": 2, "loss": 1.0})
    assert time.monotonic() - begin < 10
    ckpt.close()


def test_schedule_is_the_lasp_papers():
    cfg = TrainConfig()
    lr = optim.learning_rate(cfg)
    assert float(lr(0)) == 0.0
    assert float(lr(1000)) == pytest.approx(2.5e-4)
    assert float(lr(2000)) == pytest.approx(5e-4)
    assert float(lr(26000)) == pytest.approx(5e-4 * (0.1 + 0.9 * 0.5), rel=1e-4)  # cosine midpoint
    assert float(lr(50000)) == pytest.approx(5e-5) and float(lr(80000)) == pytest.approx(5e-5)


def test_optimizer_decays_only_matrices():
    cfg = TrainConfig(lr=1.0, warmup_steps=0, decay_steps=10, weight_decay=0.5, clip_norm=1.0)
    tx = optim.make_optimizer(cfg)
    params = {"m": jnp.ones((2, 2)), "v": jnp.ones(2)}
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    np.testing.assert_allclose(updates["m"], -0.5 * np.ones((2, 2)))  # lr * wd * p: decayed
    np.testing.assert_allclose(updates["v"], 0.0)  # vectors are not


@pytest.mark.parametrize("clip_norm", [1.0, 0.0])
def test_optimizer_clips_the_global_gradient_norm(clip_norm):
    """AdamW's first moment after one step is (1 - b1) * the gradient it was given: clipped to clip_norm by
    make_optimizer's chain, or the raw gradient with clip_norm=0 (off)."""
    cfg = TrainConfig(lr=1.0, warmup_steps=0, decay_steps=10, clip_norm=clip_norm)
    tx = optim.make_optimizer(cfg)
    params = {"m": jnp.ones((2, 2)), "v": jnp.ones(2)}
    grads = {"m": jnp.full((2, 2), 3.0), "v": jnp.full(2, 4.0)}  # global norm sqrt(4 * 9 + 2 * 16) = sqrt(68)
    _, state = tx.update(grads, tx.init(params), params)
    mu = optax.tree_utils.tree_get(state, "mu")
    expect = (1 - cfg.b1) * (clip_norm or np.sqrt(68.0))
    assert float(optax.tree.norm(mu)) == pytest.approx(expect, rel=1e-6)


def test_flops_and_mfu():
    """The model FLOPs of a linear model and of a hybrid (layer 1 softmax) from the config, and MFU from them;
    the loop's Throughput (per step, a batch's documents) and bench_train_gpu report the same figure."""
    linear = ModelConfig(n_layers=2, n_heads=4, head_dim=16)
    assert metrics.flops_per_token(linear, 1_000_000, seq_len=100) == 6e6 + 6 * 2 * 4 * 2 * 16 * 16
    hybrid = ModelConfig(n_layers=2, n_heads=4, head_dim=16, softmax_layers=(1,))
    assert metrics.flops_per_token(hybrid, 0, seq_len=100) == 6 * 4 * 2 * 16 * 16 + 6 * 4 * 100 * 16
    # Packed documents: the softmax term over each document's causal half. Rows [5, 3] and [8] (ids restart
    # wherever they change, an id met again is a new document): (25 + 9) / 8 and 64 / 8.
    assert metrics.attention_length([[4, 4, 4, 4, 4, 0, 0, 0], [1] * 8]) == ((25 + 9) / 8 + 8) / 2
    assert metrics.attention_length([[3, 0, 0, 3]]) == (1 + 4 + 1) / 4
    with pytest.raises(ValueError, match=r"non-empty \[B, T\] array, got shape \(4,\)"):
        metrics.attention_length([3, 0, 0, 3])
    # Mamba-2: the state is SSM heads x d_state x head dim (d_model 64, expand 2: 8 heads of 16, d_state 32)
    mamba = ModelConfig(kind="mamba2", d_model=64, n_layers=2, head_dim=16, d_state=32)
    assert mamba.linear_state_shape == (8, 32, 16)
    assert metrics.flops_per_token(mamba, 0, seq_len=100) == 6 * 2 * 8 * 2 * 32 * 16
    assert metrics.peak_tflops("NVIDIA H200") == 989.4 and metrics.peak_tflops("cpu") is None
    assert metrics.peak_tflops("cpu", 2.0) == 2.0
    assert metrics.mfu(1000.0, 1e9, n_devices=2, peak=1.0) == 0.5
    assert metrics.mfu(1000.0, 1e9, n_devices=2, peak=None) is None
    speed = metrics.Throughput(tokens_per_step=1000, flops_per_token=1e9, n_devices=2, peak=1.0)
    speed.step()
    out = speed.measure()
    assert out["tokens_per_s"] > 0
    assert out["mfu"] == pytest.approx(out["tokens_per_s"] * 1e9 / 2e12)
    speed.step(4e9)  # a step of its own FLOPs per token (a batch's documents), beside one at the default
    speed.step()
    out = speed.measure()
    assert out["mfu"] == pytest.approx(out["tokens_per_s"] * (4e9 + 1e9) / 2 / 2e12)
    unknown = metrics.Throughput(tokens_per_step=1000, flops_per_token=1e9, n_devices=2, peak=None)
    unknown.step()
    assert "tokens_per_s" in (out := unknown.measure()) and "mfu" not in out


def test_metrics_jsonl_keeps_the_last_record_per_step_and_plots(tmp_path):
    log = metrics.MetricsLog(tmp_path / "metrics.jsonl")
    for step, loss in [(1, 5.0), (2, 4.0), (3, 3.5), (2, 4.0), (3, 3.0)]:  # a resumed run replays steps 2-3
        log.write(step, "train", loss=loss, tokens_per_s=100.0 * step, mfu=0.1)
    log.write(3, "val", loss=3.2, perplexity=24.5)
    records = metrics.read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["kind"], r["loss"]) for r in records] == [(1, "train", 5.0), (2, "train", 4.0),
                                                                     (3, "train", 3.0), (3, "val", 3.2)]
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["kind"] == "train"
    from train.plot import main

    main([str(tmp_path)])
    png = (tmp_path / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_metrics_and_plot_survive_a_half_written_last_line(tmp_path):
    """A run killed mid-write leaves half a JSON line: reading skips it with a warning, the plot is drawn, and
    a resumed run's next record starts on a line of its own."""
    log = metrics.MetricsLog(tmp_path / "metrics.jsonl")
    for step in (1, 2):
        log.write(step, "train", loss=5.0 - step, tokens_per_s=100.0)
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 3, "kind": "tr')
    from train.plot import main

    with pytest.warns(UserWarning, match=r"skipped 1 damaged line\(s\) \(line 3\)"):
        main([str(tmp_path)])
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    metrics.MetricsLog(tmp_path / "metrics.jsonl").write(3, "train", loss=1.5)
    with pytest.warns(UserWarning, match=r"\(line 3\)"):
        records = metrics.read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in records] == [(1, 4.0), (2, 3.0), (3, 1.5)]
