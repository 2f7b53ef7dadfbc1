"""Checkpointer (orbax + Grain iterator state), the optimiser schedule, metrics JSONL, MFU and the plot."""

from __future__ import annotations

import json

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import metrics, optim
from train.checkpoint import Checkpointer, abstract_like
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


def test_schedule_is_the_lasp_papers():
    cfg = TrainConfig()
    lr = optim.learning_rate(cfg)
    assert float(lr(0)) == 0.0
    assert float(lr(1000)) == pytest.approx(2.5e-4)
    assert float(lr(2000)) == pytest.approx(5e-4)
    assert float(lr(26000)) == pytest.approx(5e-4 * (0.1 + 0.9 * 0.5), rel=1e-4)  # cosine midpoint
    assert float(lr(50000)) == pytest.approx(5e-5) and float(lr(80000)) == pytest.approx(5e-5)


def test_optimizer_clips_and_decays_only_matrices():
    cfg = TrainConfig(lr=1.0, warmup_steps=0, decay_steps=10, weight_decay=0.5, clip_norm=1.0)
    tx = optim.make_optimizer(cfg)
    params = {"m": jnp.ones((2, 2)), "v": jnp.ones(2)}
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    np.testing.assert_allclose(updates["m"], -0.5 * np.ones((2, 2)))  # lr * wd * p: decayed
    np.testing.assert_allclose(updates["v"], 0.0)  # vectors are not
    huge = {"m": jnp.full((2, 2), 1e6), "v": jnp.full(2, 1e6)}
    clipped = optax_clip_norm(huge)
    assert clipped == pytest.approx(1.0, rel=1e-5)


def optax_clip_norm(grads):
    import optax

    clipped, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
    return float(optax.tree.norm(clipped))


def test_flops_and_mfu():
    f = metrics.flops_per_token(1_000_000, n_linear_layers=2, n_heads=4, head_dim=16)
    assert f == 6e6 + 6 * 2 * 4 * 2 * 16 * 16
    assert metrics.flops_per_token(0, 0, 4, 16, n_softmax_layers=1, seq_len=100) == 6 * 4 * 100 * 16
    assert metrics.peak_tflops("NVIDIA H200") == 989.4 and metrics.peak_tflops("cpu") is None
    assert metrics.peak_tflops("cpu", 2.0) == 2.0
    speed = metrics.Throughput(tokens_per_step=1000, flops_per_token=1e9, n_devices=2, peak=1.0)
    speed.step()
    out = speed.measure()
    assert out["tokens_per_s"] > 0
    assert out["mfu"] == pytest.approx(out["tokens_per_s"] * 1e9 / 2e12)


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
